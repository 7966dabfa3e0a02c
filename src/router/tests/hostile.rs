//! Input meant to mislead or to cost: forged answers, strangers, reused
//! ids, floods of receipts.

use super::*;

/// Issue 11, defect 1: a disco#info result from anyone but the queried
/// resource, even with the right id, changes nothing (before, it made
/// an unconfirmed message count as confirmed at the receipt timeout).
#[tokio::test(start_paused = true)]
async fn forged_disco_result_confirms_nothing() {
    let mut h = harness(64).await;
    h.subscribe_and_go_offline().await;
    h.available().await;
    settle().await;
    let ids: Vec<String> = h
        .drain_all()
        .into_iter()
        .filter_map(|st| match st {
            Stanza::Iq(Iq::Get { id, to, .. })
                if to.as_ref().is_some_and(|t| t.to_string() == "bob@x/r") =>
            {
                Some(id)
            }
            _ => None,
        })
        .collect();
    let [id] = &ids[..] else {
        panic!("one disco#info query to bob@x/r: {ids:?}")
    };
    assert!(id.len() >= 32, "an unguessable id, not a counter: {id}");
    // Mallory answers first, with Bob's query id and no receipts.
    h.feed(&format!(
        "<iq xmlns='{NS}' type='result' from='mallory@x/r' to='relay.x' id='{id}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    h.msg("m1").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(ids_of(&h.drain()), ["m1"]);
    // No receipt: the message stays pending, it is not "confirmed".
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(h.store.recipient("bob@x").unwrap().pending, 1);
}

/// Issue 11, defect 2: presence from JIDs the relay never asked (a
/// stranger, or a user of the served domain nobody wrote to) writes
/// nothing, queries nothing and is not probed after a reconnect.
#[tokio::test(start_paused = true)]
async fn presence_from_strangers_leaves_no_trace() {
    let mut h = harness(64).await;
    for who in ["mallory@evil", "carol@x"] {
        for xml in [
            format!("<presence xmlns='{NS}' from='{who}' to='relay.x' type='subscribed'/>"),
            format!("<presence xmlns='{NS}' from='{who}/r' to='relay.x'/>"),
            format!("<presence xmlns='{NS}' from='{who}/r' to='relay.x' type='unavailable'/>"),
            format!("<presence xmlns='{NS}' from='{who}/s' to='relay.x'/>"),
        ] {
            h.feed(&xml).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    let out = h.drain_all();
    assert!(
        !out.iter().any(
            |st| matches!(st, Stanza::Iq(Iq::Get { payload, .. }) if payload.is("query", ns::DISCO_INFO))
        ),
        "no disco#info query to strangers: {out:?}"
    );
    assert!(h.store.recipients().unwrap().is_empty(), "nothing stored");
    h.events.send(LinkEvent::Down).await.unwrap();
    h.events.send(LinkEvent::Up { epoch: 2 }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let probes: Vec<_> = h
        .drain_all()
        .into_iter()
        .filter(|st| matches!(st, Stanza::Presence(p) if p.type_ == PresenceType::Probe))
        .collect();
    assert!(probes.is_empty(), "{probes:?}");
}

/// Issue 11, defect 4: after a message is confirmed, a different
/// message under the same id is relayed (before, it was dropped as a
/// duplicate: no relay, no error); a resubmission of it is still
/// stored once; and a third, different one while it is pending is
/// refused with `conflict`, never dropped silently.
#[tokio::test(start_paused = true)]
async fn reused_id_for_a_different_message_is_never_lost() {
    let mut h = harness(64).await;
    h.bob_online().await;
    h.drain_all();
    let send = |body: &str| {
        format!(
            "<message xmlns='{NS}' from='alice@x/r' to='bob@relay.x' id='fixed' type='chat'><body>{body}</body></message>"
        )
    };
    h.feed(&send("one")).await;
    settle().await;
    h.receipt("fixed").await;
    settle().await;
    assert_eq!(h.store.recipient("bob@x").unwrap().pending, 0);
    h.drain_all();
    h.feed(&send("two")).await;
    h.feed(&send("two")).await; // a resubmission
    h.feed(&send("three")).await; // different, while "two" is pending
    settle().await;
    let out = h.drain_all();
    let bodies: Vec<_> = messages(&out)
        .into_iter()
        .filter(|(to, _, _)| to == "bob@x")
        .filter_map(|(_, _, b)| b)
        .collect();
    assert_eq!(bodies, ["two"], "relayed once");
    let conflicts = out
        .iter()
        .filter(|st| condition(st) == Some(DefinedCondition::Conflict))
        .count();
    assert_eq!(conflicts, 1, "the third is refused, not dropped: {out:?}");
    assert_eq!(h.store.recipient("bob@x").unwrap().pending, 1);
}

/// Issue 11, defect 6: body-less payloads (a reaction, a call
/// proposal) go once, as they came, without a receipt request, and
/// are not stored (before, they waited for a receipt clients do not
/// send, held the queue and came back later: a call ringing days
/// late).
#[tokio::test(start_paused = true)]
async fn bodyless_payloads_are_relayed_once_without_a_receipt_request() {
    let mut h = harness(64).await;
    h.bob_online().await;
    h.drain_all();
    for (id, inner) in [
        (
            "react",
            "<reactions xmlns='urn:xmpp:reactions:0' id='m0'><reaction>+1</reaction></reactions><store xmlns='urn:xmpp:hints'/>",
        ),
        (
            "call",
            "<propose xmlns='urn:xmpp:jingle-message:0' id='c1'><description xmlns='urn:xmpp:jingle:apps:rtp:1' media='audio'/></propose><store xmlns='urn:xmpp:hints'/>",
        ),
    ] {
        h.feed(&format!(
            "<message xmlns='{NS}' from='alice@x/r' to='bob@relay.x' id='{id}' type='chat'>{inner}</message>"
        ))
        .await;
    }
    settle().await;
    let out = h.drain_all();
    let relayed: Vec<&Message> = out
        .iter()
        .filter_map(|st| match st {
            Stanza::Message(m) if m.to.as_ref().is_some_and(|t| t.to_string() == "bob@x") => {
                Some(m)
            }
            _ => None,
        })
        .collect();
    let ids: Vec<_> = relayed
        .iter()
        .map(|m| m.id.as_ref().unwrap().0.as_str())
        .collect();
    assert_eq!(ids, ["react", "call"]);
    assert!(
        relayed
            .iter()
            .all(|m| !m.payloads.iter().any(|p| p.is("request", ns::RECEIPTS))),
        "no receipt requested"
    );
    assert_eq!(
        h.store.recipient("bob@x").unwrap().pending,
        0,
        "nothing stored"
    );
    // Bob goes away and comes back: nothing comes again.
    h.unavailable("r").await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    h.available().await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(messages(&h.drain_all()).is_empty());
}

/// Issue 11, defect 9: a stanza's receipts and markers are handled 16
/// at most, and a recipient's marker scans are budgeted: past the
/// budget a marker confirms only the message it names (before, every
/// payload ran, and every marker scanned and decoded the queue).
#[tokio::test(start_paused = true)]
async fn receipts_and_markers_cost_bounded_work() {
    let mut h = harness(64).await;
    h.bob_online().await;
    for i in 0..20 {
        h.msg(&format!("m{i}")).await;
    }
    settle().await;
    let receipts: String = (0..20)
        .map(|i| format!("<received xmlns='urn:xmpp:receipts' id='m{i}'/>"))
        .collect();
    h.feed(&format!(
        "<message xmlns='{NS}' from='bob@x/r' to='alice@relay.x'>{receipts}</message>"
    ))
    .await;
    settle().await;
    assert_eq!(h.store.recipient("bob@x").unwrap().pending, 4, "16 handled");
    // Spend the marker budget (200) on an old message…
    for _ in 0..200 {
        h.feed(&format!(
            "<message xmlns='{NS}' from='bob@x/r' to='alice@relay.x'><displayed xmlns='urn:xmpp:chat-markers:0' id='m0'/></message>"
        ))
        .await;
    }
    // …then a marker for the last one confirms only that one.
    h.feed(&format!(
        "<message xmlns='{NS}' from='bob@x/r' to='alice@relay.x'><displayed xmlns='urn:xmpp:chat-markers:0' id='m19'/></message>"
    ))
    .await;
    settle().await;
    assert_eq!(h.store.recipient("bob@x").unwrap().pending, 3);
}

/// Review of issue 11, 4 and 5: a late receipt for an earlier message
/// under a reused id does not confirm the new one before it was sent,
/// and is not relayed; receipts past the per-stanza limit are not
/// relayed either, and a marker past its scan budget is relayed as a
/// receipt for its own message.
#[tokio::test(start_paused = true)]
async fn only_what_was_confirmed_is_relayed_to_the_sender() {
    let mut h = harness(64).await;
    h.bob_online().await;
    let send = |body: &str| {
        format!(
            "<message xmlns='{NS}' from='alice@x/r' to='bob@relay.x' id='fixed' type='chat'><body>{body}</body></message>"
        )
    };
    h.feed(&send("one")).await;
    settle().await;
    h.receipt("fixed").await;
    h.unavailable("r").await;
    h.feed(&send("two")).await; // bob is offline: not sent
    settle().await;
    h.drain_all();
    // The laptop wakes and receipts the old copy.
    h.feed(&format!(
        "<message xmlns='{NS}' from='bob@x/laptop' to='alice@relay.x'><received xmlns='urn:xmpp:receipts' id='fixed'/></message>"
    ))
    .await;
    settle().await;
    assert_eq!(h.store.recipient("bob@x").unwrap().pending, 1, "two stays");
    assert!(receipts_to_alice(&h.drain_all()).is_empty());

    // 20 receipts in one stanza: 16 handled, 16 relayed.
    let mut h = harness(64).await;
    h.bob_online().await;
    for i in 0..20 {
        h.msg(&format!("m{i}")).await;
    }
    settle().await;
    h.drain_all();
    let receipts: String = (0..20)
        .map(|i| format!("<received xmlns='urn:xmpp:receipts' id='m{i}'/>"))
        .collect();
    h.feed(&format!(
        "<message xmlns='{NS}' from='bob@x/r' to='alice@relay.x'>{receipts}</message>"
    ))
    .await;
    settle().await;
    let out = h.drain_all();
    let relayed: usize = out
        .iter()
        .filter_map(|st| match st {
            Stanza::Message(m) => Some(
                m.payloads
                    .iter()
                    .filter(|p| p.is("received", ns::RECEIPTS))
                    .count(),
            ),
            _ => None,
        })
        .sum();
    assert_eq!(relayed, 16);
    for _ in 0..200 {
        h.feed(&format!(
            "<message xmlns='{NS}' from='bob@x/r' to='alice@relay.x'><displayed xmlns='urn:xmpp:chat-markers:0' id='m0'/></message>"
        ))
        .await;
    }
    settle().await;
    h.drain_all();
    h.feed(&format!(
        "<message xmlns='{NS}' from='bob@x/r' to='alice@relay.x'><displayed xmlns='urn:xmpp:chat-markers:0' id='m19'/></message>"
    ))
    .await;
    settle().await;
    let out = h.drain_all();
    assert_eq!(receipts_to_alice(&out), ["m19"], "{out:?}");
}

/// Review of issue 11, 6 and 7: a message relayed once is held to the
/// size limit and loses claims made in the relay's name; a chat state
/// with a receipt attached is not exempt from the rate; and a bounce
/// of a message relayed once goes back to its sender.
#[tokio::test(start_paused = true)]
async fn messages_relayed_once_are_checked_and_their_bounces_returned() {
    let mut h = harness_with(64, "[limits]\nmax_stanza_bytes = 2000\n").await;
    let big = "x".repeat(3000);
    h.feed(&format!(
        "<message xmlns='{NS}' from='alice@x/r' to='bob@relay.x' id='big' type='chat'><reactions xmlns='urn:xmpp:reactions:0' id='m0'><reaction>{big}</reaction></reactions></message>"
    ))
    .await;
    h.feed(&format!(
        "<message xmlns='{NS}' from='alice@x/r' to='bob@relay.x' id='r1' type='chat'><reactions xmlns='urn:xmpp:reactions:0' id='m0'><reaction>+1</reaction></reactions><stanza-id xmlns='urn:xmpp:sid:0' by='relay.x' id='forged'/></message>"
    ))
    .await;
    settle().await;
    let out = h.drain_all();
    let refused: Vec<_> = out
        .iter()
        .filter(|st| condition(st) == Some(DefinedCondition::PolicyViolation))
        .collect();
    assert_eq!(refused.len(), 1, "{out:?}");
    let relayed: Vec<&Message> = out
        .iter()
        .filter_map(|st| match st {
            Stanza::Message(m) if m.to.as_ref().is_some_and(|t| t.to_string() == "bob@x") => {
                Some(m)
            }
            _ => None,
        })
        .collect();
    assert_eq!(relayed.len(), 1);
    assert!(
        !relayed[0]
            .payloads
            .iter()
            .any(|p| p.is("stanza-id", ns::SID)),
        "the forged stanza-id is gone"
    );
    // Bob's server bounces the reaction: alice hears of it.
    h.bounce("r1", "cancel", "not-acceptable").await;
    settle().await;
    let out = h.drain_all();
    let back: Vec<_> = out
        .iter()
        .filter_map(|st| match st {
            Stanza::Message(m) if condition(st) == Some(DefinedCondition::NotAcceptable) => {
                Some(m.to.as_ref().unwrap().to_string())
            }
            _ => None,
        })
        .collect();
    assert_eq!(back, ["alice@x/r"], "{out:?}");

    // Rate: burst 200 by default; a receipt does not carry chat states
    // past it.
    let mut h = harness_with(64, "[limits]\nsender_rate_per_s = 1\nsender_burst = 1\n").await;
    for i in 0..3 {
        h.feed(&format!(
            "<message xmlns='{NS}' from='alice@x/r' to='bob@relay.x' id='c{i}' type='chat'><composing xmlns='http://jabber.org/protocol/chatstates'/><received xmlns='urn:xmpp:receipts' id='nothing'/></message>"
        ))
        .await;
    }
    settle().await;
    let out = h.drain_all();
    let refused = out
        .iter()
        .filter(|st| condition(st) == Some(DefinedCondition::PolicyViolation))
        .count();
    assert_eq!(refused, 2, "{out:?}");
}
