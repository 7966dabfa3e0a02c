//! The router: every stanza from the link goes through here.
//!
//! It is one task that owns all delivery state, so no locks: messages are
//! accepted into the store, sent once durable, confirmed by receipts and
//! markers, and replayed when presence says the recipient is back. See the
//! lifecycle in docs/architecture.md.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::time::{DelayQueue, delay_queue};
use tokio_xmpp::Stanza;
use tokio_xmpp::minidom::Element;
use tokio_xmpp::parsers::date::DateTime;
use tokio_xmpp::parsers::delay::Delay;
use tokio_xmpp::parsers::disco::{
    DiscoInfoQuery, DiscoInfoResult, DiscoItemsResult, Identity, Item as DiscoItem,
};
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::jid::{BareJid, Jid};
use tokio_xmpp::parsers::message::{Id, Lang, Message, MessageType};
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::presence::{Presence, Type as PresenceType};
use tokio_xmpp::parsers::receipts::{Received, Request};
use tokio_xmpp::parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};
use tokio_xmpp::parsers::stanza_id::{OriginId, StanzaId};
use tracing::{debug, error, info, warn};

use crate::address::{AddressBook, AddressError, with_relay_resource};
use crate::admin::{Admin, Node, Ops, Snapshot};
use crate::config::{Config, Durability};
use crate::gate::{Flushed, Gate};
use crate::link::{LinkEvent, Outbound};
use crate::message_kind::{self, Kind};
use crate::privilege::{self, Grants};
use crate::ratelimit::RateLimiter;
use crate::store::{
    Accepted, Answers, Contact, Habit, NewMessage, PurgeScope, QueueLimits, RecipientState, Record,
    Store, StoreError, Subscription, bare_of,
};
use crate::twin::{self, AnotherInstance, Instance, Verdict};
use crate::xep0050::{COMMANDS, Command};

/// Receipts and markers handled per stanza at most.
const MAX_CONFIRMATIONS_PER_STANZA: usize = 16;
/// Pending messages a marker's scan looks at, at most.
const MARKER_SCAN_LIMIT: usize = 16_384;
/// Link events handled in one burst (one store batch) at most.
const BURST: usize = 256;
/// Recipients probed per step after a connect.
const PROBE_STEP: usize = 256;
/// Relay contacts kept in memory at most (the store holds them all).
const CONTACT_CACHE: usize = 100_000;
/// XEP-0172 user nickname.
const NICK: &str = "http://jabber.org/protocol/nick";
/// After a recipient refuses the presence subscription, how long before
/// the next message asks again.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(24 * 3600);

/// What a stanza of a burst needs of the burst's commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    Nothing,
    /// It relays a message accepted in this burst.
    Accept,
    /// It relays receipts or markers: the removals they caused.
    Removals,
}

/// disco#info queries in flight at most; past that, new resources are
/// not asked (they count as able to send receipts, the safe side).
const MAX_DISCO_PENDING: usize = 4096;

/// A disco#info query sent to a recipient's resource: only an answer
/// from that full JID counts.
#[derive(Debug)]
struct DiscoQuery {
    recipient: String,
    resource: String,
    to: Jid,
}

/// Delivery phase of one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Nothing sent and nothing scheduled.
    Idle,
    /// Sending pending messages in order, up to the window.
    Sending,
    /// Back online; replay starts when the grace timer fires.
    Grace,
    /// Known to be offline: wait for presence (or any stanza from it).
    Offline,
    /// Presence unknown after a failure: retry when the timer fires.
    Backoff,
}

/// One message on the wire, waiting for its receipt.
#[derive(Debug)]
struct InFlight {
    id: String,
    sender_bare: String,
    timer: delay_queue::Key,
    /// The resource it was addressed to, when not the bare JID.
    to_resource: Option<String>,
    /// Whether a client it went to is known to answer its sender: if
    /// not, it counts delivered when no error came back within
    /// `unanswered_wait_ms` (see [`Router::expects_receipt`]).
    expect: bool,
}

/// An available resource of a recipient.
#[derive(Debug, Clone, Copy)]
struct Resource {
    priority: i8,
    /// From disco#info: `Some(false)` when the client says it cannot send
    /// receipts.
    receipts: Option<bool>,
    /// Missed a receipt: left out until it shows life again (a presence
    /// or any stanza from it), while the others are written to directly.
    silent: bool,
}

/// The delivery state of `recipient`, created on first use. A free
/// function so that the caller may still borrow the router's timers.
fn peer_entry<'a>(
    peers: &'a mut HashMap<String, Peer>,
    recipient: &str,
    initial_backoff: Duration,
) -> &'a mut Peer {
    peers
        .entry(recipient.to_owned())
        .or_insert_with(|| Peer::new(initial_backoff))
}

/// Runtime (not stored) delivery state of one recipient.
#[derive(Debug)]
struct Peer {
    phase: Phase,
    /// Available resources, from presence addressed to our bare domain.
    resources: HashMap<String, Resource>,
    /// Whether the resources map reflects real presence information.
    presence_known: bool,
    in_flight: BTreeMap<u64, InFlight>,
    /// Next seq to consider sending while `Sending`.
    cursor: u64,
    /// Grace or backoff timer.
    timer: Option<delay_queue::Key>,
    /// Next backoff delay.
    backoff: Duration,
    /// Send attempts per pending seq since start (not stored).
    attempts: HashMap<u64, u32>,
    /// Messages below this seq were accepted before the current sending
    /// phase began: they go out as replays, with `<delay/>`.
    replay_below: u64,
    /// Confirmed while the store could not record it: never sent again
    /// by this process.
    unsaved_confirms: std::collections::HashSet<u64>,
    /// An administrator asked for a replay: the full window, whatever
    /// presence says, until the next failure.
    forced: bool,
    /// Armed while messages wait for a relay contact's answer.
    contact_timer: Option<delay_queue::Key>,
    /// What each client does with receipt requests, by resource: the
    /// store's, read at first use.
    habits: Option<HashMap<String, Habit>>,
}

impl Peer {
    fn new(initial_backoff: Duration) -> Peer {
        Peer {
            phase: Phase::Idle,
            resources: HashMap::new(),
            presence_known: false,
            in_flight: BTreeMap::new(),
            cursor: 0,
            timer: None,
            backoff: initial_backoff,
            attempts: HashMap::new(),
            replay_below: 0,
            unsaved_confirms: Default::default(),
            forced: false,
            contact_timer: None,
            habits: None,
        }
    }

    /// Some resource takes messages and has not missed a receipt.
    fn online(&self) -> bool {
        self.resources
            .values()
            .any(|r| r.priority >= 0 && !r.silent)
    }

    /// Where messages go: the bare JID (the server picks the resources),
    /// or, once a resource went silent, the best of the others by name,
    /// since the server would still pick the silent one.
    fn target(&self) -> Option<String> {
        if !self.resources.values().any(|r| r.silent) {
            return None;
        }
        self.resources
            .iter()
            .filter(|(_, r)| r.priority >= 0 && !r.silent)
            .max_by_key(|(name, r)| (r.priority, std::cmp::Reverse(name.as_str())))
            .map(|(name, _)| name.clone())
    }

    /// The resources a message sent to `to` (a resource, or the bare JID)
    /// reaches: that one, or those the server routes a bare-JID message
    /// to (the highest priority, silent or not: the server does not know
    /// what the relay thinks of them). Empty when presence is unknown.
    fn reached_by(&self, to: Option<&str>) -> Vec<String> {
        if let Some(t) = to {
            return vec![t.to_owned()];
        }
        let top = self
            .resources
            .values()
            .filter(|r| r.priority >= 0)
            .map(|r| r.priority)
            .max();
        self.resources
            .iter()
            .filter(|(_, r)| Some(r.priority) == top)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// A receipt timed out for a message sent to `to` (a resource, or the
    /// bare JID): mark silent what that proves silent, the resource, or
    /// those the server routes a bare-JID message to (the highest
    /// priority). Returns their names.
    fn silence(&mut self, to: Option<&str>) -> Vec<String> {
        let top = self
            .resources
            .values()
            .filter(|r| r.priority >= 0 && !r.silent)
            .map(|r| r.priority)
            .max();
        let mut out = Vec::new();
        for (name, r) in &mut self.resources {
            let hit = match to {
                Some(t) => t == name,
                None => !r.silent && Some(r.priority) == top,
            };
            if hit {
                r.silent = true;
                out.push(name.clone());
            }
        }
        out
    }

    /// Message `seq` left the store (confirmed, refused, expired,
    /// purged): nothing of it stays in flight or counted.
    fn removed(&mut self, seq: u64, timers: &mut DelayQueue<Timer>) {
        if let Some(f) = self.in_flight.remove(&seq) {
            timers.try_remove(&f.timer);
        }
        self.attempts.remove(&seq);
    }

    /// Message `seq` stays in the store (a write failed) but this
    /// process must never send it again.
    fn never_again(&mut self, seq: u64, timers: &mut DelayQueue<Timer>) {
        if let Some(f) = self.in_flight.remove(&seq) {
            timers.try_remove(&f.timer);
        }
        self.unsaved_confirms.insert(seq);
    }

    /// Stop sending: whatever is in flight stays pending (it will be
    /// replayed from the start of the queue) and no timer stays armed.
    fn halt(&mut self, timers: &mut DelayQueue<Timer>) {
        for (_, f) in std::mem::take(&mut self.in_flight) {
            timers.try_remove(&f.timer);
        }
        if let Some(k) = self.timer.take() {
            timers.try_remove(&k);
        }
        if let Some(k) = self.contact_timer.take() {
            timers.try_remove(&k);
        }
        self.cursor = 0;
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Timer {
    Receipt {
        recipient: String,
        seq: u64,
    },
    /// Grace or backoff elapsed: start (re)sending.
    Resume {
        recipient: String,
    },
    /// Time to probe the next recipients after a connect.
    ProbeStep,
    /// Time to look for another instance under our name again.
    TwinCheck,
    /// Time for the next step of the expiry walk.
    Expire,
    /// After a store failure: is there space again?
    SpaceProbe,
    /// A disco#info query went unanswered: forget it.
    DiscoTimeout {
        id: String,
    },
    /// The wait for a relay contact's answer is over: send what it held.
    ContactWait {
        recipient: String,
    },
}

/// Why the router stopped by itself.
#[derive(Debug, thiserror::Error)]
pub enum Stop {
    #[error(transparent)]
    AnotherInstance(#[from] AnotherInstance),
    #[error(
        "the store failed to write and there is space again; exiting so that it is reopened \
         (a supervisor restarts it; pending messages are replayed)"
    )]
    ReopenStore,
}

impl Stop {
    /// The process's exit status for this stop.
    pub fn exit_status(&self) -> u8 {
        match self {
            Stop::AnotherInstance(_) => twin::EXIT_STATUS,
            // EX_TEMPFAIL: restart me.
            Stop::ReopenStore => 75,
        }
    }
}

/// Counters for logs and the admin commands.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub accepted_total: u64,
    pub confirmed_total: u64,
    pub replays_total: u64,
    pub bounces_total: u64,
    pub refused_total: u64,
    pub purged_total: u64,
    pub expired_total: u64,
    /// Messages the recipient's side refused for good (a final error
    /// bounce): removed, their senders told.
    pub rejected_total: u64,
    /// Notices kept for senders (expiry, final refusals).
    pub notices_total: u64,
    /// Messages counted delivered without a receipt: sent to clients not
    /// known to answer their sender, and no error came back in time.
    pub assumed_total: u64,
    /// Of those, put back in their queue by a late bounce.
    pub late_bounces_total: u64,
}

pub struct Router {
    config: Arc<Config>,
    book: AddressBook,
    /// The component's bare domain as a JID, the `from` of its own stanzas.
    me: Jid,
    store: Arc<Store>,
    outbox: mpsc::Sender<Outbound>,
    /// Stanzas of the current burst, sent once its writes are committed.
    out_buf: Vec<(Outbound, Needs)>,
    /// Messages accepted in the current burst: (seq, recipient).
    burst_accepted: Vec<(u64, String)>,
    /// Messages just accepted, as parsed, so that relaying one at once
    /// does not parse its stored XML back.
    fresh: Fresh,
    /// Recipients still to probe after the last connect.
    probe_queue: VecDeque<(String, RecipientState)>,
    /// Probed recipients with pending messages, awaiting the end of the
    /// pass to schedule their retry.
    probe_waiting: Vec<String>,
    /// Epoch of the live link, if any.
    epoch: Option<u64>,
    peers: HashMap<String, Peer>,
    timers: DelayQueue<Timer>,
    /// What is on disk decides what may be relayed.
    gate: Gate,
    /// disco#info queries in flight, by iq id.
    disco_pending: HashMap<String, DiscoQuery>,
    pub stats: Stats,
    /// Ad-hoc command sessions.
    admin: Admin,
    started: std::time::Instant,
    link_up_since: Option<chrono::DateTime<chrono::Utc>>,
    /// Where the config came from, for `reload-config` and `status`.
    config_path: Option<PathBuf>,
    /// This process, as its twin probes name it.
    instance: Instance,
    twin_timer: Option<delay_queue::Key>,
    /// Set when this instance must stop by itself.
    fatal: Option<Stop>,
    /// A store write failed (disk full, I/O error): sled does not recover
    /// from that within the process, so new messages are refused until
    /// there is space again, and then the process exits to reopen it.
    store_failed: bool,
    rate: RateLimiter,
    /// Whether the expiry walk has a step scheduled.
    expiry_scheduled: bool,
    /// Recipients that refused (or cancelled) the presence subscription,
    /// and when: asked again only [`RESUBSCRIBE_AFTER`] later.
    refused_at: HashMap<String, tokio::time::Instant>,
    /// Relay contacts, a cache of the store's (cleared past
    /// [`CONTACT_CACHE`] entries).
    contacts: HashMap<(String, String), Contact>,
    /// When this process asked each relay contact not answered yet: its
    /// first messages wait `contact_wait_ms` from then.
    contact_asked: HashMap<(String, String), tokio::time::Instant>,
    /// Marker scans per recipient: 20 a second, 200 at once.
    marker_scans: RateLimiter,
    /// The first seq this process handed out.
    first_seq: u64,
    /// Messages relayed once, recently: who sent them, so that a bounce
    /// reaches its sender.
    once_sent: RecentOnce,
    /// What each server (by domain) granted the component (XEP-0356), as
    /// it announced on this connection.
    grants: HashMap<String, Grants>,
    /// Privileged roster sets in flight, by iq id: (recipient, sender).
    roster_sets: HashMap<String, (String, String)>,
}

/// The most recently accepted messages, by seq, until relayed: at most
/// [`Fresh::MAX_BYTES`] of stanzas and [`Fresh::MAX_ENTRIES`] seqs.
#[derive(Default)]
struct Fresh {
    messages: HashMap<u64, (Message, usize)>,
    /// Seqs in accept order, taken ones too (until they age out).
    order: VecDeque<u64>,
    bytes: usize,
}

impl Fresh {
    const MAX_BYTES: usize = 4 << 20;
    const MAX_ENTRIES: usize = 16_384;

    fn put(&mut self, seq: u64, m: Message, size: usize) {
        while self.order.len() >= Self::MAX_ENTRIES
            || !self.order.is_empty() && self.bytes + size > Self::MAX_BYTES
        {
            if let Some(old) = self.order.pop_front()
                && let Some((_, s)) = self.messages.remove(&old)
            {
                self.bytes -= s;
            }
        }
        if size <= Self::MAX_BYTES {
            self.order.push_back(seq);
            self.messages.insert(seq, (m, size));
            self.bytes += size;
        }
    }

    fn take(&mut self, seq: u64) -> Option<Message> {
        let (m, size) = self.messages.remove(&seq)?;
        self.bytes -= size;
        Some(m)
    }
}

/// Messages relayed once, by (recipient, sender bare, id) → the sender's
/// full JID: the last [`RecentOnce::MAX`].
#[derive(Default)]
struct RecentOnce {
    senders: HashMap<(String, String, String), Jid>,
    order: VecDeque<(String, String, String)>,
}

impl RecentOnce {
    const MAX: usize = 4096;

    fn put(&mut self, key: (String, String, String), sender: Jid) {
        if self.order.len() >= Self::MAX
            && let Some(old) = self.order.pop_front()
        {
            self.senders.remove(&old);
        }
        if self.senders.insert(key.clone(), sender).is_none() {
            self.order.push_back(key);
        }
    }

    fn get(&self, key: &(String, String, String)) -> Option<&Jid> {
        self.senders.get(key)
    }
}

/// Error replies the router sends; every refusal gets one.
fn stanza_error(type_: ErrorType, cond: DefinedCondition, text: &str) -> StanzaError {
    StanzaError::new(type_, cond, "en", text)
}

/// The answer to an iq nobody here serves.
fn no_such_service() -> StanzaError {
    stanza_error(
        ErrorType::Cancel,
        DefinedCondition::ServiceUnavailable,
        "no such service",
    )
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn random_id() -> String {
    format!("rd-{:016x}", rand::random::<u64>())
}

impl Router {
    pub fn new(
        config: Arc<Config>,
        config_path: Option<PathBuf>,
        store: Arc<Store>,
        outbox: mpsc::Sender<Outbound>,
        flush_requests: mpsc::UnboundedSender<u64>,
    ) -> Result<Router, StoreError> {
        let book = address_book(&config);
        let me = Jid::from(book.component_jid());
        let first_seq = store.next_seq()?;
        let gate = match config.store.durability {
            // Every seq handed out so far is below this and already on
            // disk as far as this process is concerned (what sled
            // recovered).
            Durability::Fsync => Gate::fsync(flush_requests, store.next_seq()?),
            // Sent at once; sled flushes every flush_interval_ms.
            Durability::Batched => Gate::batched(),
        };
        let rate = RateLimiter::new(config.limits.sender_rate_per_s, config.limits.sender_burst);
        Ok(Router {
            config,
            book,
            me,
            store,
            outbox,
            out_buf: Vec::new(),
            burst_accepted: Vec::new(),
            fresh: Fresh::default(),
            probe_queue: VecDeque::new(),
            probe_waiting: Vec::new(),
            epoch: None,
            peers: HashMap::new(),
            timers: DelayQueue::new(),
            gate,
            disco_pending: HashMap::new(),
            stats: Stats::default(),
            admin: Admin::default(),
            started: std::time::Instant::now(),
            link_up_since: None,
            config_path,
            instance: Instance::new(now_ms()),
            twin_timer: None,
            fatal: None,
            store_failed: false,
            rate,
            expiry_scheduled: false,
            refused_at: HashMap::new(),
            contacts: HashMap::new(),
            contact_asked: HashMap::new(),
            marker_scans: RateLimiter::new(20, 200),
            first_seq,
            once_sent: RecentOnce::default(),
            grants: HashMap::new(),
            roster_sets: HashMap::new(),
        })
    }

    /// Run until shutdown or until the link is gone; the error says why
    /// this instance had to stop by itself.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<LinkEvent>,
        mut durable: mpsc::Receiver<Flushed>,
        shutdown: CancellationToken,
    ) -> Result<(), Stop> {
        while self.fatal.is_none() {
            // One burst per round: the store gathers its writes in memory
            // and applies them in one batch at the end (see `store`).
            self.store.begin();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(f) = durable.recv() => match f {
                    Flushed::Durable(ticket) => self.on_durable(ticket).await,
                    Flushed::Failed(e) => {
                        self.store_failure("fsync", &e);
                        self.abandon_undurable().await;
                    }
                },
                ev = events.recv() => match ev {
                    Some(ev) => {
                        self.on_link_event(ev).await;
                        // Whatever else has arrived joins the burst.
                        for _ in 1..BURST {
                            let Ok(ev) = events.try_recv() else { break };
                            self.on_link_event(ev).await;
                        }
                    }
                    None => break,
                },
                Some(expired) = self.timers.next() => {
                    let t = expired.into_inner();
                    self.on_timer(t).await;
                }
            }
            self.end_burst().await;
        }
        if let Err(e) = self.store.commit() {
            error!(error = %e, "store write failed at stop");
        }
        info!(
            accepted = self.stats.accepted_total,
            confirmed = self.stats.confirmed_total,
            "router stopped"
        );
        match self.fatal.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Pings from our domain to our domain, naming this instance.
    async fn send_twin_probes(&mut self) {
        for n in 0..twin::PROBES {
            let from = format!("{}@{}", Instance::probe_node(n), self.book.component());
            let Ok(from) = Jid::from_str(&from) else {
                continue;
            };
            let iq = Iq::from_get(self.instance.probe_id(n), tokio_xmpp::parsers::ping::Ping)
                .with_from(from)
                .with_to(self.me.clone());
            self.send(iq).await;
        }
    }

    async fn on_twin_probe(&mut self, verdict: Verdict) {
        match verdict {
            Verdict::Mine => {}
            Verdict::Earlier(other) => {
                let e = AnotherInstance {
                    domain: self.book.component().to_string(),
                    started: other.started(),
                };
                error!(error = %e, "stopping");
                self.fatal = Some(Stop::AnotherInstance(e));
            }
            Verdict::Later(other) => {
                warn!(
                    other_started = %other.started(),
                    "another redeliver instance connected under this component's name; \
                     it started later and will stop"
                );
                // Make sure it hears of us soon.
                self.send_twin_probes().await;
            }
        }
    }

    /// Queue a stanza for the link; it leaves when the burst ends.
    async fn send(&mut self, stanza: impl Into<Stanza>) {
        self.send_after(stanza, Needs::Nothing).await;
    }

    /// Queue a stanza that may leave only if the burst's writes commit.
    async fn send_after(&mut self, stanza: impl Into<Stanza>, needs: Needs) {
        let Some(epoch) = self.epoch else { return };
        self.out_buf.push((
            Outbound {
                epoch,
                stanza: stanza.into(),
            },
            needs,
        ));
    }

    /// Commit the burst's store writes, ask for their fsync, then let its
    /// stanzas go: nothing leaves before the write it depends on is in
    /// sled (and, in fsync mode, the gate holds what needs the fsync).
    /// If the commit fails, what depended on it stays here: relays of the
    /// burst's new messages (their senders are told instead) and receipts
    /// for its removals (those messages come back after the restart).
    async fn end_burst(&mut self) {
        let accepted = std::mem::take(&mut self.burst_accepted);
        if let Err(e) = self.store.commit() {
            self.store_failure("commit", &e);
            let out = std::mem::take(&mut self.out_buf);
            let held = out.iter().filter(|(_, n)| *n != Needs::Nothing).count();
            self.out_buf = out
                .into_iter()
                .filter(|(_, n)| *n == Needs::Nothing)
                .collect();
            if held > 0 {
                warn!(
                    stanzas = held,
                    "not sent: they depended on writes that failed"
                );
            }
            self.abandon_undurable().await;
            if self.gate.is_batched() {
                // In fsync mode the gate held these and abandon_undurable
                // told their senders.
                self.abandon_unstored(accepted).await;
            }
        }
        self.gate.submit();
        for (o, _) in std::mem::take(&mut self.out_buf) {
            // Bounded: when the link is slow the router waits here, which
            // slows intake from the link in turn.
            let _ = self.outbox.send(o).await;
        }
    }

    /// Messages of a burst whose commit failed (batched mode): never sent
    /// by this process, and their senders told.
    async fn abandon_unstored(&mut self, accepted: Vec<(u64, String)>) {
        for (seq, recipient) in accepted {
            if let Some(peer) = self.peers.get_mut(&recipient) {
                peer.never_again(seq, &mut self.timers);
            }
            self.tell_unstored(&recipient, seq).await;
        }
    }

    /// Tell the sender of message `seq` that it was not stored.
    async fn tell_unstored(&mut self, recipient: &str, seq: u64) {
        match self.store.get(recipient, seq) {
            Ok(Some(rec)) => {
                warn!(to = %recipient, id = %rec.id, seq, "not stored durably; sender told");
                self.notify_sender(
                    recipient,
                    &rec,
                    ErrorType::Wait,
                    DefinedCondition::ResourceConstraint,
                    "the relay could not store this message; send it again later",
                )
                .await;
            }
            Ok(None) => {}
            Err(e) => error!(error = %e, seq, "cannot read an unstored message"),
        }
    }

    /// Handle one link event as a burst of its own (what `run` does with
    /// each round of events), for drivers other than `run`: the fuzz
    /// targets.
    pub async fn handle(&mut self, ev: LinkEvent) {
        self.store.begin();
        self.on_link_event(ev).await;
        self.end_burst().await;
    }

    async fn on_link_event(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Up { epoch } => self.on_link_up(epoch).await,
            LinkEvent::Down => self.on_link_down(),
            LinkEvent::Stanza(st) => match *st {
                Stanza::Message(m) => self.on_message(m).await,
                Stanza::Presence(p) => self.on_presence(p).await,
                Stanza::Iq(iq) => self.on_iq(iq).await,
            },
            LinkEvent::Invalid {
                kind,
                from,
                to,
                id,
                type_,
                error,
            } => {
                warn!(kind, ?from, ?to, ?id, %error, "stanza did not parse");
                self.answer_invalid(kind, from, to, id, type_).await;
            }
        }
    }

    async fn answer_invalid(
        &mut self,
        kind: &'static str,
        from: Option<String>,
        to: Option<String>,
        id: Option<String>,
        type_: Option<String>,
    ) {
        // Never answer an error or a result: that could loop.
        if matches!(type_.as_deref(), Some("error") | Some("result")) || kind == "presence" {
            return;
        }
        let (Some(from), Some(to)) = (
            from.and_then(|f| Jid::from_str(&f).ok()),
            to.and_then(|t| Jid::from_str(&t).ok()),
        ) else {
            return;
        };
        if to.domain().as_str() != self.book.component().as_str() {
            return;
        }
        let err = stanza_error(
            ErrorType::Modify,
            DefinedCondition::BadRequest,
            "the stanza could not be parsed",
        );
        if kind == "iq" {
            let iq = Iq::from_error(id.unwrap_or_default(), err)
                .with_from(to)
                .with_to(from);
            self.send(iq).await;
        } else {
            let mut m = Message::error(Some(from)).with_payload(err);
            m.from = Some(to);
            m.id = id.map(Id);
            self.send(m).await;
        }
    }

    async fn on_link_up(&mut self, epoch: u64) {
        self.epoch = Some(epoch);
        // The server says again what it grants on each connection. Roster
        // sets that got no answer are asked again at the pair's next
        // message (not a day later).
        self.grants.clear();
        for (_, (recipient, sender)) in std::mem::take(&mut self.roster_sets) {
            if let Some(mut c) = self.contact(&recipient, &sender)
                && c.subscription == Subscription::Requested
            {
                c.asked_at_ms = 0;
                if self.store.set_contact(&recipient, &sender, c).is_ok() {
                    self.cache_contact(&recipient, &sender, c);
                }
            }
        }
        self.link_up_since = Some(chrono::Utc::now());
        let recipients = match self.store.recipients() {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "cannot list recipients after connect");
                return;
            }
        };
        info!(
            epoch,
            recipients = recipients.len(),
            "link up; probing subscribed recipients"
        );
        // In steps, so that a large store does not hold everything else
        // up (nor buffer a probe per recipient at once).
        self.probe_queue = recipients.into();
        self.timers.insert(Timer::ProbeStep, Duration::ZERO);
        self.send_twin_probes().await;
        // The walk runs while notices can go out; the first connect starts
        // it at once (a restart may find messages that expired while the
        // process was down).
        if !self.expiry_scheduled {
            self.expiry_scheduled = true;
            self.timers.insert(Timer::Expire, Duration::ZERO);
        }
        if self.twin_timer.is_none() {
            self.twin_timer = Some(self.timers.insert(Timer::TwinCheck, twin::INTERVAL));
        }
    }

    /// Probe the next [`PROBE_STEP`] recipients known at link up: servers
    /// do not queue presence for a disconnected component, so ask again.
    async fn probe_step(&mut self) {
        let initial = self.config.retry_initial();
        for _ in 0..PROBE_STEP {
            let Some((name, state)) = self.probe_queue.pop_front() else {
                break;
            };
            let Ok(jid) = BareJid::from_str(&name) else {
                warn!(recipient = %name, "store holds an invalid recipient JID; skipping");
                continue;
            };
            if state.subscription == Subscription::Subscribed {
                self.send(
                    Presence::probe()
                        .with_from(self.me.clone())
                        .with_to(Jid::from(jid)),
                )
                .await;
            }
            if state.pending > 0 {
                if state.subscription == Subscription::Subscribed {
                    // The probe may answer; the retry waits for the
                    // whole pass (see below).
                    self.probe_waiting.push(name);
                } else {
                    self.resume_unless_known(&name, Duration::ZERO);
                }
            }
        }
        if !self.probe_queue.is_empty() {
            self.timers.insert(Timer::ProbeStep, Duration::ZERO);
            return;
        }
        // Every probe is out. Where no presence has come back within
        // retry_initial_ms of the last one (presence unknown), a retry
        // decides: timed from the end of the pass, so that a large store
        // does not resend to recipients whose answers are still queued.
        debug!("every recipient probed");
        for name in std::mem::take(&mut self.probe_waiting) {
            self.resume_unless_known(&name, initial);
        }
    }

    /// Schedule a resume for a recipient nothing is known of yet.
    fn resume_unless_known(&mut self, name: &str, delay: Duration) {
        let initial = self.config.retry_initial();
        let peer = peer_entry(&mut self.peers, name, initial);
        if peer.timer.is_none() && peer.phase == Phase::Idle {
            peer.phase = Phase::Backoff;
            peer.timer = Some(self.timers.insert(
                Timer::Resume {
                    recipient: name.to_owned(),
                },
                delay,
            ));
        }
    }

    fn on_link_down(&mut self) {
        self.epoch = None;
        self.probe_queue.clear();
        self.probe_waiting.clear();
        self.link_up_since = None;
        // What was on the wire is in doubt: it stays pending and is
        // replayed once presence is known again.
        for peer in self.peers.values_mut() {
            peer.halt(&mut self.timers);
            peer.resources.clear();
            peer.presence_known = false;
            peer.phase = Phase::Idle;
        }
        let names: Vec<String> = self.peers.keys().cloned().collect();
        for name in names {
            self.forget_if_idle(&name);
        }
        self.disco_pending.clear();
        warn!("link down; in-flight messages stay pending");
    }

    // ----- messages -----

    async fn on_message(&mut self, mut m: Message) {
        let (Some(from), Some(to)) = (m.from.clone(), m.to.clone()) else {
            debug!("message without from or to dropped");
            return;
        };
        if to.domain().as_str() != self.book.component().as_str() {
            // Not ours (a server would not route it here): no answer, since
            // nothing may leave with a `from` outside our domain.
            debug!(%to, "message for another domain dropped");
            return;
        }
        if m.type_ == MessageType::Error {
            let error = m
                .payloads
                .iter()
                .find(|p| p.name() == "error")
                .and_then(|p| StanzaError::try_from(p.clone()).ok());
            self.on_bounce(&from, &to, m.id.as_ref().map(|i| i.0.as_str()), error)
                .await;
            return;
        }
        if to.node().is_none()
            && from.node().is_none()
            && from.resource().is_none()
            && let Some(g) = m.payloads.iter().find_map(privilege::grants)
        {
            if from.domain().as_str() != self.config.relay.default_domain {
                // Only the component's own server may grant (XEP-0356):
                // that is the default domain's. ejabberd announces for
                // each of its hosts; a federated server could claim it.
                debug!(server = %from, "privileges from a domain other than the default one; ignored");
                return;
            }
            info!(
                server = %from,
                roster = g.roster_set,
                presence = g.presence,
                "the server granted privileges (XEP-0356)"
            );
            self.grants.insert(from.domain().to_string(), g);
            return;
        }
        let Some(to_node) = to.node() else {
            self.refuse_message(
                &m,
                ErrorType::Cancel,
                DefinedCondition::ServiceUnavailable,
                "this address does not take messages; write to user@relay-domain",
            )
            .await;
            return;
        };
        let from_bare = from.to_bare();
        if from_bare.node().is_none() || !self.book.sender_allowed(from.domain().as_str()) {
            self.refuse_message(
                &m,
                ErrorType::Cancel,
                DefinedCondition::NotAllowed,
                "your domain may not send through this relay",
            )
            .await;
            return;
        }
        let target = match self.book.user_for(Some(to_node.as_str())) {
            Ok(t) => t,
            Err(AddressError::DomainNotAllowed(_)) => {
                self.refuse_message(
                    &m,
                    ErrorType::Cancel,
                    DefinedCondition::NotAllowed,
                    "the recipient's domain is not served by this relay",
                )
                .await;
                return;
            }
            Err(e) => {
                self.refuse_message(
                    &m,
                    ErrorType::Modify,
                    DefinedCondition::JidMalformed,
                    &e.to_string(),
                )
                .await;
                return;
            }
        };
        let from_key = from_bare.to_string();
        // Anything from a recipient shows it is reachable again, and the
        // resource it came from is not silent.
        if let Some(r) = from.resource()
            && let Some(peer) = self.peers.get_mut(&from_key)
            && let Some(res) = peer.resources.get_mut(r.as_str())
        {
            res.silent = false;
        }
        self.seen_alive(&from_key).await;
        let had_confirmations = m
            .payloads
            .iter()
            .any(|p| message_kind::confirmation(p).is_some());
        let resource = from.resource().map(|r| r.to_string());
        let matched = self
            .handle_confirmations(&from_key, resource.as_deref(), &target, &mut m)
            .await;
        if m.type_ == MessageType::Groupchat {
            self.refuse_message(
                &m,
                ErrorType::Cancel,
                DefinedCondition::NotAcceptable,
                "groupchat messages are not relayed",
            )
            .await;
            return;
        }
        if message_kind::kind(&m) == Kind::Once {
            if had_confirmations && m.payloads.is_empty() && m.bodies.is_empty() {
                return; // nothing left to say
            }
            self.relay_once(m, &from, &from_bare, &target, matched)
                .await;
            return;
        }
        self.accept(m, &from, &from_bare, &target).await;
    }

    /// Why a message of `size` bytes from `sender` is refused, if it is:
    /// over `max_stanza_bytes`, or over the sender's rate (which this
    /// counts). The condition is `policy-violation` either way.
    fn over_size_or_rate(
        &mut self,
        size: usize,
        sender: &BareJid,
    ) -> Option<(ErrorType, &'static str)> {
        if size > self.config.limits.max_stanza_bytes {
            return Some((ErrorType::Modify, "message too large for the relay"));
        }
        let now = tokio::time::Instant::now().into_std();
        (!self.rate.allow(sender.as_str(), now))
            .then_some((ErrorType::Wait, "too many messages; slow down"))
    }

    fn queue_limits(&self) -> QueueLimits {
        let l = &self.config.limits;
        QueueLimits {
            max_pending: l.max_pending_per_recipient,
            max_bytes: l.max_bytes_per_recipient,
            max_store_bytes: l.max_store_bytes,
        }
    }

    /// The store cannot take it (write failure, full disk).
    async fn refuse_unstorable(&mut self, m: &Message) {
        self.refuse_message(
            m,
            ErrorType::Wait,
            DefinedCondition::ResourceConstraint,
            "the relay cannot store messages right now",
        )
        .await;
    }

    async fn refuse_message(&mut self, m: &Message, t: ErrorType, c: DefinedCondition, text: &str) {
        self.stats.refused_total += 1;
        info!(from = ?m.from, to = ?m.to, id = ?m.id, condition = ?c, "refused message");
        let Some(from) = m.from.clone() else { return };
        let mut reply = Message::error(Some(from)).with_payload(stanza_error(t, c, text));
        reply.from = m.to.clone();
        reply.id = m.id.clone();
        self.send(reply).await;
    }

    async fn accept(&mut self, mut m: Message, from: &Jid, from_bare: &BareJid, target: &BareJid) {
        let relay_from = match self.book.relay_for(from_bare) {
            Ok(r) => r,
            Err(e) => {
                self.refuse_message(
                    &m,
                    ErrorType::Modify,
                    DefinedCondition::JidMalformed,
                    &e.to_string(),
                )
                .await;
                return;
            }
        };
        let original = m.clone();
        let id = match &m.id {
            Some(id) if !id.0.is_empty() => id.0.clone(),
            _ => random_id(),
        };
        let origin_id = m
            .payloads
            .iter()
            .find(|p| p.is("origin-id", ns::SID))
            .and_then(|p| p.attr("id"))
            .map(str::to_owned);
        m.id = Some(Id(id.clone()));
        m.from = Some(Jid::from(relay_from));
        m.to = Some(Jid::from(target.clone()));
        // Ours is added at send time.
        m.payloads.retain(|p| !p.is("request", ns::RECEIPTS));
        self.strip_claims_in_our_name(&mut m);
        let content_hash = content_of(&m);
        let xml = String::from(&Element::from(m.clone()));
        let size = xml.len();
        if let Some((t, text)) = self.over_size_or_rate(size, from_bare) {
            self.refuse_message(&original, t, DefinedCondition::PolicyViolation, text)
                .await;
            return;
        }
        let recipient = target.to_string();
        let limits = self.queue_limits();
        if self.store_failed {
            self.refuse_unstorable(&original).await;
            return;
        }
        let outcome = self.store.accept(
            NewMessage {
                recipient: &recipient,
                sender_bare: &from_bare.to_string(),
                origin_id: origin_id.as_deref(),
                content_hash,
                record: Record {
                    accepted_at_ms: now_ms(),
                    sender: from.to_string(),
                    id: id.clone(),
                    stanza: xml,
                },
            },
            limits,
        );
        match outcome {
            Ok(Accepted::Stored { seq }) => {
                self.stats.accepted_total += 1;
                debug!(to = %recipient, from = %from, id = %id, seq, "accepted");
                self.ensure_contact(&recipient, target, from_bare).await;
                self.on_stored(seq, &recipient, target, m, size).await;
            }
            Ok(Accepted::Duplicate { seq }) => {
                info!(to = %recipient, from = %from, id = %id, seq, "duplicate submission ignored");
            }
            Ok(Accepted::IdInUse { seq }) => {
                info!(to = %recipient, from = %from, id = %id, seq, "id reused for a different message");
                self.refuse_message(
                    &original,
                    ErrorType::Cancel,
                    DefinedCondition::Conflict,
                    "a different message with this id is still pending for this recipient; \
                     send it with a new id",
                )
                .await;
            }
            Ok(Accepted::QueueFull) => {
                self.refuse_message(
                    &original,
                    ErrorType::Wait,
                    DefinedCondition::ResourceConstraint,
                    "the recipient's queue is full",
                )
                .await;
            }
            Ok(Accepted::StoreFull) => {
                warn!(to = %recipient, "store holds limits.max_store_bytes; refusing new messages");
                self.refuse_message(
                    &original,
                    ErrorType::Wait,
                    DefinedCondition::ResourceConstraint,
                    "the relay's store is full",
                )
                .await;
            }
            Err(e) => {
                self.store_failure("accept", &e);
                error!(error = %e, to = %recipient, "store write failed; refusing");
                self.refuse_unstorable(&original).await;
            }
        }
    }

    /// A message (or a notice) is in `recipient`'s queue under `seq`.
    async fn on_stored(
        &mut self,
        seq: u64,
        recipient: &str,
        target: &BareJid,
        m: Message,
        size: usize,
    ) {
        self.burst_accepted.push((seq, recipient.to_owned()));
        self.fresh.put(seq, m, size);
        self.gate.accepted(seq, recipient);
        self.ensure_subscribed(recipient, target).await;
        self.kick(recipient, seq).await;
    }

    /// Relay a message that goes once ([`message_kind::kind`]): nothing
    /// to store, no receipt to request.
    ///
    /// Receipts, markers and hints alone cost bounded work and are never
    /// refused; anything else counts against the sender's rate and size
    /// limits like a message. `confirmed`: it confirmed stored messages,
    /// so it tells the sender they are done with and leaves only once
    /// their removal is on disk (fsync mode; never after a store failure).
    async fn relay_once(
        &mut self,
        mut m: Message,
        from: &Jid,
        from_bare: &BareJid,
        target: &BareJid,
        confirmed: bool,
    ) {
        if !message_kind::only_bookkeeping(&m) {
            let size = String::from(&Element::from(m.clone())).len();
            if let Some((t, text)) = self.over_size_or_rate(size, from_bare) {
                self.refuse_message(&m, t, DefinedCondition::PolicyViolation, text)
                    .await;
                return;
            }
            if let Some(id) = &m.id {
                self.once_sent.put(
                    (target.to_string(), from_bare.to_string(), id.0.clone()),
                    from.clone(),
                );
            }
        }
        let Ok(relay_from) = self.book.relay_full(from_bare) else {
            return;
        };
        m.from = Some(relay_from);
        m.to = Some(Jid::from(target.clone()));
        self.strip_claims_in_our_name(&mut m);
        if !confirmed {
            self.send(m).await;
        } else if let Some(m) = self.gate.after_writes(m.into()) {
            self.send_after(m, Needs::Removals).await;
        }
    }

    /// Never relay a claim made in our name (a delay or a stanza-id of
    /// ours is added at send time, by us only).
    fn strip_claims_in_our_name(&self, m: &mut Message) {
        let me = self.me.to_string();
        m.payloads.retain(|p| {
            !(p.is("delay", ns::DELAY) && p.attr("from") == Some(me.as_str())
                || p.is("stanza-id", ns::SID) && p.attr("by") == Some(me.as_str()))
        });
    }

    /// Receipts and markers from `from_key` (a recipient) about messages
    /// that `target` sent it.
    /// At most [`MAX_CONFIRMATIONS_PER_STANZA`] per stanza; a marker's
    /// scan of earlier messages is budgeted per recipient (past the
    /// budget a marker confirms only the message it names, as a receipt).
    ///
    /// The stanza is edited to say no more than what was done, since it is
    /// relayed on to the sender: confirmations past the limit, and those
    /// naming a message not sent yet (a late receipt for an earlier message
    /// under a reused id), are taken out; a marker that confirmed only its
    /// own message becomes a receipt for it. Returns whether any named a
    /// stored message (then its relay waits for the removal's fsync).
    /// Each that names one also tells that the client at `resource`
    /// answers `target` ([`Router::learn_habit`]).
    async fn handle_confirmations(
        &mut self,
        from_key: &str,
        resource: Option<&str>,
        target: &BareJid,
        m: &mut Message,
    ) -> bool {
        let sender = target.to_string();
        let found: Vec<(usize, String, bool)> = m
            .payloads
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                message_kind::confirmation(p).map(|(id, marker)| (i, id.to_owned(), marker))
            })
            .collect();
        if found.len() > MAX_CONFIRMATIONS_PER_STANZA {
            warn!(
                from = from_key,
                count = found.len(),
                handled = MAX_CONFIRMATIONS_PER_STANZA,
                "too many receipts and markers in one stanza; the rest ignored"
            );
        }
        let mut matched = false;
        // Payload index → its replacement (None: taken out).
        let mut edits: Vec<(usize, Option<Element>)> = Vec::new();
        for (n, (i, id, marker)) in found.into_iter().enumerate() {
            if n >= MAX_CONFIRMATIONS_PER_STANZA {
                edits.push((i, None));
                continue;
            }
            let seq = match self.store.seq_of(from_key, &sender, &id) {
                Ok(Some(seq)) => seq,
                Ok(None) => continue,
                Err(e) => {
                    error!(error = %e, "id index lookup failed");
                    continue;
                }
            };
            if self.unsent(from_key, seq) {
                debug!(
                    from = from_key,
                    id, seq, "confirmation for a message not sent yet ignored"
                );
                edits.push((i, None));
                continue;
            }
            matched = true;
            // Only a receipt says the client answers receipts: a client
            // may send read markers with receipts turned off.
            if !marker && let Some(r) = resource {
                self.learn_habit(from_key, r, &sender);
            }
            let scan = marker
                && self
                    .marker_scans
                    .allow(from_key, tokio::time::Instant::now().into_std());
            if marker && !scan {
                debug!(
                    from = from_key,
                    id, "marker scan budget spent; confirming the marked message only"
                );
            }
            let seqs = if scan {
                // Pending ones, and those counted delivered and kept for a
                // late bounce (read now: a bounce must not bring them back).
                let found = self
                    .store
                    .pending_from_sender_upto(from_key, &sender, seq, MARKER_SCAN_LIMIT)
                    .and_then(|mut s| {
                        s.extend(self.store.assumed_from_sender_upto(
                            from_key,
                            &sender,
                            seq,
                            MARKER_SCAN_LIMIT,
                        )?);
                        Ok(s)
                    });
                match found {
                    Ok(s) => s
                        .into_iter()
                        .filter(|s| !self.unsent(from_key, *s))
                        .collect(),
                    Err(e) => {
                        error!(error = %e, "marker scan failed");
                        continue;
                    }
                }
            } else {
                if marker {
                    edits.push((i, Some(Element::from(Received { id: id.clone() }))));
                }
                vec![seq]
            };
            self.confirm(from_key, &seqs, false).await;
        }
        if !edits.is_empty() {
            let mut payloads = std::mem::take(&mut m.payloads);
            for (i, with) in edits.into_iter().rev() {
                match with {
                    Some(el) => payloads[i] = el,
                    None => {
                        payloads.remove(i);
                    }
                }
            }
            m.payloads = payloads;
        }
        matched
    }

    /// Whether message `seq` for `recipient` was accepted by this process
    /// and never sent: no client can have seen it, so nothing confirms
    /// it (an older message of this process's lifetime may have been sent
    /// by the one before, which is not known here).
    fn unsent(&self, recipient: &str, seq: u64) -> bool {
        seq >= self.first_seq
            && self
                .peers
                .get(recipient)
                .is_none_or(|p| !p.attempts.contains_key(&seq))
            && matches!(self.store.get(recipient, seq), Ok(Some(_)))
    }

    /// Remove confirmed messages, or (`assumed`) messages counted
    /// delivered without a receipt, which the store keeps aside for the
    /// late bounce window.
    async fn confirm(&mut self, recipient: &str, seqs: &[u64], assumed: bool) {
        let outcome = if assumed {
            self.store.assume(recipient, seqs, now_ms())
        } else {
            self.store.confirm(recipient, seqs)
        };
        let removed = match outcome {
            Ok(r) => r,
            Err(e) => {
                self.store_failure("confirm", &e);
                // Confirmed all the same: not sent again by this process.
                // The store still holds them, so after the restart that
                // the failure leads to they come once more.
                if let Some(peer) = self.peers.get_mut(recipient) {
                    for seq in seqs {
                        peer.never_again(*seq, &mut self.timers);
                    }
                }
                self.pump(recipient).await;
                return;
            }
        };
        if removed.is_empty() {
            return;
        }
        self.gate.removed();
        let initial = self.config.retry_initial();
        if let Some(peer) = self.peers.get_mut(recipient) {
            for (seq, _) in &removed {
                if assumed {
                    // Its send count stays: a late bounce may put it back,
                    // and then a receipt for it still counts.
                    if let Some(f) = peer.in_flight.remove(seq) {
                        self.timers.try_remove(&f.timer);
                    }
                } else {
                    peer.removed(*seq, &mut self.timers);
                }
            }
            peer.backoff = initial;
        }
        // The recipient's own receipt or marker is relayed to the sender
        // as it came (see on_message), so nothing is sent here.
        if assumed {
            self.stats.assumed_total += removed.len() as u64;
            let keep_s = self.config.late_bounce_window().as_secs();
            for (seq, rec) in removed {
                info!(
                    to = recipient,
                    id = %rec.id,
                    seq,
                    keep_s,
                    "no receipt expected from this client and no error came back: counted \
                     delivered, kept for a late bounce"
                );
            }
        } else {
            self.stats.confirmed_total += removed.len() as u64;
            for (seq, rec) in removed {
                info!(to = recipient, id = %rec.id, seq, "confirmed");
            }
        }
        self.refill(recipient).await;
        self.forget_if_idle(recipient);
    }

    async fn on_bounce(
        &mut self,
        from: &Jid,
        to: &Jid,
        id: Option<&str>,
        error: Option<StanzaError>,
    ) {
        let recipient = from.to_bare().to_string();
        let Some(id) = id else { return };
        let sender = to
            .node()
            .and_then(|n| self.book.user_for(Some(n.as_str())).ok())
            .map(|j| j.to_string());
        let hit = self.peers.get(&recipient).and_then(|peer| {
            peer.in_flight
                .iter()
                .find(|(_, f)| f.id == id && Some(&f.sender_bare) == sender.as_ref())
                .map(|(seq, _)| *seq)
        });
        let Some(seq) = hit else {
            // Not on the wire: a message counted delivered (a late
            // bounce), or one relayed once.
            if let Some(s) = sender.as_deref()
                && self.late_bounce(&recipient, s, id, error.as_ref()).await
            {
                return;
            }
            self.bounce_once(&recipient, sender, id, error).await;
            return;
        };
        if let Some(e) = error.as_ref().filter(|e| is_final(e)) {
            self.reject(&recipient, seq, e).await;
        } else {
            self.stats.bounces_total += 1;
            info!(to = %recipient, id, "bounced; recipient marked offline");
            self.fail(&recipient, true).await;
        }
    }

    /// A bounce of a message counted delivered without a receipt (the
    /// server kept it in a stream-management session that then timed
    /// out): it goes back in its queue, at its place, and is sent again
    /// once the recipient is back. Whether the bounce was one.
    async fn late_bounce(
        &mut self,
        recipient: &str,
        sender: &str,
        id: &str,
        error: Option<&StanzaError>,
    ) -> bool {
        let seq = match self.store.seq_of(recipient, sender, id) {
            Ok(Some(seq)) => seq,
            Ok(None) => return false,
            Err(e) => {
                error!(error = %e, "id index lookup failed");
                return false;
            }
        };
        if !self.store.is_assumed(recipient, seq).unwrap_or(false) {
            return false;
        }
        let rec = match self.store.restore(recipient, seq) {
            Ok(Some(rec)) => rec,
            Ok(None) => return false,
            Err(e) => {
                self.store_failure("restore", &e);
                return true;
            }
        };
        self.stats.late_bounces_total += 1;
        self.gate.removed();
        warn!(
            to = recipient,
            id = %rec.id,
            seq,
            "late bounce of a message counted delivered without a receipt: back in its queue"
        );
        if self.store_failed {
            // Back in the queue in memory only: the sender is told now,
            // and the restart that the failure leads to starts afresh.
            self.tell_unstored(recipient, seq).await;
            if let Some(peer) = self.peers.get_mut(recipient) {
                peer.never_again(seq, &mut self.timers);
            }
            return true;
        }
        if let Some(e) = error.filter(|e| is_final(e)) {
            self.reject(recipient, seq, e).await;
            return true;
        }
        // A bounce about a session that ended (a stream-management
        // timeout) says nothing of the recipient's other resources: the
        // message goes again in its place, now if the recipient is being
        // sent to, else when it is back.
        let initial = self.config.retry_initial();
        let peer = peer_entry(&mut self.peers, recipient, initial);
        match peer.phase {
            Phase::Sending => {
                peer.cursor = peer.cursor.min(seq);
                self.pump(recipient).await;
            }
            Phase::Idle => self.kick(recipient, seq).await,
            Phase::Grace | Phase::Offline | Phase::Backoff => {}
        }
        true
    }

    /// A bounce of a message relayed once goes back to its sender (from
    /// the recipient's relay address, with the same id and error).
    async fn bounce_once(
        &mut self,
        recipient: &str,
        sender: Option<String>,
        id: &str,
        error: Option<StanzaError>,
    ) {
        let (Some(sender), Some(error)) = (sender, error) else {
            debug!(to = recipient, id, "error for nothing in flight");
            return;
        };
        let key = (recipient.to_owned(), sender, id.to_owned());
        let (Some(to), Ok(bare)) = (
            self.once_sent.get(&key).cloned(),
            BareJid::from_str(recipient),
        ) else {
            debug!(to = recipient, id, "error for nothing in flight");
            return;
        };
        let Ok(from) = self.book.relay_full(&bare) else {
            return;
        };
        info!(to = recipient, id, condition = ?error.defined_condition, "message relayed once bounced; sender told");
        let mut m = Message::error(Some(to)).with_payload(error);
        m.from = Some(from);
        m.id = Some(Id(id.to_owned()));
        self.send(m).await;
    }

    /// The recipient's side refused message `seq` in a way that retrying
    /// cannot change: end it, tell its sender with the same condition,
    /// and go on with the queue.
    async fn reject(&mut self, recipient: &str, seq: u64, error: &StanzaError) {
        let removed = match self.store.forget(recipient, seq) {
            Ok(r) => r.map(|rec| (seq, rec)),
            Err(e) => {
                self.store_failure("reject", &e);
                self.fail(recipient, true).await;
                return;
            }
        };
        self.gate.removed();
        if let Some(peer) = self.peers.get_mut(recipient) {
            peer.removed(seq, &mut self.timers);
        }
        // Bounded: the text comes from the other side.
        let said = error
            .texts
            .values()
            .next()
            .map(|t| format!(": {}", t.chars().take(200).collect::<String>()))
            .unwrap_or_default();
        if let Some((seq, rec)) = removed {
            self.stats.rejected_total += 1;
            warn!(
                to = recipient,
                id = %rec.id,
                seq,
                condition = ?error.defined_condition,
                "refused for good by the recipient's side; dropped, sender told"
            );
            let text = format!("the recipient's server refused this message{said}");
            self.notify_sender(
                recipient,
                &rec,
                error.type_.clone(),
                error.defined_condition.clone(),
                &text,
            )
            .await;
        }
        self.pump(recipient).await;
    }

    // ----- delivery state machine -----

    /// Message `seq` is new for `recipient`: send if we may.
    async fn kick(&mut self, recipient: &str, seq: u64) {
        let initial = self.config.retry_initial();
        let peer = peer_entry(&mut self.peers, recipient, initial);
        match peer.phase {
            Phase::Sending => {
                self.pump(recipient).await;
            }
            Phase::Idle => {
                if peer.online() || !peer.presence_known {
                    peer.phase = Phase::Sending;
                    peer.cursor = 0;
                    peer.replay_below = seq;
                    self.pump(recipient).await;
                } else {
                    peer.phase = Phase::Offline;
                }
            }
            Phase::Grace | Phase::Offline | Phase::Backoff => {}
        }
    }

    /// Send pending messages in order while the window has room; how
    /// many went.
    async fn pump(&mut self, recipient: &str) -> usize {
        self.pump_some(recipient, false).await
    }

    /// After confirmations: refill only once half the window is free, so
    /// that a backlog leaves in clumps (fewer, larger writes for the
    /// server to read) rather than one message per receipt.
    async fn refill(&mut self, recipient: &str) -> usize {
        self.pump_some(recipient, true).await
    }

    async fn pump_some(&mut self, recipient: &str, clump: bool) -> usize {
        if self.epoch.is_none() {
            return 0;
        }
        let Some(peer) = self.peers.get(recipient) else {
            return 0;
        };
        // With presence unknown, one message at a time: if the recipient
        // is logging in right now, the server would bounce the head of a
        // window and deliver its tail, out of order.
        let window = if peer.forced || peer.presence_known && peer.online() {
            self.config.delivery.window
        } else {
            1
        };
        if peer.phase != Phase::Sending
            || peer.in_flight.len() >= window
            || clump && peer.in_flight.len() > window / 2
        {
            return 0;
        }
        let room = window - peer.in_flight.len();
        let batch = match self.store.pending_from(recipient, peer.cursor, room) {
            Ok(b) => b,
            Err(e) => {
                error!(error = %e, to = recipient, "cannot read queue");
                return 0;
            }
        };
        let timeout = self.config.receipt_timeout();
        let mut to_send = Vec::with_capacity(batch.len());
        let target = peer.target();
        // Senders whose messages wait for a relay contact's answer, and
        // the shortest wait left (one timer per recipient at a time).
        let mut held = std::collections::HashSet::new();
        let mut soonest: Option<Duration> = None;
        for (_, rec) in &batch {
            let sender = bare_of(&rec.sender);
            if !held.contains(sender)
                && let Some(left) = self.held_for_contact(recipient, sender)
            {
                held.insert(sender.to_owned());
                soonest = Some(soonest.map_or(left, |s| s.min(left)));
            }
        }
        // Per sender: is a client the batch reaches known to answer it?
        let mut expect: HashMap<String, bool> = HashMap::new();
        for (_, rec) in &batch {
            let sender = bare_of(&rec.sender);
            if !expect.contains_key(sender) {
                let e = self.expects_receipt(recipient, sender, target.as_deref());
                expect.insert(sender.to_owned(), e);
            }
        }
        let unanswered_wait = self.config.unanswered_wait();
        if let Some(wait) = soonest
            && let Some(peer) = self.peers.get_mut(recipient)
            && peer.contact_timer.is_none()
        {
            peer.contact_timer = Some(self.timers.insert(
                Timer::ContactWait {
                    recipient: recipient.to_owned(),
                },
                wait,
            ));
        }
        {
            let peer = self.peers.get_mut(recipient).expect("checked above");
            for (seq, rec) in batch {
                if peer.unsaved_confirms.contains(&seq) || peer.in_flight.contains_key(&seq) {
                    // Never again; or on the wire already (the cursor went
                    // back for a message a late bounce put back).
                    peer.cursor = seq + 1;
                    continue;
                }
                if seq > self.gate.durable_seq() {
                    break; // not on disk yet; on_durable resumes
                }
                if held.contains(bare_of(&rec.sender)) {
                    // Until the recipient answers the relay contact; the
                    // queue keeps its order, so what follows waits too.
                    break;
                }
                let expect = expect.get(bare_of(&rec.sender)).copied().unwrap_or(true);
                let timer = self.timers.insert(
                    Timer::Receipt {
                        recipient: recipient.to_owned(),
                        seq,
                    },
                    if expect { timeout } else { unanswered_wait },
                );
                if let Some(old) = peer.in_flight.insert(
                    seq,
                    InFlight {
                        id: rec.id.clone(),
                        sender_bare: bare_of(&rec.sender).to_owned(),
                        timer,
                        to_resource: target.clone(),
                        expect,
                    },
                ) {
                    self.timers.try_remove(&old.timer);
                }
                peer.cursor = seq + 1;
                let attempts = peer.attempts.entry(seq).or_insert(0);
                *attempts += 1;
                let replay = *attempts > 1 || seq < peer.replay_below;
                to_send.push((seq, rec, replay));
            }
        }
        let sent = to_send.len();
        for (seq, rec, replay) in to_send {
            let needs = if self.burst_accepted.iter().any(|(s, _)| *s == seq) {
                Needs::Accept
            } else {
                Needs::Nothing
            };
            if replay {
                self.stats.replays_total += 1;
            }
            let fresh = self.fresh.take(seq);
            match self.outgoing(seq, &rec, replay, fresh) {
                Some(mut m) => {
                    if let Some(full) = target
                        .as_ref()
                        .and_then(|r| Jid::from_str(&format!("{recipient}/{r}")).ok())
                    {
                        m.to = Some(full);
                    }
                    self.send_after(m, needs).await
                }
                None => {
                    // A record we cannot parse back can never be delivered;
                    // keep it for the operator rather than drop it.
                    error!(
                        to = recipient,
                        seq, "stored stanza does not parse; left in the store"
                    );
                }
            }
        }
        sent
    }

    /// Rebuild the stanza for the wire from its record.
    /// `fresh`: the same message as accepted, if still at hand.
    fn outgoing(
        &self,
        seq: u64,
        rec: &Record,
        replay: bool,
        fresh: Option<Message>,
    ) -> Option<Message> {
        let mut m = match fresh {
            Some(m) => m,
            None => Message::try_from(Element::from_str(&rec.stanza).ok()?).ok()?,
        };
        // From the relay address's full JID (stored stanzas name the bare
        // one): some clients answer receipts to a full JID only.
        if let Some(from) = &m.from
            && from.resource().is_none()
            && let Some(full) = with_relay_resource(&from.to_bare())
        {
            m.from = Some(full);
        }
        m.payloads.push(Request.into());
        // A XEP-0359 origin-id equal to the message id, unless the sender
        // gave one: clients that tell copies apart by origin-id (and by
        // the stanza-id below, the same at every send) then show a replay,
        // or the copy their server archived, once.
        if !m.payloads.iter().any(|p| p.is("origin-id", ns::SID)) {
            m.payloads.push(OriginId { id: rec.id.clone() }.into());
        }
        m.payloads.push(
            StanzaId {
                id: format!("{seq:016x}"),
                by: self.me.clone(),
            }
            .into(),
        );
        if replay {
            let stamp = chrono::DateTime::from_timestamp_millis(rec.accepted_at_ms)
                .unwrap_or_default()
                .fixed_offset();
            m.payloads.push(
                Delay {
                    from: Some(self.me.clone()),
                    stamp: DateTime(stamp),
                    data: Some("Redelivered".into()),
                }
                .into(),
            );
        }
        Some(m)
    }

    /// A send failed. After a bounce the server certainly kept nothing,
    /// so with presence unknown we retry with backoff. After a silent
    /// receipt timeout the server may hold a copy (offline storage, a
    /// frozen client): resending would only duplicate it, so we wait for
    /// presence or any stanza from the recipient.
    async fn fail(&mut self, recipient: &str, bounced: bool) {
        let Some(peer) = self.peers.get_mut(recipient) else {
            return;
        };
        peer.halt(&mut self.timers);
        if bounced {
            // The server says nobody is there.
            peer.resources.clear();
        }
        // After a timeout the resources stay, marked silent: a late
        // receipt or any stanza from one brings it back.
        peer.forced = false;
        let subscribed = matches!(
            self.store.recipient(recipient).map(|s| s.subscription),
            Ok(Subscription::Subscribed)
        );
        if subscribed || !bounced {
            peer.presence_known = subscribed;
            peer.phase = Phase::Offline;
        } else {
            peer.presence_known = false;
            peer.phase = Phase::Backoff;
            let delay = peer.backoff;
            peer.backoff = (peer.backoff * 2).min(self.config.retry_max());
            peer.timer = Some(self.timers.insert(
                Timer::Resume {
                    recipient: recipient.to_owned(),
                },
                delay,
            ));
            debug!(
                to = recipient,
                retry_in_ms = delay.as_millis() as u64,
                "presence unknown; retry scheduled"
            );
        }
    }

    /// The recipient showed signs of life: replay after the grace window
    /// unless already sending.
    async fn seen_alive(&mut self, recipient: &str) {
        let Some(peer) = self.peers.get_mut(recipient) else {
            return;
        };
        if matches!(peer.phase, Phase::Offline | Phase::Backoff | Phase::Idle) {
            let has_pending = self
                .store
                .recipient(recipient)
                .map(|s| s.pending > 0)
                .unwrap_or(false);
            if !has_pending {
                // Nothing to resend: no retry either (a stale one would
                // later restart a window already under way).
                if let Some(k) = peer.timer.take() {
                    self.timers.try_remove(&k);
                }
                peer.phase = Phase::Idle;
                return;
            }
            if let Some(k) = peer.timer.take() {
                self.timers.try_remove(&k);
            }
            peer.phase = Phase::Grace;
            peer.timer = Some(self.timers.insert(
                Timer::Resume {
                    recipient: recipient.to_owned(),
                },
                self.config.replay_grace(),
            ));
            debug!(to = recipient, "back online; replay after grace");
        }
    }

    async fn on_timer(&mut self, t: Timer) {
        match t {
            Timer::Expire => self.expire_step().await,
            Timer::DiscoTimeout { id } => {
                self.disco_pending.remove(&id);
            }
            Timer::ContactWait { recipient } => {
                let Some(peer) = self.peers.get_mut(&recipient) else {
                    return;
                };
                // This timer fired: its key may already name another.
                peer.contact_timer = None;
                if peer.phase == Phase::Sending {
                    self.pump(&recipient).await;
                }
            }
            Timer::ProbeStep => {
                if self.epoch.is_some() {
                    self.probe_step().await;
                }
            }
            Timer::SpaceProbe => {
                if probe_space(&self.config.store.path) {
                    error!("{}", Stop::ReopenStore);
                    self.fatal = Some(Stop::ReopenStore);
                } else {
                    self.timers.insert(Timer::SpaceProbe, SPACE_PROBE_EVERY);
                }
            }
            Timer::TwinCheck => {
                self.send_twin_probes().await;
                self.twin_timer = Some(self.timers.insert(Timer::TwinCheck, twin::INTERVAL));
            }
            Timer::Resume { recipient } => {
                let next = self.store.next_seq().unwrap_or(u64::MAX);
                let Some(peer) = self.peers.get_mut(&recipient) else {
                    return;
                };
                if !matches!(peer.phase, Phase::Grace | Phase::Backoff) {
                    // Stale: only grace and backoff arm this timer.
                    return;
                }
                // This timer fired: its key may already name another.
                peer.timer = None;
                // Whatever is in flight goes again from the queue's head,
                // with its receipt timer gone.
                peer.halt(&mut self.timers);
                peer.replay_below = next;
                peer.phase = Phase::Sending;
                self.pump(&recipient).await;
            }
            Timer::Receipt { recipient, seq } => {
                let next = self.store.next_seq().unwrap_or(u64::MAX);
                let Some(peer) = self.peers.get_mut(&recipient) else {
                    return;
                };
                let Some(f) = peer.in_flight.remove(&seq) else {
                    return;
                };
                if !f.expect {
                    // No client it reached is known to answer its sender
                    // (they say they send no receipts, or never sent one
                    // to it): no error in time is the best proof there
                    // will be. A late bounce puts it back.
                    self.confirm(&recipient, &[seq], true).await;
                    return;
                }
                self.missed_receipt(&recipient, f.to_resource.as_deref());
                let Some(peer) = self.peers.get_mut(&recipient) else {
                    return;
                };
                // The timeout proves only that what it went to is silent:
                // the other resources, if any, go on.
                let silent = peer.silence(f.to_resource.as_deref());
                if peer.online() {
                    info!(
                        to = %recipient,
                        seq,
                        ?silent,
                        "receipt timeout; those resources left out, delivery goes on to the others"
                    );
                    peer.halt(&mut self.timers);
                    peer.replay_below = next;
                    peer.phase = Phase::Sending;
                    self.pump(&recipient).await;
                } else {
                    info!(to = %recipient, seq, "receipt timeout; recipient marked offline");
                    self.fail(&recipient, false).await;
                }
            }
        }
    }

    async fn on_durable(&mut self, ticket: u64) {
        let (released, recipients) = self.gate.durable(ticket);
        for stanza in released {
            self.send(stanza).await;
        }
        // Only a recipient with a message that just became durable can
        // have been held back by the gate.
        for r in recipients {
            if self
                .peers
                .get(&r)
                .is_some_and(|p| p.phase == Phase::Sending)
            {
                self.pump(&r).await;
            }
        }
    }

    // ----- store failures -----

    fn store_failure(&mut self, what: &str, e: &dyn std::fmt::Display) {
        if self.store_failed {
            return;
        }
        self.store_failed = true;
        error!(
            operation = what,
            error = %e,
            "the store cannot write: refusing new messages until there is space again, \
             then exiting to reopen it"
        );
        self.timers.insert(Timer::SpaceProbe, SPACE_PROBE_EVERY);
    }

    /// Messages accepted but never made durable will not be relayed by
    /// this process: tell their senders, so that nothing goes silently.
    /// Receipts held for removals that will never be durable are
    /// dropped: those messages come back after the restart, and their
    /// senders must not have seen a receipt for them.
    async fn abandon_undurable(&mut self) {
        let (waiting, dropped) = self.gate.abandon_waiting();
        if dropped > 0 {
            warn!(
                receipts = dropped,
                "receipts not relayed: the removals they confirm never reached disk"
            );
        }
        for (seq, recipient) in waiting {
            self.tell_unstored(&recipient, seq).await;
        }
    }

    // ----- expiry -----

    /// One bounded step of the expiry walk; the next step is scheduled at
    /// once if there is more to do, else after a pause, so a backlog never
    /// stalls the router.
    async fn expire_step(&mut self) {
        const STEP: usize = 1000;
        let ttl = self.config.message_ttl();
        let cutoff = now_ms() - i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let pause = (ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        if self.epoch.is_none() {
            // Nobody to tell: wait for the link.
            self.timers.insert(Timer::Expire, pause);
            return;
        }
        let step = match self.store.expire(cutoff, STEP) {
            Ok(s) => s,
            Err(e) => {
                self.store_failure("expire", &e);
                error!(error = %e, "expiry step failed; retrying later");
                self.timers.insert(Timer::Expire, pause);
                return;
            }
        };
        if !step.messages.is_empty() {
            self.gate.removed();
        }
        // Messages counted delivered without a receipt are kept only for
        // the late bounce window.
        let window =
            i64::try_from(self.config.late_bounce_window().as_millis()).unwrap_or(i64::MAX);
        let pruned = match self
            .store
            .prune_assumed(now_ms().saturating_sub(window), STEP)
        {
            Ok(p) => p,
            Err(e) => {
                self.store_failure("prune", &e);
                Default::default()
            }
        };
        if pruned.removed > 0 {
            debug!(
                count = pruned.removed,
                "late bounce window over for messages counted delivered"
            );
        }
        let notice = self.config.limits.expiry_notice;
        let ttl_s = self.config.limits.message_ttl_s;
        for (recipient, seq, rec) in step.messages {
            self.stats.expired_total += 1;
            info!(to = %recipient, id = %rec.id, seq, "expired undelivered");
            if let Some(peer) = self.peers.get_mut(&recipient) {
                peer.removed(seq, &mut self.timers);
            }
            if notice {
                let text =
                    format!("expired undelivered: not confirmed by the recipient within {ttl_s} s");
                self.notify_sender(
                    &recipient,
                    &rec,
                    ErrorType::Wait,
                    DefinedCondition::RecipientUnavailable,
                    &text,
                )
                .await;
            }
        }
        self.timers.insert(
            Timer::Expire,
            if step.more || pruned.more {
                Duration::ZERO
            } else {
                pause
            },
        );
    }

    /// Tell a stored message's sender what became of it, from the
    /// recipient's relay address, two ways: an error with the message's id
    /// to the full JID it came from (a client still there marks the
    /// message failed), and a notice a person can read, kept and relayed
    /// like a message to the sender's bare JID. The error alone is lost
    /// when that resource has gone away, which a week later it usually
    /// has: servers drop an error for a resource that is gone or for a
    /// bare JID (RFC 6121 8.5.2.1.1, 8.5.3.2.1), while a message to the
    /// bare JID waits in the server's offline storage or here.
    async fn notify_sender(
        &mut self,
        recipient: &str,
        rec: &Record,
        type_: ErrorType,
        condition: DefinedCondition,
        text: &str,
    ) {
        let (Ok(sender), Ok(recipient)) =
            (Jid::from_str(&rec.sender), BareJid::from_str(recipient))
        else {
            return;
        };
        let Ok(from) = self.book.relay_for(&recipient) else {
            return;
        };
        let mut m =
            Message::error(Some(sender.clone())).with_payload(stanza_error(type_, condition, text));
        m.from = self.book.relay_full(&recipient).ok();
        m.id = Some(Id(rec.id.clone()));
        self.send(m).await;
        self.queue_notice(&recipient, from, &sender.to_bare(), rec, text)
            .await;
    }

    /// Keep a notice for `sender` about `rec` (which was for `recipient`)
    /// in the sender's queue. Its record names as its sender the
    /// recipient's bare JID with an empty resource, which is no JID, so
    /// that no notice is ever sent about a notice.
    async fn queue_notice(
        &mut self,
        recipient: &BareJid,
        from: BareJid,
        sender: &BareJid,
        rec: &Record,
        text: &str,
    ) {
        if self.store_failed {
            return;
        }
        let said = Element::from_str(&rec.stanza)
            .ok()
            .and_then(|e| e.children().find(|c| c.name() == "body").map(|b| b.text()))
            .map(|b| {
                let mut q: String = b.chars().take(80).collect();
                if q.len() < b.len() {
                    q.push('…');
                }
                format!("\"{q}\" ")
            })
            .unwrap_or_default();
        let when = chrono::DateTime::from_timestamp_millis(rec.accepted_at_ms)
            .unwrap_or_default()
            .format("%Y-%m-%d %H:%M UTC");
        let body = format!(
            "Not delivered: your message {said}to {recipient} (sent {when}, id {}): {text}.",
            rec.id
        );
        let id = format!("notice-{:016x}", rand::random::<u64>());
        let mut m = Message::chat(Some(Jid::from(sender.clone())));
        m.from = Some(Jid::from(from));
        m.id = Some(Id(id.clone()));
        m.bodies.insert(Lang::default(), body);
        let content_hash = content_of(&m);
        let xml = String::from(&Element::from(m.clone()));
        let size = xml.len();
        let queue = sender.to_string();
        let limits = self.queue_limits();
        let outcome = self.store.accept(
            NewMessage {
                recipient: &queue,
                sender_bare: recipient.as_str(),
                origin_id: None,
                content_hash,
                record: Record {
                    accepted_at_ms: now_ms(),
                    sender: format!("{recipient}/"),
                    id: id.clone(),
                    stanza: xml,
                },
            },
            limits,
        );
        match outcome {
            Ok(Accepted::Stored { seq }) => {
                self.stats.notices_total += 1;
                info!(to = %queue, id, about = %rec.id, seq, "notice kept for the sender");
                // From the recipient's relay address: a relay contact of
                // the sender's, so that contacts-only clients answer it.
                self.ensure_contact(&queue, sender, recipient).await;
                self.on_stored(seq, &queue, sender, m, size).await;
            }
            Ok(other) => {
                warn!(to = %queue, about = %rec.id, ?other, "no room to keep a notice; only the error was sent")
            }
            Err(e) => {
                self.store_failure("notice", &e);
            }
        }
    }

    // ----- receipts expected or not -----

    /// Read `recipient`'s remembered client habits into its peer, once.
    fn load_habits(&mut self, recipient: &str) {
        let Some(peer) = self.peers.get_mut(recipient) else {
            return;
        };
        if peer.habits.is_none() {
            let known = self.store.habits(recipient).unwrap_or_else(|e| {
                error!(error = %e, to = recipient, "cannot read client habits");
                Vec::new()
            });
            peer.habits = Some(known.into_iter().collect());
        }
    }

    /// The clients a message sent to `to` (a resource, or the bare JID)
    /// reaches: by presence, or, with presence unknown, every client the
    /// relay remembers for `recipient`.
    fn reached(&mut self, recipient: &str, to: Option<&str>) -> Vec<String> {
        self.load_habits(recipient);
        let Some(peer) = self.peers.get(recipient) else {
            return Vec::new();
        };
        if peer.presence_known && !peer.resources.is_empty() || to.is_some() {
            peer.reached_by(to)
        } else {
            peer.habits
                .as_ref()
                .map(|h| h.keys().cloned().collect())
                .unwrap_or_default()
        }
    }

    /// Whether a message from `sender` sent to `to` waits for a receipt
    /// (and, without one, is sent again at the next login), or counts
    /// delivered when no error came back within `unanswered_wait_ms`. It
    /// waits when a client it reaches is known to answer that sender: a
    /// client seen answering a relay address its user had not approved
    /// answers everyone; one seen answering only approved ones answers
    /// the relay contacts its user approved. A client never seen
    /// answering (receipts off, or its user ignored the contact request)
    /// would otherwise be shown the message again at every login.
    fn expects_receipt(&mut self, recipient: &str, sender: &str, to: Option<&str>) -> bool {
        let reached = self.reached(recipient, to);
        if reached.is_empty() {
            return false;
        }
        let approved = self
            .contact(recipient, sender)
            .is_some_and(|c| c.subscription == Subscription::Subscribed);
        let Some(peer) = self.peers.get(recipient) else {
            return false;
        };
        let habits = peer.habits.as_ref();
        reached.iter().any(|r| {
            peer.resources
                .get(r)
                .is_none_or(|res| res.receipts != Some(false))
                && habits
                    .and_then(|h| h.get(r))
                    .is_some_and(|h| h.answers == Answers::All || approved)
        })
    }

    /// A receipt or marker from `resource` confirmed a message from
    /// `sender` that the relay sent: remember that this client answers
    /// (everyone, unless its user had approved that sender's relay
    /// contact). Written only when something changes, and the time it
    /// was heard from at most once a day.
    fn learn_habit(&mut self, recipient: &str, resource: &str, sender: &str) {
        let approved = self
            .contact(recipient, sender)
            .is_some_and(|c| c.subscription == Subscription::Subscribed);
        let seen = if approved {
            Answers::Contacts
        } else {
            Answers::All
        };
        self.load_habits(recipient);
        let old = match self.peers.get(recipient).and_then(|p| p.habits.as_ref()) {
            Some(h) => h.get(resource).copied(),
            None => self
                .store
                .habits(recipient)
                .ok()
                .and_then(|v| v.into_iter().find(|(r, _)| r == resource).map(|(_, h)| h)),
        };
        let now = now_ms();
        let answers = old.map_or(seen, |h| h.answers.max(seen));
        if let Some(h) = old
            && h.answers == answers
            && h.missed == 0
            && now.saturating_sub(h.seen_at_ms) < 24 * 3600 * 1000
        {
            return;
        }
        let habit = Habit {
            answers,
            missed: 0,
            seen_at_ms: now,
        };
        if let Err(e) = self.store.set_habit(recipient, resource, Some(habit)) {
            error!(error = %e, "cannot record a client's receipt habit");
            return;
        }
        if old.map(|h| h.answers) != Some(answers) {
            info!(
                to = recipient,
                resource,
                ?answers,
                "this client answers receipts; its messages wait for them"
            );
        }
        if let Some(h) = self
            .peers
            .get_mut(recipient)
            .and_then(|p| p.habits.as_mut())
        {
            if h.len() >= crate::store::MAX_HABITS && !h.contains_key(resource) {
                // The store dropped one too; read them again next time.
                self.peers.get_mut(recipient).expect("just seen").habits = None;
            } else {
                h.insert(resource.to_owned(), habit);
            }
        }
        // What is on the wire to it now waits for its receipts too.
        let waiting: Vec<(u64, String, Option<String>)> = self
            .peers
            .get(recipient)
            .map(|p| {
                p.in_flight
                    .iter()
                    .filter(|(_, f)| !f.expect)
                    .map(|(seq, f)| (*seq, f.sender_bare.clone(), f.to_resource.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let timeout = self.config.receipt_timeout();
        for (seq, sender, to) in waiting {
            if self.expects_receipt(recipient, &sender, to.as_deref())
                && let Some(f) = self
                    .peers
                    .get_mut(recipient)
                    .and_then(|p| p.in_flight.get_mut(&seq))
            {
                f.expect = true;
                self.timers.reset(&f.timer, timeout);
            }
        }
    }

    /// A message that waited for a receipt from the clients `to` reaches
    /// timed out: one more silent spell for each remembered one. Two in a
    /// row without an answer between them and it is forgotten, so that a
    /// client whose user turned receipts off is not shown messages again
    /// at every login (a client that froze once answers at its next
    /// login and keeps the full guarantee).
    fn missed_receipt(&mut self, recipient: &str, to: Option<&str>) {
        // With presence unknown nobody knows which client had it: no
        // client is charged.
        if !self
            .peers
            .get(recipient)
            .is_some_and(|p| p.presence_known && !p.resources.is_empty() || to.is_some())
        {
            return;
        }
        let reached = self.reached(recipient, to);
        for r in reached {
            let Some(habits) = self
                .peers
                .get_mut(recipient)
                .and_then(|p| p.habits.as_mut())
            else {
                return;
            };
            let Some(h) = habits.get_mut(&r) else {
                continue;
            };
            h.missed = h.missed.saturating_add(1);
            let update = if h.missed >= 2 {
                habits.remove(&r);
                info!(
                    to = recipient,
                    resource = %r,
                    "client missed receipts twice in a row; its messages no longer wait for them"
                );
                None
            } else {
                Some(*h)
            };
            if let Err(e) = self.store.set_habit(recipient, &r, update) {
                error!(error = %e, "cannot record a client's receipt habit");
            }
        }
    }

    // ----- presence -----

    /// The first message from `sender` to `recipient` makes the sender's
    /// relay address ask the recipient for a presence subscription (with
    /// a XEP-0172 nick naming the sender), so that clients that answer
    /// receipts only to roster contacts (Gajim, Conversations, Monal,
    /// Psi) answer it once the recipient approves.
    async fn ensure_contact(&mut self, recipient: &str, target: &BareJid, sender: &BareJid) {
        let sender_key = sender.to_string();
        let known = self.contact(recipient, &sender_key);
        // Asked (or refused) within the last day: not again. A request
        // lost on the way, or refused, is asked again after that.
        if let Some(c) = known
            && (c.subscription == Subscription::Subscribed
                || now_ms().saturating_sub(c.asked_at_ms) < RESUBSCRIBE_AFTER.as_millis() as i64)
        {
            return;
        }
        // A contact the recipient removed or refused is not put back into
        // the roster without asking (privileged mode asks then).
        let refused_before = known.is_some_and(|c| c.subscription == Subscription::None);
        let Ok(from) = self.book.relay_for(sender) else {
            return;
        };
        let contact = Contact {
            subscription: Subscription::Requested,
            asked_at_ms: now_ms(),
        };
        if let Err(e) = self.store.set_contact(recipient, &sender_key, contact) {
            error!(error = %e, "cannot record a relay contact request");
            return;
        }
        self.cache_contact(recipient, &sender_key, contact);
        if self.contact_asked.len() >= CONTACT_CACHE {
            self.contact_asked.clear();
        }
        self.contact_asked.insert(
            (recipient.to_owned(), sender_key.clone()),
            tokio::time::Instant::now(),
        );
        if self.granted(target).roster_set
            && !refused_before
            && self.roster_sets.len() < MAX_DISCO_PENDING
        {
            // No prompt: the item goes straight into the roster.
            let id = format!("roster-{}", random_id());
            self.roster_sets
                .insert(id.clone(), (recipient.to_owned(), sender_key.clone()));
            info!(to = recipient, contact = %from, "adding a relay contact to the roster (privileged)");
            let name = format!("{sender_key} (via {})", self.book.component());
            self.send(privilege::roster_item(
                id,
                self.me.clone(),
                target,
                from,
                &name,
            ))
            .await;
            return;
        }
        self.ask_contact(recipient, target, &from, &sender_key)
            .await;
    }

    /// What the server of `user` granted the component.
    fn granted(&self, user: &BareJid) -> Grants {
        self.grants
            .get(user.domain().as_str())
            .copied()
            .unwrap_or_default()
    }

    /// The answer to a privileged roster set: the contact is in the
    /// roster with subscription both, or (refused: ejabberd 23.01 fails
    /// every such set) the relay stops trying on that server and asks for
    /// the subscription instead.
    async fn on_roster_set_answer(
        &mut self,
        id: &str,
        from: Option<&Jid>,
        error: Option<&StanzaError>,
    ) -> bool {
        let Some((recipient, sender)) = self.roster_sets.get(id).cloned() else {
            return false;
        };
        if from.map(|f| f.to_bare().to_string()) != Some(recipient.clone()) {
            return false;
        }
        self.roster_sets.remove(id);
        let Some(error) = error else {
            self.on_contact_answer(&recipient, &sender, true).await;
            return true;
        };
        let (Ok(target), Ok(sender_jid)) =
            (BareJid::from_str(&recipient), BareJid::from_str(&sender))
        else {
            return true;
        };
        // A refusal of the permission itself ends roster sets on that
        // server for this connection (ejabberd 23.01 answers every one
        // with internal-server-error); anything else (a user that does
        // not exist, say) concerns this pair only.
        let refused = matches!(
            error.defined_condition,
            DefinedCondition::InternalServerError
                | DefinedCondition::Forbidden
                | DefinedCondition::NotAllowed
                | DefinedCondition::FeatureNotImplemented
        );
        if refused && let Some(g) = self.grants.get_mut(target.domain().as_str()) {
            warn!(server = %target.domain(), condition = ?error.defined_condition, "the server refused a privileged roster set; asking recipients instead");
            g.roster_set = false;
        } else {
            info!(to = %recipient, condition = ?error.defined_condition, "a privileged roster set failed for this recipient; asking instead");
        }
        if let Ok(from) = self.book.relay_for(&sender_jid) {
            self.ask_contact(&recipient, &target, &from, &sender).await;
        }
        true
    }

    /// Ask `target` for a presence subscription from the relay address
    /// `from` (for `sender`).
    async fn ask_contact(
        &mut self,
        recipient: &str,
        target: &BareJid,
        from: &BareJid,
        sender_key: &str,
    ) {
        info!(to = recipient, contact = %from, "asking for a relay contact");
        let nick = Element::builder("nick", NICK)
            .append(sender_key.to_owned())
            .build();
        self.send(
            Presence::subscribe()
                .with_from(Jid::from(from.clone()))
                .with_to(Jid::from(target.clone()))
                .with_payloads(vec![nick]),
        )
        .await;
    }

    /// The recipient answered a relay contact's request.
    async fn on_contact_answer(&mut self, recipient: &str, sender: &str, approved: bool) {
        let Some(mut c) = self.contact(recipient, sender) else {
            return; // never asked
        };
        let sub = if approved {
            Subscription::Subscribed
        } else {
            Subscription::None
        };
        if c.subscription == sub {
            return;
        }
        c.subscription = sub;
        if !approved {
            // Asked again only a day after the refusal.
            c.asked_at_ms = now_ms();
        }
        if let Err(e) = self.store.set_contact(recipient, sender, c) {
            error!(error = %e, "cannot record a relay contact answer");
            return;
        }
        self.cache_contact(recipient, sender, c);
        if approved {
            info!(to = recipient, from = sender, "relay contact approved");
        } else {
            info!(
                to = recipient,
                from = sender,
                "relay contact refused or cancelled"
            );
        }
        // What waited for the answer goes now.
        if self
            .peers
            .get(recipient)
            .is_some_and(|p| p.phase == Phase::Sending)
        {
            self.pump(recipient).await;
        }
    }

    fn contact(&mut self, recipient: &str, sender: &str) -> Option<Contact> {
        let key = (recipient.to_owned(), sender.to_owned());
        if let Some(c) = self.contacts.get(&key) {
            return Some(*c);
        }
        let c = self.store.contact(recipient, sender).ok().flatten()?;
        self.cache_contact(recipient, sender, c);
        Some(c)
    }

    fn cache_contact(&mut self, recipient: &str, sender: &str, c: Contact) {
        if self.contacts.len() >= CONTACT_CACHE {
            self.contacts.clear();
        }
        self.contacts
            .insert((recipient.to_owned(), sender.to_owned()), c);
    }

    /// How much longer a message from `sender` to `recipient` waits for
    /// the recipient's answer to the relay contact's request, if it does:
    /// at most `contact_wait_ms` after this process asked (after a
    /// restart, nothing waits).
    fn held_for_contact(&mut self, recipient: &str, sender: &str) -> Option<Duration> {
        let key = (recipient.to_owned(), sender.to_owned());
        let asked = *self.contact_asked.get(&key)?;
        let wait = Duration::from_millis(self.config.delivery.contact_wait_ms);
        let left = wait.saturating_sub(asked.elapsed());
        let waiting = self
            .contact(recipient, sender)
            .is_some_and(|c| c.subscription == Subscription::Requested);
        if !waiting || left.is_zero() {
            self.contact_asked.remove(&key);
            return None;
        }
        Some(left)
    }

    async fn ensure_subscribed(&mut self, recipient: &str, jid: &BareJid) {
        if self.granted(jid).presence {
            // The server sends its users' presence without one.
            return;
        }
        match self.store.recipient(recipient) {
            Ok(st) if st.subscription == Subscription::None => {
                // After a refusal, ask again only after a long pause (not
                // once per message).
                let now = tokio::time::Instant::now();
                self.refused_at
                    .retain(|_, t| now.duration_since(*t) < RESUBSCRIBE_AFTER);
                if self.refused_at.contains_key(recipient) {
                    return;
                }
                if let Err(e) = self
                    .store
                    .set_subscription(recipient, Subscription::Requested)
                {
                    error!(error = %e, "cannot record subscription request");
                    return;
                }
                info!(to = recipient, "requesting presence subscription");
                self.send(
                    Presence::subscribe()
                        .with_from(self.me.clone())
                        .with_to(Jid::from(jid.clone())),
                )
                .await;
            }
            Ok(_) => {}
            Err(e) => error!(error = %e, "cannot read recipient state"),
        }
    }

    async fn on_presence(&mut self, p: Presence) {
        let (Some(from), Some(to)) = (p.from.clone(), p.to.clone()) else {
            return;
        };
        if to.domain().as_str() != self.book.component().as_str() {
            return;
        }
        match p.type_ {
            PresenceType::Subscribe => {
                // Auto-approve anyone subscribing to any of our JIDs.
                self.send(
                    Presence::subscribed()
                        .with_from(to.to_bare())
                        .with_to(from.to_bare()),
                )
                .await;
                return;
            }
            PresenceType::Unsubscribe => {
                self.send(
                    Presence::new(PresenceType::Unsubscribed)
                        .with_from(to.to_bare())
                        .with_to(from.to_bare()),
                )
                .await;
                return;
            }
            PresenceType::Probe => {
                self.send(Presence::available().with_from(to.to_bare()).with_to(from))
                    .await;
                return;
            }
            _ => {}
        }
        // Delivery tracking only looks at presence for our bare domain;
        // relay-user JIDs in a roster get their own copies, and answers
        // to their (relay contact) subscription requests.
        if let Some(node) = to.node() {
            if matches!(
                p.type_,
                PresenceType::Subscribed | PresenceType::Unsubscribed
            ) && let Ok(sender) = self.book.user_for(Some(node.as_str()))
            {
                let approved = p.type_ == PresenceType::Subscribed;
                self.on_contact_answer(&from.to_bare().to_string(), sender.as_str(), approved)
                    .await;
            }
            return;
        }
        let recipient = from.to_bare().to_string();
        let sub = match self.store.recipient(&recipient) {
            Ok(s) => s.subscription,
            Err(e) => {
                error!(error = %e, "cannot read recipient state");
                return;
            }
        };
        // Presence state is taken only from recipients the relay asked for
        // it: anyone else's would grow the store and memory for nothing.
        // Where the server grants presence (XEP-0356 managed_entity) it
        // sends every user's: taken from those the relay is delivering to
        // only. It shows changes since then, so what the relay knows of
        // such a user's resources may be incomplete: a hint, not proof of
        // absence.
        let granted_presence = self.granted(&from.to_bare()).presence;
        let managed = granted_presence
            && (self.peers.contains_key(&recipient)
                || self
                    .store
                    .recipient(&recipient)
                    .is_ok_and(|s| s.pending > 0));
        if sub == Subscription::None && !managed {
            debug!(from = %from, "presence from a JID the relay never asked; ignored");
            return;
        }
        let initial = self.config.retry_initial();
        match p.type_ {
            PresenceType::Subscribed => {
                info!(to = %recipient, "presence subscription approved");
                let _ = self
                    .store
                    .set_subscription(&recipient, Subscription::Subscribed);
            }
            PresenceType::Unsubscribed => {
                info!(to = %recipient, "presence subscription refused or cancelled");
                let _ = self.store.set_subscription(&recipient, Subscription::None);
                self.refused_at
                    .insert(recipient.clone(), tokio::time::Instant::now());
                if let Some(peer) = self.peers.get_mut(&recipient) {
                    // Without a subscription no presence will say more:
                    // what waited for it is retried with backoff.
                    peer.resources.clear();
                    peer.presence_known = false;
                    if peer.phase == Phase::Offline {
                        peer.phase = Phase::Idle;
                    }
                }
                if self
                    .store
                    .recipient(&recipient)
                    .is_ok_and(|s| s.pending > 0)
                {
                    self.resume_unless_known(&recipient, initial);
                }
            }
            PresenceType::Unavailable => {
                // Prosody acknowledges a subscribe with a bare unavailable:
                // that is not a logout.
                if sub != Subscription::Subscribed && !managed {
                    return;
                }
                let managed_only = sub != Subscription::Subscribed;
                let peer = peer_entry(&mut self.peers, &recipient, initial);
                if managed_only
                    && !from
                        .resource()
                        .is_some_and(|r| peer.resources.contains_key(r.as_str()))
                {
                    // A resource the relay never saw: says nothing of the
                    // others.
                    return;
                }
                peer.presence_known = true;
                match from.resource() {
                    Some(r) => {
                        peer.resources.remove(r.as_str());
                    }
                    None => peer.resources.clear(),
                }
                if !peer.online() {
                    debug!(to = %recipient, "offline");
                    // What went to clients not known to answer counts
                    // delivered now: the server had it before this
                    // unavailable, and if it could not deliver it, it
                    // bounces it (or keeps it offline), and a bounce puts
                    // it back. The rest goes again at the next login.
                    let unanswered: Vec<u64> = peer
                        .in_flight
                        .iter()
                        .filter(|(_, f)| !f.expect)
                        .map(|(seq, _)| *seq)
                        .collect();
                    peer.halt(&mut self.timers);
                    if managed_only {
                        // Maybe still online elsewhere: retried with
                        // backoff, as with presence unknown.
                        peer.presence_known = false;
                        peer.phase = Phase::Idle;
                    } else {
                        peer.phase = Phase::Offline;
                    }
                    if !unanswered.is_empty() {
                        self.confirm(&recipient, &unanswered, true).await;
                    }
                    if managed_only
                        && self
                            .store
                            .recipient(&recipient)
                            .is_ok_and(|s| s.pending > 0)
                    {
                        self.resume_unless_known(&recipient, initial);
                    }
                }
            }
            PresenceType::None => {
                if sub == Subscription::Requested && !granted_presence {
                    // Presence only flows after approval (unless the
                    // server grants it); a lost `subscribed` must not
                    // leave us waiting.
                    let _ = self
                        .store
                        .set_subscription(&recipient, Subscription::Subscribed);
                }
                let Some(resource) = from.resource().map(|r| r.to_string()) else {
                    return;
                };
                let peer = peer_entry(&mut self.peers, &recipient, initial);
                let was_online = peer.online();
                peer.presence_known = true;
                let known = peer.resources.get(&resource).and_then(|r| r.receipts);
                let new_resource = !peer.resources.contains_key(&resource);
                // Any presence from a silent resource shows it alive.
                peer.resources.insert(
                    resource.clone(),
                    Resource {
                        priority: p.priority.0,
                        receipts: known,
                        silent: false,
                    },
                );
                let online = peer.online();
                if new_resource {
                    self.query_receipt_support(&recipient, from.clone(), resource)
                        .await;
                }
                if online && !was_online {
                    info!(to = %recipient, "available");
                    self.seen_alive(&recipient).await;
                    // Presence known now: the window opens.
                    self.pump(&recipient).await;
                }
            }
            _ => {}
        }
    }

    /// Drop the runtime state of a recipient with nothing pending and no
    /// presence known: the map then holds only recipients with work, and
    /// those whose presence the relay asked for (at most one per
    /// recipient in the store).
    fn forget_if_idle(&mut self, recipient: &str) {
        let Some(peer) = self.peers.get(recipient) else {
            return;
        };
        if peer.presence_known
            || !peer.in_flight.is_empty()
            || peer.timer.is_some()
            || !peer.unsaved_confirms.is_empty()
        {
            return;
        }
        if self
            .store
            .recipient(recipient)
            .is_ok_and(|s| s.pending == 0)
        {
            self.peers.remove(recipient);
        }
    }

    async fn query_receipt_support(&mut self, recipient: &str, full: Jid, resource: String) {
        if self.disco_pending.len() >= MAX_DISCO_PENDING {
            warn!(to = %full, "too many disco#info queries unanswered; not asking");
            return;
        }
        // Unguessable: the answer is matched on id and sender.
        let id = format!(
            "disco-{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        self.disco_pending.insert(
            id.clone(),
            DiscoQuery {
                recipient: recipient.to_owned(),
                resource,
                to: full.clone(),
            },
        );
        self.timers.insert(
            Timer::DiscoTimeout { id: id.clone() },
            self.config.receipt_timeout(),
        );
        let iq = Iq::from_get(id, DiscoInfoQuery { node: None })
            .with_from(self.me.clone())
            .with_to(full);
        self.send(iq).await;
    }

    // ----- iq -----

    async fn on_iq(&mut self, iq: Iq) {
        let to = match &iq {
            Iq::Get { to, .. }
            | Iq::Set { to, .. }
            | Iq::Result { to, .. }
            | Iq::Error { to, .. } => to,
        };
        if to
            .as_ref()
            .is_some_and(|t| t.domain().as_str() != self.book.component().as_str())
        {
            // An answer would carry a foreign `from`, which ends the link.
            debug!(?to, "iq for another domain dropped");
            return;
        }
        match iq {
            Iq::Result {
                id, payload, from, ..
            } => {
                if self.on_roster_set_answer(&id, from.as_ref(), None).await {
                    return;
                }
                let Some(q) = self.take_disco(&id, from.as_ref()) else {
                    return;
                };
                let supports = payload
                    .and_then(|p| DiscoInfoResult::try_from(p).ok())
                    .map(|info| info.features.contains(ns::RECEIPTS));
                if let Some(peer) = self.peers.get_mut(&q.recipient)
                    && let Some(r) = peer.resources.get_mut(&q.resource)
                {
                    r.receipts = supports;
                    debug!(to = %q.recipient, resource = %q.resource, ?supports, "receipt support");
                }
            }
            Iq::Error {
                id, from, error, ..
            } => {
                if self
                    .on_roster_set_answer(&id, from.as_ref(), Some(&error))
                    .await
                {
                    return;
                }
                self.take_disco(&id, from.as_ref());
            }
            Iq::Get {
                from,
                to,
                id,
                payload,
            } => {
                let from_us = from
                    .as_ref()
                    .is_some_and(|f| f.domain().as_str() == self.book.component().as_str());
                if from_us
                    && payload.is("ping", ns::PING)
                    && let Some(verdict) = self.instance.judge(&id)
                {
                    // Not answered: the answer could reach the other one.
                    self.on_twin_probe(verdict).await;
                    return;
                }
                let reply = self.answer_get(&from, &to, &payload);
                self.reply_iq(from, to, id, reply).await;
            }
            Iq::Set {
                from,
                to,
                id,
                payload,
            } => {
                let to_domain = to.as_ref().is_some_and(|t| t.node().is_none());
                let reply = match &from {
                    Some(f) if to_domain && payload.is("command", COMMANDS) => {
                        self.on_command(f, payload).await
                    }
                    _ => Err(no_such_service()),
                };
                self.reply_iq(from, to, id, reply).await;
            }
        }
    }

    /// The disco#info query `id` answered by `from`: only the full JID it
    /// was sent to may answer it (anyone else's answer is ignored).
    fn take_disco(&mut self, id: &str, from: Option<&Jid>) -> Option<DiscoQuery> {
        let q = self.disco_pending.get(id)?;
        if from != Some(&q.to) {
            warn!(?from, expected = %q.to, "disco#info answer from the wrong sender ignored");
            return None;
        }
        self.disco_pending.remove(id)
    }

    fn is_admin(&self, from: Option<&Jid>) -> bool {
        let Some(from) = from else { return false };
        let bare = from.to_bare();
        self.config
            .admin
            .jids
            .iter()
            .any(|j| BareJid::from_str(j).is_ok_and(|j| j == bare))
    }

    /// An XEP-0050 request to the bare domain.
    async fn on_command(
        &mut self,
        from: &Jid,
        payload: Element,
    ) -> Result<Option<Element>, StanzaError> {
        let admin = self.is_admin(Some(from));
        let req = match Command::try_from(payload.clone()) {
            Ok(c) => c,
            Err(e) => {
                let cond = if payload
                    .attr("action")
                    .is_some_and(|a| a.parse::<crate::xep0050::Action>().is_err())
                {
                    crate::xep0050::CommandError::MalformedAction
                } else {
                    crate::xep0050::CommandError::BadPayload
                };
                warn!(%from, error = %e, "malformed command request");
                return Err(crate::admin::bad_request(
                    cond,
                    "the command element is malformed",
                ));
            }
        };
        let node = req.node.clone();
        let timeout = Duration::from_secs(self.config.admin.session_timeout_s);
        // The sessions live beside the router, which the commands borrow.
        let mut sessions = std::mem::take(&mut self.admin);
        let out = sessions.handle(self, from, admin, timeout, req).await;
        self.admin = sessions;
        match &out {
            Ok(c) => info!(%from, node, status = ?c.status, "admin command"),
            Err(e) => info!(%from, node, condition = ?e.defined_condition, "admin command refused"),
        }
        out.map(|c| Some(c.into()))
    }

    /// The result of an iq get, or the error to answer.
    #[allow(clippy::result_large_err)] // the error is the reply itself
    fn answer_get(
        &self,
        from: &Option<Jid>,
        to: &Option<Jid>,
        payload: &Element,
    ) -> Result<Option<Element>, StanzaError> {
        let to_domain = to.as_ref().is_some_and(|t| t.node().is_none());
        if payload.is("ping", ns::PING) {
            return Ok(None);
        }
        if !to_domain {
            return Err(no_such_service());
        }
        let node = payload.attr("node");
        if payload.is("query", ns::DISCO_INFO) {
            let (identity, features): (_, &[&str]) = match node {
                None => (
                    Identity::new("component", "generic", "en", "redeliver"),
                    &[
                        ns::DISCO_INFO,
                        ns::DISCO_ITEMS,
                        COMMANDS,
                        ns::PING,
                        ns::RECEIPTS,
                        ns::SID,
                    ],
                ),
                // XEP-0050 §2.3: a command node describes itself.
                Some(n) if self.is_admin(from.as_ref()) && Node::from_name(n).is_some() => (
                    Identity::new(
                        "automation",
                        "command-node",
                        "en",
                        Node::from_name(n).map_or("", Node::title),
                    ),
                    &[COMMANDS, ns::DATA_FORMS],
                ),
                Some(_) => {
                    return Err(stanza_error(
                        ErrorType::Cancel,
                        DefinedCondition::ItemNotFound,
                        "no such node",
                    ));
                }
            };
            let info = DiscoInfoResult {
                node: node.map(String::from),
                identities: vec![identity],
                features: features.iter().map(|f| f.to_string()).collect(),
                extensions: vec![],
            };
            return Ok(Some(info.into()));
        }
        if payload.is("query", ns::DISCO_ITEMS) {
            // Commands are listed to admins only; others see none.
            let items = if node == Some(COMMANDS) && self.is_admin(from.as_ref()) {
                Node::ALL
                    .iter()
                    .map(|n| DiscoItem {
                        jid: self.me.clone(),
                        node: Some(n.name().to_owned()),
                        name: Some(n.title().to_owned()),
                    })
                    .collect()
            } else {
                vec![]
            };
            let items = DiscoItemsResult {
                node: node.map(String::from),
                items,
                rsm: None,
            };
            return Ok(Some(items.into()));
        }
        Err(no_such_service())
    }

    async fn reply_iq(
        &mut self,
        from: Option<Jid>,
        to: Option<Jid>,
        id: String,
        reply: Result<Option<Element>, StanzaError>,
    ) {
        let Some(from) = from else { return };
        let our = to.unwrap_or_else(|| self.me.clone());
        let iq = match reply {
            Ok(payload) => Iq::Result {
                from: Some(our),
                to: Some(from),
                id,
                payload,
            },
            Err(e) => Iq::from_error(id, e).with_from(our).with_to(from),
        };
        self.send(iq).await;
    }

    /// Stop: make the store durable. Blocking work runs off the runtime.
    pub async fn flush_store(store: Arc<Store>) {
        match tokio::task::spawn_blocking(move || {
            store.commit()?;
            store.flush()?;
            store.write_shutdown_marker()
        })
        .await
        {
            Ok(Ok(_)) => info!("store flushed"),
            Ok(Err(e)) => error!(error = %e, "final store flush failed"),
            Err(e) => error!(error = %e, "final store flush panicked"),
        }
    }
}

fn address_book(config: &Config) -> AddressBook {
    AddressBook::new(
        &config.component.domain,
        &config.relay.default_domain,
        &config.relay.allowed_sender_domains,
    )
}

impl Ops for Router {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            stats: self.stats.clone(),
            in_flight: self.peers.values().map(|p| p.in_flight.len() as u64).sum(),
            uptime: self.started.elapsed(),
            link_up_since: self.link_up_since,
            server: self.config.component.server.clone(),
            domain: self.config.component.domain.clone(),
            durability: self.config.store.durability.as_str(),
            config_path: self.config_path.as_ref().map(|p| p.display().to_string()),
        }
    }

    fn store(&self) -> &Store {
        &self.store
    }

    fn resolve(&self, jid: &str) -> Result<String, String> {
        let j = BareJid::from_str(jid).map_err(|e| format!("{jid:?} is not a bare JID: {e}"))?;
        if j.domain().as_str() == self.book.component().as_str() {
            // A relay address stands for the user it reaches.
            return self
                .book
                .user_for(j.node().map(|n| n.as_str()))
                .map(|u| u.to_string())
                .map_err(|e| e.to_string());
        }
        if j.node().is_none() {
            return Err(format!("{jid:?} is a domain, not a recipient"));
        }
        Ok(j.to_string())
    }

    fn attempts(&self, recipient: &str, seq: u64) -> u32 {
        self.peers
            .get(recipient)
            .and_then(|p| p.attempts.get(&seq).copied())
            .unwrap_or(0)
    }

    fn now_ms(&self) -> i64 {
        now_ms()
    }

    async fn replay(&mut self, recipient: &str) -> Result<(u64, u64), String> {
        let pending = self
            .store
            .recipient(recipient)
            .map_err(|e| e.to_string())?
            .pending;
        if pending == 0 {
            return Ok((0, 0));
        }
        if self.epoch.is_none() {
            return Err("the component link is down".into());
        }
        let next = self.store.next_seq().map_err(|e| e.to_string())?;
        let initial = self.config.retry_initial();
        let peer = peer_entry(&mut self.peers, recipient, initial);
        // Whatever was in flight goes again, from the head of the queue.
        peer.halt(&mut self.timers);
        peer.phase = Phase::Sending;
        peer.replay_below = next;
        peer.backoff = initial;
        peer.forced = true;
        info!(
            to = recipient,
            pending, "replay requested by an administrator"
        );
        let sent = self.pump(recipient).await;
        Ok((sent as u64, pending))
    }

    async fn purge(&mut self, recipient: &str, scope: PurgeScope) -> Result<u64, String> {
        let seqs = self
            .store
            .purge(recipient, scope)
            .map_err(|e| e.to_string())?;
        if !seqs.is_empty() {
            self.gate.removed();
        }
        if let Some(peer) = self.peers.get_mut(recipient) {
            for seq in &seqs {
                peer.removed(*seq, &mut self.timers);
            }
        }
        self.stats.purged_total += seqs.len() as u64;
        info!(
            to = recipient,
            purged = seqs.len(),
            "purged by an administrator"
        );
        // Room in the window may have opened.
        self.pump(recipient).await;
        Ok(seqs.len() as u64)
    }

    fn reload(&mut self) -> Result<Vec<String>, String> {
        let Some(path) = self.config_path.clone() else {
            return Err("this instance was started without a config file".into());
        };
        let new = Config::load(&path).map_err(|e| e.to_string())?;
        let changes = self.config.changes(&new);
        let fixed: Vec<&str> = changes
            .iter()
            .filter(|c| c.needs_restart())
            .map(|c| c.key.as_str())
            .collect();
        if !fixed.is_empty() {
            return Err(format!(
                "{} can only change with a restart",
                fixed.join(", ")
            ));
        }
        self.book = address_book(&new);
        self.rate
            .set(new.limits.sender_rate_per_s, new.limits.sender_burst);
        self.config = Arc::new(new);
        let lines: Vec<String> = changes.iter().map(ToString::to_string).collect();
        info!(changes = ?lines, "configuration reloaded");
        Ok(lines)
    }
}

const SPACE_PROBE_EVERY: Duration = Duration::from_secs(5);

/// Whether 256 KiB can be written and synced next to the store.
fn probe_space(store: &std::path::Path) -> bool {
    use std::io::Write;
    let probe = store.join(".space-probe");
    let ok = std::fs::File::create(&probe)
        .and_then(|mut f| {
            f.write_all(&vec![0u8; 256 << 10])?;
            f.sync_all()
        })
        .is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

/// The [`content_hash`](crate::store::content_hash) of what a message
/// says: its bodies, subjects and thread, and its payloads but those that
/// differ between two submissions of one message (delays, ids, receipt
/// requests).
fn content_of(m: &Message) -> u64 {
    let mut text = String::new();
    for (lang, body) in &m.bodies {
        text.push_str(lang);
        text.push('\0');
        text.push_str(body);
        text.push('\0');
    }
    for (lang, subject) in &m.subjects {
        text.push_str(lang);
        text.push('\0');
        text.push_str(subject);
        text.push('\0');
    }
    if let Some(thread) = &m.thread {
        text.push_str(&String::from(&Element::from(thread.clone())));
    }
    for p in &m.payloads {
        if p.is("delay", ns::DELAY)
            || p.is("origin-id", ns::SID)
            || p.is("stanza-id", ns::SID)
            || p.is("request", ns::RECEIPTS)
        {
            continue;
        }
        text.push_str(&String::from(p));
    }
    crate::store::content_hash(text.as_bytes())
}

/// Whether a bounce's error says the recipient's side will never take
/// the message (a privacy list, a content filter), as opposed to "not
/// now". `service-unavailable` stays "not now": Prosody answers it alike
/// for a user who does not exist and for an offline one with offline
/// storage off; so does `remote-server-not-found`, which Prosody also
/// sends (type cancel) while a remote server that exists is down
/// (docs/architecture.md).
fn is_final(e: &StanzaError) -> bool {
    use DefinedCondition as C;
    e.type_ != ErrorType::Wait
        && !matches!(
            e.defined_condition,
            C::ServiceUnavailable
                | C::RecipientUnavailable
                | C::RemoteServerTimeout
                | C::RemoteServerNotFound
                | C::ResourceConstraint
                | C::InternalServerError
                | C::UndefinedCondition
        )
}

#[cfg(test)]
mod tests {
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
        let store =
            Arc::new(Store::open(&config.store.path, Durability::Batched, 5, 1 << 20).unwrap());
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
}
