//! Transparent mode against real servers (docs/transparent.md): alice
//! writes to bob@localhost, not to a relay address. The server module
//! from component-config/ hands redeliver what the server cannot deliver,
//! and redeliver replays it as alice when bob is back: once, with its id
//! and one delay from relay.localhost stamped with the time alice sent
//! it, and alice gets bob's receipt.

#[macro_use]
mod common;

use std::time::Duration;

use common::*;
use minidom::Element;

const BOB: &str = "bob@localhost";
const HANDOFF: &str = "urn:redeliver:handoff:0";

/// redeliver, up, with the server's message permission.
async fn relay_for(server: &Server, opts: RelayOpts) -> Relay {
    let relay = Relay::start(server, opts);
    wait_log(&relay, "transparent mode hand-offs are taken").await;
    relay
}

/// `m` is alice's message `id` as redeliver replays it: from her bare
/// JID, one delay, from relay.localhost, stamped when she sent it: inside
/// `span` (from before she sent it to after redeliver took it), give or
/// take the second a server's clock rounds down to.
fn assert_replayed(m: &Element, id: &str, (from, to): (i64, i64)) {
    assert_eq!(m.attr("id"), Some(id), "{m:?}");
    assert_eq!(m.attr("from"), Some("alice@localhost"), "{m:?}");
    let d = delays(m);
    assert_eq!(d.len(), 1, "{id}: one delay: {m:?}");
    assert_eq!(d[0].0, COMPONENT, "{m:?}");
    assert!(
        (from - 1000..=to).contains(&d[0].1),
        "{id}: stamp {} is not when alice sent it ({from}..={to})",
        d[0].1
    );
}

/// Bob's next `n` body messages, and nothing more within three seconds.
async fn exactly(bob: &mut Client, n: usize) -> Vec<Element> {
    let mut out = Vec::new();
    while out.len() < n {
        match bob.next_body_message(SECS(20)).await {
            Some(m) => out.push(m),
            None => panic!("bob got {} of {n} messages: {out:?}", out.len()),
        }
    }
    let more = bob.next_body_message(SECS(3)).await;
    assert!(more.is_none(), "nothing twice: {more:?}");
    out
}

fn ids_of(ms: &[Element]) -> Vec<String> {
    ms.iter()
        .map(|m| m.attr("id").unwrap_or("").to_owned())
        .collect()
}

/// Alice writes `ids` to bob@localhost; the wall-clock time just before.
async fn alice_writes(alice: &Client, ids: &[&str]) -> i64 {
    let from = now_ms();
    for id in ids {
        alice.message(BOB, id, &format!("body of {id}"));
    }
    from
}

/// Offline at send time: handed off, replayed once at login as alice,
/// and alice gets bob's receipts.
async fn offline_at_send_time(kind: Kind) {
    let server = Server::start(kind, ServerOpts::transparent());
    let relay = relay_for(&server, RelayOpts::default()).await;
    let mut alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    let sent = alice_writes(&alice, &["t1", "t2"]).await;
    wait_stored(&relay, &["t1", "t2"]).await;
    let span = (sent, now_ms());
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    let got = exactly(&mut bob, 2).await;
    assert_eq!(ids_of(&got), ["t1", "t2"]);
    for (m, id) in got.iter().zip(["t1", "t2"]) {
        assert_replayed(m, id, span);
    }
    let mut receipts = alice.receipt_ids(2, SECS(10)).await;
    receipts.sort();
    assert_eq!(receipts, ["t1", "t2"], "alice has bob's receipts");
    wait_log(&relay, "confirmed").await;
    // Confirmed: a second login brings nothing.
    bob.close().await;
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    assert!(bob.next_body_message(SECS(3)).await.is_none());
}

/// Bob's stream-management session hibernates and times out with a
/// message queued: the server hands it off; it comes once at the next
/// login with the time alice sent it (mod_smacks' own stamp replaced).
async fn stream_management_timeout(kind: Kind) {
    let server = Server::start(kind, ServerOpts::transparent());
    let relay = relay_for(&server, RelayOpts::default()).await;
    let bob = Client::connect(
        server.c2s_port,
        "bob",
        ClientOpts {
            sm: true,
            ..Default::default()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    bob.reset();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    let sent = alice_writes(&alice, &["sm1"]).await;
    // The hibernation (3 s) ends; the queued message is handed off.
    wait_stored(&relay, &["sm1"]).await;
    let span = (sent, now_ms());
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    let got = exactly(&mut bob, 1).await;
    assert_replayed(&got[0], "sm1", span);
}

/// redeliver is down when the server fails to deliver: the server's own
/// storage delivers, once (and redeliver, back, does not).
async fn component_down(kind: Kind) {
    let server = Server::start(kind, ServerOpts::transparent());
    let mut relay = relay_for(&server, RelayOpts::default()).await;
    relay.terminate();
    let alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    alice_writes(&alice, &["d1", "d2"]).await;
    tokio::time::sleep(SECS(1)).await;
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    let got = exactly(&mut bob, 2).await;
    assert_eq!(ids_of(&got), ["d1", "d2"]);
    relay.restart();
    wait_log(&relay, "transparent mode hand-offs are taken").await;
    assert!(bob.next_body_message(SECS(3)).await.is_none());
}

/// redeliver is killed while hand-offs are in flight, and comes back
/// before bob: each message comes once, in order.
async fn component_killed_during_handoffs(kind: Kind) {
    let server = Server::start(kind, ServerOpts::transparent());
    let mut relay = relay_for(
        &server,
        RelayOpts {
            durability: "fsync",
            ..Default::default()
        },
    )
    .await;
    let alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    let sent = ids("k", 60);
    for (i, id) in sent.iter().enumerate() {
        alice.message(BOB, id, &format!("body of {id}"));
        if i == 30 {
            relay.sigkill();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(SECS(1)).await;
    relay.restart();
    wait_log(&relay, "transparent mode hand-offs are taken").await;
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    let got = exactly(&mut bob, sent.len()).await;
    assert_eq!(ids_of(&got), sent);
}

/// A user cannot hand off (only the server's bare domain can), nor
/// forge a confirmation copy or the replay mark.
async fn forged_by_a_user(kind: Kind) {
    let server = Server::start(kind, ServerOpts::transparent());
    let relay = relay_for(&server, RelayOpts::default()).await;
    let mut carol = Client::connect(server.c2s_port, "carol", ClientOpts::default()).await;
    let reply = carol
        .iq(xml(&format!(
            "<iq xmlns='jabber:client' type='set' to='{COMPONENT}' id='forged1'>\
             <handoff xmlns='{HANDOFF}'><forwarded xmlns='urn:xmpp:forward:0'>\
             <message xmlns='jabber:client' from='alice@localhost/x' to='bob@localhost' \
             id='f1' type='chat'><body>forged</body></message></forwarded></handoff></iq>"
        )))
        .await;
    // Refused: `forbidden` from redeliver, or `bad-request` when the
    // server module already took the element out of a user's stanza.
    assert_eq!(reply.attr("type"), Some("error"), "{reply:?}");
    // A message carrying the replay mark is still handed off and kept.
    let alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    alice.send(xml(&format!(
        "<message xmlns='jabber:client' to='{BOB}' id='marked' type='chat'>\
         <body>marked</body><replay xmlns='{HANDOFF}'/></message>"
    )));
    wait_stored(&relay, &["marked"]).await;
    // carol's forged copy of bob's receipt for it confirms nothing.
    carol.send(xml(&format!(
        "<message xmlns='jabber:client' to='{COMPONENT}' id='forged2'>\
         <confirmation xmlns='{HANDOFF}'><forwarded xmlns='urn:xmpp:forward:0'>\
         <message xmlns='jabber:client' from='bob@localhost/x' to='alice@localhost' id='r'>\
         <received xmlns='urn:xmpp:receipts' id='marked'/></message></forwarded>\
         </confirmation></message>"
    )));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    let got = exactly(&mut bob, 1).await;
    assert_eq!(ids_of(&got), ["marked"]);
    assert!(
        !relay.log_text().contains("f1"),
        "the forged one was not taken"
    );
}

/// Bob's client answers receipts only to roster contacts (Gajim's rule),
/// and alice is one: the replay comes from her own JID, so he answers,
/// and redeliver stops.
async fn receipts_to_contacts_only(kind: Kind) {
    let server = Server::start(kind, ServerOpts::transparent());
    let relay = relay_for(&server, RelayOpts::default()).await;
    befriend(&server).await;
    let alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    let sent = alice_writes(&alice, &["g1"]).await;
    wait_stored(&relay, &["g1"]).await;
    let span = (sent, now_ms());
    let gajim = ClientOpts {
        receipts_to_contacts_only: true,
        resource: "gajim".into(),
        ..Default::default()
    };
    let mut bob = Client::connect(server.c2s_port, "bob", gajim.clone()).await;
    let got = exactly(&mut bob, 1).await;
    assert_replayed(&got[0], "g1", span);
    wait_log(&relay, "confirmed").await;
    bob.close().await;
    let mut bob = Client::connect(server.c2s_port, "bob", gajim).await;
    assert!(bob.next_body_message(SECS(3)).await.is_none());
}

/// alice and bob in each other's roster with subscription `both`.
async fn befriend(server: &Server) {
    let alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    let bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    for (who, to) in [(&alice, BOB), (&bob, "alice@localhost")] {
        who.send(xml(&format!(
            "<presence xmlns='jabber:client' to='{to}' type='subscribe'/>"
        )));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    alice.close().await;
    bob.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// Archives on: each message once in bob's archive and once in alice's,
/// although redeliver's replay goes through the server again.
async fn archived_once(kind: Kind) {
    let server = Server::start(
        kind,
        ServerOpts {
            mam: true,
            ..ServerOpts::transparent()
        },
    );
    let relay = relay_for(&server, RelayOpts::default()).await;
    let mut alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    alice_writes(&alice, &["a1", "a2"]).await;
    wait_stored(&relay, &["a1", "a2"]).await;
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    assert_eq!(ids_of(&exactly(&mut bob, 2).await), ["a1", "a2"]);
    wait_log(&relay, "confirmed").await;
    for (who, client) in [("bob", &mut bob), ("alice", &mut alice)] {
        let (archived, _) = client.archive().await;
        let bodies: Vec<String> = archived
            .iter()
            .filter(|m| m.get_child("body", "jabber:client").is_some())
            .map(|m| m.attr("id").unwrap_or("").to_owned())
            .collect();
        assert_eq!(bodies, ["a1", "a2"], "{who}'s archive: {archived:?}");
    }
}

/// bob logs in while alice's messages are being handed off (copies held,
/// answers in flight, more arriving during his login): each comes once.
async fn login_during_handoffs(kind: Kind) {
    let server = Server::start(kind, ServerOpts::transparent());
    let relay = relay_for(&server, RelayOpts::default()).await;
    let alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    let sent = ids("l", 300);
    let port = server.c2s_port;
    let bob = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Client::connect(port, "bob", ClientOpts::default()).await
    });
    for id in &sent {
        alice.message(BOB, id, &format!("body of {id}"));
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let mut bob = bob.await.unwrap();
    let mut got = ids_of(&exactly(&mut bob, sent.len()).await);
    got.sort();
    let mut want = sent.clone();
    want.sort();
    assert_eq!(got, want, "each once");
    drop(relay);
}

on_both_servers!(
    offline_at_send_time,
    login_during_handoffs,
    stream_management_timeout,
    component_down,
    component_killed_during_handoffs,
    forged_by_a_user,
    receipts_to_contacts_only,
    archived_once,
);
