//! The crash test: redeliver is killed with SIGKILL again and again while
//! thousands of messages flow through it, against the fake XEP-0114
//! server (tests/common/fake.rs) whose users are always online and send a
//! receipt for every message at once.
//!
//! The users behind the fake server receipt what they get, except that a
//! fifth of first copies are dropped unanswered, as if lost on the way;
//! the relay must send those again. At the end every recipient logs out
//! and in, which makes the relay replay what it still holds.
//!
//! What counts:
//! - *acknowledged*: a message redeliver relayed onward at least once;
//! - *receipted*: the recipient sent a receipt for a copy of it;
//! - *lost*: acknowledged and never receipted by the end;
//! - *confirmed*: its sender has seen the receipt redeliver relayed back;
//! - *resent after confirmation*: relayed again after its sender saw the
//!   receipt.
//!
//! fsync mode promises no loss and no resend after confirmation. batched
//! mode may lose what was acknowledged in the last moments before a
//! crash; the test shows every such loss lies just before a kill, and
//! reports the figures (`cargo test --test crash -- --nocapture`).

#[macro_use]
mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fake::{Event, FakeHandle, FakeServer};
use common::*;

const MESSAGES: usize = 4000;
const RECIPIENTS: usize = 20;
const SENDERS: usize = 10;
const KILLS: usize = 25;
/// Messages offered per second.
const RATE: u64 = 400;

/// Share of first copies the users drop without a receipt.
const DROP: f64 = 0.2;

#[derive(Default)]
struct Tally {
    /// id → arrival times of each relayed copy.
    deliveries: HashMap<String, Vec<(u64, Instant)>>,
    /// Ids the recipient sent a receipt for.
    receipted: HashSet<String>,
    /// id → arrival of the receipt relayed back to the sender.
    confirmed: HashMap<String, u64>,
}

struct Report {
    kills: usize,
    written: usize,
    acknowledged: usize,
    lost: Vec<String>,
    resent_after_confirmation: usize,
    /// Receipted, but the sender never saw the receipt (a crash between
    /// removing the message and relaying the receipt).
    notices_lost: usize,
    duplicates: usize,
    never_acknowledged: usize,
    /// For each lost message: how long before the next kill it was first
    /// relayed.
    lost_before_kill_ms: Vec<u128>,
}

fn message(i: usize) -> (String, String) {
    let id = format!("m{i}");
    let xml = format!(
        "<message xmlns='jabber:component:accept' from='s{}@localhost/r' to='r{}@relay.localhost' id='{id}' type='chat'>\
         <body>crash test message {i}</body><request xmlns='urn:xmpp:receipts'/></message>",
        i % SENDERS,
        i % RECIPIENTS
    );
    (id, xml)
}

/// How the relay is stopped, again and again, under load.
#[derive(Clone, Copy)]
enum Stop {
    /// SIGKILL: a crash.
    Kill,
    /// SIGTERM: a clean stop, as an operator's restart.
    Term,
}

async fn run(durability: &'static str, stop: Stop) -> Report {
    let mut fake = FakeServer::start().await;
    let port = fake.port;
    let relay = relay_on_fake(
        port,
        RelayOpts {
            durability,
            max_pending: 100_000,
            receipt_timeout_ms: 2_000,
            replay_grace_ms: 300,
            ..Default::default()
        },
    )
    .await;
    let relay = Arc::new(Mutex::new(relay));
    let users = fake.handle();

    let written = Arc::new(Mutex::new(0usize));
    let sender = {
        let fake = fake.handle();
        let written = written.clone();
        tokio::spawn(async move {
            let gap = Duration::from_micros(1_000_000 / RATE);
            for i in 0..MESSAGES {
                let (_, xml) = message(i);
                // Between a kill and the next connection there is nobody
                // to write to: wait.
                while !fake.send(&xml) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                *written.lock().unwrap() += 1;
                tokio::time::sleep(gap).await;
            }
        })
    };

    let kill_times = Arc::new(Mutex::new(Vec::new()));
    // Exit statuses of clean stops that were not 0.
    let unclean: Arc<Mutex<Vec<Option<i32>>>> = Arc::default();
    let killer = {
        let relay = relay.clone();
        let kill_times = kill_times.clone();
        let unclean = unclean.clone();
        tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(500));
            for _ in 0..KILLS {
                let wait = rand::random_range(150..450);
                std::thread::sleep(Duration::from_millis(wait));
                let mut r = relay.lock().unwrap();
                kill_times.lock().unwrap().push(Instant::now());
                match stop {
                    Stop::Kill => r.sigkill(),
                    // Not asserted here: a panic would leave the relay
                    // down and the sender waiting for it forever.
                    Stop::Term => unclean.lock().unwrap().extend(match r.terminate() {
                        Some(0) => None,
                        other => Some(other),
                    }),
                }
                r.restart();
            }
        })
    };

    let mut tally = Tally::default();
    let mut quiet_since = Instant::now();
    let mut relogins = 0;
    loop {
        match fake.next(Duration::from_millis(200)).await {
            Some(Event::Stanza(_, n, at, el)) => {
                quiet_since = Instant::now();
                on_stanza(&users, &mut tally, n, at, &el);
            }
            Some(_) => {}
            None => {
                let done = sender.is_finished() && killer.is_finished();
                if !done || quiet_since.elapsed() < Duration::from_secs(3) {
                    continue;
                }
                let missing = tally
                    .deliveries
                    .keys()
                    .any(|id| !tally.receipted.contains(id));
                if !missing || relogins == 5 {
                    break;
                }
                // Everyone logs out and in: the relay replays what it holds.
                relogins += 1;
                for r in 0..RECIPIENTS {
                    users.send(&format!(
                        "<presence xmlns='jabber:component:accept' from='r{r}@localhost/res' to='{COMPONENT}' type='unavailable'/>\
                         <presence xmlns='jabber:component:accept' from='r{r}@localhost/res' to='{COMPONENT}'/>"
                    ));
                }
                quiet_since = Instant::now();
            }
        }
    }
    sender.await.unwrap();
    killer.await.unwrap();
    let kills = kill_times.lock().unwrap().clone();
    assert_eq!(
        *unclean.lock().unwrap(),
        [],
        "clean stops that did not exit 0"
    );
    drop(relay);

    let written = *written.lock().unwrap();
    let acknowledged = tally.deliveries.len();
    let mut lost: Vec<String> = tally
        .deliveries
        .keys()
        .filter(|id| !tally.receipted.contains(*id))
        .cloned()
        .collect();
    let notices_lost = tally
        .receipted
        .iter()
        .filter(|id| !tally.confirmed.contains_key(*id))
        .count();
    lost.sort();
    let resent_after_confirmation = tally
        .deliveries
        .iter()
        .filter(|(id, d)| {
            tally
                .confirmed
                .get(*id)
                .is_some_and(|c| d.iter().any(|(n, _)| n > c))
        })
        .count();
    let duplicates = tally.deliveries.values().map(|d| d.len() - 1).sum();
    let lost_before_kill_ms = lost
        .iter()
        .map(|id| {
            let first = tally.deliveries[id][0].1;
            kills
                .iter()
                .filter(|k| **k >= first)
                .map(|k| k.duration_since(first).as_millis())
                .min()
                .unwrap_or(u128::MAX)
        })
        .collect();
    let all_ids: HashSet<String> = (0..MESSAGES).map(|i| message(i).0).collect();
    Report {
        kills: kills.len(),
        written,
        acknowledged,
        lost,
        resent_after_confirmation,
        notices_lost,
        duplicates,
        never_acknowledged: all_ids.len() - acknowledged,
        lost_before_kill_ms,
    }
}

/// Play the users: a receipt for every relayed message; note receipts
/// that reach senders.
fn on_stanza(
    fake: &FakeHandle,
    tally: &mut Tally,
    n: u64,
    at: Instant,
    el: &tokio_xmpp::minidom::Element,
) {
    if el.name() != "message" {
        return;
    }
    let to = el.attr("to").unwrap_or("");
    if let Some(r) = el.get_child("received", "urn:xmpp:receipts") {
        // Relayed back to a sender.
        if to.starts_with('s') {
            tally
                .confirmed
                .entry(r.attr("id").unwrap_or("").to_owned())
                .or_insert(n);
        }
        return;
    }
    let Some(id) = el.attr("id") else { return };
    if el.attr("type") == Some("error") || !to.starts_with('r') {
        return;
    }
    let copies = tally.deliveries.entry(id.to_owned()).or_default();
    copies.push((n, at));
    if copies.len() == 1 && rand::random_bool(DROP) {
        return;
    }
    tally.receipted.insert(id.to_owned());
    let recipient = to.split('/').next().unwrap_or(to);
    let from = el.attr("from").unwrap_or("");
    fake.send(&format!(
        "<message xmlns='jabber:component:accept' from='{}/res' to='{}' id='rc-{}'>\
         <received xmlns='urn:xmpp:receipts' id='{}'/></message>",
        esc(recipient),
        esc(from),
        esc(id),
        esc(id)
    ));
}

fn print(mode: &str, r: &Report) {
    println!(
        "crash test ({mode}): stops {}, messages written {}, acknowledged {}, lost {}, \
         resent after confirmation {}, receipt notices lost {}, copies sent more than once {}, \
         never acknowledged {}",
        r.kills,
        r.written,
        r.acknowledged,
        r.lost.len(),
        r.resent_after_confirmation,
        r.notices_lost,
        r.duplicates,
        r.never_acknowledged
    );
    if !r.lost.is_empty() {
        println!(
            "  lost messages were first relayed this many ms before a kill: {:?}",
            r.lost_before_kill_ms
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_mode_loses_nothing_and_never_resends_after_confirmation() {
    let r = run("fsync", Stop::Kill).await;
    print("fsync", &r);
    assert!(r.kills >= 20);
    assert_eq!(r.written, MESSAGES);
    assert!(r.lost.is_empty(), "lost: {:?}", r.lost);
    assert_eq!(r.resent_after_confirmation, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_mode_loses_only_what_a_crash_window_holds() {
    let r = run("batched", Stop::Kill).await;
    print("batched", &r);
    assert!(r.kills >= 20);
    assert_eq!(r.written, MESSAGES);
    // Every loss is a message relayed just before a kill (the flush
    // window plus the time to receive its receipt), never a later one.
    for ms in &r.lost_before_kill_ms {
        assert!(*ms < 1_000, "a loss not explained by a crash: {ms} ms");
    }
}

/// Clean stops (SIGTERM) under load, in either mode: nothing is lost,
/// nothing is sent again after its sender saw the receipt, and every
/// receipt a recipient sent reaches its sender, whatever round the stop
/// cut short (one whose commit waited for the next round's included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_stops_lose_no_message_and_no_receipt() {
    for mode in ["batched", "fsync"] {
        let r = run(mode, Stop::Term).await;
        print(&format!("{mode}, SIGTERM"), &r);
        assert!(r.kills >= 20);
        assert_eq!(r.written, MESSAGES);
        assert!(r.lost.is_empty(), "{mode}: lost {:?}", r.lost);
        assert_eq!(r.resent_after_confirmation, 0, "{mode}");
        assert_eq!(
            r.notices_lost, 0,
            "{mode}: receipts that never reached their sender"
        );
    }
}
