//! Benchmark 3 of issue 5, "the component alone": a load generator plays
//! the server side of XEP-0114 on loopback (tests/common/fake.rs, no XMPP
//! server), drives redeliver with N messages across R recipients, and
//! answers each relayed copy with a receipt at once. Prints messages per
//! second (accepted, stored and relayed) and the latency from a stanza in
//! to its relayed copy out, for `batched` and `fsync`.
//!
//! `bash scripts/bench` runs it against the release build. Not a test:
//! it asserts nothing about speed.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "floor/mod.rs"]
mod floor;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::fake::{Event, FakeServer};
use common::*;

struct Run {
    /// redeliver's CPU (all threads) per message while relaying, µs.
    cpu_us: f64,
    seconds: f64,
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Offer `n` messages to `recipients` recipients at `rate` per second
/// (0: as fast as the link takes them).
async fn run(durability: &'static str, n: usize, recipients: usize, rate: u64) -> Run {
    let mut fake = FakeServer::start().await;
    let relay = relay_on_fake(
        fake.port,
        RelayOpts {
            durability,
            max_pending: 1_000_000,
            max_stanza_bytes: 8192,
            receipt_timeout_ms: 60_000,
            compression: std::env::var("BENCH_SLED_COMPRESSION").is_ok_and(|v| v == "1"),
            ..Default::default()
        },
    )
    .await;
    fake.connected(SECS(5)).await.expect("connected");
    let users = fake.handle();
    // Warm up: one message per recipient, so that every presence is
    // known and windows are open before the clock starts.
    for r in 0..recipients {
        users.send(&format!(
            "<message xmlns='jabber:component:accept' from='s@localhost/r' to='r{r}@relay.localhost' id='w{r}' type='chat'><body>warm</body></message>"
        ));
    }
    let mut warm = 0;
    while warm < recipients {
        if let Some(Event::Stanza(_, _, _, el)) = fake.next(SECS(30)).await {
            if el.name() == "message"
                && el.attr("id").is_some_and(|i| i.starts_with('w'))
                && el.attr("type") != Some("error")
            {
                warm += 1;
                receipt(&users, &el);
            }
        } else {
            panic!("warm-up stalled at {warm}");
        }
    }
    // The warm-up ends when redeliver has handled its receipts and the
    // answers to its subscription requests too (one-time work per
    // recipient): it answers this ping after them, since it handles
    // stanzas in order.
    users.send(
        "<iq xmlns='jabber:component:accept' type='get' id='warm-done' from='s@localhost/r' to='relay.localhost'><ping xmlns='urn:xmpp:ping'/></iq>",
    );
    loop {
        match fake.next(SECS(60)).await {
            Some(Event::Stanza(_, _, _, el))
                if el.name() == "iq" && el.attr("id") == Some("warm-done") =>
            {
                break;
            }
            Some(_) => {}
            None => panic!("warm-up: no answer to the ping"),
        }
    }
    let sent_at: std::sync::Arc<std::sync::Mutex<HashMap<usize, Instant>>> = Default::default();
    let cpu0 = floor::cpu_s(relay.pid());
    let start = Instant::now();
    let sender = {
        let users = users.clone();
        let sent_at = sent_at.clone();
        tokio::spawn(async move {
            let gap = (rate > 0).then(|| Duration::from_secs_f64(1.0 / rate as f64));
            let mut next = Instant::now();
            for i in 0..n {
                let xml = format!(
                    "<message xmlns='jabber:component:accept' from='s{}@localhost/r' to='r{}@relay.localhost' id='b{i}' type='chat'><body>benchmark message {i:>10} of about a hundred bytes of body text here</body><request xmlns='urn:xmpp:receipts'/></message>",
                    i % 50,
                    i % recipients
                );
                sent_at.lock().unwrap().insert(i, Instant::now());
                users.send(&xml);
                if let Some(g) = gap {
                    next += g;
                    let now = Instant::now();
                    if next > now {
                        tokio::time::sleep(next - now).await;
                    }
                } else if i % 256 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut latencies = Vec::with_capacity(n);
    let mut last = start;
    while latencies.len() < n {
        let Some(ev) = fake.next(SECS(60)).await else {
            panic!("stalled at {} of {n}", latencies.len());
        };
        let Event::Stanza(_, _, at, el) = ev else {
            continue;
        };
        if el.name() != "message"
            || el.attr("type") == Some("error")
            || el.has_child("received", "urn:xmpp:receipts")
        {
            continue;
        }
        let Some(i) = el
            .attr("id")
            .and_then(|id| id.strip_prefix('b'))
            .and_then(|i| i.parse::<usize>().ok())
        else {
            continue;
        };
        if let Some(t) = sent_at.lock().unwrap().remove(&i) {
            latencies.push(at.duration_since(t));
            last = at;
        }
        receipt(&users, &el);
    }
    let cpu = floor::cpu_s(relay.pid()) - cpu0;
    sender.await.unwrap();
    drop(relay);
    latencies.sort();
    let seconds = last.duration_since(start).as_secs_f64();
    Run {
        cpu_us: cpu * 1e6 / n as f64,
        seconds,
        per_second: n as f64 / seconds,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
    }
}

fn receipt(users: &common::fake::FakeHandle, el: &tokio_xmpp::minidom::Element) {
    let to = el.attr("to").unwrap_or("");
    let from = el.attr("from").unwrap_or("");
    let id = el.attr("id").unwrap_or("");
    users.send(&format!(
        "<message xmlns='jabber:component:accept' from='{to}/res' to='{from}' id='rc-{id}'><received xmlns='urn:xmpp:receipts' id='{id}'/></message>"
    ));
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = env_or("BENCH_MESSAGES", 100_000);
    let recipients: usize = env_or("BENCH_RECIPIENTS", 1_000);
    let reps: usize = env_or("BENCH_REPS", 3);
    let f = floor::Floor::measure();
    println!("{}", f.describe());
    println!(
        "component alone: {n} messages across {recipients} recipients, receipts at once, median of {reps} (min..max)"
    );
    println!(
        "| mode | load | msg/s | ÷ sled accept+removal | seconds | p50 ms | p99 ms | redeliver CPU µs/msg | ÷ floor |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    for durability in ["batched", "fsync"] {
        for (label, rate) in [("as fast as it takes", 0u64), ("paced 2,000/s", 2_000)] {
            let name = format!("{durability}-{}", if rate > 0 { "paced" } else { "max" });
            if !only.is_empty() && !only.split(',').any(|o| o == name) {
                continue;
            }
            let count = if rate > 0 { (rate * 10) as usize } else { n };
            let mut runs = Vec::new();
            for _ in 0..reps {
                runs.push(run(durability, count, recipients, rate).await);
            }
            runs.sort_by(|a, b| a.per_second.total_cmp(&b.per_second));
            let med = &runs[runs.len() / 2];
            let (lo, hi) = (&runs[0], &runs[runs.len() - 1]);
            println!(
                "| {durability} | {label} | {:.0} ({:.0}..{:.0}) | {:.0}% | {:.2} | {:.2} | {:.2} | {:.0} | {:.1}× |",
                med.per_second,
                lo.per_second,
                hi.per_second,
                100.0 * med.per_second / f.sled_life_rate,
                med.seconds,
                med.p50_ms,
                med.p99_ms,
                med.cpu_us,
                med.cpu_us / f.per_message_us()
            );
        }
    }
}
