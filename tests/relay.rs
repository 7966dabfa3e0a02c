//! The relay end to end against real servers: every scenario runs once
//! against Prosody and once against ejabberd.

#[macro_use]
mod common;

use std::time::Duration;

use common::*;

const BOB: &str = "bob@relay.localhost";
const ALICE: &str = "alice@relay.localhost";
async fn online_recipient_messages_and_receipts_both_ways(kind: Kind) {
    let server = Server::start(kind, ServerOpts::default());
    let _relay = Relay::start(&server, RelayOpts::default());
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    let mut alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;

    let sent = ids("a", 5);
    for id in &sent {
        alice.message(BOB, id, &format!("hello {id}"));
    }
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let m = bob.next_body_message(SECS(10)).await.expect("bob receives");
        assert_eq!(
            m.attr("from"),
            Some(format!("{ALICE}/redeliver").as_str()),
            "relayed from alice's relay address, a full JID"
        );
        assert!(m.has_child("request", "urn:xmpp:receipts"));
        let sid = m
            .get_child("stanza-id", "urn:xmpp:sid:0")
            .expect("stanza-id");
        assert_eq!(sid.attr("by"), Some(COMPONENT));
        got.push(m.attr("id").unwrap().to_owned());
    }
    assert_eq!(got, sent);
    let receipts = alice.receipt_ids(sent.len(), SECS(10)).await;
    assert_eq!(receipts, sent, "end-to-end receipts reach alice");

    // Bob replies through the relay: the same treatment the other way.
    bob.message(ALICE, "b1", "hi alice");
    let m = alice
        .next_body_message(SECS(10))
        .await
        .expect("alice receives reply");
    assert_eq!(m.attr("id"), Some("b1"));
    assert_eq!(m.attr("from"), Some(format!("{BOB}/redeliver").as_str()));
    assert_eq!(bob.receipt_ids(1, SECS(10)).await, ["b1"]);

    // No duplicates afterwards.
    assert!(
        bob.body_ids(1, SECS(2)).await.is_empty(),
        "no duplicate to bob"
    );
}

/// Log bob in once so that he approves the relay's subscription, then out.
async fn subscribe_bob(server: &Server, relay: &Relay) {
    // The first message makes the relay ask for bob's presence.
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    let alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    alice.message(BOB, "warmup", "warm-up");
    assert_eq!(bob.body_ids(1, SECS(10)).await, ["warmup"]);
    wait_log(relay, "presence subscription approved").await;
    // The relay knows bob's client answers (the scenarios rely on it):
    // on a loaded machine ejabberd's presence flurry around the approval
    // may end the first message without its receipt, so try again.
    for n in 1..=5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if relay.log_text().contains("this client answers receipts") {
            break;
        }
        let id = format!("warmup{n}");
        alice.message(BOB, &id, "warm-up");
        assert_eq!(bob.body_ids(1, SECS(10)).await, [id]);
    }
    bob.close().await;
    alice.close().await;
    wait_log(relay, "offline").await;
}

/// Offline recipient, server offline storage off: every send bounces, the
/// relay keeps the messages and replays them once when bob logs in.
async fn offline_recipient_without_server_storage(kind: Kind) {
    let server = Server::start(kind, ServerOpts::default());
    let relay = Relay::start(&server, RelayOpts::default());
    let sent = ids("off", 4);
    send_all(&server, BOB, &sent).await;
    // Bounces and backoff retries happen meanwhile.
    tokio::time::sleep(SECS(2)).await;
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    expect_exactly(&mut bob, &sent).await;
    assert!(
        relay.log_text().contains("bounced"),
        "the relay saw the bounce"
    );
}

/// Offline recipient, server offline storage on: the server's own copy is
/// delivered at login, its receipt confirms it, and the relay does not
/// replay it.
async fn offline_recipient_with_server_storage(kind: Kind) {
    let server = Server::start(
        kind,
        ServerOpts {
            offline_storage: true,
            ..Default::default()
        },
    );
    let relay = Relay::start(&server, RelayOpts::default());
    let sent = ids("st", 3);
    send_all(&server, BOB, &sent).await;
    // Wait past the wait for an error: the server stored them silently,
    // and for a client never seen answering that counts as delivered.
    wait_log(&relay, "counted delivered").await;
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    expect_exactly(&mut bob, &sent).await;
    wait_log(&relay, "confirmed").await;
}

/// Bob is cut with a TCP reset mid-stream; without stream management the
/// server reports him unavailable, and everything unconfirmed comes again
/// at his next login.
async fn recipient_reset_without_stream_management(kind: Kind) {
    reset_scenario(kind, false).await;
}

/// The same with stream management: the server hibernates the session and
/// bounces its queue at the timeout.
async fn recipient_reset_with_stream_management(kind: Kind) {
    reset_scenario(kind, true).await;
}

async fn reset_scenario(kind: Kind, sm: bool) {
    let server = Server::start(kind, ServerOpts::default());
    let relay = Relay::start(&server, RelayOpts::default());
    subscribe_bob(&server, &relay).await;
    // Bob receives but never confirms, then his connection is reset.
    let mut bob = Client::connect(
        server.c2s_port,
        "bob",
        ClientOpts {
            receipts: false,
            sm,
            ..Default::default()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    let sent = ids("rst", 6);
    for id in &sent[..3] {
        alice.message(BOB, id, "before reset");
    }
    assert_eq!(bob.body_ids(3, SECS(10)).await, sent[..3]);
    bob.reset();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for id in &sent[3..] {
        alice.message(BOB, id, "after reset");
    }
    // Without SM the server says unavailable at once; with SM only after
    // its hibernation timeout (3 s here) when it bounces the queue.
    tokio::time::sleep(SECS(if sm { 6 } else { 2 })).await;
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    expect_exactly(&mut bob, &sent).await;
}

/// A frozen client (TCP up, nothing read): no receipt comes, so the
/// messages come again at the next login.
async fn frozen_recipient_gets_messages_at_next_login(kind: Kind) {
    let server = Server::start(kind, ServerOpts::default());
    let relay = Relay::start(&server, RelayOpts::default());
    subscribe_bob(&server, &relay).await;
    answers_once(&server, &relay, "bob", "frozen").await;
    let frozen = Client::connect(
        server.c2s_port,
        "bob",
        ClientOpts {
            resource: "frozen".into(),
            ..Default::default()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    frozen.freeze();
    let sent = ids("frz", 3);
    send_all(&server, BOB, &sent).await;
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
    expect_exactly(&mut bob, &sent).await;
    drop(frozen);
}

/// SIGKILL with pending messages, restart on the same store: all of them
/// are delivered once, in order.
async fn component_sigkill_and_restart_keeps_pending(kind: Kind) {
    let server = Server::start(kind, ServerOpts::default());
    let mut relay = Relay::start(&server, RelayOpts::default());
    subscribe_bob(&server, &relay).await;
    let sent = ids("kill", 5);
    send_all(&server, BOB, &sent).await;
    wait_stored(&relay, &sent.iter().map(String::as_str).collect::<Vec<_>>()).await;
    relay.sigkill();
    relay.restart();
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    expect_exactly(&mut bob, &sent).await;
}

/// The server restarts: the relay reconnects by itself and replays to a
/// recipient who logged in meanwhile.
async fn server_restart_reconnects_and_replays(kind: Kind) {
    let mut server = Server::start(kind, ServerOpts::default());
    let relay = Relay::start(&server, RelayOpts::default());
    subscribe_bob(&server, &relay).await;
    let sent = ids("srv", 3);
    send_all(&server, BOB, &sent).await;
    server.restart();
    relay.wait_ready(2);
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    expect_exactly(&mut bob, &sent).await;
}

/// SIGTERM: the relay closes the stream, flushes and exits 0.
async fn sigterm_exits_cleanly(kind: Kind) {
    let server = Server::start(kind, ServerOpts::default());
    let mut relay = Relay::start(&server, RelayOpts::default());
    assert_eq!(relay.terminate(), Some(0));
    let log = relay.log_text();
    assert!(log.contains("store flushed"), "{log}");
    assert!(log.contains("component stream closed"), "{log}");
}

/// Every refusal gets its error, nothing refused is stored, and the relay
/// keeps relaying afterwards.
async fn refusals_and_still_relaying(kind: Kind) {
    let server = Server::start(kind, ServerOpts::default());
    let relay = Relay::start(
        &server,
        RelayOpts {
            max_pending: 2,
            max_stanza_bytes: 2048,
            ..Default::default()
        },
    );
    let mut alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    let mut eve = Client::connect(
        server.c2s_port,
        "eve@other.localhost",
        ClientOpts::default(),
    )
    .await;

    eve.message(BOB, "e1", "let me in");
    assert_eq!(
        eve.next_error(SECS(10)).await,
        Some(("e1".into(), "not-allowed".into()))
    );

    alice.message(r"a\40b\40c@relay.localhost", "bad1", "x");
    assert_eq!(
        alice.next_error(SECS(10)).await,
        Some(("bad1".into(), "jid-malformed".into()))
    );

    alice.message(r"x\40evil.example@relay.localhost", "bad2", "x");
    assert_eq!(
        alice.next_error(SECS(10)).await,
        Some(("bad2".into(), "not-allowed".into()))
    );

    alice.message(BOB, "big", &"x".repeat(4096));
    assert_eq!(
        alice.next_error(SECS(10)).await,
        Some(("big".into(), "policy-violation".into()))
    );

    // Carol is offline (storage off): her queue fills at 2.
    let carol = "carol@relay.localhost";
    alice.message(carol, "c1", "one");
    alice.message(carol, "c2", "two");
    alice.message(carol, "c3", "three");
    assert_eq!(
        alice.next_error(SECS(10)).await,
        Some(("c3".into(), "resource-constraint".into()))
    );

    // Still relaying, and nothing refused was stored or sent.
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    alice.message(BOB, "ok1", "still there");
    assert_eq!(bob.body_ids(1, SECS(10)).await, ["ok1"]);
    assert!(
        bob.body_ids(1, SECS(2)).await.is_empty(),
        "refused messages never sent"
    );
    let mut carol_c = Client::connect(server.c2s_port, "carol", ClientOpts::default()).await;
    assert_eq!(carol_c.body_ids(3, SECS(10)).await, ["c1", "c2"]);
    assert!(!relay.log_text().contains("panicked"));
}

/// A client that advertises no receipt support (disco#info) never
/// confirms: a message counts as delivered once sent to an available
/// resource with no error within the receipt timeout, and is not replayed.
async fn client_without_receipt_support_gets_weaker_guarantee(kind: Kind) {
    let server = Server::start(kind, ServerOpts::default());
    let relay = Relay::start(&server, RelayOpts::default());
    subscribe_bob(&server, &relay).await;
    let opts = ClientOpts {
        receipts: false,
        advertise_receipts: false,
        ..Default::default()
    };
    let mut bob = Client::connect(server.c2s_port, "bob", opts.clone()).await;
    wait_log(&relay, "supports=Some(false)").await;
    let sent = ids("nr", 2);
    send_all(&server, BOB, &sent).await;
    assert_eq!(bob.body_ids(2, SECS(10)).await, sent);
    wait_log(&relay, "counted delivered").await;
    bob.close().await;
    let mut bob = Client::connect(server.c2s_port, "bob", opts).await;
    assert!(bob.body_ids(1, SECS(3)).await.is_empty(), "not replayed");
}

/// A stanza that does not parse is answered with `<bad-request/>`; the
/// link stays up and the relay keeps relaying.
async fn unparseable_stanza_is_answered_without_reconnect(kind: Kind) {
    let server = Server::start(kind, ServerOpts::default());
    let relay = Relay::start(&server, RelayOpts::default());
    let mut alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    alice.send(xml(
        // Two threads: both servers pass it on (ejabberd does not decode
        // a message's children), xmpp-parsers refuses it. A bogus type
        // would do on Prosody only: ejabberd rewrites it.
        "<message xmlns='jabber:client' to='bob@relay.localhost' id='weird' type='chat'><body>x</body><thread>a</thread><thread>b</thread></message>",
    ));
    match kind {
        Kind::Prosody => assert_eq!(
            alice.next_error(SECS(10)).await,
            Some(("weird".into(), "bad-request".into()))
        ),
        // ejabberd re-encodes the message (one thread kept) before the
        // component sees it: what arrives parses and is relayed.
        Kind::Ejabberd => assert_eq!(bob.body_ids(1, SECS(10)).await, ["weird"]),
    }
    alice.message(BOB, "after", "still relaying");
    assert_eq!(bob.body_ids(1, SECS(10)).await, ["after"]);
    let log = relay.log_text();
    if kind == Kind::Prosody {
        assert!(log.contains("stanza did not parse"), "{log}");
    }
    assert!(!log.contains("component link lost"), "no reconnect: {log}");
    assert_eq!(log.matches(READY).count(), 1);
}

/// One instance serves one domain. A second process on the same sled
/// store stops at once (sled's lock). One with its own store is refused
/// by Prosody (`conflict`) and keeps retrying; ejabberd accepts it, and
/// the later instance notices the earlier one and stops with status 3.
/// On PostgreSQL a second process on the same database stands by without
/// connecting until the first is gone (tests/failover.rs). The first
/// keeps relaying either way.
async fn second_instance_is_refused(kind: Kind) {
    let server = Server::start(kind, ServerOpts::default());
    let relay = Relay::start(&server, RelayOpts::default());

    let (status, log) = relay.run_second(false, SECS(6));
    if common::pg::relays_use_postgres() {
        assert_eq!(status, None, "stands by: {log}");
        assert!(log.contains("standby"), "{log}");
        assert!(!log.contains(READY), "{log}");
    } else {
        assert_eq!(status, Some(1), "{log}");
        assert!(log.contains("is in use by another process"), "{log}");
    }
    let (status, log) = relay.run_second(true, SECS(8));
    second_is_refused(kind, &relay, status, &log).await;
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    send_all(&server, BOB, &ids("one", 3)).await;
    expect_exactly(&mut bob, &ids("one", 3)).await;
}

/// How a second instance with a store of its own ends.
async fn second_is_refused(kind: Kind, relay: &Relay, status: Option<i32>, log: &str) {
    match kind {
        Kind::Prosody => {
            assert_eq!(status, None, "keeps retrying: {log}");
            assert!(log.contains("Conflict"), "{log}");
            assert!(!log.contains(READY), "{log}");
        }
        Kind::Ejabberd => {
            assert_eq!(status, Some(3), "{log}");
            assert!(log.contains(READY), "ejabberd let it in: {log}");
            assert!(log.contains("another redeliver instance"), "{log}");
        }
    }
    if kind == Kind::Ejabberd {
        wait_log(relay, "it started later and will stop").await;
    }
}

on_both_servers!(
    online_recipient_messages_and_receipts_both_ways,
    offline_recipient_without_server_storage,
    offline_recipient_with_server_storage,
    recipient_reset_without_stream_management,
    recipient_reset_with_stream_management,
    frozen_recipient_gets_messages_at_next_login,
    component_sigkill_and_restart_keeps_pending,
    server_restart_reconnects_and_replays,
    sigterm_exits_cleanly,
    refusals_and_still_relaying,
    client_without_receipt_support_gets_weaker_guarantee,
    unparseable_stanza_is_answered_without_reconnect,
    second_instance_is_refused,
);
