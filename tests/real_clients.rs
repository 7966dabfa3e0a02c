//! Recipients that answer receipts the way real clients do (issue 12):
//! one that always answers (Dino, Profanity, Movim); one that answers
//! only roster contacts (Gajim 1.7, Conversations, Monal, Psi;
//! `ClientOpts::receipts_to_contacts_only`) whose user approves the
//! relay's requests, and one whose user ignores them; one that
//! advertises receipts and never answers (receipts turned off). Each is
//! shown every message exactly once across reconnects and the queue
//! drains; the sender gets every receipt the client sent. Each scenario
//! runs on Prosody and on ejabberd and prints its figures.

#[macro_use]
mod common;

use std::time::Duration;

use common::operator::*;
use common::*;

const BOB: &str = "bob@relay.localhost";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rule {
    Always,
    /// Gajim's: only roster contacts with subscription from or both;
    /// its user approves every request.
    ContactsOnly,
    /// Gajim's rule, and its user ignores every subscription request
    /// (the relay's and the relay contact's).
    ContactsOnlyIgnoring,
    /// Advertises receipts, never sends one.
    Never,
}

impl Rule {
    fn opts(self) -> ClientOpts {
        ClientOpts {
            receipts: self != Rule::Never,
            receipts_to_contacts_only: matches!(
                self,
                Rule::ContactsOnly | Rule::ContactsOnlyIgnoring
            ),
            approve: self != Rule::ContactsOnlyIgnoring,
            ..Default::default()
        }
    }

    /// Whether the client sends receipts to the relay addresses.
    fn answers(self) -> bool {
        matches!(self, Rule::Always | Rule::ContactsOnly)
    }
}

/// Body messages `client` gets within `wait` (ids, duplicates kept).
async fn shown(client: &mut Client, wait: Duration) -> Vec<String> {
    client.body_ids(usize::MAX, wait).await
}

/// Alice sends `n` messages to bob, whose client follows `rule`; bob is
/// online from the start (`online`) or logs in after they were sent.
/// Then bob logs out and in twice. Checks and prints: sent, shown,
/// shown twice, receipts to alice, pending at the end.
async fn scenario(kind: Kind, rule: Rule, online: bool) {
    scenario_on(kind, rule, online, false).await;
}

/// [`scenario`], with the server granting privileges (XEP-0356) or not.
async fn scenario_on(kind: Kind, rule: Rule, online: bool, privileged: bool) {
    let server = Server::start(
        kind,
        ServerOpts {
            privilege: privileged,
            ..Default::default()
        },
    );
    // Prosody's roster permission puts the relay contact into the roster:
    // a contacts-only client answers it even if its user approves nothing.
    let answers =
        rule.answers() || privileged && kind == Kind::Prosody && rule == Rule::ContactsOnlyIgnoring;
    // New correspondents' first messages wait for the relay contact's
    // answer, as by default.
    let relay = Relay::start(
        &server,
        RelayOpts {
            contact_wait_ms: 10_000,
            ..Default::default()
        },
    );
    let mut alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    let sent = ids(if online { "on" } else { "off" }, 3);
    let mut bob = if online {
        Some(Client::connect(server.c2s_port, "bob", rule.opts()).await)
    } else {
        None
    };
    for id in &sent {
        alice.message(BOB, id, &format!("body of {id}"));
    }
    let mut all = Vec::new();
    if bob.is_none() {
        // Bounces and retries meanwhile (offline storage off).
        tokio::time::sleep(SECS(2)).await;
        bob = Some(Client::connect(server.c2s_port, "bob", rule.opts()).await);
    }
    let mut bob = bob.expect("connected");
    // Past the receipt timeout, so that what waits for a receipt would
    // be replayed at the next login. Without approval the first messages
    // wait for the relay contact's answer (10 s), and with presence
    // unknown they go one at a time, retried with backoff while bob is
    // offline.
    let first = if rule == Rule::ContactsOnlyIgnoring {
        30
    } else {
        5
    };
    all.extend(shown(&mut bob, SECS(first)).await);
    for _ in 0..2 {
        bob.close().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        bob = Client::connect(server.c2s_port, "bob", rule.opts()).await;
        all.extend(shown(&mut bob, SECS(4)).await);
    }
    let receipts = alice.receipt_ids(sent.len(), SECS(1)).await;
    let log = relay.log_text();
    // Confirmed by a receipt, or counted delivered without one, and not
    // put back by a late bounce.
    let settled = sent
        .iter()
        .filter(|id| {
            log.lines().any(|l| {
                (l.contains(" confirmed") || l.contains("counted delivered"))
                    && l.contains(&format!("id={id} "))
            }) && !log
                .lines()
                .any(|l| l.contains("back in its queue") && l.contains(&format!("id={id} ")))
        })
        .count();
    let mut unique = all.clone();
    unique.sort();
    unique.dedup();
    println!(
        "{kind:?} {rule:?}{} {}: sent {}, shown {}, shown twice {}, receipts to alice {}, pending at the end {}",
        if privileged { " privileged" } else { "" },
        if online {
            "online"
        } else {
            "offline then online"
        },
        sent.len(),
        unique.len(),
        all.len() - unique.len(),
        receipts.len(),
        sent.len() - settled
    );
    assert_eq!(unique, sent, "every message shown: {all:?}");
    assert_eq!(all.len(), sent.len(), "nothing shown twice: {all:?}");
    assert_eq!(all, sent, "in the order sent");
    let mut r = receipts.clone();
    r.sort();
    if answers {
        assert_eq!(r, sent, "alice gets bob's receipts");
    } else {
        assert!(r.is_empty(), "bob sent none: {r:?}");
    }
    assert_eq!(settled, sent.len(), "the queue drained:\n{log}");
    let pending = pending_messages(&server).await;
    assert_eq!(pending, 0, "stats: nothing pending");
}

/// `stats`' pending-messages, asked by the admin.
async fn pending_messages(server: &Server) -> u64 {
    let mut op = Operator::connect(server, "admin").await;
    let stats = op.run("stats", &[]).await;
    number(&stats, "pending-messages")
}

async fn always_answering_client(kind: Kind) {
    scenario(kind, Rule::Always, true).await;
    scenario(kind, Rule::Always, false).await;
}

/// The relay address asks bob for a subscription (a relay contact); once
/// his user approved, his contacts-only client answers it like any
/// contact.
async fn contacts_only_client_that_approves(kind: Kind) {
    scenario(kind, Rule::ContactsOnly, true).await;
    scenario(kind, Rule::ContactsOnly, false).await;
}

/// His user ignores every request: the client never answers, and is
/// shown each message once.
async fn contacts_only_client_that_ignores_the_request(kind: Kind) {
    scenario(kind, Rule::ContactsOnlyIgnoring, true).await;
    scenario(kind, Rule::ContactsOnlyIgnoring, false).await;
}

/// Every client mode, online and offline then online, with the server
/// granting privileges (XEP-0356).
async fn every_client_mode_in_privileged_mode(kind: Kind) {
    for rule in [
        Rule::Always,
        Rule::ContactsOnly,
        Rule::ContactsOnlyIgnoring,
        Rule::Never,
    ] {
        scenario_on(kind, rule, true, true).await;
        scenario_on(kind, rule, false, true).await;
    }
}

/// Receipts turned off (still advertised): shown each message once.
async fn client_that_never_answers(kind: Kind) {
    scenario(kind, Rule::Never, true).await;
    scenario(kind, Rule::Never, false).await;
}

on_both_servers!(
    always_answering_client,
    contacts_only_client_that_approves,
    contacts_only_client_that_ignores_the_request,
    client_that_never_answers,
    privileged_mode_needs_no_prompt,
    every_client_mode_in_privileged_mode,
);

/// Privileged mode (XEP-0356), with a contacts-only client whose user
/// would ignore every prompt. On Prosody (mod_privilege) the relay puts
/// the relay contact into bob's roster with subscription both: no prompt,
/// his client answers, alice gets every receipt. On ejabberd 23.01 the
/// roster set fails (SERVER-FACTS.md), so the relay asks instead; his
/// user ignores it and each message is shown once. On both, presence
/// comes without the domain's subscription request.
async fn privileged_mode_needs_no_prompt(kind: Kind) {
    let server = Server::start(
        kind,
        ServerOpts {
            privilege: true,
            ..Default::default()
        },
    );
    let relay = Relay::start(
        &server,
        RelayOpts {
            contact_wait_ms: 10_000,
            ..Default::default()
        },
    );
    wait_log(&relay, "the server granted privileges").await;
    let opts = Rule::ContactsOnlyIgnoring.opts();
    let mut bob = Client::connect(server.c2s_port, "bob", opts.clone()).await;
    let mut alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    let sent = ids("priv", 3);
    for id in &sent {
        alice.message(BOB, id, &format!("body of {id}"));
    }
    let mut all = shown(&mut bob, SECS(12)).await;
    bob.close().await;
    let mut bob = Client::connect(server.c2s_port, "bob", opts).await;
    all.extend(shown(&mut bob, SECS(4)).await);
    let receipts = alice.receipt_ids(sent.len(), SECS(1)).await;
    let log = relay.log_text();
    println!(
        "{kind:?} privileged: sent {}, shown {}, receipts to alice {}",
        sent.len(),
        all.len(),
        receipts.len()
    );
    assert_eq!(all, sent, "each shown once, in order");
    assert!(
        !log.contains("requesting presence subscription"),
        "no prompt for the relay's domain:\n{log}"
    );
    match kind {
        Kind::Prosody => {
            assert!(log.contains("adding a relay contact to the roster (privileged)"));
            assert!(
                !log.contains("asking for a relay contact"),
                "no prompt:\n{log}"
            );
            let mut r = receipts.clone();
            r.sort();
            assert_eq!(r, sent, "his client answers the roster contact");
        }
        Kind::Ejabberd => {
            assert!(
                log.contains("the server refused a privileged roster set"),
                "{log}"
            );
            assert!(log.contains("asking for a relay contact"));
            assert!(receipts.is_empty());
        }
    }
    assert_eq!(pending_messages(&server).await, 0);
}
