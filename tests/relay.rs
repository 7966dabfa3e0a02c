//! The relay end to end against a real Prosody.

mod common;

use std::time::Duration;

use common::*;

const BOB: &str = "bob@relay.localhost";
const ALICE: &str = "alice@relay.localhost";
const SECS: fn(u64) -> Duration = Duration::from_secs;

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}{i}")).collect()
}

#[tokio::test]
async fn online_recipient_messages_and_receipts_both_ways() {
    let prosody = Prosody::start(ProsodyOpts::default());
    let _relay = Relay::start(&prosody, RelayOpts::default());
    let mut bob = Client::connect(prosody.c2s_port, "bob", ClientOpts::default()).await;
    let mut alice = Client::connect(prosody.c2s_port, "alice", ClientOpts::default()).await;

    let sent = ids("a", 5);
    for id in &sent {
        alice.message(BOB, id, &format!("hello {id}"));
    }
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let m = bob.next_body_message(SECS(10)).await.expect("bob receives");
        assert_eq!(m.attr("from"), Some(ALICE), "relayed from alice's relay address");
        assert!(m.has_child("request", "urn:xmpp:receipts"));
        let sid = m.get_child("stanza-id", "urn:xmpp:sid:0").expect("stanza-id");
        assert_eq!(sid.attr("by"), Some(COMPONENT));
        got.push(m.attr("id").unwrap().to_owned());
    }
    assert_eq!(got, sent);
    let receipts = alice.receipt_ids(sent.len(), SECS(10)).await;
    assert_eq!(receipts, sent, "end-to-end receipts reach alice");

    // Bob replies through the relay: the same treatment the other way.
    bob.message(ALICE, "b1", "hi alice");
    let m = alice.next_body_message(SECS(10)).await.expect("alice receives reply");
    assert_eq!(m.attr("id"), Some("b1"));
    assert_eq!(m.attr("from"), Some(BOB));
    assert_eq!(bob.receipt_ids(1, SECS(10)).await, ["b1"]);

    // No duplicates afterwards.
    assert!(bob.body_ids(1, SECS(2)).await.is_empty(), "no duplicate to bob");
}
