//! Clients that never answer receipts: counted delivered, tombstones, late
//! bounces, learned habits.

use super::*;

/// Issue 12, item 2: a client that advertises receipts and never
/// answers (receipts off, or a contacts-only client whose user
/// ignored the request) sees each message once across reconnects, and
/// the queue drains: with no error within `unanswered_wait_ms`, or
/// at a logout, a message counts delivered; a bounce puts it back.
#[tokio::test(start_paused = true)]
async fn a_client_that_never_answers_sees_each_message_once() {
    let mut h = harness_with(64, "unanswered_wait_ms = 200\n").await;
    new_client_online(&mut h, "gajim").await;
    for id in ["m1", "m2", "m3"] {
        h.msg(id).await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(ids_of(&h.drain()), ["m1", "m2", "m3"]);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(stats(&h), (0, 3), "counted delivered, kept aside");
    for _ in 0..3 {
        h.unavailable("gajim").await;
        h.presence("gajim").await;
        tokio::time::sleep(Duration::from_millis(2000)).await;
        assert!(h.drain().is_empty(), "nothing shown again");
    }
    // Logged out 100 ms after m4 went: the server had it first, so it
    // counts delivered now; its bounce (had the server not delivered
    // it) puts it back for the next login.
    h.msg("m4").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.unavailable("gajim").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(stats(&h), (0, 4), "counted delivered at the logout");
    h.bounce("m4", "cancel", "service-unavailable").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(stats(&h), (1, 3));
    h.presence("gajim").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(ids_of(&h.drain()), ["m4", "m4"]);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(stats(&h), (0, 4));
}

/// A message counted delivered without a receipt that the server
/// bounces late (a stream-management session that timed out) goes
/// back in its queue at its place, and out again at the next login;
/// a late receipt confirms it for good (relayed to its sender) and
/// teaches that the client answers, so that its next messages wait
/// for receipts again (the frozen-client guarantee). The late bounce
/// window ends the tombstones.
#[tokio::test(start_paused = true)]
async fn late_bounces_and_late_receipts_after_an_assumption() {
    let mut h = harness_with(
        64,
        "unanswered_wait_ms = 200\nlate_bounce_window_s = 60\n[limits]\nmessage_ttl_s = 600\n",
    )
    .await;
    new_client_online(&mut h, "phone").await;
    h.msg("m1").await;
    h.msg("m2").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.drain_all();
    assert_eq!(stats(&h), (0, 2));
    // A late receipt for m2 reaches alice and ends its tombstone.
    h.feed(&receipt_from("phone", "m2")).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(receipts_to_alice(&h.drain_all()), ["m2"]);
    h.bounce("m2", "cancel", "service-unavailable").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(stats(&h), (0, 1), "confirmed m2 stays so");
    // The phone's session timed out with m1 unacknowledged.
    h.bounce("m1", "cancel", "service-unavailable").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(stats(&h), (1, 0), "m1 back in the queue");
    h.presence("phone").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(ids_of(&h.drain()), ["m1"], "sent again at the next login");
    // Sent to a client now known to answer, m1 waits for its
    // receipt: after the timeout it is not counted delivered.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(stats(&h), (1, 0));
    assert_eq!(
        h.store.habits("bob@x").unwrap()[0].1.answers,
        Answers::All,
        "answered a relay address bob never approved"
    );
    h.presence("phone").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(ids_of(&h.drain()), ["m1"], "frozen-client guarantee");
    h.feed(&receipt_from("phone", "m1")).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(stats(&h), (0, 0));
}

/// The expiry walk ends tombstones once the late bounce window is
/// over (here 0: at its next step); a bounce after that finds none.
#[tokio::test(start_paused = true)]
async fn tombstones_end_with_the_late_bounce_window() {
    let mut h = harness_with(
        64,
        "unanswered_wait_ms = 200\nlate_bounce_window_s = 0\n[limits]\nmessage_ttl_s = 600\n",
    )
    .await;
    new_client_online(&mut h, "tablet").await;
    h.msg("m3").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stats(&h), (0, 1));
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(stats(&h), (0, 0), "pruned after the window");
    h.bounce("m3", "cancel", "service-unavailable").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(stats(&h), (0, 0), "too late to put back");
    assert_eq!(ids_of(&h.drain()), ["m3"]);
}

/// A client seen answering only relay contacts its user approved (a
/// contacts-only client: Gajim, Conversations, Monal, Psi) is waited
/// for on messages from those senders, and not on others'; a client
/// that missed receipts in two silent spells in a row is no longer
/// waited for.
#[tokio::test(start_paused = true)]
async fn contacts_only_clients_are_waited_for_on_approved_contacts_only() {
    let mut h = harness_with(64, "unanswered_wait_ms = 200\n").await;
    new_client_online(&mut h, "gajim").await;
    h.msg("a1").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    h.feed(&format!(
        "<presence xmlns='{NS}' from='bob@x' to='alice@relay.x' type='subscribed'/>"
    ))
    .await;
    h.feed(&receipt_from("gajim", "a1")).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        h.store.habits("bob@x").unwrap()[0].1.answers,
        Answers::Contacts
    );
    h.drain_all();
    // Carol's relay address was never approved: her message counts
    // delivered without a receipt.
    h.feed(&format!(
        "<message xmlns='{NS}' from='carol@x/r' to='bob@relay.x' id='k1' type='chat'><body>k1</body></message>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ids_of(&h.drain()), ["k1"]);
    assert_eq!(stats(&h), (0, 1));
    // Alice's waits: frozen, then shown again at the next login.
    h.msg("a2").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(h.store.totals().unwrap().pending, 1);
    h.presence("gajim").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(ids_of(&h.drain()), ["a2", "a2"]);
    // Silent again (its user turned receipts off): forgotten, a2
    // counted delivered at its next send.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(h.store.habits("bob@x").unwrap().is_empty());
    h.presence("gajim").await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(ids_of(&h.drain()), ["a2"]);
    assert_eq!(stats(&h), (0, 2));
}

/// Review of item 2: a late bounce about a session that ended does
/// not take down the recipient's other resources: the message goes
/// again at once to the one still there, and what follows goes on.
#[tokio::test(start_paused = true)]
async fn a_late_bounce_does_not_stall_a_recipient_still_online() {
    let mut h = harness_with(64, "unanswered_wait_ms = 200\n").await;
    new_client_online(&mut h, "phone").await;
    h.msg("m1").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.presence("desk").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    h.drain_all();
    assert_eq!(stats(&h), (0, 1));
    h.bounce("m1", "cancel", "service-unavailable").await;
    h.unavailable("phone").await;
    h.msg("m2").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(ids_of(&h.drain()), ["m1", "m2"]);
}

/// Review of item 2: a marker for a message counted delivered ends
/// its tombstone (and those of the sender's earlier ones), so that a
/// late bounce does not show read messages again; markers do not
/// teach that a client answers receipts; a receipt for a message put
/// back by a late bounce still counts.
#[tokio::test(start_paused = true)]
async fn markers_end_tombstones_and_teach_nothing() {
    let mut h = harness_with(64, "unanswered_wait_ms = 200\n").await;
    new_client_online(&mut h, "gajim").await;
    h.msg("m1").await;
    h.msg("m2").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stats(&h), (0, 2));
    h.feed(&format!(
        "<message xmlns='{NS}' from='bob@x/gajim' to='alice@relay.x'><displayed xmlns='urn:xmpp:chat-markers:0' id='m2'/></message>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(stats(&h), (0, 0), "read: no late bounce brings them back");
    assert!(
        h.store.habits("bob@x").unwrap().is_empty(),
        "a marker is no receipt"
    );
    h.bounce("m1", "cancel", "service-unavailable").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(stats(&h), (0, 0));
    // m3 counted delivered, put back by a bounce, then its receipt
    // arrives before the resend: it counts, and it is relayed.
    h.drain_all();
    h.msg("m3").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.unavailable("gajim").await;
    h.bounce("m3", "cancel", "service-unavailable").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(stats(&h), (1, 0));
    h.feed(&receipt_from("gajim", "m3")).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(stats(&h), (0, 0));
    assert_eq!(receipts_to_alice(&h.drain_all()), ["m3"]);
}

/// Review of item 2: once a client is seen answering, what is already
/// on the wire to it waits for its receipts too (the frozen-client
/// guarantee from its first answer on).
#[tokio::test(start_paused = true)]
async fn messages_in_flight_wait_once_their_client_answered() {
    let mut h = harness_with(64, "unanswered_wait_ms = 200\n").await;
    new_client_online(&mut h, "phone").await;
    h.msg("m1").await;
    h.msg("m2").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    h.feed(&receipt_from("phone", "m1")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stats(&h), (1, 0), "m2 waits for its receipt");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(stats(&h), (1, 0), "and stays for the next login");
}

/// Review of item 2: a late bounce while the store cannot write tells
/// the sender at once (the message is back in memory only).
#[tokio::test(start_paused = true)]
async fn a_late_bounce_after_a_store_failure_tells_the_sender() {
    let mut h = harness_with(64, "unanswered_wait_ms = 200\n").await;
    new_client_online(&mut h, "phone").await;
    h.msg("m1").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.drain_all();
    h.store.fail_commits();
    // A write that fails makes the relay notice.
    h.msg("m2").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    h.drain_all();
    h.bounce("m1", "cancel", "service-unavailable").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let told: Vec<_> = h
        .drain_all()
        .into_iter()
        .filter_map(|st| match st {
            Stanza::Message(m) if m.type_ == MessageType::Error => {
                Some(m.id.map(|i| i.0).unwrap_or_default())
            }
            _ => None,
        })
        .collect();
    assert!(told.contains(&"m1".to_string()), "{told:?}");
}

/// With presence unknown (no subscription), a message waits for a
/// receipt when any remembered client answers; a device that never
/// answers is then shown it again at each sign of life, but at most three
/// times: two silent spells in a row and the remembered clients are
/// forgotten (to be learned again at their next receipt).
#[tokio::test(start_paused = true)]
async fn with_presence_unknown_a_message_is_shown_at_most_three_times() {
    let mut h = harness_with(64, "unanswered_wait_ms = 200\n").await;
    h.store
        .set_habit(
            "bob@x",
            "phone",
            Some(Habit {
                answers: Answers::All,
                missed: 0,
                seen_at_ms: now_ms(),
            }),
        )
        .unwrap();
    h.msg("m1").await;
    let mut shown = 0;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        shown += ids_of(&h.drain()).iter().filter(|id| **id == "m1").count();
        // A sign of life: bob writes through the relay from his desktop.
        h.feed(&format!(
            "<message xmlns='{NS}' from='bob@x/desktop' to='alice@relay.x' id='s{shown}' type='chat'><body>hi</body></message>"
        ))
        .await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    shown += ids_of(&h.drain()).iter().filter(|id| **id == "m1").count();
    assert_eq!(shown, 3, "shown three times, then counted delivered");
    assert_eq!(h.store.recipient("bob@x").unwrap().pending, 0);
}
