//! The delivery state machine: probes, the window, grace, replays, silent
//! devices, addressing.

use super::*;

/// After a connect every subscribed recipient is probed, in steps;
/// one that answers mid-pass is replayed within its grace, and the
/// silent ones get their retry afterwards.
#[tokio::test(start_paused = true)]
async fn startup_probes_every_recipient_in_steps() {
    let dir = tempfile::tempdir().unwrap();
    let config = Arc::new(config(dir.path(), 64));
    let n = PROBE_STEP * 3 + 7;
    let store = subscribed_store(&config, n);
    let (out_tx, mut out_rx) = mpsc::channel(8192);
    let (ev_tx, ev_rx) = mpsc::channel(1024);
    let (flush_tx, _flush_rx) = mpsc::unbounded_channel();
    let (_int_tx, int_rx) = mpsc::channel(16);
    let router = Router::new(config, None, store, out_tx, flush_tx).unwrap();
    let stop = CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    tokio::spawn(router.run(ev_rx, int_rx, stop));
    ev_tx.send(LinkEvent::Up { epoch: 1 }).await.unwrap();
    // One recipient comes online while the pass is under way.
    let online = format!("u{}@x", n - 1);
    let el = Element::from_str(&format!(
        "<presence xmlns='{NS}' from='{online}/r' to='relay.x'/>"
    ))
    .unwrap();
    ev_tx
        .send(LinkEvent::Stanza(
            Box::new(Stanza::Presence(Presence::try_from(el).unwrap())),
            crate::link::now_us(),
        ))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(310)).await;
    let mut probed = std::collections::HashSet::new();
    let mut relayed = Vec::new();
    while let Ok(o) = out_rx.try_recv() {
        match o.stanza {
            Stanza::Presence(p) if p.type_ == PresenceType::Probe => {
                probed.insert(p.to.unwrap().to_string());
            }
            Stanza::Message(m) => relayed.push(m.to.unwrap().to_string()),
            _ => {}
        }
    }
    assert_eq!(probed.len(), n, "every subscribed recipient probed once");
    assert_eq!(relayed, [online], "only the one that said it is online");
    // The silent ones get their retry retry_initial_ms after the pass.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut retried = 0;
    while let Ok(o) = out_rx.try_recv() {
        if matches!(o.stanza, Stanza::Message(_)) {
            retried += 1;
        }
    }
    assert_eq!(retried, n - 1);
}

/// A store of `n` subscribed recipients `u{i}@x` with one message each,
/// `m{i}`.
fn subscribed_store(config: &Config, n: usize) -> Arc<dyn QueueStore> {
    let store = test_databases::from_env(
        &config.store.path,
        Durability::Batched,
        &config.component.domain,
    );
    store.begin();
    for i in 0..n {
        let recipient = format!("u{i}@x");
        let id = format!("m{i}");
        store
            .accept(
                NewMessage {
                    recipient: &recipient,
                    sender_bare: "alice@x",
                    origin_id: None,
                    content_hash: 0,
                    record: Record {
                        accepted_at_ms: now_ms(),
                        sender: "alice@x/r".into(),
                        stanza: format!(
                            "<message xmlns='{NS}' from='alice@relay.x' to='{recipient}' id='{id}' type='chat'><body>{id}</body></message>"
                        ),
                        id,
                    },
                },
                QueueLimits {
                    max_pending: 10,
                    max_bytes: 1 << 20,
                    max_store_bytes: 1 << 30,
                },
            )
            .unwrap();
        store
            .set_subscription(&recipient, Subscription::Subscribed)
            .unwrap();
    }
    store.commit().unwrap();
    store
}

/// `who` (a bare JID) is offline: the answer to its probe.
async fn unavailable_from(h: &Harness, who: &str) {
    h.feed(&format!(
        "<presence xmlns='{NS}' from='{who}' to='relay.x' type='unavailable'/>"
    ))
    .await;
}

/// The recipients (`to`) of the messages sent since the last drain,
/// sorted.
fn sorted_recipients(h: &mut Harness) -> Vec<String> {
    let mut to: Vec<String> = messages(&h.drain_all())
        .into_iter()
        .map(|(t, _, _)| t)
        .collect();
    to.sort_unstable();
    to
}

/// On a large store most probe answers come after the pass has ended.
/// One that says "unavailable" holds the recipient's messages, new ones
/// too, until its presence, and then they are replayed after the grace
/// with their `<delay/>`; the silent ones get the pass's one retry, and a
/// message new meanwhile waits for that retry behind the rest.
#[tokio::test(start_paused = true)]
async fn answers_after_the_pass_hold_messages_until_presence() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 64);
    let n = PROBE_STEP * 2;
    let store = subscribed_store(&config, n);
    let mut h = harness_on(store, config, dir).await;
    settle().await;
    let probes = h
        .drain_all()
        .into_iter()
        .filter(|st| matches!(st, Stanza::Presence(p) if p.type_ == PresenceType::Probe))
        .count();
    assert_eq!(probes, n, "the pass is over");
    for i in 0..n / 2 {
        unavailable_from(&h, &format!("u{i}@x")).await;
    }
    // New messages: for one known offline, and for one still silent.
    let silent = n - 1;
    for (i, id) in [(0, "new0"), (silent, "new-silent")] {
        h.feed(&format!(
            "<message xmlns='{NS}' from='alice@x/r' to='u{i}@relay.x' id='{id}' type='chat'><body>{id}</body></message>"
        ))
        .await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        messages(&h.drain_all()),
        [],
        "nothing before the retry, to those offline or silent"
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    let retried = messages(&h.drain_all());
    let mut to: Vec<&str> = retried.iter().map(|(t, _, _)| t.as_str()).collect();
    to.sort_unstable();
    let mut silent_ones: Vec<String> = (n / 2..n).map(|i| format!("u{i}@x")).collect();
    silent_ones.sort_unstable();
    // Presence unknown: one message each on the wire, the head of its
    // queue; the new one follows its receipt.
    assert_eq!(
        to, silent_ones,
        "the retry goes to the silent ones, one each"
    );
    let to_silent = |out: &[(String, String, Option<String>)]| -> Vec<String> {
        out.iter()
            .filter(|(t, _, _)| t == &format!("u{silent}@x"))
            .map(|(_, id, _)| id.clone())
            .collect()
    };
    assert_eq!(to_silent(&retried), [format!("m{silent}")]);
    h.feed(&format!(
        "<message xmlns='{NS}' from='u{silent}@x/r' to='alice@relay.x'><received xmlns='urn:xmpp:receipts' id='m{silent}'/></message>"
    ))
    .await;
    settle().await;
    assert_eq!(to_silent(&messages(&h.drain_all())), ["new-silent"]);
    // The one known offline logs in: its messages after the grace.
    h.feed(&format!(
        "<presence xmlns='{NS}' from='u0@x/r' to='relay.x'/>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(290)).await;
    assert_eq!(messages(&h.drain_all()), [], "within the grace");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let out = h.drain_all();
    let replayed: Vec<(String, bool)> = out
        .iter()
        .filter_map(|st| match st {
            Stanza::Message(m) if !m.bodies.is_empty() => Some((
                m.id.as_ref().unwrap().0.clone(),
                m.payloads.iter().any(|p| p.is("delay", ns::DELAY)),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        replayed,
        [("m0".to_string(), true), ("new0".to_string(), true)],
        "in order, each with its delay"
    );
    assert!(
        messages(&out)
            .iter()
            .all(|(t, _, _)| t == "u0@x/r" || t == "u0@x"),
        "{out:?}"
    );
}

/// A link that goes down forgets what presence said: a recipient known
/// offline is probed again and retried like the others, and the retry
/// of the first link's pass sends nothing on the second.
#[tokio::test(start_paused = true)]
async fn a_new_link_forgets_who_was_offline_and_the_old_retry() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 64);
    let store = subscribed_store(&config, 4);
    let mut h = harness_on(store, config, dir).await;
    settle().await;
    unavailable_from(&h, "u0@x").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.drain_all();
    h.events.send(LinkEvent::Down).await.unwrap();
    h.events.send(LinkEvent::Up { epoch: 2 }).await.unwrap();
    settle().await;
    let mut probed: Vec<String> = h
        .drain_all()
        .into_iter()
        .filter_map(|st| match st {
            Stanza::Presence(p) if p.type_ == PresenceType::Probe => Some(p.to?.to_string()),
            _ => None,
        })
        .collect();
    probed.sort_unstable();
    assert_eq!(probed, ["u0@x", "u1@x", "u2@x", "u3@x"]);
    // The first pass's retry was due 500 ms after it: nothing.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(messages(&h.drain_all()), []);
    // The second's, 500 ms after it: every one, u0 too.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let to = sorted_recipients(&mut h);
    assert_eq!(to, ["u0@x", "u1@x", "u2@x", "u3@x"]);
}

/// The pass's retry waits while answers are still being read: answers
/// that keep coming past its time are a backlog, not silence, and only
/// the recipients that never answered are sent to; on the first link
/// and on the next (whose recipients the last link knew).
#[tokio::test(start_paused = true)]
async fn the_retry_waits_for_answers_still_coming_in() {
    for reconnect in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), 64);
        let store = subscribed_store(&config, 20);
        let mut h = harness_on(store, config, dir).await;
        settle().await;
        if reconnect {
            tokio::time::sleep(Duration::from_millis(600)).await;
            h.events.send(LinkEvent::Down).await.unwrap();
            h.events.send(LinkEvent::Up { epoch: 2 }).await.unwrap();
            settle().await;
        }
        h.drain_all();
        // The retry is due 500 ms after the pass; answers come every
        // 10 ms from 450 ms to 590.
        tokio::time::sleep(Duration::from_millis(450)).await;
        for i in 0..15 {
            unavailable_from(&h, &format!("u{i}@x")).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            messages(&h.drain_all()),
            [],
            "not while answers come in (reconnect: {reconnect})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let to = sorted_recipients(&mut h);
        assert_eq!(to, ["u15@x", "u16@x", "u17@x", "u18@x", "u19@x"]);
    }
}

/// Answers from recipients with nothing pending hold the retry back
/// too: they come in probe order, ahead of answers that matter.
#[tokio::test(start_paused = true)]
async fn answers_from_recipients_with_nothing_pending_hold_the_retry_back() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 64);
    let store = subscribed_store(&config, 5);
    for i in 0..15 {
        store
            .set_subscription(&format!("p{i}@x"), Subscription::Subscribed)
            .unwrap();
    }
    let mut h = harness_on(store, config, dir).await;
    settle().await;
    h.drain_all();
    tokio::time::sleep(Duration::from_millis(450)).await;
    for i in 0..15 {
        unavailable_from(&h, &format!("p{i}@x")).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 0..5 {
        unavailable_from(&h, &format!("u{i}@x")).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(messages(&h.drain_all()), [], "all of them answered");
}

/// Answers that trickle in for long hold the retry back four times
/// `retry_initial_ms` past its time at most: then those still silent are
/// sent to.
#[tokio::test(start_paused = true)]
async fn trickling_answers_hold_the_retry_back_for_a_while_only() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 64);
    let store = subscribed_store(&config, 40);
    let mut h = harness_on(store, config, dir).await;
    settle().await;
    h.drain_all();
    // Due at 500 ms, held until 2,500 at most; an answer every 90 ms
    // from 450 ms (quiet: 100 ms).
    tokio::time::sleep(Duration::from_millis(450)).await;
    let mut sent = Vec::new();
    for i in 0..30 {
        unavailable_from(&h, &format!("u{i}@x")).await;
        tokio::time::sleep(Duration::from_millis(90)).await;
        let now = messages(&h.drain_all());
        if !now.is_empty() {
            sent.push((i, now));
        }
    }
    let [(i, first)] = &sent[..] else {
        panic!("one retry: {sent:?}");
    };
    // Sent after the answer of u{i}, 450 + 90 * i ms after the pass.
    assert_eq!(*i, 22, "at 2,500 ms");
    let mut to: Vec<String> = first.iter().map(|(t, _, _)| t.clone()).collect();
    to.sort_unstable();
    let mut silent: Vec<String> = (23..40).map(|i| format!("u{i}@x")).collect();
    silent.sort_unstable();
    assert_eq!(to, silent);
}

/// New messages for recipients awaiting their answer are not answers:
/// they wait for the retry, and the retry does not wait for them.
#[tokio::test(start_paused = true)]
async fn new_messages_do_not_hold_the_retry_back() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 64);
    let store = subscribed_store(&config, 20);
    let mut h = harness_on(store, config, dir).await;
    settle().await;
    h.drain_all();
    tokio::time::sleep(Duration::from_millis(450)).await;
    for i in 0..15 {
        h.feed(&format!(
            "<message xmlns='{NS}' from='alice@x/r' to='u{i}@relay.x' id='new{i}' type='chat'><body>new</body></message>"
        ))
        .await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // By 600 ms: every recipient's head, m{i}, and nothing else (presence
    // unknown: one on the wire each).
    let mut sent: Vec<(String, String)> = messages(&h.drain_all())
        .into_iter()
        .map(|(t, id, _)| (t, id))
        .collect();
    sent.sort_unstable();
    let mut heads: Vec<(String, String)> = (0..20)
        .map(|i| (format!("u{i}@x"), format!("m{i}")))
        .collect();
    heads.sort_unstable();
    assert_eq!(sent, heads);
}

#[test]
fn fresh_messages_are_bounded_by_bytes_and_entries() {
    let mut f = Fresh::default();
    let half = Fresh::MAX_BYTES / 2;
    f.put(1, Message::new(None), half);
    f.put(2, Message::new(None), half);
    f.put(3, Message::new(None), half);
    assert!(f.take(1).is_none(), "the oldest made room");
    assert!(f.take(2).is_some());
    assert!(f.take(2).is_none(), "taken once");
    assert_eq!(f.bytes, half);
    f.put(4, Message::new(None), Fresh::MAX_BYTES + 1);
    assert!(f.take(4).is_none(), "larger than the whole cache: not kept");
    for seq in 10..10 + Fresh::MAX_ENTRIES as u64 + 5 {
        f.put(seq, Message::new(None), 1);
    }
    assert_eq!(f.order.len(), Fresh::MAX_ENTRIES);
    assert!(f.take(10).is_none() && f.take(20).is_some());
}

#[tokio::test(start_paused = true)]
async fn replay_waits_for_grace_and_keeps_order() {
    let mut h = harness(64).await;
    h.subscribe_and_go_offline().await;
    for id in ["m1", "m2", "m3"] {
        h.msg(id).await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(h.drain().is_empty(), "offline: nothing sent");
    h.available().await;
    tokio::time::sleep(Duration::from_millis(290)).await;
    assert!(h.drain().is_empty(), "nothing before the grace window ends");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let sent = h.drain();
    assert_eq!(ids_of(&sent), ["m1", "m2", "m3"]);
    assert!(sent.iter().all(|(_, d)| *d), "replays carry <delay/>");
}

#[tokio::test(start_paused = true)]
async fn receipt_during_grace_is_not_replayed() {
    let mut h = harness(64).await;
    h.bob_online().await;
    // m1 goes out, then bob drops without a receipt; the server keeps
    // its copy (offline storage).
    h.msg("m1").await;
    settle().await;
    h.unavailable("r").await;
    h.msg("m2").await;
    h.available().await;
    settle().await;
    h.drain();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The server's own offline copy of m1 was receipted.
    h.receipt("m1").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ids_of(&h.drain()), ["m2"]);
}

#[tokio::test(start_paused = true)]
async fn receipt_timeout_marks_offline_until_presence() {
    let mut h = harness(64).await;
    h.bob_online().await;
    h.msg("m1").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(ids_of(&h.drain()), ["m1"]);
    // No receipt: after the timeout, nothing is resent on its own.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(h.drain().is_empty(), "no resend without a sign of life");
    // A new login (new available presence) replays it.
    h.presence("r2").await;
    tokio::time::sleep(Duration::from_millis(310)).await;
    assert_eq!(ids_of(&h.drain()), ["m1"]);
}

#[tokio::test(start_paused = true)]
async fn window_refills_once_half_is_confirmed() {
    let mut h = harness(4).await;
    h.bob_online().await;
    for i in 1..=8 {
        h.msg(&format!("m{i}")).await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(ids_of(&h.drain()), ["m1", "m2", "m3", "m4"]);
    h.receipt("m1").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(h.drain().is_empty(), "three in flight: more than half");
    h.receipt("m2").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(ids_of(&h.drain()), ["m5", "m6"], "refilled in one clump");
}

#[tokio::test(start_paused = true)]
async fn window_bounds_in_flight() {
    let mut h = harness(2).await;
    h.bob_online().await;
    for id in ["m1", "m2", "m3", "m4"] {
        h.msg(id).await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(ids_of(&h.drain()), ["m1", "m2"]);
    h.receipt("m1").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(ids_of(&h.drain()), ["m3"]);
    // A marker confirms m2 and m3 at once, freeing two slots.
    h.feed(&format!(
        "<message xmlns='{NS}' from='bob@x/r' to='alice@relay.x'><displayed xmlns='urn:xmpp:chat-markers:0' id='m3'/></message>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(ids_of(&h.drain()), ["m4"]);
}

#[tokio::test(start_paused = true)]
async fn bounce_with_unknown_presence_retries_with_backoff() {
    let mut h = harness(64).await;
    h.msg("m1").await;
    settle().await;
    assert_eq!(ids_of(&h.drain()), ["m1"]);
    h.bounce("m1", "cancel", "service-unavailable").await;
    tokio::time::sleep(Duration::from_millis(490)).await;
    assert!(h.drain().is_empty());
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(ids_of(&h.drain()), ["m1"], "retried after 500 ms");
}

/// Issue 11, defect 5: a receipt timeout on one device (the higher
/// priority one, which the server picks, frozen) takes down only that
/// device: the message and those after it go to the other one by its
/// full JID (before, nothing more was sent while Bob stayed online).
#[tokio::test(start_paused = true)]
async fn receipt_timeout_on_one_device_lets_the_others_go_on() {
    let mut h = harness(64).await;
    h.subscribe_and_go_offline().await;
    h.feed(&format!(
        "<presence xmlns='{NS}' from='bob@x/phone' to='relay.x'><priority>5</priority></presence>"
    ))
    .await;
    h.presence("desk").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    h.drain_all();
    // Both clients are known to answer receipts.
    h.answers("phone").await;
    h.answers("desk").await;
    h.msg("m1").await;
    settle().await;
    let first: Vec<_> = messages(&h.drain_all())
        .into_iter()
        .map(|(to, id, _)| (to, id))
        .collect();
    assert_eq!(first, [("bob@x".to_string(), "m1".to_string())]);
    // The phone is frozen: no receipt.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let again: Vec<_> = messages(&h.drain_all())
        .into_iter()
        .map(|(to, id, _)| (to, id))
        .collect();
    assert_eq!(again, [("bob@x/desk".to_string(), "m1".to_string())]);
    h.feed(&format!(
        "<message xmlns='{NS}' from='bob@x/desk' to='alice@relay.x'><received xmlns='urn:xmpp:receipts' id='m1'/></message>"
    ))
    .await;
    h.msg("m2").await;
    settle().await;
    let next: Vec<_> = messages(&h.drain_all())
        .into_iter()
        .filter(|(_, _, b)| b.is_some())
        .map(|(to, id, _)| (to, id))
        .collect();
    assert_eq!(next, [("bob@x/desk".to_string(), "m2".to_string())]);
    assert_eq!(h.store.recipient("bob@x").unwrap().pending, 1);
    // The phone shows life (a new presence): back to the bare JID.
    h.feed(&format!(
        "<presence xmlns='{NS}' from='bob@x/phone' to='relay.x'><priority>5</priority></presence>"
    ))
    .await;
    h.receipt("m2").await;
    h.msg("m3").await;
    settle().await;
    let last: Vec<_> = messages(&h.drain_all())
        .into_iter()
        .filter(|(_, _, b)| b.is_some())
        .map(|(to, id, _)| (to, id))
        .collect();
    assert_eq!(last, [("bob@x".to_string(), "m3".to_string())]);
}

/// Issue 11, defect 7: a backoff timer left armed when the queue
/// emptied (here by expiry) must not restart a window already under
/// way (before, it sent the in-flight message a second time and
/// leaked its receipt timer).
#[tokio::test(start_paused = true)]
async fn stale_resume_timer_sends_nothing_twice() {
    let mut h = harness_with(64, "[limits]\nmessage_ttl_s = 1\n").await;
    let bounce = format!(
        "<message xmlns='{NS}' from='bob@x' to='alice@relay.x' id='m1' type='error'><error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"
    );
    h.msg("m1").await;
    settle().await;
    h.feed(&bounce).await; // backoff: retry at 500 ms
    // m1 outlives its TTL on the wall clock (expiry reads it).
    std::thread::sleep(Duration::from_millis(1100));
    tokio::time::sleep(Duration::from_millis(520)).await;
    h.feed(&bounce).await; // retried and bounced: next retry at ~1.5 s
    tokio::time::sleep(Duration::from_millis(490)).await; // expiry at 1 s
    assert_eq!(h.store.recipient("bob@x").unwrap().pending, 0, "expired");
    // Bob shows life with nothing pending, then a new message goes.
    h.feed(&format!(
        "<message xmlns='{NS}' from='bob@x/r' to='alice@relay.x' type='chat'><active xmlns='http://jabber.org/protocol/chatstates'/></message>"
    ))
    .await;
    h.drain_all();
    h.msg("m2").await;
    h.available().await; // the window opens
    tokio::time::sleep(Duration::from_millis(600)).await; // past the old retry
    let m2 = messages(&h.drain_all())
        .into_iter()
        .filter(|(_, id, _)| id == "m2")
        .count();
    assert_eq!(m2, 1, "m2 sent once");
}

/// Review of issue 11, 3: when every resource went silent, a late
/// receipt from one brings it back, and delivery goes on to it by full
/// JID (not to the bare JID, which the server routes to the frozen
/// one).
#[tokio::test(start_paused = true)]
async fn a_late_receipt_brings_a_silent_device_back() {
    let mut h = harness(64).await;
    h.subscribe_and_go_offline().await;
    h.feed(&format!(
        "<presence xmlns='{NS}' from='bob@x/laptop' to='relay.x'><priority>5</priority></presence>"
    ))
    .await;
    h.presence("phone").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    h.answers("laptop").await;
    h.answers("phone").await;
    h.msg("m1").await;
    // The laptop is frozen; m1 goes on to the phone, which is slow too.
    tokio::time::sleep(Duration::from_millis(2010)).await;
    h.drain_all();
    // The phone's late receipt arrives: it is back, m2 goes to it.
    h.feed(&format!(
        "<message xmlns='{NS}' from='bob@x/phone' to='alice@relay.x'><received xmlns='urn:xmpp:receipts' id='m1'/></message>"
    ))
    .await;
    h.msg("m2").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let sent: Vec<_> = messages(&h.drain_all())
        .into_iter()
        .filter(|(_, _, b)| b.is_some())
        .map(|(to, id, _)| (to, id))
        .collect();
    assert_eq!(sent, [("bob@x/phone".to_string(), "m2".to_string())]);
}

/// Review of issue 11, 11: when a recipient cancels the subscription,
/// what waited for its presence is retried with backoff (no presence
/// will come again).
#[tokio::test(start_paused = true)]
async fn an_unsubscribed_queue_is_retried() {
    let mut h = harness(64).await;
    h.subscribe_and_go_offline().await;
    h.msg("m1").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(h.drain().is_empty(), "offline");
    h.feed(&format!(
        "<presence xmlns='{NS}' from='bob@x' to='relay.x' type='unsubscribed'/>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(510)).await;
    assert_eq!(ids_of(&h.drain()), ["m1"]);
}

/// Issue 12, item 0: relayed messages come from the relay address's
/// full JID (Profanity answers receipts to a full JID only), and a
/// receipt addressed to the bare relay address or to any resource of
/// it confirms alike.
#[tokio::test(start_paused = true)]
async fn relayed_from_a_full_jid_and_confirmed_at_any_resource() {
    let mut h = harness(64).await;
    h.bob_online().await;
    for id in ["f1", "f2", "f3"] {
        h.msg(id).await;
    }
    settle().await;
    let froms: Vec<String> = h
        .drain_all()
        .into_iter()
        .filter_map(|st| match st {
            Stanza::Message(m) if !m.bodies.is_empty() => m.from.map(|f| f.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(froms, ["alice@relay.x/redeliver"; 3]);
    for (id, to) in [
        ("f1", "alice@relay.x"),
        ("f2", "alice@relay.x/redeliver"),
        ("f3", "alice@relay.x/other"),
    ] {
        h.feed(&format!(
            "<message xmlns='{NS}' from='bob@x/r' to='{to}'><received xmlns='urn:xmpp:receipts' id='{id}'/></message>"
        ))
        .await;
    }
    settle().await;
    assert_eq!(h.store.recipient("bob@x").unwrap().pending, 0);
    let receipts = receipts_to_alice(&h.drain_all());
    assert_eq!(receipts, ["f1", "f2", "f3"], "relayed to the sender");
}

/// Issue 12, item 4 (in part): a relayed message carries a XEP-0359
/// origin-id equal to its id (the sender's own, if it gave one) and a
/// stanza-id that stays the same at every send, so that clients that
/// tell copies apart by either show a replay, or an archived copy,
/// once.
#[tokio::test(start_paused = true)]
async fn relayed_messages_carry_stable_origin_and_stanza_ids() {
    let mut h = harness(64).await;
    h.bob_online().await;
    h.msg("o1").await;
    h.feed(&format!(
        "<message xmlns='{NS}' from='alice@x/r' to='bob@relay.x' id='o2' type='chat'><body>x</body><origin-id xmlns='urn:xmpp:sid:0' id='mine'/></message>"
    ))
    .await;
    settle().await;
    let ids = |out: Vec<Stanza>| -> Vec<(String, Vec<String>, String)> {
        out.into_iter()
            .filter_map(|st| match st {
                Stanza::Message(m) if !m.bodies.is_empty() => Some((
                    m.id.clone().unwrap().0,
                    m.payloads
                        .iter()
                        .filter(|p| p.is("origin-id", ns::SID))
                        .map(|p| p.attr("id").unwrap().to_owned())
                        .collect(),
                    m.payloads
                        .iter()
                        .find(|p| p.is("stanza-id", ns::SID))
                        .map(|p| p.attr("id").unwrap().to_owned())
                        .unwrap(),
                )),
                _ => None,
            })
            .collect()
    };
    let first = ids(h.drain_all());
    assert_eq!(first[0].1, ["o1"]);
    assert_eq!(first[1].1, ["mine"], "the sender's own kept, not doubled");
    // Bob drops without receipts and comes back: the replay carries
    // the same origin-ids and stanza-ids.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    h.presence("r2").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(ids(h.drain_all()), first);
}

/// Handle what was fed, with the paused clock standing still.
async fn handled() {
    for _ in 0..32 {
        tokio::task::yield_now().await;
    }
}

/// A receipt whose removal waits for the next round's commit (sled,
/// `router/linger.rs`), in fsync mode: the next message's accept and
/// the removal share one commit and one fsync, and the receipt reaches
/// its sender once that fsync is done, before that message's relay;
/// when nothing follows, it goes once the linger is over.
#[tokio::test(start_paused = true)]
async fn a_receipt_waits_for_the_next_commit_and_goes_back_first() {
    let Some(mut h) = fsync_harness_with_m1_relayed().await else {
        // PostgreSQL commits every round, and asks no fsync.
        return;
    };

    h.receipt("m1").await;
    handled().await;
    assert!(h.flushes.try_recv().is_err(), "the removal's commit waits");
    // The next message comes while it waits: one commit, one fsync.
    h.msg("m2").await;
    handled().await;
    let t = h
        .flushes
        .try_recv()
        .expect("an fsync for the removal and m2");
    assert!(h.flushes.try_recv().is_err(), "one fsync for both");
    assert!(h.drain_all().is_empty(), "nothing before the fsync");
    h.internal.send(Flushed::Durable(t)).await.unwrap();
    handled().await;
    let seen: Vec<String> = h
        .drain_all()
        .into_iter()
        .filter_map(|st| match st {
            Stanza::Message(m) if !m.bodies.is_empty() => Some(format!("to bob: {}", m.id?.0)),
            Stanza::Message(m) => receipts_to_alice(&[Stanza::Message(m)])
                .pop()
                .map(|id| format!("receipt to alice: {id}")),
            _ => None,
        })
        .collect();
    assert_eq!(seen, ["receipt to alice: m1", "to bob: m2"]);

    // Nothing follows m2's receipt: its commit is made at the linger's end.
    h.receipt("m2").await;
    handled().await;
    assert!(h.flushes.try_recv().is_err(), "the removal's commit waits");
    settle().await;
    let t = h
        .flushes
        .try_recv()
        .expect("an fsync once the linger is over");
    h.internal.send(Flushed::Durable(t)).await.unwrap();
    settle().await;
    assert_eq!(receipts_to_alice(&h.drain_all()), ["m2"]);
    assert_eq!(h.store.recipient("bob@x").unwrap().pending, 0);
}
