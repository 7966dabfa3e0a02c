//! The delivery state machine with a fake link (channels) and tokio's
//! paused clock.

use super::*;

const NS: &str = "jabber:component:accept";

struct Harness {
    events: mpsc::Sender<LinkEvent>,
    outbox: mpsc::Receiver<Outbound>,
    store: Arc<Store>,
    /// The flusher's side, in fsync mode: tickets asked, answers.
    flushes: mpsc::UnboundedReceiver<u64>,
    internal: mpsc::Sender<Flushed>,
    _dir: tempfile::TempDir,
    _stop: tokio_util::sync::DropGuard,
}

fn config(dir: &std::path::Path, window: usize) -> Config {
    config_with(dir, window, "")
}

/// The test config with `extra` TOML appended (whole sections).
fn config_with(dir: &std::path::Path, window: usize, extra: &str) -> Config {
    config_full(dir, window, "batched", extra)
}

fn config_full(dir: &std::path::Path, window: usize, durability: &str, extra: &str) -> Config {
    // Relay contacts send at once in these tests, unless one sets it.
    let wait = if extra.contains("contact_wait_ms") {
        ""
    } else {
        "contact_wait_ms = 0"
    };
    let text = format!(
        r#"[component]
domain = "relay.x"
server = "127.0.0.1:1"
[relay]
default_domain = "x"
allowed_sender_domains = ["x"]
[store]
path = "{}"
durability = "{durability}"
[delivery]
receipt_timeout_ms = 1000
replay_grace_ms = 300
{wait}
window = {window}
retry_initial_ms = 500
{extra}
"#,
        dir.display()
    );
    let c: Config = toml::from_str(&text).unwrap();
    c.validate().unwrap();
    c
}

async fn harness(window: usize) -> Harness {
    harness_with(window, "").await
}

async fn harness_with(window: usize, extra: &str) -> Harness {
    harness_full(window, "batched", extra).await
}

async fn harness_full(window: usize, durability: &str, extra: &str) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let config = Arc::new(config_full(dir.path(), window, durability, extra));
    let store =
        Arc::new(Store::open(&config.store.path, config.store.durability, 5, 1 << 20).unwrap());
    let (out_tx, out_rx) = mpsc::channel(1024);
    let (ev_tx, ev_rx) = mpsc::channel(1024);
    let (flush_tx, flush_rx) = mpsc::unbounded_channel();
    let (int_tx, int_rx) = mpsc::channel(16);
    let router = Router::new(config, None, store.clone(), out_tx, flush_tx).unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(router.run(ev_rx, int_rx, stop.clone()));
    ev_tx.send(LinkEvent::Up { epoch: 1 }).await.unwrap();
    Harness {
        events: ev_tx,
        outbox: out_rx,
        store,
        flushes: flush_rx,
        internal: int_tx,
        _dir: dir,
        _stop: stop.drop_guard(),
    }
}

impl Harness {
    async fn feed(&self, xml: &str) {
        let el = Element::from_str(xml).unwrap();
        let st = match el.name() {
            "message" => Stanza::Message(Message::try_from(el).unwrap()),
            "iq" => Stanza::Iq(Iq::try_from(el).unwrap()),
            _ => Stanza::Presence(Presence::try_from(el).unwrap()),
        };
        self.events
            .send(LinkEvent::Stanza(Box::new(st)))
            .await
            .unwrap();
    }

    async fn msg(&self, id: &str) {
        self.feed(&format!(
            "<message xmlns='{NS}' from='alice@x/r' to='bob@relay.x' id='{id}' type='chat'><body>{id}</body></message>"
        ))
        .await;
    }

    async fn receipt(&self, id: &str) {
        self.feed(&format!(
            "<message xmlns='{NS}' from='bob@x/r' to='alice@relay.x'><received xmlns='urn:xmpp:receipts' id='{id}'/></message>"
        ))
        .await;
    }

    async fn subscribe_and_go_offline(&mut self) {
        self.msg("first").await;
        self.feed(&format!(
            "<presence xmlns='{NS}' from='bob@x' to='relay.x' type='subscribed'/>"
        ))
        .await;
        self.feed(&format!(
            "<presence xmlns='{NS}' from='bob@x/r' to='relay.x'/>"
        ))
        .await;
        self.receipt("first").await;
        self.feed(&format!(
            "<presence xmlns='{NS}' from='bob@x/r' to='relay.x' type='unavailable'/>"
        ))
        .await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        self.drain();
    }

    /// The client at `bob@x/{resource}` answers a message: the relay
    /// then knows it answers receipts, and waits for its receipts.
    async fn answers(&mut self, resource: &str) {
        let id = format!("hello-{resource}");
        self.msg(&id).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        self.feed(&format!(
            "<message xmlns='{NS}' from='bob@x/{resource}' to='alice@relay.x'><received xmlns='urn:xmpp:receipts' id='{id}'/></message>"
        ))
        .await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        self.drain_all();
    }

    /// Bob approved the subscription, went away and is back, past
    /// the replay grace: messages go to him at once.
    async fn bob_online(&mut self) {
        self.subscribe_and_go_offline().await;
        self.available().await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }

    /// An available presence from `bob@x/{resource}`.
    async fn presence(&self, resource: &str) {
        self.feed(&format!(
            "<presence xmlns='{NS}' from='bob@x/{resource}' to='relay.x'/>"
        ))
        .await;
    }

    /// `bob@x/{resource}` logs out.
    async fn unavailable(&self, resource: &str) {
        self.feed(&format!(
            "<presence xmlns='{NS}' from='bob@x/{resource}' to='relay.x' type='unavailable'/>"
        ))
        .await;
    }

    /// Bob's server bounces message `id` to alice with `condition`.
    async fn bounce(&self, id: &str, type_: &str, condition: &str) {
        self.feed(&format!(
            "<message xmlns='{NS}' from='bob@x' to='alice@relay.x' id='{id}' type='error'><error type='{type_}'><{condition} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"
        ))
        .await;
    }

    async fn available(&self) {
        self.presence("r").await;
    }

    /// Everything sent since the last drain.
    fn drain_all(&mut self) -> Vec<Stanza> {
        std::iter::from_fn(|| self.outbox.try_recv().ok())
            .map(|o| o.stanza)
            .collect()
    }

    /// Ids of relayed body messages to bob, and whether each has a delay.
    fn drain(&mut self) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        while let Ok(o) = self.outbox.try_recv() {
            if let Stanza::Message(m) = o.stanza
                && !m.bodies.is_empty()
            {
                let delayed = m.payloads.iter().any(|p| p.is("delay", ns::DELAY));
                out.push((m.id.unwrap().0, delayed));
            }
        }
        out
    }
}

fn ids_of(v: &[(String, bool)]) -> Vec<&str> {
    v.iter().map(|(i, _)| i.as_str()).collect()
}

/// After a connect every subscribed recipient is probed, in steps;
/// one that answers mid-pass is replayed within its grace, and the
/// silent ones get their retry afterwards.
#[tokio::test(start_paused = true)]
async fn startup_probes_every_recipient_in_steps() {
    let dir = tempfile::tempdir().unwrap();
    let config = Arc::new(config(dir.path(), 64));
    let store = Arc::new(Store::open(&config.store.path, Durability::Batched, 5, 1 << 20).unwrap());
    let n = PROBE_STEP * 3 + 7;
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
        .send(LinkEvent::Stanza(Box::new(Stanza::Presence(
            Presence::try_from(el).unwrap(),
        ))))
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
    tokio::time::sleep(Duration::from_millis(1)).await;
    h.unavailable("r").await;
    h.msg("m2").await;
    h.available().await;
    tokio::time::sleep(Duration::from_millis(1)).await;
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
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(ids_of(&h.drain()), ["m1"]);
    h.bounce("m1", "cancel", "service-unavailable").await;
    tokio::time::sleep(Duration::from_millis(490)).await;
    assert!(h.drain().is_empty());
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(ids_of(&h.drain()), ["m1"], "retried after 500 ms");
}
/// Messages sent since the last drain: (to, id, body) of each.
fn messages(out: &[Stanza]) -> Vec<(String, String, Option<String>)> {
    out.iter()
        .filter_map(|st| match st {
            Stanza::Message(m) => Some((
                m.to.as_ref().map(|t| t.to_string()).unwrap_or_default(),
                m.id.as_ref().map(|i| i.0.clone()).unwrap_or_default(),
                m.bodies.values().next().cloned(),
            )),
            _ => None,
        })
        .collect()
}

/// The error condition of an error message, if it is one.
fn condition(st: &Stanza) -> Option<DefinedCondition> {
    let Stanza::Message(m) = st else { return None };
    if m.type_ != MessageType::Error {
        return None;
    }
    m.payloads
        .iter()
        .find_map(|p| StanzaError::try_from(p.clone()).ok())
        .map(|e| e.defined_condition)
}

/// Issue 11, defect 1: a disco#info result from anyone but the queried
/// resource, even with the right id, changes nothing (before, it made
/// an unconfirmed message count as confirmed at the receipt timeout).
#[tokio::test(start_paused = true)]
async fn forged_disco_result_confirms_nothing() {
    let mut h = harness(64).await;
    h.subscribe_and_go_offline().await;
    h.available().await;
    tokio::time::sleep(Duration::from_millis(1)).await;
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

/// Issue 11, defect 3: a final refusal (here `forbidden`, a privacy
/// list) ends that message with a notice to its sender carrying the
/// same condition, and the queue goes on at once (before, it retried
/// for the whole TTL while everything behind it waited).
#[tokio::test(start_paused = true)]
async fn final_refusal_ends_the_message_and_tells_its_sender() {
    let mut h = harness(64).await;
    h.msg("m1").await;
    h.msg("m2").await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(
        ids_of(&h.drain()),
        ["m1"],
        "presence unknown: one at a time"
    );
    h.bounce("m1", "auth", "forbidden").await;
    tokio::time::sleep(Duration::from_millis(1)).await;
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
    tokio::time::sleep(Duration::from_millis(1)).await;
    h.receipt("fixed").await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(h.store.recipient("bob@x").unwrap().pending, 0);
    h.drain_all();
    h.feed(&send("two")).await;
    h.feed(&send("two")).await; // a resubmission
    h.feed(&send("three")).await; // different, while "two" is pending
    tokio::time::sleep(Duration::from_millis(1)).await;
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
    tokio::time::sleep(Duration::from_millis(1)).await;
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
    tokio::time::sleep(Duration::from_millis(1)).await;
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
    tokio::time::sleep(Duration::from_millis(1)).await;
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
    tokio::time::sleep(Duration::from_millis(1)).await;
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
    tokio::time::sleep(Duration::from_millis(1)).await;
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
    tokio::time::sleep(Duration::from_millis(1)).await;
    let receipts: String = (0..20)
        .map(|i| format!("<received xmlns='urn:xmpp:receipts' id='m{i}'/>"))
        .collect();
    h.feed(&format!(
        "<message xmlns='{NS}' from='bob@x/r' to='alice@relay.x'>{receipts}</message>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(1)).await;
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
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(h.store.recipient("bob@x").unwrap().pending, 3);
}
/// Receipts relayed to alice (ids), from a drain.
fn receipts_to_alice(out: &[Stanza]) -> Vec<String> {
    out.iter()
        .filter_map(|st| match st {
            Stanza::Message(m)
                if m.to
                    .as_ref()
                    .is_some_and(|t| t.to_bare().to_string() == "alice@x") =>
            {
                m.payloads
                    .iter()
                    .find(|p| p.is("received", ns::RECEIPTS))
                    .and_then(|p| p.attr("id"))
                    .map(str::to_owned)
            }
            _ => None,
        })
        .collect()
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
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(ids_of(&h.drain()), ["m1"]);
    h.store.fail_commits();
    h.msg("m2").await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    h.receipt("m1").await;
    tokio::time::sleep(Duration::from_millis(1)).await;
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
    let mut h = harness_full(64, "fsync", "").await;
    for xml in [
        format!("<presence xmlns='{NS}' from='bob@x' to='relay.x' type='subscribed'/>"),
        format!("<presence xmlns='{NS}' from='bob@x/r' to='relay.x'/>"),
    ] {
        h.feed(&xml).await;
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    h.msg("m1").await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(h.drain().is_empty(), "not durable yet");
    let ticket = h.flushes.try_recv().expect("an fsync asked for m1");
    h.internal.send(Flushed::Durable(ticket)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(ids_of(&h.drain()), ["m1"]);
    h.receipt("m1").await;
    tokio::time::sleep(Duration::from_millis(1)).await;
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

/// Issue 11, defect 10: an expired message's sender gets, besides the
/// error to the full JID it came from, a notice kept in the store and
/// relayed like a message to its bare JID (an error to a resource
/// that went away is dropped by the server); and a notice that itself
/// expires makes no notice.
#[tokio::test(start_paused = true)]
async fn expiry_notice_is_kept_and_relayed_to_the_bare_jid() {
    let mut h = harness_with(64, "[limits]\nmessage_ttl_s = 1\n").await;
    h.msg("m1").await;
    tokio::time::sleep(Duration::from_millis(1)).await;
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
    tokio::time::sleep(Duration::from_millis(1)).await;
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
/// still flows: chat states, and receipts that confirm nothing stored.
#[tokio::test(start_paused = true)]
async fn after_a_store_failure_what_needs_no_write_still_flows() {
    let mut h = harness(64).await;
    h.store.fail_commits();
    h.msg("m1").await; // the failing commit fails the gate
    tokio::time::sleep(Duration::from_millis(1)).await;
    h.drain_all();
    h.feed(&format!(
        "<message xmlns='{NS}' from='bob@x/r' to='alice@relay.x' type='chat'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>"
    ))
    .await;
    h.feed(&format!(
        "<message xmlns='{NS}' from='bob@x/r' to='alice@relay.x'><received xmlns='urn:xmpp:receipts' id='unknown'/></message>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    let out = h.drain_all();
    let to_alice = messages(&out)
        .into_iter()
        .filter(|(to, _, _)| to == "alice@x")
        .count();
    assert_eq!(to_alice, 2, "{out:?}");
    assert_eq!(receipts_to_alice(&out), ["unknown"]);
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
    tokio::time::sleep(Duration::from_millis(1)).await;
    h.receipt("fixed").await;
    h.unavailable("r").await;
    h.feed(&send("two")).await; // bob is offline: not sent
    tokio::time::sleep(Duration::from_millis(1)).await;
    h.drain_all();
    // The laptop wakes and receipts the old copy.
    h.feed(&format!(
        "<message xmlns='{NS}' from='bob@x/laptop' to='alice@relay.x'><received xmlns='urn:xmpp:receipts' id='fixed'/></message>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(h.store.recipient("bob@x").unwrap().pending, 1, "two stays");
    assert!(receipts_to_alice(&h.drain_all()).is_empty());

    // 20 receipts in one stanza: 16 handled, 16 relayed.
    let mut h = harness(64).await;
    h.bob_online().await;
    for i in 0..20 {
        h.msg(&format!("m{i}")).await;
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    h.drain_all();
    let receipts: String = (0..20)
        .map(|i| format!("<received xmlns='urn:xmpp:receipts' id='m{i}'/>"))
        .collect();
    h.feed(&format!(
        "<message xmlns='{NS}' from='bob@x/r' to='alice@relay.x'>{receipts}</message>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(1)).await;
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
    tokio::time::sleep(Duration::from_millis(1)).await;
    h.drain_all();
    h.feed(&format!(
        "<message xmlns='{NS}' from='bob@x/r' to='alice@relay.x'><displayed xmlns='urn:xmpp:chat-markers:0' id='m19'/></message>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(1)).await;
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
    tokio::time::sleep(Duration::from_millis(1)).await;
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
    tokio::time::sleep(Duration::from_millis(1)).await;
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
    tokio::time::sleep(Duration::from_millis(1)).await;
    let out = h.drain_all();
    let refused = out
        .iter()
        .filter(|st| condition(st) == Some(DefinedCondition::PolicyViolation))
        .count();
    assert_eq!(refused, 2, "{out:?}");
}

/// Review of issue 11, 9 and 10: a message refused for good forgets
/// its id, so the sender may send it again; the refusal's text from
/// the other side is cut short in the notice.
#[tokio::test(start_paused = true)]
async fn a_refused_message_may_be_sent_again_and_its_notice_is_bounded() {
    let mut h = harness(64).await;
    h.msg("m1").await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    let long = "y".repeat(10_000);
    h.feed(&format!(
        "<message xmlns='{NS}' from='bob@x' to='alice@relay.x' id='m1' type='error'><error type='auth'><forbidden xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/><text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>{long}</text></error></message>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    let out = h.drain_all();
    let notice = messages(&out)
        .into_iter()
        .find(|(to, _, b)| to == "alice@x" && b.is_some())
        .expect("a notice");
    assert!(notice.2.unwrap().len() < 600);
    h.msg("m1").await; // sent again, say once unblocked
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(ids_of(&h.drain()), ["m1"]);
    assert_eq!(h.store.recipient("bob@x").unwrap().pending, 1);
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
    tokio::time::sleep(Duration::from_millis(1)).await;
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
    tokio::time::sleep(Duration::from_millis(1)).await;
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
    tokio::time::sleep(Duration::from_millis(1)).await;
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
/// Issue 12, item 1: the first message from a sender makes its relay
/// address ask the recipient for a subscription, with a XEP-0172 nick
/// naming the sender; messages from that sender wait for the answer
/// (here approval), or at most `contact_wait_ms`, then go.
#[tokio::test(start_paused = true)]
async fn a_relay_contact_is_asked_for_and_its_answer_awaited() {
    let mut h = harness_with(64, "contact_wait_ms = 5000\n").await;
    h.msg("c1").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let out = h.drain_all();
    let asks: Vec<(String, String)> = out
        .iter()
        .filter_map(|st| match st {
            Stanza::Presence(p) if p.type_ == PresenceType::Subscribe => Some((
                p.from.as_ref().unwrap().to_string(),
                p.payloads
                    .iter()
                    .find(|e| e.is("nick", NICK))
                    .map(|e| e.text())
                    .unwrap_or_default(),
            )),
            _ => None,
        })
        .collect();
    assert!(
        asks.contains(&("alice@relay.x".to_string(), "alice@x".to_string())),
        "{asks:?}"
    );
    assert!(messages(&out).is_empty(), "held for the answer");
    h.feed(&format!(
        "<presence xmlns='{NS}' from='bob@x' to='alice@relay.x' type='subscribed'/>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(ids_of(&h.drain()), ["c1"], "sent once approved");
    h.receipt("c1").await;

    // Carol's first message: nobody answers, it goes after the wait.
    h.feed(&format!(
        "<message xmlns='{NS}' from='carol@x/r' to='bob@relay.x' id='k1' type='chat'><body>k1</body></message>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(4900)).await;
    assert!(!ids_of(&h.drain()).contains(&"k1"), "still waiting");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(ids_of(&h.drain()).contains(&"k1"), "sent after the wait");
}

/// Bob's client at `res` logs in with subscription approved (its
/// receipts never seen): presence known, nothing learned about it.
async fn new_client_online(h: &mut Harness, res: &str) {
    h.store
        .set_subscription("bob@x", Subscription::Requested)
        .unwrap();
    h.feed(&format!(
        "<presence xmlns='{NS}' from='bob@x' to='relay.x' type='subscribed'/>"
    ))
    .await;
    h.presence(res).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    h.drain_all();
}

fn stats(h: &Harness) -> (u64, u64) {
    let t = h.store.totals().unwrap();
    (t.pending, h.store.assumed_totals().unwrap().messages)
}

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
    h.feed(&format!(
        "<message xmlns='{NS}' from='bob@x/phone' to='alice@relay.x'><received xmlns='urn:xmpp:receipts' id='m2'/></message>"
    ))
    .await;
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
    h.feed(&format!(
        "<message xmlns='{NS}' from='bob@x/phone' to='alice@relay.x'><received xmlns='urn:xmpp:receipts' id='m1'/></message>"
    ))
    .await;
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
    h.feed(&format!(
        "<message xmlns='{NS}' from='bob@x/gajim' to='alice@relay.x'><received xmlns='urn:xmpp:receipts' id='a1'/></message>"
    ))
    .await;
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

fn receipt_from(resource: &str, id: &str) -> String {
    format!(
        "<message xmlns='{NS}' from='bob@x/{resource}' to='alice@relay.x'><received xmlns='urn:xmpp:receipts' id='{id}'/></message>"
    )
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

/// The server grants the component `perms` (XEP-0356).
async fn grant(h: &Harness, from: &str, perms: &str) {
    h.feed(&format!(
        "<message xmlns='{NS}' from='{from}' to='relay.x'><privilege xmlns='urn:xmpp:privilege:2'>{perms}</privilege></message>"
    ))
    .await;
}

const ROSTER: &str = "<perm access='roster' type='set'/>";
const PRESENCE: &str = "<perm access='presence' type='managed_entity'/>";

/// Roster sets the relay sent: (iq id, to, item jid).
fn roster_sets(out: &[Stanza]) -> Vec<(String, String, String)> {
    out.iter()
        .filter_map(|st| match st {
            Stanza::Iq(iq) => {
                let el = Element::from(iq.clone());
                let item = el
                    .get_child("query", ns::ROSTER)?
                    .get_child("item", ns::ROSTER)?
                    .attr("jid")?
                    .to_owned();
                Some((el.attr("id")?.to_owned(), el.attr("to")?.to_owned(), item))
            }
            _ => None,
        })
        .collect()
}

fn subscribes_from(out: &[Stanza]) -> Vec<String> {
    out.iter()
        .filter_map(|st| match st {
            Stanza::Presence(p) if p.type_ == PresenceType::Subscribe => {
                p.from.as_ref().map(|f| f.to_string())
            }
            _ => None,
        })
        .collect()
}

/// Review of privileged mode: presence granted by the server shows
/// only changes since the relay started delivering to a user, so a
/// logout of a resource it never saw does not make him offline, and
/// when the ones it saw are gone his queue is still retried.
#[tokio::test(start_paused = true)]
async fn granted_presence_is_a_hint_not_proof_of_absence() {
    let mut h = harness_with(64, "unanswered_wait_ms = 200\n").await;
    grant(&h, "x", PRESENCE).await;
    // phone and desktop were online before anything was pending.
    h.presence("phone").await;
    h.presence("desktop").await;
    h.msg("m1").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    h.unavailable("desktop").await;
    h.msg("m2").await;
    // As soon as m1 counts delivered (200 ms): nothing says bob left
    // (a backoff retry would be 500 ms).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = h.drain_all();
    let sent: Vec<String> = messages(&out).into_iter().map(|(_, id, _)| id).collect();
    assert!(sent.contains(&"m2".to_string()), "{sent:?}");
    assert!(
        subscribes_from(&out).iter().all(|f| f != "relay.x"),
        "no subscription asked for the domain: {out:?}"
    );
    // A presence seen, then its logout: nothing known is left, and a
    // message after that is still tried (with backoff).
    h.presence("tablet").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    h.unavailable("tablet").await;
    h.msg("m3").await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(ids_of(&h.drain()).contains(&"m3"));
    assert_eq!(
        h.store.recipient("bob@x").unwrap().subscription,
        Subscription::None,
        "granted presence approves nothing"
    );
}

/// Review of privileged mode: a roster set that fails for one user
/// (one that does not exist) falls back for that pair only; one the
/// server refuses as such (ejabberd 23.01: internal-server-error)
/// ends roster sets for the connection. Unanswered ones are sent
/// again after a reconnect, and a relay contact the user removed is
/// asked for, not put back.
#[tokio::test(start_paused = true)]
async fn privileged_roster_sets_fall_back_with_care() {
    let mut h = harness_with(64, "unanswered_wait_ms = 200\n").await;
    grant(&h, "x", ROSTER).await;
    // A grant from another domain is ignored.
    grant(&h, "y", "<perm access='presence' type='managed_entity'/>").await;
    h.feed(&format!(
        "<message xmlns='{NS}' from='alice@x/r' to='nobody@relay.x' id='n1' type='chat'><body>n1</body></message>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let out = h.drain_all();
    let sets = roster_sets(&out);
    assert_eq!(sets.len(), 1, "{out:?}");
    h.feed(&format!(
        "<iq xmlns='{NS}' type='error' from='nobody@x' to='relay.x' id='{}'><error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
        sets[0].0
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        subscribes_from(&h.drain_all()),
        ["alice@relay.x"],
        "asked instead"
    );
    // Bob: still a roster set.
    h.msg("b1").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let out = h.drain_all();
    let sets = roster_sets(&out);
    assert_eq!(sets.len(), 1, "{out:?}");
    assert_eq!(sets[0].1, "bob@x");
    assert_eq!(sets[0].2, "alice@relay.x");
    // The link drops before the answer: sent again afterwards.
    h.events.send(LinkEvent::Down).await.unwrap();
    h.events.send(LinkEvent::Up { epoch: 2 }).await.unwrap();
    grant(&h, "x", ROSTER).await;
    h.msg("b2").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let sets = roster_sets(&h.drain_all());
    assert_eq!(sets.len(), 1, "asked again");
    h.feed(&format!(
        "<iq xmlns='{NS}' type='result' from='bob@x' to='relay.x' id='{}'/>",
        sets[0].0
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        h.store
            .contact("bob@x", "alice@x")
            .unwrap()
            .unwrap()
            .subscription,
        Subscription::Subscribed
    );
    // Bob removes the contact; a day later alice's next message asks
    // him instead of putting it back.
    h.feed(&format!(
        "<presence xmlns='{NS}' from='bob@x' to='alice@relay.x' type='unsubscribed'/>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut c = h.store.contact("bob@x", "alice@x").unwrap().unwrap();
    assert_eq!(c.subscription, Subscription::None);
    c.asked_at_ms -= 25 * 3600 * 1000;
    h.store.set_contact("bob@x", "alice@x", c).unwrap();
    // (the relay's cache still holds the fresh one: a carol→bob pair
    // shows the same rule on a cold cache)
    h.store
        .set_contact(
            "bob@x",
            "carol@x",
            Contact {
                subscription: Subscription::None,
                asked_at_ms: 1,
            },
        )
        .unwrap();
    h.drain_all();
    h.feed(&format!(
        "<message xmlns='{NS}' from='carol@x/r' to='bob@relay.x' id='k1' type='chat'><body>k1</body></message>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let out = h.drain_all();
    assert!(roster_sets(&out).is_empty(), "not put back: {out:?}");
    assert_eq!(subscribes_from(&out), ["carol@relay.x"]);
    // ejabberd 23.01's answer ends roster sets for the connection.
    h.feed(&format!(
        "<message xmlns='{NS}' from='dave@x/r' to='bob@relay.x' id='d1' type='chat'><body>d1</body></message>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let sets = roster_sets(&h.drain_all());
    assert_eq!(sets.len(), 1);
    h.feed(&format!(
        "<iq xmlns='{NS}' type='error' from='bob@x' to='relay.x' id='{}'><error type='wait'><internal-server-error xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
        sets[0].0
    ))
    .await;
    h.feed(&format!(
        "<message xmlns='{NS}' from='erin@x/r' to='bob@relay.x' id='e1' type='chat'><body>e1</body></message>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let out = h.drain_all();
    assert!(roster_sets(&out).is_empty(), "{out:?}");
    assert_eq!(subscribes_from(&out), ["dave@relay.x", "erin@relay.x"]);
}
