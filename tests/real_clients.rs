//! Recipients that answer receipts the way real clients do (issue 12).
//! Here: one that always answers (Dino, Profanity, Movim): each message
//! is shown once across reconnects, the sender gets every receipt, the
//! queue drains. Clients that answer only roster contacts (Gajim 1.7,
//! Conversations, Monal, Psi; `ClientOpts::receipts_to_contacts_only`)
//! or never are not covered yet: the relay still shows them a message
//! again at each login until its TTL (issue 12, items 1 and 2). Each
//! scenario runs on Prosody and on ejabberd and prints its figures.

#[macro_use]
mod common;

use std::time::Duration;

use common::*;

const BOB: &str = "bob@relay.localhost";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rule {
    Always,
    /// Gajim's: only roster contacts with subscription from or both;
    /// its user approves every request.
    ContactsOnly,
}

impl Rule {
    fn opts(self) -> ClientOpts {
        ClientOpts {
            receipts_to_contacts_only: self == Rule::ContactsOnly,
            ..Default::default()
        }
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
    let server = Server::start(kind, ServerOpts::default());
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
    // be replayed at the next login.
    all.extend(shown(&mut bob, SECS(5)).await);
    for _ in 0..2 {
        bob.close().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        bob = Client::connect(server.c2s_port, "bob", rule.opts()).await;
        all.extend(shown(&mut bob, SECS(4)).await);
    }
    let receipts = alice.receipt_ids(sent.len(), SECS(1)).await;
    let log = relay.log_text();
    let settled = sent
        .iter()
        .filter(|id| {
            log.lines()
                .any(|l| l.contains(" confirmed") && l.contains(&format!("id={id} ")))
        })
        .count();
    let mut unique = all.clone();
    unique.sort();
    unique.dedup();
    println!(
        "{kind:?} {rule:?} {}: sent {}, shown {}, shown twice {}, receipts to alice {}, pending at the end {}",
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
    let mut r = receipts.clone();
    r.sort();
    assert_eq!(r, sent, "alice gets bob's receipts");
    assert_eq!(settled, sent.len(), "the queue drained:\n{log}");
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

on_both_servers!(always_answering_client, contacts_only_client_that_approves);
