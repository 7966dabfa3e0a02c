//! XEP-0203 `<delay/>` as the recipient's client sees it, against real
//! servers: a message that goes out later than the moment redeliver
//! accepted it carries `<delay from='relay.localhost' stamp='…'/>` with
//! that moment, so the client shows when it was sent; a message relayed
//! at once carries none.

#[macro_use]
mod common;

use std::time::Duration;

use common::*;
use minidom::Element;

const BOB: &str = "bob@relay.localhost";

/// `m` is message `id` with redeliver's delay, stamped inside `span` (the
/// wall-clock time its sender sent it in).
fn assert_ours(m: &Element, id: &str, (from, to): (i64, i64)) {
    assert_eq!(m.attr("id"), Some(id), "{m:?}");
    let ours: Vec<i64> = delays(m)
        .into_iter()
        .filter(|(by, _)| by == COMPONENT)
        .map(|(_, stamp)| stamp)
        .collect();
    assert_eq!(ours.len(), 1, "{id}: one delay from {COMPONENT}: {m:?}");
    assert!(
        (from..=to).contains(&ours[0]),
        "{id}: stamp {} is not its accept time ({from}..={to})",
        ours[0]
    );
}

/// Bob's next `n` body messages.
async fn next_messages(bob: &mut Client, n: usize) -> Vec<Element> {
    let mut out = Vec::new();
    while out.len() < n {
        match bob.next_body_message(SECS(15)).await {
            Some(m) => out.push(m),
            None => panic!("bob got {} of {n} messages: {out:?}", out.len()),
        }
    }
    out
}

/// Alice sends `ids` to Bob's relay address and logs out; the wall-clock
/// span they were sent (and accepted) in.
async fn alice_sends(server: &Server, ids: &[&str]) -> (i64, i64) {
    let from = now_ms();
    send_all(
        server,
        BOB,
        &ids.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    )
    .await;
    (from, now_ms())
}

/// Bob approves the relay's subscription at a first login, then leaves:
/// the relay knows when he is offline.
async fn subscribed_then_offline(server: &Server, relay: &Relay) {
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    let alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    alice.message(BOB, "warmup", "warm-up");
    let m = next_messages(&mut bob, 1).await.remove(0);
    assert!(delays(&m).is_empty(), "relayed at once: no delay: {m:?}");
    wait_log(relay, "presence subscription approved").await;
    wait_log(relay, "confirmed").await;
    bob.close().await;
    alice.close().await;
    wait_log(relay, "offline").await;
}

/// Online: relayed at once, with no delay (in fsync mode after its own
/// fsync, on PostgreSQL after its commit: still at once).
async fn relayed_at_once_carries_none(kind: Kind) {
    let server = Server::start(kind, ServerOpts::default());
    let relay = Relay::start(&server, RelayOpts::default());
    subscribed_then_offline(&server, &relay).await;
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    alice.message(BOB, "now1", "at once");
    let m = next_messages(&mut bob, 1).await.remove(0);
    assert_eq!(m.attr("id"), Some("now1"));
    assert!(delays(&m).is_empty(), "relayed at once: {m:?}");
}

/// Offline at send time, the server's offline storage off: redeliver
/// keeps them and replays them at login with their accept time.
async fn offline_without_server_storage(kind: Kind) {
    let server = Server::start(kind, ServerOpts::default());
    let relay = Relay::start(&server, RelayOpts::default());
    subscribed_then_offline(&server, &relay).await;
    let span = alice_sends(&server, &["off1", "off2"]).await;
    tokio::time::sleep(SECS(1)).await;
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    let got = next_messages(&mut bob, 2).await;
    assert_ours(&got[0], "off1", span);
    assert_ours(&got[1], "off2", span);
}

/// Offline at send time, the server's offline storage on: the relay
/// knows Bob is away, so it holds them itself (nothing goes to the
/// server's storage) and replays them at login with their accept time.
async fn offline_with_server_storage(kind: Kind) {
    let server = Server::start(
        kind,
        ServerOpts {
            offline_storage: true,
            ..Default::default()
        },
    );
    let relay = Relay::start(&server, RelayOpts::default());
    subscribed_then_offline(&server, &relay).await;
    let span = alice_sends(&server, &["st1", "st2"]).await;
    tokio::time::sleep(SECS(1)).await;
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    let got = next_messages(&mut bob, 2).await;
    assert_ours(&got[0], "st1", span);
    assert_ours(&got[1], "st2", span);
    let more = bob.body_ids(1, SECS(3)).await;
    assert!(more.is_empty(), "nothing twice: {more:?}");
}

/// The first message from a new correspondent waits for the relay
/// contact's answer; Bob logs in and approves, and it goes then, a first
/// send that waited (before, it went without a delay).
async fn held_for_a_relay_contact(kind: Kind) {
    let server = Server::start(kind, ServerOpts::default());
    let relay = Relay::start(
        &server,
        RelayOpts {
            contact_wait_ms: 20_000,
            ..Default::default()
        },
    );
    let span = alice_sends(&server, &["c1"]).await;
    tokio::time::sleep(SECS(2)).await;
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    let got = next_messages(&mut bob, 1).await;
    assert_ours(&got[0], "c1", span);
    wait_log(&relay, "relay contact approved").await;
}

/// Bob's queue is full (limit 1): the second message is refused with
/// `resource-constraint`; sent again once there is room, it is accepted
/// while Bob is away and reaches him at login with its new accept time.
async fn refused_for_quota_then_accepted(kind: Kind) {
    let server = Server::start(kind, ServerOpts::default());
    let relay = Relay::start(
        &server,
        RelayOpts {
            max_pending: 1,
            ..Default::default()
        },
    );
    subscribed_then_offline(&server, &relay).await;
    let mut alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    let first = now_ms();
    alice.message(BOB, "q1", "first");
    alice.message(BOB, "q2", "over the quota");
    assert_eq!(
        alice.next_error(SECS(10)).await,
        Some(("q2".into(), "resource-constraint".into()))
    );
    let span = (first, now_ms());
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    let got = next_messages(&mut bob, 1).await;
    assert_ours(&got[0], "q1", span);
    wait_log_line(&relay, &["confirmed", "id=q1"]).await;
    bob.close().await;
    wait_log(&relay, "offline").await;
    let again = now_ms();
    alice.message(BOB, "q2", "over the quota");
    wait_log_line(&relay, &["accepted", "id=q2"]).await;
    let span = (again, now_ms());
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    let got = next_messages(&mut bob, 1).await;
    assert_ours(&got[0], "q2", span);
}

/// A client known to answer receipts freezes: the message it never
/// confirmed comes again at the next login, with its accept time.
async fn replayed_after_a_receipt_timeout(kind: Kind) {
    let server = Server::start(kind, ServerOpts::default());
    let relay = Relay::start(&server, RelayOpts::default());
    subscribed_then_offline(&server, &relay).await;
    answers_once(&server, &relay, "bob", "frozen").await;
    let mut frozen = Client::connect(
        server.c2s_port,
        "bob",
        ClientOpts {
            resource: "frozen".into(),
            receipts: false,
            ..Default::default()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let span = alice_sends(&server, &["rt1"]).await;
    let m = next_messages(&mut frozen, 1).await.remove(0);
    assert!(delays(&m).is_empty(), "its first send went at once: {m:?}");
    wait_log(&relay, "receipt timeout").await;
    let mut bob = Client::connect(
        server.c2s_port,
        "bob",
        ClientOpts {
            resource: "fresh".into(),
            ..Default::default()
        },
    )
    .await;
    let got = next_messages(&mut bob, 1).await;
    assert_ours(&got[0], "rt1", span);
}

on_both_servers!(
    relayed_at_once_carries_none,
    offline_without_server_storage,
    offline_with_server_storage,
    held_for_a_relay_contact,
    refused_for_quota_then_accepted,
    replayed_after_a_receipt_timeout,
);
