//! The floor under benchmark 3: what the parts redeliver is built on cost
//! on this machine, measured alone, one core, no network:
//! - sled: writing one accepted message's keys (queue entry, age and
//!   expiry index, id index, counters) one batch per message, as
//!   redeliver did first, and 256 messages per batch, as its bursts do
//!   now; the same with each message's removal after its receipt; and
//!   one flush (the fsync a group commit shares);
//! - XML: parsing one relayed-size stanza into xmpp-parsers' `Message`,
//!   and writing one back out, as the link and the router do per message.
//!
//! `bash scripts/bench` runs it. Not a test.

use std::str::FromStr;
use std::time::Instant;

use tokio_xmpp::minidom::Element;
use tokio_xmpp::parsers::message::Message;

const STANZA: &str = "<message xmlns='jabber:component:accept' from='s1@localhost/r' to='r1@relay.localhost' id='b0000012345' type='chat'><body>benchmark message      12345 of about a hundred bytes of body text here</body><request xmlns='urn:xmpp:receipts'/></message>";

/// The keys one accept writes (see src/store/mod.rs), for message `i`.
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
fn sled_rate(per_batch: usize, n: u64, confirm: bool) -> f64 {
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

fn flush_ms(rounds: u32) -> f64 {
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

fn per_stanza_us(n: u32, mut f: impl FnMut()) -> f64 {
    let t0 = Instant::now();
    for _ in 0..n {
        f();
    }
    t0.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn main() {
    let n = 50_000;
    println!("the parts alone, one core:");
    println!("| part | figure |");
    println!("|---|---|");
    let one = sled_rate(1, n, false);
    println!("| sled, one accept's 6 keys, a batch per message | {one:.0} messages/s |");
    let grouped = sled_rate(256, n, false);
    println!("| sled, the same, 256 messages per batch | {grouped:.0} messages/s |");
    let life = sled_rate(256, n, true);
    println!(
        "| sled, accept and later removal (10 keys), 256 messages per batch | {life:.0} messages/s |"
    );
    let ms = flush_ms(200);
    println!(
        "| sled flush (fsync) after one small write | {ms:.2} ms ({:.0} per second) |",
        1000.0 / ms
    );
    let parse = per_stanza_us(n as u32, || {
        let el = Element::from_str(STANZA).unwrap();
        std::hint::black_box(Message::try_from(el).unwrap());
    });
    println!(
        "| XML in: stanza text to `Message` ({} bytes) | {parse:.1} µs |",
        STANZA.len()
    );
    let m = Message::try_from(Element::from_str(STANZA).unwrap()).unwrap();
    let write = per_stanza_us(n as u32, || {
        std::hint::black_box(String::from(&Element::from(m.clone())));
    });
    println!("| XML out: `Message` to stanza text | {write:.1} µs |");
}
