//! The router's unit tests: the real router task, driven through its
//! channels with a fake link and tokio's paused clock. This file is the
//! harness; the tests are in one file per subject.

use super::*;
use crate::store::test_databases;

mod contacts;
mod delays;
mod delivery;
mod forwarded;
mod hostile;
mod refusals;
mod sizes;
mod transparent;
mod unanswered;

const NS: &str = "jabber:component:accept";

/// Let the router end its rounds, a held commit's too (`linger`), on the
/// paused clock.
async fn settle() {
    tokio::time::sleep(linger::LINGER + Duration::from_millis(1)).await;
}

struct Harness {
    events: mpsc::Sender<LinkEvent>,
    outbox: mpsc::Receiver<Outbound>,
    store: Arc<dyn QueueStore>,
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
    let config = config_full(dir.path(), window, durability, extra);
    let store = test_databases::from_env(
        &config.store.path,
        config.store.durability,
        &config.component.domain,
    );
    harness_on(store, config, dir).await
}

/// The router on `store` (already led, if shared).
async fn harness_on(store: Arc<dyn QueueStore>, config: Config, dir: tempfile::TempDir) -> Harness {
    let config = Arc::new(config);
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
            .send(LinkEvent::Stanza(Box::new(st), crate::link::now_us()))
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
        self.feed(&receipt_from("r", id)).await;
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
        settle().await;
        self.drain();
    }

    /// The client at `bob@x/{resource}` answers a message: the relay
    /// then knows it answers receipts, and waits for its receipts.
    async fn answers(&mut self, resource: &str) {
        let id = format!("hello-{resource}");
        self.msg(&id).await;
        settle().await;
        self.feed(&receipt_from(resource, &id)).await;
        settle().await;
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

fn receipt_from(resource: &str, id: &str) -> String {
    format!(
        "<message xmlns='{NS}' from='bob@x/{resource}' to='alice@relay.x'><received xmlns='urn:xmpp:receipts' id='{id}'/></message>"
    )
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

/// bob approved the relay's subscription and is online, at once (no
/// grace wait: what is sent next goes straight out).
async fn subscribed_and_online(h: &Harness) {
    for xml in [
        format!("<presence xmlns='{NS}' from='bob@x' to='relay.x' type='subscribed'/>"),
        format!("<presence xmlns='{NS}' from='bob@x/r' to='relay.x'/>"),
    ] {
        h.feed(&xml).await;
    }
    settle().await;
}

/// On sled in fsync mode: bob online, m1 accepted, its fsync asked and
/// answered, m1 relayed. None on a store whose commits are durable
/// (PostgreSQL asks no fsync).
async fn fsync_harness_with_m1_relayed() -> Option<Harness> {
    let mut h = harness_full(64, "fsync", "").await;
    if h.store.durable_at_commit() {
        return None;
    }
    subscribed_and_online(&h).await;
    h.msg("m1").await;
    settle().await;
    assert!(h.drain().is_empty(), "not durable yet");
    let ticket = h.flushes.try_recv().expect("an fsync asked for m1");
    h.internal.send(Flushed::Durable(ticket)).await.unwrap();
    settle().await;
    assert_eq!(ids_of(&h.drain()), ["m1"]);
    Some(h)
}
