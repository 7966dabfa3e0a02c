//! Expiry, quotas, the rate limit and foreign confirmations, against real
//! servers (each scenario runs on Prosody and on ejabberd).

#[macro_use]
mod common;

use std::time::Duration;

use common::*;

const BOB: &str = "bob@relay.localhost";

/// (id, condition) of the next `n` errors alice gets within `wait`.
async fn errors(client: &mut Client, n: usize, wait: Duration) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let end = tokio::time::Instant::now() + wait;
    while out.len() < n {
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        match client.next_error(left).await {
            // The test client's own receipts (for the notices it gets)
            // bounce while redeliver is down: not about its messages.
            Some((id, _)) if id.starts_with("rcpt-") => {}
            Some(e) => out.push(e),
            None => break,
        }
    }
    out
}

/// Messages nobody confirms within `message_ttl_s` are removed and their
/// sender is told, also when the TTL passed while redeliver was down.
async fn expiry_tells_the_sender_and_survives_a_restart(kind: Kind) {
    let server = Server::start(kind, ServerOpts::default());
    let mut relay = Relay::start(
        &server,
        RelayOpts {
            message_ttl_s: 3,
            ..Default::default()
        },
    );
    let mut alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    alice.message(BOB, "e1", "never read");
    alice.message(BOB, "e2", "never read either");
    let got = errors(&mut alice, 2, SECS(15)).await;
    assert_eq!(
        got,
        [
            ("e1".to_owned(), "recipient-unavailable".to_owned()),
            ("e2".to_owned(), "recipient-unavailable".to_owned())
        ]
    );
    assert!(relay.log_text().contains("expired undelivered"));

    // Accepted, then the process dies and the TTL passes while it is down.
    alice.message(BOB, "e3", "expires while the relay is down");
    wait_stored(&relay, &["e3"]).await;
    relay.sigkill();
    tokio::time::sleep(SECS(4)).await;
    relay.restart();
    let got = errors(&mut alice, 1, SECS(10)).await;
    assert_eq!(got, [("e3".to_owned(), "recipient-unavailable".to_owned())]);

    // Nothing is left for bob.
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    assert!(bob.body_ids(1, SECS(3)).await.is_empty());
}

/// Issue 11, defect 10: the sender of a message that expires gets a
/// notice even when the resource it sent from has gone away (before, only
/// an error to that full JID, which the server drops): a chat message from
/// the recipient's relay address, kept by the relay (or the server's
/// offline storage) until the sender is back, and shown once.
async fn expiry_notice_reaches_a_sender_who_went_away(kind: Kind) {
    for offline_storage in [false, true] {
        let server = Server::start(
            kind,
            ServerOpts {
                offline_storage,
                ..Default::default()
            },
        );
        let relay = Relay::start(
            &server,
            RelayOpts {
                message_ttl_s: 2,
                ..Default::default()
            },
        );
        // Bob's client is known to answer, so the relay waits for his
        // receipt (for a client never seen answering, a message the
        // server stored offline counts delivered and never expires here).
        answers_once(&server, &relay, "bob", "test").await;
        let alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
        alice.message(BOB, "gone1", "sent just before logging out");
        wait_log(&relay, "id=gone1").await;
        alice.close().await;
        wait_log(&relay, "expired undelivered").await;
        tokio::time::sleep(SECS(1)).await;
        let mut alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
        let notice = alice
            .next_body_message(SECS(20))
            .await
            .unwrap_or_else(|| panic!("no notice (offline storage {offline_storage})"));
        assert_eq!(
            notice
                .attr("from")
                .map(|f| f.split('/').next().unwrap_or(f)),
            Some(BOB),
            "{notice:?}"
        );
        let body = notice.get_child("body", CLIENT_NS).unwrap().text();
        assert!(body.contains("gone1"), "{body}");
        let again = alice.drain(SECS(3)).await;
        assert!(
            !again
                .iter()
                .any(|m| m.get_child("body", CLIENT_NS).is_some()),
            "shown once (offline storage {offline_storage}): {again:?}"
        );
    }
}

/// The store cap refuses new messages with `<resource-constraint/>`; what
/// was accepted before is all delivered.
async fn store_cap_refuses_new_messages_and_keeps_the_old(kind: Kind) {
    let server = Server::start(kind, ServerOpts::default());
    let _relay = Relay::start(
        &server,
        RelayOpts {
            // Room for a few stanzas of about 300 bytes.
            max_store_bytes: 1500,
            ..Default::default()
        },
    );
    let mut alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    let sent = ids("cap", 8);
    for id in &sent {
        alice.message(BOB, id, "a message that takes some room in the store");
    }
    let refused = errors(&mut alice, 8, SECS(5)).await;
    assert!(!refused.is_empty(), "the cap was reached");
    assert!(
        refused.iter().all(|(_, c)| c == "resource-constraint"),
        "{refused:?}"
    );
    let refused_ids: Vec<&str> = refused.iter().map(|(id, _)| id.as_str()).collect();
    let kept: Vec<String> = sent
        .iter()
        .filter(|id| !refused_ids.contains(&id.as_str()))
        .cloned()
        .collect();
    assert!(kept.len() >= 2, "{kept:?}");
    // The refused ones are the last ones: nothing accepted was dropped.
    assert_eq!(kept, sent[..kept.len()]);
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    expect_exactly(&mut bob, &kept).await;
}

/// A sender over its rate gets `<policy-violation/>` (type wait) for the
/// excess; the bucket refills.
async fn rate_limit_refuses_the_excess(kind: Kind) {
    let server = Server::start(kind, ServerOpts::default());
    let _relay = Relay::start(
        &server,
        RelayOpts {
            sender_rate_per_s: 1,
            sender_burst: 3,
            ..Default::default()
        },
    );
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    let mut alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    for id in ["r1", "r2", "r3", "r4", "r5"] {
        alice.message(BOB, id, "fast");
    }
    let refused = errors(&mut alice, 2, SECS(10)).await;
    assert_eq!(
        refused,
        [
            ("r4".to_owned(), "policy-violation".to_owned()),
            ("r5".to_owned(), "policy-violation".to_owned())
        ]
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    alice.message(BOB, "r6", "after a pause");
    // Another sender has a bucket of its own.
    let carol = Client::connect(server.c2s_port, "carol", ClientOpts::default()).await;
    carol.message(BOB, "c1", "from carol");
    let mut got = bob.body_ids(5, SECS(10)).await;
    got.sort();
    assert_eq!(got, ["c1", "r1", "r2", "r3", "r6"]);
    assert!(errors(&mut alice, 1, SECS(1)).await.is_empty());
}

/// A receipt or marker confirms only the message it is about: from its
/// recipient, for its sender. Carol's receipt for bob's message id, and
/// bob's marker sent to the wrong sender, confirm nothing.
async fn foreign_receipts_and_markers_confirm_nothing(kind: Kind) {
    let server = Server::start(kind, ServerOpts::default());
    let relay = Relay::start(&server, RelayOpts::default());
    // Bob's client is known to answer, but does not (yet).
    answers_once(&server, &relay, "bob", "test").await;
    let mut bob = Client::connect(
        server.c2s_port,
        "bob",
        ClientOpts {
            receipts: false,
            ..Default::default()
        },
    )
    .await;
    let alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    alice.message(BOB, "f1", "for bob");
    assert_eq!(bob.body_ids(1, SECS(10)).await, ["f1"]);

    // Carol claims to have received bob's message.
    let carol = Client::connect(server.c2s_port, "carol", ClientOpts::default()).await;
    carol.send(xml(
        "<message xmlns='jabber:client' to='alice@relay.localhost' id='x1'>\
         <received xmlns='urn:xmpp:receipts' id='f1'/></message>",
    ));
    // Bob marks it displayed, but towards dave instead of alice.
    bob.send(xml(
        "<message xmlns='jabber:client' to='dave@relay.localhost' id='x2'>\
         <displayed xmlns='urn:xmpp:chat-markers:0' id='f1'/></message>",
    ));
    // A receipt for an id nobody sent.
    bob.send(xml(
        "<message xmlns='jabber:client' to='alice@relay.localhost' id='x3'>\
         <received xmlns='urn:xmpp:receipts' id='no-such-id'/></message>",
    ));
    tokio::time::sleep(SECS(1)).await;
    let confirmed = relay
        .log_text()
        .lines()
        .filter(|l| l.contains(" confirmed"))
        .count();
    assert_eq!(confirmed, 1, "only the hello was confirmed");

    // Still pending: bob's next login gets it again, and his own receipt
    // confirms it.
    bob.close().await;
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    assert_eq!(bob.body_ids(1, SECS(10)).await, ["f1"]);
    wait_log_line(&relay, &[" confirmed", "id=f1 "]).await;
}

/// Issue 23, item 3: a local user writes sixteen receipts to a relay
/// address, each naming an id of 8,000 `"` (128 KB as sent, under the
/// server's client limit; written `&quot;` they made a 640 KB stanza from
/// redeliver, and Prosody closed the component link on it). They name
/// nothing the relay stored: not relayed, and the link stays up.
async fn receipts_naming_nothing_leave_the_link_up(kind: Kind) {
    use tokio::io::AsyncWriteExt;
    let server = Server::start(kind, ServerOpts::default());
    let relay = Relay::start(&server, RelayOpts::default());
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    let mut mallory = raw_session(server.c2s_port, "carol").await;
    let id = "\"".repeat(8000);
    let receipts: String = (0..16)
        .map(|_| format!("<received xmlns='urn:xmpp:receipts' id='{id}'/>"))
        .collect();
    let stanza = format!(
        "<message xmlns='jabber:client' to='alice@relay.localhost' id='junk'>{receipts}</message>"
    );
    for _ in 0..3 {
        mallory.write_all(stanza.as_bytes()).await.unwrap();
    }
    mallory.flush().await.unwrap();
    tokio::time::sleep(SECS(2)).await;
    send_all(&server, BOB, &ids("after", 2)).await;
    assert_eq!(bob.body_ids(2, SECS(10)).await, ids("after", 2));
    let log = relay.log_text();
    assert!(!log.contains("component link lost"), "{log}");
    assert_eq!(log.matches(READY).count(), 1, "no reconnect: {log}");
}

on_both_servers!(
    receipts_naming_nothing_leave_the_link_up,
    expiry_tells_the_sender_and_survives_a_restart,
    expiry_notice_reaches_a_sender_who_went_away,
    store_cap_refuses_new_messages_and_keeps_the_old,
    rate_limit_refuses_the_excess,
    foreign_receipts_and_markers_confirm_nothing,
);
