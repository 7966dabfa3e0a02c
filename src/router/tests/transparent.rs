//! Transparent mode (docs/transparent.md): a server module's hand-offs are
//! answered once durable and replayed as their sender through the
//! server's message permission, with their id and one delay of their
//! time; the module's copies of receipts confirm them.

use super::*;

const MESSAGE: &str = "<perm access='message' type='outgoing'/>";

/// A hand-off iq `iq` of message `id` (alice@x/phone to bob@x) from `from`,
/// stamped `stamp`.
fn handoff(from: &str, iq: &str, id: &str, stamp: &str) -> String {
    format!(
        "<iq xmlns='{NS}' type='set' from='{from}' to='relay.x' id='{iq}'>\
         <handoff xmlns='urn:redeliver:handoff:0'><forwarded xmlns='urn:xmpp:forward:0'>\
         <delay xmlns='urn:xmpp:delay' stamp='{stamp}'/>\
         <message xmlns='jabber:client' from='alice@x/phone' to='bob@x' id='{id}' type='chat'>\
         <body>{id}</body><request xmlns='urn:xmpp:receipts'/></message>\
         </forwarded></handoff></iq>"
    )
}

/// bob@x/r's receipt for `id`, as the module copies it.
fn copy_of_receipt(id: &str) -> String {
    format!(
        "<message xmlns='{NS}' from='x' to='relay.x'><confirmation xmlns='urn:redeliver:handoff:0'>\
         <forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client' from='bob@x/r' \
         to='alice@x' id='rcpt-{id}'><received xmlns='urn:xmpp:receipts' id='{id}'/></message>\
         </forwarded></confirmation></message>"
    )
}

/// The module dropped the replay of `id` (bob had no session).
fn bounced_replay(id: &str) -> String {
    format!(
        "<message xmlns='{NS}' type='error' from='bob@x' to='relay.x' id='{id}'>\
         <replay xmlns='urn:redeliver:handoff:0' from='alice@x'/><error type='wait'>\
         <recipient-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"
    )
}

/// Answers to hand-offs: (iq id, the error condition if one).
fn answers(out: &[Stanza]) -> Vec<(String, Option<DefinedCondition>)> {
    out.iter()
        .filter_map(|st| match st {
            Stanza::Iq(Iq::Result { id, .. }) => Some((id.clone(), None)),
            Stanza::Iq(Iq::Error { id, error, .. }) => {
                Some((id.clone(), Some(error.defined_condition.clone())))
            }
            _ => None,
        })
        .collect()
}

/// A replay as the server reads it: (outer to, inner from, inner to, id,
/// the delays' (from, stamp), whether it asks for a receipt).
type Replay = (String, String, String, String, Vec<(String, String)>, bool);

fn replays(out: &[Stanza]) -> Vec<Replay> {
    out.iter()
        .filter_map(|st| {
            let Stanza::Message(m) = st else { return None };
            let el = Element::from(m.clone());
            let inner = el
                .get_child("privilege", crate::privilege::NS_V2)?
                .get_child("forwarded", ns::FORWARD)?
                .get_child("message", ns::JABBER_CLIENT)?;
            assert!(inner.get_child("replay", handoff::NS).is_some(), "marked");
            let delays = inner
                .children()
                .filter(|c| c.is("delay", ns::DELAY))
                .map(|d| {
                    (
                        d.attr("from").unwrap_or_default().to_owned(),
                        d.attr("stamp").unwrap_or_default().to_owned(),
                    )
                })
                .collect();
            Some((
                el.attr("to")?.to_owned(),
                inner.attr("from")?.to_owned(),
                inner.attr("to")?.to_owned(),
                inner.attr("id")?.to_owned(),
                delays,
                inner.get_child("request", ns::RECEIPTS).is_some(),
            ))
        })
        .collect()
}

/// bob online, a hand-off replayed to him once: the harness, and the
/// replay's envelope id.
async fn replayed_to_bob_online() -> (Harness, String) {
    let mut h = harness(8).await;
    grant(&h, "x", &format!("{MESSAGE}{PRESENCE}")).await;
    h.presence("r").await;
    settle().await;
    h.feed(&handoff("x", "h1", "m1", "2026-12-07T01:00:03Z"))
        .await;
    settle().await;
    let out = h.drain_all();
    assert_eq!(replays(&out).len(), 1);
    (h, envelope_id(&out))
}

/// The id of the first replay's envelope in `out`.
fn envelope_id(out: &[Stanza]) -> String {
    out.iter()
        .find_map(|s| match s {
            Stanza::Message(m) => m.id.clone(),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no envelope: {out:?}"))
        .0
}

#[tokio::test(start_paused = true)]
async fn a_handoff_is_answered_and_replayed_as_its_sender_once_bob_is_back() {
    let mut h = harness(8).await;
    grant(&h, "x", &format!("{MESSAGE}{PRESENCE}")).await;
    h.feed(&handoff("x", "h1", "m1", "2026-12-07T01:00:03.250Z"))
        .await;
    settle().await;
    let out = h.drain_all();
    assert_eq!(answers(&out), [("h1".to_owned(), None)]);
    // Presence unknown: one try, which the module drops (bob has no
    // session) and says so.
    assert_eq!(replays(&out).len(), 1, "{out:?}");
    h.feed(&bounced_replay("m1")).await;
    settle().await;
    assert!(replays(&h.drain_all()).is_empty());
    h.presence("r").await;
    tokio::time::sleep(Duration::from_millis(310)).await;
    let r = replays(&h.drain_all());
    assert_eq!(
        r,
        [(
            "x".to_owned(),
            "alice@x".to_owned(),
            "bob@x".to_owned(),
            "m1".to_owned(),
            vec![(
                "relay.x".to_owned(),
                "2026-12-07T01:00:03.250+00:00".to_owned()
            )],
            true
        )]
    );
    h.feed(&copy_of_receipt("m1")).await;
    settle().await;
    let out = h.drain_all();
    assert!(
        receipts_to_alice(&out).is_empty(),
        "alice has bob's own: {out:?}"
    );
    assert_eq!(stats(&h).0, 0, "confirmed by the copy");
    // Back again: nothing more.
    h.unavailable("r").await;
    h.presence("r").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(replays(&h.drain_all()).is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_same_message_handed_off_twice_is_taken_once() {
    let mut h = harness(8).await;
    grant(&h, "x", &format!("{MESSAGE}{PRESENCE}")).await;
    h.presence("r").await;
    settle().await;
    h.feed(&handoff("x", "h1", "m1", "2026-12-07T01:00:03Z"))
        .await;
    settle().await;
    // At bob's login the module hands its copy off again.
    h.feed(&handoff("x", "h2", "m1", "2026-12-07T01:00:03Z"))
        .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let out = h.drain_all();
    assert_eq!(
        answers(&out),
        [("h1".to_owned(), None), ("h2".to_owned(), None)]
    );
    assert_eq!(replays(&out).len(), 1, "{out:?}");
    h.feed(&copy_of_receipt("m1")).await;
    settle().await;
    // After the receipt too: a late copy is answered taken, not replayed.
    h.feed(&handoff("x", "h3", "m1", "2026-12-07T01:00:03Z"))
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out = h.drain_all();
    assert_eq!(answers(&out), [("h3".to_owned(), None)]);
    assert!(replays(&out).is_empty(), "{out:?}");
}

#[tokio::test(start_paused = true)]
async fn handoffs_are_refused_without_the_permission_or_from_a_user() {
    let mut h = harness(8).await;
    grant(&h, "x", PRESENCE).await;
    h.feed(&handoff("x", "h1", "m1", "2026-12-07T01:00:03Z"))
        .await;
    h.feed(&handoff("bob@x/r", "h2", "m2", "2026-12-07T01:00:03Z"))
        .await;
    h.feed(&handoff("x/r", "h3", "m3", "2026-12-07T01:00:03Z"))
        .await;
    settle().await;
    let out = h.drain_all();
    assert_eq!(
        answers(&out),
        [
            ("h1".to_owned(), Some(DefinedCondition::NotAllowed)),
            ("h2".to_owned(), Some(DefinedCondition::Forbidden)),
            ("h3".to_owned(), Some(DefinedCondition::Forbidden)),
        ]
    );
    assert!(replays(&out).is_empty());
    assert_eq!(stats(&h).0, 0, "nothing stored");
    // A user's copy of a receipt is no copy: it confirms nothing.
    grant(&h, "x", &format!("{MESSAGE}{PRESENCE}")).await;
    h.feed(&handoff("x", "h4", "m4", "2026-12-07T01:00:03Z"))
        .await;
    settle().await;
    h.feed(&copy_of_receipt("m4").replace("from='x'", "from='bob@x/r'"))
        .await;
    settle().await;
    assert_eq!(stats(&h).0, 1);
}

#[tokio::test(start_paused = true)]
async fn in_fsync_mode_the_answer_waits_for_the_disk() {
    // (sled; on PostgreSQL the commit is the disk write.)
    let mut h = harness_full(8, "fsync", "").await;
    grant(&h, "x", &format!("{MESSAGE}{PRESENCE}")).await;
    h.feed(&handoff("x", "h1", "m1", "2026-12-07T01:00:03Z"))
        .await;
    settle().await;
    if h.store.durable_at_commit() {
        // PostgreSQL: on disk at the commit.
        assert_eq!(answers(&h.drain_all()), [("h1".to_owned(), None)]);
        return;
    }
    assert!(answers(&h.drain_all()).is_empty(), "not on disk yet");
    while let Ok(t) = h.flushes.try_recv() {
        h.internal.send(Flushed::Durable(t)).await.unwrap();
    }
    settle().await;
    assert_eq!(answers(&h.drain_all()), [("h1".to_owned(), None)]);
}

#[tokio::test(start_paused = true)]
async fn a_refused_envelope_marks_bob_offline_until_he_is_seen() {
    let (mut h, id) = replayed_to_bob_online().await;
    h.feed(&format!(
        "<message xmlns='{NS}' type='error' from='x' to='relay.x' id='{id}'><error type='wait'>\
         <resource-constraint xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"
    ))
    .await;
    settle().await;
    assert_eq!(stats(&h).0, 1, "kept");
    h.unavailable("r").await;
    h.presence("r").await;
    tokio::time::sleep(Duration::from_millis(310)).await;
    assert_eq!(
        replays(&h.drain_all()).len(),
        1,
        "sent again once bob is seen"
    );
}

/// A hand-off `iq` of `inner` (a jabber:client message) from x.
fn handoff_of(iq: &str, inner: &str) -> String {
    format!(
        "<iq xmlns='{NS}' type='set' from='x' to='relay.x' id='{iq}'>\
         <handoff xmlns='urn:redeliver:handoff:0'><forwarded xmlns='urn:xmpp:forward:0'>\
         <delay xmlns='urn:xmpp:delay' stamp='2026-12-07T01:00:03Z'/>{inner}\
         </forwarded></handoff></iq>"
    )
}

/// dave's relayed message `id` to bob's relay address.
fn relayed_from_dave(id: &str) -> String {
    format!(
        "<message xmlns='{NS}' from='dave@x/r' to='bob@relay.x' id='{id}' type='chat'><body>{id}</body></message>"
    )
}

/// bob@x/{res}'s receipt for `id`, as the module copies it.
fn copy_from(res: &str, id: &str) -> String {
    copy_of_receipt(id).replace("from='bob@x/r'", &format!("from='bob@x/{res}'"))
}

/// Bob's Gajim answers alice (a real contact of his) through a copy;
/// that says nothing of a relay address he never approved: dave's
/// relayed message still counts delivered when no error comes, and is
/// not shown again at the next login.
#[tokio::test(start_paused = true)]
async fn a_copy_teaches_nothing_about_relay_addresses() {
    for with_copy in [false, true] {
        let mut h = harness_with(64, "unanswered_wait_ms = 200\n").await;
        grant(&h, "x", MESSAGE).await;
        new_client_online(&mut h, "gajim").await;
        h.feed(&handoff("x", "h1", "m1", "2026-12-07T01:00:03Z"))
            .await;
        settle().await;
        assert_eq!(replays(&h.drain_all()).len(), 1);
        if with_copy {
            h.feed(&copy_from("gajim", "m1")).await;
            settle().await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        h.feed(&relayed_from_dave("d1")).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(ids_of(&h.drain()), ["d1"]);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            h.store.recipient("bob@x").unwrap().pending,
            0,
            "with_copy={with_copy}: d1 counted delivered"
        );
        tokio::time::sleep(Duration::from_millis(1000)).await;
        h.unavailable("gajim").await;
        h.presence("gajim").await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(h.drain().is_empty(), "with_copy={with_copy}: shown once");
    }
}

/// A receipt (or any body-less message) alice sent offline bob is the
/// server's to deliver: refused, nothing stored, nothing replayed.
#[tokio::test(start_paused = true)]
async fn body_less_handoffs_are_left_with_the_server() {
    let mut h = harness(8).await;
    grant(&h, "x", &format!("{MESSAGE}{PRESENCE}")).await;
    h.feed(&handoff_of(
        "h1",
        "<message xmlns='jabber:client' from='alice@x/phone' to='bob@x' id='rc1' type='chat'>\
         <received xmlns='urn:xmpp:receipts' id='m0'/><store xmlns='urn:xmpp:hints'/></message>",
    ))
    .await;
    settle().await;
    let out = h.drain_all();
    assert_eq!(
        answers(&out),
        [("h1".to_owned(), Some(DefinedCondition::NotAcceptable))]
    );
    assert!(replays(&out).is_empty());
    assert_eq!(stats(&h).0, 0);
}

/// After a reconnect the queue may be resumed before the server's
/// grants arrive; the grant then sends what waited for it.
#[tokio::test(start_paused = true)]
async fn a_late_grant_sends_what_waited_for_it() {
    let mut h = harness(8).await;
    grant(&h, "x", &format!("{MESSAGE}{PRESENCE}")).await;
    h.feed(&handoff("x", "h1", "m1", "2026-12-07T01:00:03Z"))
        .await;
    settle().await;
    assert_eq!(replays(&h.drain_all()).len(), 1);
    h.feed(&bounced_replay("m1")).await;
    settle().await;
    h.events.send(LinkEvent::Down).await.unwrap();
    settle().await;
    h.events.send(LinkEvent::Up { epoch: 2 }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    h.drain_all();
    grant(&h, "x", &format!("{MESSAGE}{PRESENCE}")).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(!replays(&h.drain_all()).is_empty());
}

/// A hand-off answered long ago, counted delivered, bounces late while
/// the store cannot write: the server has no copy any more, so its
/// sender is told, as a relayed message's is.
#[tokio::test(start_paused = true)]
async fn a_late_bounce_after_a_store_failure_tells_the_handoffs_sender() {
    let mut h = harness_with(64, "unanswered_wait_ms = 200\n").await;
    grant(&h, "x", &format!("{MESSAGE}{PRESENCE}")).await;
    h.feed(&handoff("x", "h1", "m1", "2026-12-07T01:00:03Z"))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(answers(&h.drain_all()), [("h1".to_owned(), None)]);
    assert_eq!(stats(&h), (0, 1), "counted delivered");
    h.store.fail_commits();
    h.feed(&handoff("x", "h2", "m2", "2026-12-07T01:00:03Z"))
        .await;
    settle().await;
    let out = h.drain_all();
    assert!(answers(&out).is_empty(), "m2 not stored: not answered");
    assert!(
        !messages(&out)
            .iter()
            .any(|(to, id, _)| to.starts_with("alice@x") && id == "m2"),
        "m2 stays the server's: alice is not told: {out:?}"
    );
    h.feed(&bounced_replay("m1")).await;
    settle().await;
    let out = h.drain_all();
    assert!(
        messages(&out)
            .iter()
            .any(|(to, id, _)| to.starts_with("alice@x") && id == "m1"),
        "{out:?}"
    );
}

/// A hand-off with an iq id past the cap cannot be answered, so it is
/// not taken either (the server keeps it).
#[tokio::test(start_paused = true)]
async fn a_handoff_that_cannot_be_answered_is_not_taken() {
    let mut h = harness(8).await;
    grant(&h, "x", &format!("{MESSAGE}{PRESENCE}")).await;
    let long = "i".repeat(1100);
    h.feed(&handoff("x", &long, "m1", "2026-12-07T01:00:03Z"))
        .await;
    settle().await;
    let out = h.drain_all();
    assert!(
        answers(&out).is_empty() && replays(&out).is_empty(),
        "{out:?}"
    );
    assert_eq!(stats(&h).0, 0);
}

/// The expiry notice of a hand-off puts nothing into its sender's roster
/// (she never wrote to a relay address).
#[tokio::test(start_paused = true)]
async fn an_expired_handoffs_notice_adds_no_relay_contact() {
    let mut h = harness_with(64, "[limits]\nmessage_ttl_s = 1\n").await;
    grant(&h, "x", &format!("{MESSAGE}{PRESENCE}{ROSTER}")).await;
    h.feed(&handoff("x", "h1", "m1", "2026-12-07T01:00:03Z"))
        .await;
    settle().await;
    h.feed(&bounced_replay("m1")).await;
    std::thread::sleep(Duration::from_millis(1100));
    tokio::time::sleep(Duration::from_millis(1010)).await;
    let out = h.drain_all();
    assert!(
        out.iter()
            .any(|st| condition(st) == Some(DefinedCondition::RecipientUnavailable)),
        "alice told: {out:?}"
    );
    assert!(roster_sets(&out).is_empty(), "{:?}", roster_sets(&out));
    assert!(subscribes_from(&out).is_empty());
}

/// A server that refuses the envelope for good (`forbidden`): hand-offs
/// from its domain wait for a new grant instead of being retried.
#[tokio::test(start_paused = true)]
async fn a_forbidden_envelope_holds_the_domain_until_granted_again() {
    let (mut h, id) = replayed_to_bob_online().await;
    h.feed(&format!(
        "<message xmlns='{NS}' type='error' from='x' to='relay.x' id='{id}'><error type='auth'>\
         <forbidden xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"
    ))
    .await;
    h.unavailable("r").await;
    h.presence("r").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(replays(&h.drain_all()).is_empty(), "held");
    grant(&h, "x", &format!("{MESSAGE}{PRESENCE}")).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(replays(&h.drain_all()).len(), 1, "sent once granted again");
}
