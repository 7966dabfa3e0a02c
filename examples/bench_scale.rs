//! Benchmark 4 of issue 5, the scale of the store: M pending messages
//! (1,000,000 by default) across R recipients (100,000), all offline.
//!
//! The store is filled through redeliver's own store code (the accept
//! path without the network, in bursts as the router writes them), then
//! redeliver starts on it against the fake server of tests/common/fake.rs,
//! whose users are offline (probes are answered "unavailable"). Printed:
//! bytes on disk against bytes of stanzas, time from start to ready (the
//! link up), peak RSS, and the time from one recipient's presence to its
//! 10th message relayed, less replay_grace_ms.
//!
//! `bash scripts/bench` runs it against the release build. Not a test.
//! `BENCH_SCALE_KEEP=dir` keeps the filled store there for later runs.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::fake::{Event, FakeServer};
use common::*;
use redeliver::config::Durability;
use redeliver::store::{Accepted, NewMessage, QueueLimits, Record, SledStore, Subscription};

const BODY: &str =
    "a benchmark message with about a hundred bytes of body text, to look like a short chat line";
const GRACE_MS: u64 = 100;

/// `BENCH_SLED_COMPRESSION=1`: the store is created with compression.
fn compression() -> bool {
    std::env::var("BENCH_SLED_COMPRESSION").is_ok_and(|v| v == "1")
}

fn fill(path: &std::path::Path, messages: usize, recipients: usize) -> u64 {
    let store =
        SledStore::open_with(path, Durability::Batched, 500, 64 << 20, compression()).unwrap();
    let limits = QueueLimits {
        max_pending: u64::MAX,
        max_bytes: u64::MAX,
        max_store_bytes: u64::MAX,
    };
    let now = chrono::Utc::now().timestamp_millis();
    let t0 = Instant::now();
    for start in (0..messages).step_by(1000) {
        store.begin();
        for i in start..messages.min(start + 1000) {
            let r = i % recipients;
            let recipient = format!("u{r}@localhost");
            let id = format!("m{i}");
            let stanza = format!(
                "<message xmlns='jabber:component:accept' from='sender@{COMPONENT}' to='{recipient}' id='{id}' type='chat'><body>{BODY}</body></message>"
            );
            let outcome = store
                .accept(
                    NewMessage {
                        recipient: &recipient,
                        sender_bare: "sender@localhost",
                        origin_id: None,
                        content_hash: 0,
                        record: Record {
                            accepted_at_ms: now,
                            sender: "sender@localhost/r".into(),
                            id,
                            stanza,
                        },
                    },
                    limits,
                )
                .unwrap();
            assert!(matches!(outcome, Accepted::Stored { .. }), "{outcome:?}");
            if i < recipients {
                store
                    .set_subscription(&recipient, Subscription::Subscribed)
                    .unwrap();
            }
        }
        store.commit().unwrap();
    }
    store.flush().unwrap();
    let bytes = store.totals().unwrap().bytes;
    eprintln!(
        "filled {messages} messages in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    bytes
}

/// A filled store at `path`: filled here, or copied from
/// `BENCH_SCALE_KEEP` when that directory holds one filled with the same
/// figures (filling 1,000,000 takes minutes; the copy seconds). A fresh
/// fill is kept there when it is set.
fn filled(path: &std::path::Path, messages: usize, recipients: usize) -> u64 {
    let Ok(keep) = std::env::var("BENCH_SCALE_KEEP") else {
        return fill(path, messages, recipients);
    };
    let keep = std::path::Path::new(&keep).join(format!(
        "{messages}-{recipients}{}",
        if compression() { "-zstd" } else { "" }
    ));
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        let ok = std::process::Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(to)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cp -a {} {}", from.display(), to.display());
    };
    let bytes_file = keep.join("stanza-bytes");
    if let Some(bytes) = std::fs::read_to_string(&bytes_file)
        .ok()
        .and_then(|b| b.trim().parse().ok())
    {
        copy(&keep.join("store"), path);
        return bytes;
    }
    let bytes = fill(path, messages, recipients);
    // Whatever an interrupted run left goes; the figure file, written
    // last, marks a whole copy.
    let _ = std::fs::remove_dir_all(&keep);
    std::fs::create_dir_all(&keep).unwrap();
    copy(path, &keep.join("store"));
    std::fs::write(bytes_file, bytes.to_string()).unwrap();
    bytes
}

/// Bytes the files under `dir` take: (apparent size, allocated blocks).
fn disk_usage(dir: &std::path::Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut total = (0, 0);
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        if m.is_dir() {
            let (a, b) = disk_usage(&e.path());
            total.0 += a;
            total.1 += b;
        } else {
            total.0 += m.len();
            total.1 += m.blocks() * 512;
        }
    }
    total
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let messages: usize = env_or("BENCH_SCALE_MESSAGES", 1_000_000);
    let recipients: usize = env_or("BENCH_SCALE_RECIPIENTS", 100_000);
    let cache: u64 = env_or("BENCH_SCALE_CACHE_BYTES", 16 << 20);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let stanza_bytes = filled(&path, messages, recipients);
    let (apparent, allocated) = disk_usage(&path);
    let logical = {
        let store =
            SledStore::open_with(&path, Durability::Fsync, 5, cache, compression()).unwrap();
        store
            .db()
            .iter()
            .map(|kv| kv.map_or(0, |(k, v)| (k.len() + v.len()) as u64))
            .sum::<u64>()
    };
    // sled's own open (log recovery), alone, for comparison with the
    // start-to-ready time below.
    let opened = Instant::now();
    drop(SledStore::open_with(&path, Durability::Fsync, 5, cache, compression()).unwrap());
    let sled_open = opened.elapsed();

    let mut fake = FakeServer::start().await;
    fake.set_users_online(false);
    let started = Instant::now();
    let relay = relay_on_fake(
        fake.port,
        RelayOpts {
            durability: "fsync",
            max_pending: u64::MAX / 2,
            replay_grace_ms: GRACE_MS,
            receipt_timeout_ms: 30_000,
            store_path: Some(path.clone()),
            cache_bytes: cache,
            compression: compression(),
            ..Default::default()
        },
    )
    .await;
    let ready = started.elapsed();
    fake.connected(SECS(5)).await.expect("connected");
    let pid = relay.pid().expect("running");
    // Memory with the store open and the link up, before the recipients'
    // state is built (probing has only begun).
    let rss_ready = status_kib(pid, "VmRSS:");
    // Startup: every recipient is probed (and answers "unavailable").
    let probing = Instant::now();
    while fake.auto_answered() < recipients as u64 {
        if probing.elapsed() > Duration::from_secs(300) {
            panic!(
                "only {} of {recipients} probes answered",
                fake.auto_answered()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let probed = probing.elapsed();
    // The fake counts the answers it sent, not those redeliver has read:
    // a ping answered means every answer before it was handled, so that
    // the replay below is timed from a router with no backlog.
    let users = fake.handle();
    let mut early = 0usize;
    users.send(&format!(
        "<iq xmlns='jabber:component:accept' type='get' id='scale-barrier' from='sender@localhost/b' to='{COMPONENT}'><ping xmlns='urn:xmpp:ping'/></iq>"
    ));
    loop {
        let Some(ev) = fake.next(Duration::from_secs(120)).await else {
            panic!("no answer to the ping");
        };
        if let Event::Stanza(_, _, _, el) = ev {
            if el.name() == "iq" && el.attr("id") == Some("scale-barrier") {
                break;
            }
            early += 1;
        }
    }
    let handled = probing.elapsed();
    let rss_probed = status_kib(pid, "VmRSS:");
    // Then quiet, and anything it sent meanwhile counted.
    let mut stray = early;
    while let Some(ev) = fake.next(Duration::from_millis(500)).await {
        if matches!(ev, Event::Stanza(..)) {
            stray += 1;
        }
    }
    let who = format!("u{}@localhost", recipients / 2);
    let per_recipient = messages / recipients;
    let presence = Instant::now();
    users.send(&format!(
        "<presence xmlns='jabber:component:accept' from='{who}/res' to='{COMPONENT}'/>"
    ));
    let mut got = 0;
    let mut last = presence;
    while got < per_recipient {
        let Some(ev) = fake.next(SECS(30)).await else {
            panic!("replay stalled at {got} of {per_recipient}");
        };
        if let Event::Stanza(_, _, at, el) = ev
            && el.name() == "message"
            && el.attr("to").is_some_and(|t| t.starts_with(&who))
        {
            got += 1;
            last = at;
        }
    }
    let replay = last.duration_since(presence);
    let rss_peak = status_kib(pid, "VmHWM:");
    let rss_now = status_kib(pid, "VmRSS:");
    drop(relay);

    println!(
        "store scale: {messages} pending messages across {recipients} recipients, sled cache_bytes {} MiB, compression {}",
        cache >> 20,
        if compression() { "on" } else { "off" }
    );
    println!("| figure | value |");
    println!("|---|---|");
    println!("| bytes of stanzas | {stanza_bytes} |");
    println!(
        "| bytes on disk (apparent / allocated) | {apparent} / {allocated} ({:.2}× / {:.2}× the stanzas) |",
        apparent as f64 / stanza_bytes as f64,
        allocated as f64 / stanza_bytes as f64
    );
    println!(
        "| bytes of keys and values in the store | {logical} ({:.2}× the stanzas) |",
        logical as f64 / stanza_bytes as f64
    );
    println!(
        "| start to ready (process start to link up) | {:.3} s |",
        ready.as_secs_f64()
    );
    println!(
        "| sled's open of the same store alone, just after filling (log recovery) | {:.3} s |",
        sled_open.as_secs_f64()
    );
    println!(
        "| ready to every recipient probed (other stanzas sent meanwhile: {stray}) | {:.2} s |",
        probed.as_secs_f64()
    );
    println!(
        "| ready to every answer handled (a ping sent after the last answered) | {:.2} s |",
        handled.as_secs_f64()
    );
    println!(
        "| peak RSS / RSS after the replay | {:.1} MiB / {:.1} MiB |",
        rss_peak as f64 / 1024.0,
        rss_now as f64 / 1024.0
    );
    println!(
        "| RSS at link up (store open: sled's page table and cache) / after every answer was handled | {:.1} MiB / {:.1} MiB ({:.0} bytes per recipient) |",
        rss_ready as f64 / 1024.0,
        rss_probed as f64 / 1024.0,
        (rss_probed.saturating_sub(rss_ready) * 1024) as f64 / recipients as f64
    );
    println!(
        "| presence to {per_recipient}th message, less replay_grace_ms ({GRACE_MS} ms) | {:.1} ms |",
        replay.as_secs_f64() * 1000.0 - GRACE_MS as f64
    );
}
