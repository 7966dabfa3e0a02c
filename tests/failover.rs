//! Two redeliver instances on one PostgreSQL store, SIGKILLed ten times
//! under a steady load; prints the figures the closing notes quote.
//!
//! - One active (any server): the one that leads (holds the store's lead
//!   lock) is connected, the other stands by. Each kill hits the leader;
//!   the standby takes the lead and carries on from the shared store, and
//!   the killed one comes back as the new standby. On Prosody and on
//!   ejabberd.
//! - All active (ejabberd): both are connected and ejabberd spreads the
//!   stanzas over them; the leader delivers and the other hands it what
//!   it receives. The kills alternate between the leader and the other;
//!   the killed one comes back and connects again.

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

on_both_servers!(
    standby_takes_over_after_sigkill,
    a_new_leader_delivers_what_the_old_one_stored
);

async fn standby_takes_over_after_sigkill(kind: Kind) {
    kill_again_and_again(kind, false).await;
}

#[tokio::test]
async fn all_active_instances_survive_sigkills() {
    kill_again_and_again(Kind::Ejabberd, true).await;
}

/// Where each relay's current run starts in its log.
struct Runs([usize; 2]);

impl Runs {
    fn log(&self, relays: &[Relay; 2], i: usize) -> String {
        relays[i]
            .log_text()
            .get(self.0[i]..)
            .unwrap_or("")
            .to_owned()
    }
    fn leads(&self, relays: &[Relay; 2], i: usize) -> bool {
        self.log(relays, i).contains(TOOK_LEAD)
    }
    fn connected(&self, relays: &[Relay; 2], i: usize) -> bool {
        self.log(relays, i).contains(READY)
    }
}

const TOOK_LEAD: &str = "took the lead";

/// A relay on the PostgreSQL database `url`, shared with the others.
fn shared_store(url: &str, wait_ready: bool, all_active: bool) -> RelayOpts {
    RelayOpts {
        postgres_url: Some(url.to_owned()),
        wait_ready,
        all_active,
        ..Default::default()
    }
}

async fn kill_again_and_again(kind: Kind, all_active: bool) {
    let server = Server::start(kind, ServerOpts::default());
    let url = pg::new_database();
    let opts = |wait_ready| shared_store(&url, wait_ready, all_active);
    let mut relays = [
        Relay::start(&server, opts(true)),
        Relay::start(&server, opts(all_active)),
    ];
    let mut runs = Runs([0, 0]);
    if all_active {
        // One of them takes the lead once connected.
        let end = Instant::now() + Duration::from_secs(20);
        while !relays.iter().any(|r| r.log_text().contains(TOOK_LEAD)) {
            assert!(
                Instant::now() < end,
                "nobody took the lead; logs:\n{}\n---\n{}",
                relays[0].log_text(),
                relays[1].log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut active = 0;
    // Which kills hit the leader (all always, with one active).
    let mut leader_kills: Vec<bool> = Vec::new();
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
    // over (its link came up, or, all active, it took the lead), so that
    // each kill hits the instance it means to.
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
        if all_active {
            // Kill when both are connected and one leads; the leader at
            // even kills, the other at odd ones. The killed one comes
            // back once the other leads, and connects again.
            if let Some((killed, _)) = respawn {
                if runs.leads(&relays, 1 - killed) {
                    runs.0[killed] = relays[killed].log_text().len();
                    relays[killed].spawn();
                    respawn = None;
                    next_kill = Instant::now() + jitter();
                }
            } else if kills.len() < KILLS
                && Instant::now() >= next_kill
                && (0..2).all(|i| runs.connected(&relays, i))
                && let Some(leader) = (0..2).find(|i| runs.leads(&relays, *i))
            {
                let hit_leader = kills.len().is_multiple_of(2);
                let victim = if hit_leader { leader } else { 1 - leader };
                relays[victim].sigkill();
                kills.push((Instant::now(), n));
                leader_kills.push(hit_leader);
                respawn = Some((victim, 0));
            }
            continue;
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
            leader_kills.push(true);
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
    // How many places the worst one fell behind.
    let mut behind = 0;
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
            behind = behind.max(h - i);
            // What each instance said of the two, to see why.
            let after = &t.sent[h].0;
            println!("order: {id} arrived after {after}");
            for (n, r) in relays.iter().enumerate() {
                for line in r.log_text().lines().filter(|l| {
                    l.contains(&format!("id={id}"))
                        || l.contains(&format!("id={after}"))
                        || l.contains(&format!("'{id}'"))
                        || l.contains(&format!("'{after}'"))
                        || l.contains(&format!("\"{id}\""))
                        || l.contains(&format!("\"{after}\""))
                        || l.contains("took the lead")
                }) {
                    println!("  relay {n}: {line}");
                }
            }
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
    let resume_after: Vec<(bool, Duration)> = kills
        .iter()
        .zip(&leader_kills)
        .enumerate()
        .filter_map(|(k, ((at, sent_before), hit_leader))| {
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
                .map(|d| (*hit_leader, d))
        })
        .collect();
    let sorted = |leader: bool| {
        let mut v: Vec<Duration> = resume_after
            .iter()
            .filter(|(l, _)| *l == leader)
            .map(|(_, d)| *d)
            .collect();
        v.sort();
        v
    };
    let (resume, resume_other) = (sorted(true), sorted(false));
    let ms = |d: Option<&Duration>| d.map_or(-1, |d| d.as_millis() as i64);
    let mode = if all_active {
        "all active"
    } else {
        "one active"
    };
    println!(
        "failover on {kind:?}, {mode}: kills {} ({} of the leader), sent {}, delivered {}, \
         refused with an error {}, lost {}, \
         shown twice {}, re-sent after the receipt {}, order violations {}, \
         resume after a leader's kill median {} ms, worst {} ms; \
         after the other's kill median {} ms, worst {} ms",
        kills.len(),
        resume.len(),
        t.sent.len(),
        first_seen.len(),
        refused,
        lost.len(),
        twice,
        resent_after_receipt,
        order_violations,
        ms(resume.get(resume.len() / 2)),
        ms(resume.last()),
        ms(resume_other.get(resume_other.len() / 2)),
        ms(resume_other.last()),
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
    // Handed to the leader counts as accepted: it was committed.
    let (accepted_lost, dropped): (Vec<&str>, Vec<&str>) = lost.iter().partition(|id| {
        logs.contains(&format!(
            "accepted to=bob@localhost from=alice@localhost/test id={id} "
        )) || logs
            .lines()
            .any(|l| l.contains("handed to the leader") && l.contains(&format!("id='{id}'")))
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
    if all_active {
        // ejabberd gives each stanza to either connection at random, and
        // the handed-over path takes a commit longer than the direct one:
        // two messages sent back to back may change places (that is what
        // `domain_balancing: bare_source` avoids, docs/operating.md).
        // Nothing may fall further behind than that.
        assert!(behind <= 1, "a message fell {behind} places behind");
        // One instance is always connected.
        assert_eq!(refused, 0, "refused: {:?}", t.errors);
    } else {
        assert_eq!(order_violations, 0);
    }
    assert_eq!(
        resume_after.len(),
        KILLS,
        "delivery resumed after every kill"
    );
    if all_active {
        // ejabberd spread the stanzas: the instance that did not lead
        // handed some to the one that did.
        let handed_lines: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("handed to the leader"))
            .collect();
        let handed = handed_lines.len();
        // How long each took from its read to its hand-over's commit.
        let mut after: Vec<f64> = handed_lines
            .iter()
            .filter_map(|l| l.split("after_ms=").nth(1)?.split(' ').next()?.parse().ok())
            .collect();
        after.sort_by(f64::total_cmp);
        assert_eq!(
            after.len(),
            handed,
            "each hand-over's line says how long it took"
        );
        println!(
            "failover on {kind:?}, {mode}: stanzas handed to the leader {handed}, \
             read to commit median {:.1} ms, worst {:.1} ms",
            after.get(after.len() / 2).copied().unwrap_or(0.0),
            after.last().copied().unwrap_or(0.0),
        );
        assert!(handed > 0, "every stanza reached the leader directly");
    }
    // Every delivered message was confirmed to alice, but one whose
    // receipt was on its way out of an instance when it was killed:
    // XEP-0114 has no acknowledgement, so a stanza written (or about to
    // be) to a dying socket is gone. Such a message was delivered just
    // before a kill; its receipt is the sender's only loss.
    let just_before_a_kill = |at: Instant| {
        kills
            .iter()
            .any(|(k, _)| *k >= at && k.saturating_duration_since(at) < Duration::from_millis(250))
    };
    let (at_kill, unconfirmed): (Vec<&str>, Vec<&str>) = first_seen
        .iter()
        .filter(|(id, _)| !t.receipts.contains_key(**id))
        .map(|(id, _)| *id)
        .partition(|id| just_before_a_kill(first_seen[id]));
    println!(
        "failover on {kind:?}, {mode}: receipts lost at a kill (delivered, the sender not told) {}",
        at_kill.len()
    );
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
    let opts = |wait_ready| shared_store(&url, wait_ready, false);
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

/// All-active: what the leader stored for an offline recipient, the
/// instance that takes over delivers when the recipient comes (its
/// durability gate must count the old leader's commits as on disk). On
/// Prosody, which takes one connection per component, the second
/// instance is refused (`conflict`) and keeps trying on its link's
/// backoff until the first dies (docs/operating.md: it works, but
/// one-active takes over sooner there); on ejabberd both are connected.
async fn a_new_leader_delivers_what_the_old_one_stored(kind: Kind) {
    let server = Server::start(kind, ServerOpts::default());
    let url = pg::new_database();
    let opts = |wait_ready| shared_store(&url, wait_ready, true);
    let mut first = Relay::start(&server, opts(true));
    wait_log(&first, TOOK_LEAD).await;
    let second = Relay::start(&server, opts(kind == Kind::Ejabberd));
    if kind == Kind::Prosody {
        wait_log(&second, "cannot establish component link").await;
        assert!(!second.log_text().contains(READY), "Prosody took one only");
    }
    // bob is offline: the message waits in the store.
    let alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    alice.message(BOB, "p1", "stored by the first");
    wait_stored(&first, &["p1"]).await;
    first.sigkill();
    let started = Instant::now();
    wait_log(&second, TOOK_LEAD).await;
    println!(
        "all-active on {kind:?}: the second took the lead {} ms after the kill",
        started.elapsed().as_millis()
    );
    let mut bob = Client::connect(
        server.c2s_port,
        "bob",
        ClientOpts {
            // Answered by hand below.
            receipts: false,
            ..Default::default()
        },
    )
    .await;
    let m = bob
        .next_body_message(SECS(20))
        .await
        .unwrap_or_else(|| panic!("not delivered; the second's log:\n{}", second.log_text()));
    assert_eq!(m.attr("id"), Some("p1"));

    // A message the new leader's predecessor sent, confirmed after the
    // takeover, is confirmed: p2 goes out from the first instance again
    // (restarted; the second now stands by or forwards), bob's receipt
    // reaches whichever instance leads.
    first.spawn();
    // Started (and, on ejabberd, connected) before p2 is accepted.
    let end = Instant::now() + SECS(15);
    while !first.log_text().contains("all-active: connecting")
        || kind == Kind::Ejabberd && first.log_text().matches(READY).count() < 2
    {
        assert!(Instant::now() < end, "{}", first.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    alice.message(BOB, "p2", "sent by the leader");
    let p2 = bob.next_body_message(SECS(20)).await.expect("p2 delivered");
    assert_eq!(p2.attr("id"), Some("p2"));
    let mut second = second;
    second.sigkill();
    // Its second run takes the lead (the log keeps the first run's too).
    let end = Instant::now() + SECS(15);
    while first.log_text().matches(TOOK_LEAD).count() < 2 {
        assert!(Instant::now() < end, "{}", first.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut alice = alice;
    while alice.inbox.try_recv().is_ok() {}
    for id in ["p1", "p2"] {
        bob.send(xml(&format!(
            "<message xmlns='jabber:client' to='alice@relay.localhost' id='r-{id}'>\
             <received xmlns='urn:xmpp:receipts' id='{id}'/></message>"
        )));
    }
    let mut confirmed = Vec::new();
    let end = Instant::now() + SECS(15);
    while confirmed.len() < 2 && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
        while let Ok(el) = alice.inbox.try_recv() {
            if let Some(r) = el.get_child("received", "urn:xmpp:receipts") {
                confirmed.push(r.attr("id").unwrap_or("").to_owned());
            }
        }
    }
    confirmed.sort();
    assert_eq!(
        confirmed,
        ["p1", "p2"],
        "receipts for what the old leaders sent; the first's log:\n{}",
        first.log_text()
    );
}

/// `reload-config` reaches only the leader; the instance that takes over
/// reads the config file as it is then (here the operator lowered a
/// limit in every instance's file and reloaded the leader).
async fn the_new_leader_reads_the_config_file_as_it_is_now(kind: Kind, all_active: bool) {
    let server = Server::start(kind, ServerOpts::default());
    let url = pg::new_database();
    let opts = |wait_ready| shared_store(&url, wait_ready, all_active);
    let mut first = Relay::start(&server, opts(true));
    if all_active {
        wait_log(&first, TOOK_LEAD).await;
    }
    let second = Relay::start(&server, opts(all_active));
    if !all_active {
        // It has read its config and waits.
        wait_log(&second, "standby").await;
    }
    let original = std::fs::read_to_string(&second.config).unwrap();
    let limited = original.replace(
        "max_pending_per_recipient = 10000",
        "max_pending_per_recipient = 1",
    );
    assert_ne!(limited, original);
    std::fs::write(&second.config, &limited).unwrap();
    first.sigkill();
    if all_active {
        wait_log(&second, TOOK_LEAD).await;
    } else {
        second.wait_ready(1);
    }
    // carol is offline: one fits, the second is refused.
    let mut alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    alice.message("carol@relay.localhost", "c1", "one");
    alice.message("carol@relay.localhost", "c2", "two");
    let mut refused = None;
    let end = Instant::now() + SECS(10);
    while refused.is_none() && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
        while let Ok(el) = alice.inbox.try_recv() {
            if el.attr("type") == Some("error") {
                refused = Some((el.attr("id").unwrap_or("").to_owned(), format!("{el:?}")));
            }
        }
    }
    let (id, error) = refused.unwrap_or_else(|| panic!("nothing refused:\n{}", second.log_text()));
    assert_eq!(id, "c2");
    assert!(error.contains("resource-constraint"), "{error}");
}

#[tokio::test]
async fn a_standby_takes_over_with_the_config_file_as_it_is_now() {
    the_new_leader_reads_the_config_file_as_it_is_now(Kind::Prosody, false).await;
}

#[tokio::test]
async fn an_all_active_instance_takes_over_with_the_config_file_as_it_is_now() {
    the_new_leader_reads_the_config_file_as_it_is_now(Kind::Ejabberd, true).await;
}
