//! One recipient's delivery state while this process runs (nothing of it
//! is stored): its phase, its available resources, what is in flight and
//! its timers. [`super::peers::Peers`] holds one per recipient the router
//! is busy with.

use super::*;

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
pub(super) struct InFlight {
    pub(super) id: String,
    pub(super) sender_bare: String,
    pub(super) timer: delay_queue::Key,
    /// The resource it was addressed to, when not the bare JID.
    pub(super) to_resource: Option<String>,
    /// Whether a client it went to is known to answer its sender: if
    /// not, it counts delivered when no error came back within
    /// `unanswered_wait_ms` (see [`Router::expects_receipt`]).
    pub(super) expect: bool,
}

/// The states [`super::peers::Peers`] keeps as a recipient's name only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Parked {
    /// Presence unknown, nothing scheduled: what a new `Peer` is (kept
    /// after a link went down, for recipients with pending messages).
    Idle,
    /// Known offline: waiting for presence.
    Offline,
    /// Probed, no answer when the probe pass ended: in backoff until the
    /// pass's retry.
    Awaiting,
}

/// An available resource of a recipient.
#[derive(Debug, Clone, Copy)]
pub(super) struct Resource {
    pub(super) priority: i8,
    /// From disco#info: `Some(false)` when the client says it cannot send
    /// receipts.
    pub(super) receipts: Option<bool>,
    /// Missed a receipt: left out until it shows life again (a presence
    /// or any stanza from it), while the others are written to directly.
    pub(super) silent: bool,
}

/// Runtime (not stored) delivery state of one recipient.
#[derive(Debug)]
pub(super) struct Peer {
    pub(super) phase: Phase,
    /// Available resources, from presence addressed to our bare domain.
    pub(super) resources: BTreeMap<String, Resource>,
    /// Whether the resources map reflects real presence information.
    pub(super) presence_known: bool,
    pub(super) in_flight: BTreeMap<u64, InFlight>,
    /// Next seq to consider sending while `Sending`.
    pub(super) cursor: u64,
    /// Grace or backoff timer.
    pub(super) timer: Option<delay_queue::Key>,
    /// Next backoff delay.
    pub(super) backoff: Duration,
    /// Send attempts per pending seq since start (not stored).
    pub(super) attempts: BTreeMap<u64, u32>,
    /// Confirmed while the store could not record it: never sent again
    /// by this process.
    pub(super) unsaved_confirms: std::collections::BTreeSet<u64>,
    /// An administrator asked for a replay: the full window, whatever
    /// presence says, until the next failure.
    pub(super) forced: bool,
    /// Armed while messages wait for a relay contact's answer.
    pub(super) contact_timer: Option<delay_queue::Key>,
    /// What each client does with receipt requests, by resource: the
    /// store's, read at first use.
    pub(super) habits: Option<BTreeMap<String, Habit>>,
}

impl Peer {
    pub(super) fn new(initial_backoff: Duration) -> Peer {
        Peer {
            phase: Phase::Idle,
            resources: BTreeMap::new(),
            presence_known: false,
            in_flight: BTreeMap::new(),
            cursor: 0,
            timer: None,
            backoff: initial_backoff,
            attempts: BTreeMap::new(),
            unsaved_confirms: Default::default(),
            forced: false,
            contact_timer: None,
            habits: None,
        }
    }

    /// The state a recipient parked as `kind` stands for.
    pub(super) fn parked(kind: Parked, initial_backoff: Duration) -> Peer {
        let (phase, presence_known) = match kind {
            Parked::Idle => (Phase::Idle, false),
            Parked::Offline => (Phase::Offline, true),
            Parked::Awaiting => (Phase::Backoff, false),
        };
        Peer {
            phase,
            presence_known,
            ..Peer::new(initial_backoff)
        }
    }

    /// Which parked state says all this one does, if any: nothing on the
    /// wire, scheduled, counted or forced, no resource known. Client
    /// habits are not looked at: they are a cache of the store's.
    pub(super) fn parks_as(&self, initial_backoff: Duration) -> Option<Parked> {
        let quiet = self.resources.is_empty()
            && self.in_flight.is_empty()
            && self.cursor == 0
            && self.timer.is_none()
            && self.backoff == initial_backoff
            && self.attempts.is_empty()
            && self.unsaved_confirms.is_empty()
            && !self.forced
            && self.contact_timer.is_none();
        if !quiet {
            return None;
        }
        match (self.phase, self.presence_known) {
            (Phase::Idle, false) => Some(Parked::Idle),
            (Phase::Offline, true) => Some(Parked::Offline),
            // In backoff with no timer of its own: the probe pass's retry.
            (Phase::Backoff, false) => Some(Parked::Awaiting),
            _ => None,
        }
    }

    /// In backoff with no timer of its own: waiting for the probe pass's
    /// retry.
    pub(super) fn awaits_probe_retry(&self) -> bool {
        self.phase == Phase::Backoff && self.timer.is_none()
    }

    /// Some resource takes messages and has not missed a receipt.
    pub(super) fn online(&self) -> bool {
        self.resources
            .values()
            .any(|r| r.priority >= 0 && !r.silent)
    }

    /// Where messages go: the bare JID (the server picks the resources),
    /// or, once a resource went silent, the best of the others by name,
    /// since the server would still pick the silent one.
    pub(super) fn target(&self) -> Option<String> {
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
    pub(super) fn reached_by(&self, to: Option<&str>) -> Vec<String> {
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
    pub(super) fn silence(&mut self, to: Option<&str>) -> Vec<String> {
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
    pub(super) fn removed(&mut self, seq: u64, timers: &mut DelayQueue<Timer>) {
        if let Some(f) = self.in_flight.remove(&seq) {
            timers.try_remove(&f.timer);
        }
        self.attempts.remove(&seq);
    }

    /// Message `seq` stays in the store (a write failed) but this
    /// process must never send it again.
    pub(super) fn never_again(&mut self, seq: u64, timers: &mut DelayQueue<Timer>) {
        if let Some(f) = self.in_flight.remove(&seq) {
            timers.try_remove(&f.timer);
        }
        self.unsaved_confirms.insert(seq);
    }

    /// Stop sending: whatever is in flight stays pending (it will be
    /// replayed from the start of the queue) and no timer stays armed.
    pub(super) fn halt(&mut self, timers: &mut DelayQueue<Timer>) {
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
