//! Final refusals, store failures and expiry, and what senders are told.

use super::*;

/// Issue 11, defect 3: a final refusal (here `forbidden`, a privacy
/// list) ends that message with a notice to its sender carrying the
/// same condition, and the queue goes on at once (before, it retried
/// for the whole TTL while everything behind it waited).
#[tokio::test(start_paused = true)]
async fn final_refusal_ends_the_message_and_tells_its_sender() {
    let mut h = harness(64).await;
    h.msg("m1").await;
    h.msg("m2").await;
    settle().await;
    assert_eq!(
        ids_of(&h.drain()),
        ["m1"],
        "presence unknown: one at a time"
    );
    h.bounce("m1", "auth", "forbidden").await;
    settle().await;
    let out = h.drain_all();
    let notice: Vec<_> = out
        .iter()
        .filter(|st| condition(st) == Some(DefinedCondition::Forbidden))
        .collect();
    assert_eq!(notice.len(), 1, "{out:?}");
    let Stanza::Message(n) = notice[0] else {
        unreachable!()
    };
    assert_eq!(n.id.as_ref().unwrap().0, "m1");
    assert_eq!(n.to.as_ref().unwrap().to_bare().to_string(), "alice@x");
    let relayed: Vec<_> = messages(&out)
        .into_iter()
        .filter(|(to, _, body)| to.starts_with("bob@x") && body.is_some())
        .map(|(_, id, _)| id)
        .collect();
    assert_eq!(relayed, ["m2"], "the queue went on");
    assert_eq!(h.store.recipient("bob@x").unwrap().pending, 1);
}

/// Issue 11, defect 11 (batched mode): when a burst's commit fails,
/// its new message is not relayed and its sender is told, and the
/// receipt for a removal that never reached sled is not relayed
/// (before, both left as if stored).
#[tokio::test(start_paused = true)]
async fn failed_commit_in_batched_mode_relays_nothing_that_needed_it() {
    let mut h = harness(64).await;
    h.bob_online().await;
    h.msg("m1").await;
    settle().await;
    assert_eq!(ids_of(&h.drain()), ["m1"]);
    h.store.fail_commits();
    h.msg("m2").await;
    settle().await;
    h.receipt("m1").await;
    settle().await;
    let out = h.drain_all();
    let to_bob: Vec<_> = messages(&out)
        .into_iter()
        .filter(|(to, _, b)| to.starts_with("bob@x") && b.is_some())
        .collect();
    assert!(to_bob.is_empty(), "m2 was not stored: {to_bob:?}");
    let told: Vec<_> = out
        .iter()
        .filter(|st| condition(st) == Some(DefinedCondition::ResourceConstraint))
        .collect();
    assert_eq!(told.len(), 1, "m2's sender told: {out:?}");
    assert!(receipts_to_alice(&out).is_empty(), "{out:?}");
    // Nor is m2 sent later by this process.
    h.available().await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(!ids_of(&h.drain()).contains(&"m2"));
}

/// Issue 11, defect 11 (fsync mode): when an fsync fails, receipts
/// held for removals that never reached disk are dropped, not let out
/// (before, they left, and those messages came back after the
/// restart to a sender that had seen their receipt).
#[tokio::test(start_paused = true)]
async fn failed_fsync_releases_no_held_receipt() {
    let Some(mut h) = fsync_harness_with_m1_relayed().await else {
        // PostgreSQL: a commit is durable, no fsync is asked, so none
        // can fail (the next test covers what its commits release).
        return;
    };
    h.receipt("m1").await;
    settle().await;
    assert!(
        receipts_to_alice(&h.drain_all()).is_empty(),
        "held for the removal"
    );
    assert!(
        h.flushes.try_recv().is_ok(),
        "an fsync asked for the removal"
    );
    h.internal
        .send(Flushed::Failed("injected".into()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let out = h.drain_all();
    assert!(receipts_to_alice(&out).is_empty(), "{out:?}");
}

/// A failed commit takes back only what was not durable before it. On
/// a store whose commit is durable (PostgreSQL), a message committed
/// in an earlier round is relayed, and its sender is not told it was
/// not stored (before, it waited for a flush that adds nothing, and a
/// failed commit in between told its sender so). On sled in fsync mode
/// the earlier message is not on disk until its fsync, so it is held
/// and its sender told too.
#[tokio::test(start_paused = true)]
async fn failed_commit_takes_back_only_what_was_not_durable() {
    let mut h = harness_full(64, "fsync", "").await;
    subscribed_and_online(&h).await;
    h.msg("m1").await;
    settle().await;
    h.store.fail_commits();
    h.msg("m2").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let out = h.drain_all();
    let told: Vec<String> = out
        .iter()
        .filter(|st| condition(st) == Some(DefinedCondition::ResourceConstraint))
        .filter_map(|st| match st {
            Stanza::Message(m) => m.id.as_ref().map(|i| i.0.clone()),
            _ => None,
        })
        .collect();
    let to_bob: Vec<String> = messages(&out)
        .into_iter()
        .filter(|(to, _, b)| to.starts_with("bob@x") && b.is_some())
        .map(|(_, id, _)| id.to_string())
        .collect();
    if h.store.durable_at_commit() {
        assert_eq!(to_bob, ["m1"], "{out:?}");
        assert_eq!(told, ["m2"], "{out:?}");
    } else {
        assert!(to_bob.is_empty(), "{out:?}");
        assert_eq!(told, ["m1", "m2"], "{out:?}");
    }
}

/// Issue 11, defect 10: an expired message's sender gets, besides the
/// error to the full JID it came from, a notice kept in the store and
/// relayed like a message to its bare JID (an error to a resource
/// that went away is dropped by the server); and a notice that itself
/// expires makes no notice.
#[tokio::test(start_paused = true)]
async fn expiry_notice_is_kept_and_relayed_to_the_bare_jid() {
    let mut h = harness_with(64, "[limits]\nmessage_ttl_s = 1\n").await;
    h.msg("m1").await;
    settle().await;
    h.bounce("m1", "cancel", "service-unavailable").await;
    std::thread::sleep(Duration::from_millis(1100));
    tokio::time::sleep(Duration::from_millis(1010)).await; // expiry step
    let out = h.drain_all();
    let errors: Vec<_> = out
        .iter()
        .filter(|st| condition(st) == Some(DefinedCondition::RecipientUnavailable))
        .collect();
    assert_eq!(errors.len(), 1, "{out:?}");
    let notices: Vec<_> = messages(&out)
        .into_iter()
        .filter(|(to, _, b)| to == "alice@x" && b.is_some())
        .collect();
    assert_eq!(notices.len(), 1, "{out:?}");
    let body = notices[0].2.as_deref().unwrap();
    assert!(body.contains("\"m1\"") && body.contains("id m1"), "{body}");
    assert_eq!(h.store.recipient("alice@x").unwrap().pending, 1, "kept");
    // Nobody confirms the notice: it expires without a notice of its own.
    std::thread::sleep(Duration::from_millis(1100));
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(h.store.recipient("alice@x").unwrap().pending, 0);
    let out = h.drain_all();
    assert!(
        !messages(&out)
            .iter()
            .any(|(to, _, b)| to.starts_with("bob@x") && b.is_some()),
        "{out:?}"
    );
}

/// Review of issue 11, 1: `remote-server-not-found` is what Prosody
/// bounces while a remote server that exists is down, so it is not
/// final: the message stays and is retried, nobody is told yet.
#[tokio::test(start_paused = true)]
async fn remote_server_not_found_is_not_final() {
    let mut h = harness(64).await;
    h.msg("m1").await;
    settle().await;
    h.drain_all();
    h.bounce("m1", "cancel", "remote-server-not-found").await;
    tokio::time::sleep(Duration::from_millis(510)).await;
    let out = h.drain_all();
    assert!(out.iter().all(|st| condition(st).is_none()), "{out:?}");
    assert_eq!(ids_of(&h.drain()), Vec::<&str>::new());
    let again: Vec<_> = messages(&out).into_iter().map(|(_, id, _)| id).collect();
    assert_eq!(again, ["m1"], "retried");
    assert_eq!(h.store.recipient("bob@x").unwrap().pending, 1);
}

/// Review of issue 11, 2: after a store failure, what needs no write
/// still flows: chat states. (A receipt that names nothing stored is not
/// relayed at all since issue 23, item 3.)
#[tokio::test(start_paused = true)]
async fn after_a_store_failure_what_needs_no_write_still_flows() {
    let mut h = harness(64).await;
    h.store.fail_commits();
    h.msg("m1").await; // the failing commit fails the gate
    settle().await;
    h.drain_all();
    h.feed(&format!(
        "<message xmlns='{NS}' from='bob@x/r' to='alice@relay.x' type='chat'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>"
    ))
    .await;
    h.feed(&format!(
        "<message xmlns='{NS}' from='bob@x/r' to='alice@relay.x'><received xmlns='urn:xmpp:receipts' id='unknown'/></message>"
    ))
    .await;
    settle().await;
    let out = h.drain_all();
    let to_alice = messages(&out)
        .into_iter()
        .filter(|(to, _, _)| to == "alice@x")
        .count();
    assert_eq!(to_alice, 1, "{out:?}");
    assert!(receipts_to_alice(&out).is_empty(), "{out:?}");
}

/// Review of issue 11, 9 and 10: a message refused for good forgets
/// its id, so the sender may send it again; the refusal's text from
/// the other side is cut short in the notice.
#[tokio::test(start_paused = true)]
async fn a_refused_message_may_be_sent_again_and_its_notice_is_bounded() {
    let mut h = harness(64).await;
    h.msg("m1").await;
    settle().await;
    let long = "y".repeat(10_000);
    h.feed(&format!(
        "<message xmlns='{NS}' from='bob@x' to='alice@relay.x' id='m1' type='error'><error type='auth'><forbidden xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/><text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>{long}</text></error></message>"
    ))
    .await;
    settle().await;
    let out = h.drain_all();
    let notice = messages(&out)
        .into_iter()
        .find(|(to, _, b)| to == "alice@x" && b.is_some())
        .expect("a notice");
    assert!(notice.2.unwrap().len() < 600);
    h.msg("m1").await; // sent again, say once unblocked
    settle().await;
    assert_eq!(ids_of(&h.drain()), ["m1"]);
    assert_eq!(h.store.recipient("bob@x").unwrap().pending, 1);
}
