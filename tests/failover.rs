//! Two redeliver instances on one PostgreSQL store: the one that leads
//! (holds the store's lead lock) is connected, the other stands by. Under
//! a steady load the leader is SIGKILLed ten times; each time the standby
//! takes the lead and carries on from the shared store, and the killed
//! one comes back as the new standby. On Prosody and on ejabberd. Prints
//! the figures the closing notes quote.

#[macro_use]
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;

const BOB: &str = "bob@relay.localhost";
const KILLS: usize = 10;
/// One message every this long.
const PACE: Duration = Duration::from_millis(40);

#[derive(Default)]
struct Tally {
    /// When each id was sent, in order.
    sent: Vec<(String, Instant)>,
    /// Arrivals at bob, in order: (id, when).
    arrivals: Vec<(String, Instant)>,
    /// When alice saw the receipt, by id.
    receipts: HashMap<String, Instant>,
    /// Errors alice got, by id (refused while no instance was connected).
    errors: HashMap<String, String>,
}

impl Tally {
    fn take(&mut self, alice: &mut Client, bob: &mut Client) {
        let now = Instant::now();
        while let Ok(el) = alice.inbox.try_recv() {
            if let Some(r) = el.get_child("received", "urn:xmpp:receipts") {
                self.receipts
                    .entry(r.attr("id").unwrap_or("").to_owned())
                    .or_insert(now);
            } else if el.attr("type") == Some("error") {
                self.errors
                    .insert(el.attr("id").unwrap_or("").to_owned(), format!("{el:?}"));
            }
        }
        while let Ok(el) = bob.inbox.try_recv() {
            if el.get_child("body", CLIENT_NS).is_some() {
                self.arrivals
                    .push((el.attr("id").unwrap_or("").to_owned(), now));
            }
        }
    }
}

on_both_servers!(standby_takes_over_after_sigkill);

async fn standby_takes_over_after_sigkill(kind: Kind) {
    let server = Server::start(kind, ServerOpts::default());
    let url = pg::new_database();
    let opts = |wait_ready| RelayOpts {
        postgres_url: Some(url.clone()),
        wait_ready,
        ..Default::default()
    };
    let mut relays = [
        Relay::start(&server, opts(true)),
        Relay::start(&server, opts(false)),
    ];
    let mut active = 0;
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    let mut alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    let mut t = Tally::default();
    let mut kills: Vec<(Instant, usize)> = Vec::new();
    let mut n = 0usize;
    // 3 to 5 s apart, so that kills fall anywhere in the standby's
    // 500 ms retry period.
    let jitter = || Duration::from_millis(3000 + rand::random::<u64>() % 2000);
    let mut next_kill = Instant::now() + jitter();
    // The killed instance is started again only once the other one took
    // over (its link came up), so that each kill hits the leader.
    let mut respawn: Option<(usize, usize)> = None;
    while kills.len() < KILLS || respawn.is_some() || Instant::now() < next_kill {
        let id = format!("f{n:05}");
        alice.message(BOB, &id, &format!("body of {id}"));
        t.sent.push((id, Instant::now()));
        n += 1;
        // Drained every 5 ms: arrival and receipt times are that fine.
        for _ in 0..PACE.as_millis() / 5 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            t.take(&mut alice, &mut bob);
        }
        if let Some((killed, ready)) = respawn {
            let other = &relays[1 - killed];
            if other.log_text().matches(READY).count() >= ready {
                relays[killed].spawn();
                respawn = None;
                next_kill = Instant::now() + jitter();
            }
        } else if kills.len() < KILLS && Instant::now() >= next_kill {
            let ready = relays[1 - active].log_text().matches(READY).count() + 1;
            relays[active].sigkill();
            kills.push((Instant::now(), n));
            respawn = Some((active, ready));
            active = 1 - active;
        }
    }
    // Let everything pending arrive.
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
        t.take(&mut alice, &mut bob);
        let delivered: std::collections::HashSet<&str> =
            t.arrivals.iter().map(|(id, _)| id.as_str()).collect();
        if t.sent
            .iter()
            .all(|(id, _)| delivered.contains(id.as_str()) || t.errors.contains_key(id))
            && t.receipts.len() + t.errors.len() >= t.sent.len()
        {
            break;
        }
    }

    // Figures.
    let mut first_seen: HashMap<&str, Instant> = HashMap::new();
    let mut copies: HashMap<&str, usize> = HashMap::new();
    let mut resent_after_receipt = 0;
    for (id, at) in &t.arrivals {
        *copies.entry(id).or_default() += 1;
        first_seen.entry(id).or_insert(*at);
        if copies[id.as_str()] > 1 && t.receipts.get(id).is_some_and(|r| r < at) {
            resent_after_receipt += 1;
        }
    }
    let index: HashMap<&str, usize> = t
        .sent
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (id.as_str(), i))
        .collect();
    let mut order_violations = 0;
    let mut highest = None;
    let mut seen = std::collections::HashSet::new();
    for (id, _) in &t.arrivals {
        if !seen.insert(id.as_str()) {
            continue;
        }
        let i = index.get(id.as_str()).copied();
        if let (Some(i), Some(h)) = (i, highest)
            && i < h
        {
            order_violations += 1;
        }
        highest = highest.max(i);
    }
    let refused = t
        .sent
        .iter()
        .filter(|(id, _)| t.errors.contains_key(id) && !first_seen.contains_key(id.as_str()))
        .count();
    let lost: Vec<&str> = t
        .sent
        .iter()
        .map(|(id, _)| id.as_str())
        .filter(|id| !first_seen.contains_key(id) && !t.errors.contains_key(*id))
        .collect();
    let twice = copies.values().filter(|c| **c > 1).count();
    // Time from each kill to the first arrival of a message sent after it
    // (and before the next kill).
    let mut resume: Vec<Duration> = kills
        .iter()
        .enumerate()
        .filter_map(|(k, (at, sent_before))| {
            let until = kills.get(k + 1).map_or(usize::MAX, |(_, n)| *n);
            t.arrivals
                .iter()
                .filter(|(id, _)| {
                    index
                        .get(id.as_str())
                        .is_some_and(|i| (*sent_before..until).contains(i))
                })
                .map(|(_, when)| when.saturating_duration_since(*at))
                .min()
        })
        .collect();
    resume.sort();
    let ms = |d: Option<&Duration>| d.map_or(-1, |d| d.as_millis() as i64);
    println!(
        "failover on {kind:?}: kills {}, sent {}, delivered {}, refused with an error {}, lost {}, \
         shown twice {}, re-sent after the receipt {}, order violations {}, \
         resume median {} ms, worst {} ms",
        kills.len(),
        t.sent.len(),
        first_seen.len(),
        refused,
        lost.len(),
        twice,
        resent_after_receipt,
        order_violations,
        ms(resume.get(resume.len() / 2)),
        ms(resume.last()),
    );
    assert_eq!(kills.len(), KILLS);
    // A message no instance ever accepted was dropped by the server: the
    // one it wrote to the component's socket in the instant the process
    // died (both servers do, now and then; Prosody mostly bounces it
    // with an error). What an instance accepted must never be lost.
    let logs: String = relays.iter().map(Relay::log_text).collect();
    assert!(
        logs.matches("accepted to=bob@localhost").count() > t.sent.len() / 2,
        "the accept lines this check reads are logged"
    );
    let (accepted_lost, dropped): (Vec<&str>, Vec<&str>) = lost.iter().partition(|id| {
        logs.contains(&format!(
            "accepted to=bob@localhost from=alice@localhost/test id={id} "
        ))
    });
    println!(
        "failover on {kind:?}: lost after an instance accepted them {}, dropped by the server \
         at a kill without an error to the sender {}",
        accepted_lost.len(),
        dropped.len()
    );
    assert!(accepted_lost.is_empty(), "lost: {accepted_lost:?}");
    let kill_points: Vec<usize> = kills.iter().map(|(_, n)| *n).collect();
    for id in &dropped {
        let i = index[id];
        assert!(
            kill_points.iter().any(|k| (*k..k + 2).contains(&i)),
            "{id} (message {i}) dropped outside a kill {kill_points:?}"
        );
    }
    assert_eq!(resent_after_receipt, 0);
    assert_eq!(order_violations, 0);
    assert_eq!(resume.len(), KILLS, "delivery resumed after every kill");
    // Every delivered message was confirmed to alice, once stored.
    let unconfirmed: Vec<&str> = first_seen
        .keys()
        .copied()
        .filter(|id| !t.receipts.contains_key(*id))
        .collect();
    assert!(unconfirmed.is_empty(), "no receipt for {unconfirmed:?}");
    for r in &mut relays {
        r.sigkill();
    }
}

/// The leader's database session ends (the database restarted, failed
/// over, or an administrator ended it): the leader exits with status 75
/// within seconds, for its supervisor to restart it as a standby, and
/// the standby takes the lead and connects.
#[tokio::test]
async fn a_leader_whose_session_ends_steps_down() {
    let server = Server::start(Kind::Prosody, ServerOpts::default());
    let url = pg::new_database();
    let opts = |wait_ready| RelayOpts {
        postgres_url: Some(url.clone()),
        wait_ready,
        ..Default::default()
    };
    let mut leader = Relay::start(&server, opts(true));
    let standby = Relay::start(&server, opts(false));
    wait_log(&standby, "standby").await;
    // End the session that holds the lead (the standby's stays).
    assert_eq!(pg::end_lock_holders(&url), 1, "one session held the lead");
    let status = leader.wait_exit(SECS(15));
    let log = leader.log_text();
    assert_eq!(status, Some(75), "{log}");
    assert!(log.contains("no longer leads"), "{log}");
    standby.wait_ready(1);
}
