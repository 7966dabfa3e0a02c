//! The router: every stanza from the link goes through here.
//!
//! It is one task that owns all delivery state, so no locks: messages are
//! accepted into the store, sent once durable, confirmed by receipts and
//! markers, and replayed when presence says the recipient is back. See the
//! lifecycle in docs/architecture.md.
//!
//! This file holds the router's state (timers, caches) and the round
//! loop; `peer` holds each recipient's delivery state, and each job's
//! methods are in a file of their own:
//! `intake` (messages from senders), `delivery` (sending a queue in
//! order), `confirm` (receipts and markers), `expectations` (which
//! clients answer receipts), `bounce` (error bounces, late ones
//! included), `presence`, `contacts` (relay contacts), `connection` (the
//! link coming and going), `iq`, `timers`, `expiry` (and sender notices),
//! `durability` (what is on disk decides what may leave), `ops` (the
//! admin commands' view), `forwarding` (all-active instances) and
//! `gauges` (what a metrics scrape reads), `transparent` (hand-offs
//! from a server module, replays as the sender; the state is
//! [`Handoff`]'s). Three small owners: `at_once`
//! (which messages may leave without a `<delay/>`), `linger` (when a
//! round's commit may wait for the next round's) and `sizes` (the
//! bounds that keep what the router writes under the server's limit).

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
use crate::config::{Config, Durability, Instances};
use crate::gate::{Flushed, Gate};
use crate::handoff::{self, Handoff};
use crate::link::{LinkEvent, Outbound};
use crate::message_kind::{self, Kind};
use crate::privilege::{self, Grants};
use crate::ratelimit::RateLimiter;
use crate::stats::{Confirmation, Stats};
use crate::store::{
    AcceptKey, Accepted, Answers, Confirmed, Contact, Habit, NewMessage, PurgeScope, QueueLimits,
    QueueStore, RecipientState, Record, StoreError, StoreView, Subscription, bare_of,
};
use crate::twin::{self, AnotherInstance, Instance, Verdict};
use crate::xep0050::COMMANDS;
use at_once::AtOnce;
pub use forwarding::LEAD_POLL;
use forwarding::TAKE_FORWARDED_EVERY;
use linger::Linger;
pub use peer::Phase;
use peer::{InFlight, Resource};
use peers::Peers;
use sizes::SERVER_STANZA_LIMIT;

mod at_once;
mod bounce;
mod confirm;
mod connection;
mod contacts;
mod delivery;
mod durability;
mod expectations;
mod expiry;
mod forwarding;
mod gauges;
mod intake;
mod iq;
mod linger;
mod ops;
mod peer;
mod peers;
mod presence;
mod sizes;
mod timers;
mod transparent;

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
    /// It answers a stanza taken from the inbox in this burst: if the
    /// burst fails, the stanza stays for the next leader, who answers.
    Taken,
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
    /// Time to probe the next recipients after link `epoch`'s connect.
    ProbeStep {
        epoch: u64,
    },
    /// The probe pass of link `epoch` ended this long ago: retry where
    /// presence is still unknown.
    ProbeRetry {
        epoch: u64,
    },
    /// Time to look for another instance under our name again.
    TwinCheck,
    /// Time for the next step of the expiry walk.
    Expire,
    /// Time to check that this instance still leads (a shared store), or
    /// to try to take the lead (all-active instances).
    LeadCheck,
    /// Time for the leader to look for forwarded stanzas.
    TakeForwarded,
    /// The link has been down too long for a leader of a shared store.
    LinkDown,
    /// Time to read the metrics' gauges again.
    Gauges,
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
    #[error(
        "this instance no longer leads on the shared store ({0}); exiting so that another \
         instance serves the domain (a supervisor restarts this one as a standby)"
    )]
    LostLead(String),
}

impl Stop {
    /// The process's exit status for this stop.
    pub fn exit_status(&self) -> u8 {
        match self {
            Stop::AnotherInstance(_) => twin::EXIT_STATUS,
            // EX_TEMPFAIL: restart me.
            Stop::ReopenStore | Stop::LostLead(_) => 75,
        }
    }
}

pub struct Router {
    config: Arc<Config>,
    book: AddressBook,
    /// The component's bare domain as a JID, the `from` of its own stanzas.
    me: Jid,
    store: Arc<dyn QueueStore>,
    outbox: mpsc::Sender<Outbound>,
    /// Stanzas of the current burst, sent once its writes are committed.
    out_buf: Vec<(Outbound, Needs)>,
    /// Messages accepted in the current burst: (seq, recipient).
    burst_accepted: Vec<(u64, String)>,
    /// First sends of the current burst's new messages, (first, waited
    /// ms): counted once the burst commits, since they leave only then.
    burst_relays: Vec<(bool, i64)>,
    /// Messages just accepted, as parsed, so that relaying one at once
    /// does not parse its stored XML back.
    fresh: Fresh,
    /// The messages that may still leave without a `<delay/>`.
    at_once: AtOnce,
    /// Whether a round's commit waits for the next round's.
    linger: Linger,
    /// Recipients still to probe after the last connect.
    probe_queue: VecDeque<(String, RecipientState)>,
    /// Probed recipients with pending messages, awaiting the end of the
    /// pass to schedule their retry.
    probe_waiting: Vec<String>,
    /// Epoch of the live link, if any.
    epoch: Option<u64>,
    peers: Peers,
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
    /// Armed while the link is down, on a shared store.
    link_down_timer: Option<delay_queue::Key>,
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
    /// What the component's own server (the default domain's) granted
    /// it (XEP-0356), as announced on this connection.
    grants: Grants,
    /// Transparent mode: the servers' message permissions and the replays
    /// on the wire (its stanzas are read and built there).
    handoff: Handoff,
    /// Privileged roster sets in flight, by iq id: (recipient, sender).
    roster_sets: HashMap<String, (String, String)>,
    /// Whether this instance leads: always, but for all-active instances
    /// that do not (they forward what they receive, see `forwarding`).
    leading: bool,
    /// Wakes the leader when another instance forwarded a stanza.
    forwarded_wakeup: Option<Arc<tokio::sync::Notify>>,
    /// Messages forwarded in the current burst: their senders are told if
    /// its commit fails.
    burst_forwarded: Vec<Message>,
    /// Handling stanzas taken from the inbox (see `forwarding`).
    handling_taken: bool,
    /// Stanzas handed to the leader in the current burst (start tag,
    /// when it was read), for the log once committed.
    burst_handed: Vec<(String, i64)>,
    /// Messages of the current burst accepted from the inbox: if it fails
    /// they stay handed over, and their senders are not told.
    taken_seqs: std::collections::HashSet<u64>,
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
        store: Arc<dyn QueueStore>,
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
            handoff: Handoff::new(me.clone()),
            book,
            me,
            store,
            outbox,
            out_buf: Vec::new(),
            burst_accepted: Vec::new(),
            burst_relays: Vec::new(),
            fresh: Fresh::default(),
            at_once: AtOnce::default(),
            linger: Linger::default(),
            probe_queue: VecDeque::new(),
            probe_waiting: Vec::new(),
            epoch: None,
            peers: Peers::new(config.retry_initial()),
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
            link_down_timer: None,
            store_failed: false,
            rate,
            expiry_scheduled: false,
            refused_at: HashMap::new(),
            contacts: HashMap::new(),
            contact_asked: HashMap::new(),
            marker_scans: RateLimiter::new(20, 200),
            first_seq,
            once_sent: RecentOnce::default(),
            grants: Grants::default(),
            roster_sets: HashMap::new(),
            // One-active instances run once they lead (see `app`).
            leading: config.store.instances == Instances::OneActive,
            forwarded_wakeup: None,
            burst_forwarded: Vec::new(),
            handling_taken: false,
            burst_handed: Vec::new(),
            taken_seqs: Default::default(),
            config,
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
        if self.store.shared() {
            // Only a shared store has a lead to lose (or to take).
            let first = if self.leading {
                LEAD_CHECK_EVERY
            } else {
                Duration::ZERO
            };
            self.timers.insert(Timer::LeadCheck, first);
        }
        if self.config.metrics_addr().is_some() {
            self.update_gauges();
        }
        if self.store.shared() && self.leading {
            // Led since the start (one-active): the lead was taken just
            // now, perhaps after a wait as a standby.
            self.reread_config();
            self.start_taking();
        }
        while self.fatal.is_none() {
            let wakeup = self.forwarded_wakeup.clone();
            let linger = self.linger.deadline();
            // One burst per round: the store gathers its writes in memory
            // and applies them in one batch at the end (see `store`), or,
            // if they are only removals, with the next round's (`linger`).
            self.store.begin();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    // The link reads nothing more (it stops at the same
                    // signal): handle what it read before.
                    self.handle_what_was_read(&mut events).await;
                    break;
                }
                Some(f) = durable.recv() => match f {
                    Flushed::Durable(ticket) => self.on_durable(ticket).await,
                    Flushed::Failed(e) => {
                        self.store_failure("fsync", &e);
                        self.abandon_undurable().await;
                    }
                },
                ev = events.recv() => match ev {
                    Some(ev) => {
                        // Whatever else has arrived joins the burst.
                        let mut batch = vec![ev];
                        fill_burst(&mut batch, &mut events);
                        self.on_link_batch(batch).await;
                    }
                    None => break,
                },
                Some(expired) = self.timers.next() => {
                    let t = expired.into_inner();
                    self.on_timer(t).await;
                }
                _ = forwarded(&wakeup), if self.leading => {
                    self.take_forwarded().await;
                }
                // The held commit is due: this round's end makes it.
                _ = tokio::time::sleep_until(linger.unwrap_or_else(tokio::time::Instant::now)),
                    if linger.is_some() => {}
            }
            self.end_round().await;
        }
        if self.linger.holding() {
            // What the held commit's stanzas wait for.
            self.end_burst().await;
        }
        if let Err(e) = self.store.commit() {
            error!(error = %e, "store write failed at stop");
        } else {
            self.release_at_stop().await;
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

    /// At a stop: the events the link read and the router has not
    /// handled yet, handled in rounds of their own, so that nothing read
    /// from the server is dropped unseen.
    async fn handle_what_was_read(&mut self, events: &mut mpsc::Receiver<LinkEvent>) {
        while self.fatal.is_none() {
            let mut batch = Vec::new();
            fill_burst(&mut batch, events);
            if batch.is_empty() {
                break;
            }
            self.on_link_batch(batch).await;
            self.end_burst().await;
            self.store.begin();
        }
    }

    /// Queue a stanza for the link; it leaves when the burst ends.
    async fn send(&mut self, stanza: impl Into<Stanza>) {
        self.send_after(stanza, Needs::Nothing).await;
    }

    /// Queue a stanza that may leave only if the burst's writes commit.
    async fn send_after(&mut self, stanza: impl Into<Stanza>, needs: Needs) {
        let Some(epoch) = self.epoch else { return };
        let needs = match needs {
            Needs::Nothing if self.handling_taken => Needs::Taken,
            n => n,
        };
        self.out_buf.push((
            Outbound {
                epoch,
                stanza: stanza.into(),
            },
            needs,
        ));
    }

    /// The end of one of `run`'s rounds: its burst ends, unless only
    /// removals wait on its commit, which may then join the next
    /// round's (see `linger`).
    async fn end_round(&mut self) {
        let may_wait = self.fatal.is_none()
            && !self.store_failed
            && self.burst_accepted.is_empty()
            && self.burst_forwarded.is_empty()
            && self.burst_handed.is_empty()
            && self.taken_seqs.is_empty()
            && self
                .out_buf
                .iter()
                .all(|(_, n)| matches!(n, Needs::Nothing | Needs::Removals))
            && self.store.commit_can_wait();
        if self.linger.hold(may_wait, tokio::time::Instant::now()) {
            // Nothing left in it, so what did not leave has waited.
            self.at_once.end_round();
        } else {
            self.end_burst().await;
        }
    }

    /// Commit the burst's store writes, ask for their fsync, then let its
    /// stanzas go: nothing leaves before the write it depends on is in
    /// sled (and, in fsync mode, the gate holds what needs the fsync).
    /// If the commit fails, what depended on it stays here: relays of the
    /// burst's new messages (their senders are told instead) and receipts
    /// for its removals (those messages come back after the restart).
    ///
    /// On a store whose commit is durable by itself (PostgreSQL), what
    /// the commit covered is released at once, in bursts of its own,
    /// before anything else: a later failed commit cannot take it back
    /// (and tell its senders it was not stored).
    async fn end_burst(&mut self) {
        let mut durable = self.commit_burst().await;
        while let Some(ticket) = durable {
            self.store.begin();
            self.on_durable(ticket).await;
            durable = self.commit_burst().await;
        }
        self.at_once.end_round();
    }

    /// One burst's end without the release: commit, ask for the fsync,
    /// let the burst's stanzas go. Returns the ticket to release at once
    /// instead when the commit itself made its writes durable.
    async fn commit_burst(&mut self) -> Option<u64> {
        let accepted = std::mem::take(&mut self.burst_accepted);
        let relays = std::mem::take(&mut self.burst_relays);
        let forwarded = std::mem::take(&mut self.burst_forwarded);
        let handed = std::mem::take(&mut self.burst_handed);
        let committed = self.store.commit();
        let durable_now = committed.is_ok() && self.store.durable_at_commit();
        if committed.is_ok() {
            if !handed.is_empty() {
                let now = crate::link::now_us();
                for (stanza, arrived_us) in handed {
                    // From the read to the commit: how late the leader can
                    // see it, against a stanza that came to it directly.
                    let after_ms = now.saturating_sub(arrived_us) as f64 / 1000.0;
                    debug!(%stanza, after_ms, "handed to the leader");
                }
            }
            for (first, waited_ms) in relays {
                self.stats.sent(first, waited_ms);
            }
        }
        if let Err(e) = committed {
            self.store_failure("commit", &e);
            for m in &forwarded {
                self.refuse_unstorable(m).await;
            }
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
        self.taken_seqs.clear();
        let durable = if durable_now {
            self.gate.committed_durable()
        } else {
            self.gate.submit();
            None
        };
        for (o, _) in std::mem::take(&mut self.out_buf) {
            // Bounded: when the link is slow the router waits here, which
            // slows intake from the link in turn.
            let _ = self.outbox.send(o).await;
        }
        durable
    }

    /// Handle one link event as a burst of its own (what `run` does with
    /// each round of events), for drivers other than `run`: the fuzz
    /// targets.
    pub async fn handle(&mut self, ev: LinkEvent) {
        self.store.begin();
        self.on_link_event(ev).await;
        self.end_burst().await;
    }
}

/// Add to `batch` the events already queued, up to [`BURST`] in all.
fn fill_burst(batch: &mut Vec<LinkEvent>, events: &mut mpsc::Receiver<LinkEvent>) {
    while batch.len() < BURST {
        let Ok(ev) = events.try_recv() else { break };
        batch.push(ev);
    }
}

/// Resolves when another instance forwarded a stanza; never without a
/// wakeup.
async fn forwarded(wakeup: &Option<Arc<tokio::sync::Notify>>) {
    match wakeup {
        Some(w) => w.notified().await,
        None => std::future::pending().await,
    }
}

fn address_book(config: &Config) -> AddressBook {
    AddressBook::new(
        &config.component.domain,
        &config.relay.default_domain,
        &config.relay.allowed_sender_domains,
    )
}

const SPACE_PROBE_EVERY: Duration = Duration::from_secs(5);
/// How often a leader checks that it still leads.
const LEAD_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a leader of a shared store may stay without a link before it
/// gives the lead to a standby that may reach the server.
const LINK_DOWN_LEAD_LIMIT: Duration = Duration::from_secs(30);

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
mod tests;
