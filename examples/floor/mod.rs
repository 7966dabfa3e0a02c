//! What the parts redeliver is built on cost on this machine, measured
//! alone (one core, no network): the floor that issue 14's targets are
//! ratios to. Shared by the benchmark programs (`#[path]` module).
//!
//! - sled: writing one accepted message's keys one batch per message, and
//!   256 messages per batch as redeliver's rounds do; the same with each
//!   message's removal after its receipt; one flush;
//! - XML: parsing one relayed-size stanza into xmpp-parsers' `Message`,
//!   and writing one back out.

#![allow(dead_code)] // each program uses its part

use std::str::FromStr;
use std::time::Instant;

use tokio_xmpp::minidom::Element;
use tokio_xmpp::parsers::message::Message;

pub const STANZA: &str = "<message xmlns='jabber:component:accept' from='s1@localhost/r' to='r1@relay.localhost' id='b0000012345' type='chat'><body>benchmark message      12345 of about a hundred bytes of body text here</body><request xmlns='urn:xmpp:receipts'/></message>";

/// The keys one accept writes (see src/store/sled_store/mod.rs), for
/// message `i`.
fn accept_writes(i: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
    let recipient = format!("r{}@localhost", i % 1000);
    let mut q = b"q".to_vec();
    q.extend_from_slice(recipient.as_bytes());
    q.push(0);
    q.extend_from_slice(&i.to_be_bytes());
    let mut a = b"a".to_vec();
    a.extend_from_slice(&i.to_be_bytes());
    let mut x = b"x".to_vec();
    x.extend_from_slice(&i.to_be_bytes());
    let mut id = b"i".to_vec();
    id.extend_from_slice(format!("{recipient}\0s{}@localhost\0b{i:010}", i % 50).as_bytes());
    let mut r = b"r".to_vec();
    r.extend_from_slice(recipient.as_bytes());
    vec![
        (q, STANZA.as_bytes().to_vec()),
        (a, recipient.clone().into_bytes()),
        (x, vec![7; 60]),
        (id, i.to_be_bytes().to_vec()),
        (r, vec![1; 12]),
        (b"g".to_vec(), vec![2; 12]),
    ]
}

/// Messages per second sled takes when each writes its accept's keys
/// and, with `confirm`, also the removal of an earlier message (queue
/// entry and age index gone, counters rewritten) as a receipt does.
pub fn sled_rate(per_batch: usize, n: u64, confirm: bool) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new()
        .path(dir.path())
        .cache_capacity(32 << 20)
        .flush_every_ms(Some(5))
        .open()
        .unwrap();
    let t0 = Instant::now();
    let mut batch = sled::Batch::default();
    let mut in_batch = 0;
    for i in 0..n {
        for (k, v) in accept_writes(i) {
            batch.insert(k, v);
        }
        if confirm && i >= 64 {
            let mut done = accept_writes(i - 64).into_iter();
            let (q, _) = done.next().unwrap();
            let (a, _) = done.next().unwrap();
            batch.remove(q);
            batch.remove(a);
            for (k, v) in done.skip(2) {
                batch.insert(k, v); // recipient state and totals again
            }
        }
        in_batch += 1;
        if in_batch == per_batch {
            db.apply_batch(std::mem::take(&mut batch)).unwrap();
            in_batch = 0;
        }
    }
    db.apply_batch(batch).unwrap();
    n as f64 / t0.elapsed().as_secs_f64()
}

pub fn flush_ms(rounds: u32) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new()
        .path(dir.path())
        .flush_every_ms(None)
        .open()
        .unwrap();
    let t0 = Instant::now();
    for i in 0..rounds {
        db.insert(i.to_be_bytes(), STANZA.as_bytes()).unwrap();
        db.flush().unwrap();
    }
    t0.elapsed().as_secs_f64() * 1000.0 / rounds as f64
}

pub fn per_stanza_us(n: u32, mut f: impl FnMut()) -> f64 {
    let t0 = Instant::now();
    for _ in 0..n {
        f();
    }
    t0.elapsed().as_secs_f64() * 1e6 / n as f64
}

/// XML in: stanza text to `Message`, µs.
pub fn parse_us(n: u32) -> f64 {
    per_stanza_us(n, || {
        let el = Element::from_str(STANZA).unwrap();
        std::hint::black_box(Message::try_from(el).unwrap());
    })
}

/// XML out: `Message` to stanza text, µs.
pub fn write_us(n: u32) -> f64 {
    let m = Message::try_from(Element::from_str(STANZA).unwrap()).unwrap();
    per_stanza_us(n, || {
        std::hint::black_box(String::from(&Element::from(m.clone())));
    })
}

/// The floor per relayed and confirmed message: one accept and one
/// removal in sled (256 per batch), one parse, one serialise.
pub struct Floor {
    /// sled accept + removal, messages per second.
    pub sled_life_rate: f64,
    pub parse_us: f64,
    pub write_us: f64,
}

impl Floor {
    pub fn measure() -> Floor {
        Floor {
            sled_life_rate: sled_rate(256, 50_000, true),
            parse_us: parse_us(50_000),
            write_us: write_us(50_000),
        }
    }

    /// CPU µs per message that nothing can save.
    pub fn per_message_us(&self) -> f64 {
        1e6 / self.sled_life_rate + self.parse_us + self.write_us
    }

    pub fn describe(&self) -> String {
        format!(
            "floor per message {:.1} µs (sled accept+removal {:.1} µs = {:.0}/s, parse {:.1} µs, \
             serialise {:.1} µs)",
            self.per_message_us(),
            1e6 / self.sled_life_rate,
            self.sled_life_rate,
            self.parse_us,
            self.write_us
        )
    }
}

/// CPU seconds (user + system, all threads) a process has used so far.
pub fn cpu_s(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
}
