//! The router's delivery state of every recipient it knows something of:
//! a whole [`Peer`] for those it is busy with, only the name of those in
//! a state with nothing else to remember ([`Parked`]: known offline,
//! probed and awaiting the answer, or idle after the link went down).
//!
//! After a connect every recipient with a subscription is probed, and on
//! a large store most answer "unavailable", many after the probe pass has
//! ended. Kept as a `Peer` with a retry timer each, that cost about 400
//! bytes per recipient (the boxed state, its key, its slot in the map and
//! the timer's); parked, it costs the name and a slot, about 60
//! (docs/benchmarks.md, "Parked recipients").
//!
//! It also runs the probe pass's one retry: who waits for it, whether
//! answers are still being read, and who is due.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::time::DelayQueue;

use super::Timer;
use super::peer::{Parked, Peer, Phase};

pub(super) struct Peers {
    busy: HashMap<String, Box<Peer>>,
    parked: HashMap<Box<str>, Parked>,
    /// What a parked recipient's state reads as, by kind (see
    /// [`Peer::parked`]), handed out by `get`.
    idle: Peer,
    offline: Peer,
    awaiting: Peer,
    /// When a presence from a recipient the relay asked was last read:
    /// the probe pass's retry waits while answers still come in.
    last_answer: Option<Instant>,
    /// When the retry was first due: it waits for answers that long at
    /// most.
    first_due: Option<Instant>,
    /// The retry under way: recipients not sent to yet.
    retry_due: Vec<String>,
}

impl Peers {
    pub(super) fn new(initial_backoff: Duration) -> Peers {
        Peers {
            busy: HashMap::new(),
            parked: HashMap::new(),
            idle: Peer::parked(Parked::Idle, initial_backoff),
            offline: Peer::parked(Parked::Offline, initial_backoff),
            awaiting: Peer::parked(Parked::Awaiting, initial_backoff),
            last_answer: None,
            first_due: None,
            retry_due: Vec::new(),
        }
    }

    pub(super) fn get(&self, recipient: &str) -> Option<&Peer> {
        if let Some(p) = self.busy.get(recipient) {
            return Some(p);
        }
        self.parked.get(recipient).map(|kind| self.template(*kind))
    }

    /// A parked recipient becomes a whole `Peer` again.
    pub(super) fn get_mut(&mut self, recipient: &str) -> Option<&mut Peer> {
        self.unpark(recipient);
        self.busy.get_mut(recipient).map(|p| &mut **p)
    }

    /// The state of `recipient`, created on first use.
    pub(super) fn entry(&mut self, recipient: &str, initial_backoff: Duration) -> &mut Peer {
        self.unpark(recipient);
        self.busy
            .entry(recipient.to_owned())
            .or_insert_with(|| Box::new(Peer::new(initial_backoff)))
    }

    pub(super) fn contains(&self, recipient: &str) -> bool {
        self.busy.contains_key(recipient) || self.parked.contains_key(recipient)
    }

    pub(super) fn remove(&mut self, recipient: &str) {
        self.busy.remove(recipient);
        self.parked.remove(recipient);
    }

    /// Keep only the name of `recipient` when its state is one a name
    /// says ([`Peer::parks_as`]).
    pub(super) fn park_if_quiet(&mut self, recipient: &str, initial_backoff: Duration) {
        let Some(kind) = self
            .busy
            .get(recipient)
            .and_then(|p| p.parks_as(initial_backoff))
        else {
            return;
        };
        self.set_initial_backoff(initial_backoff);
        if let Some((name, _)) = self.busy.remove_entry(recipient) {
            self.parked.insert(name.into_boxed_str(), kind);
        }
    }

    /// The probe pass ended and `recipient`'s presence is still unknown:
    /// it waits in backoff for the pass's one retry, unless something is
    /// known of it already or it has a timer of its own. Whether it waits.
    pub(super) fn await_probe_answer(
        &mut self,
        recipient: String,
        initial_backoff: Duration,
    ) -> bool {
        self.set_initial_backoff(initial_backoff);
        if let Some(p) = self.busy.get_mut(&recipient) {
            if p.phase == Phase::Idle && p.timer.is_none() {
                p.phase = Phase::Backoff;
                return true;
            }
            return false;
        }
        match self.parked.get_mut(recipient.as_str()) {
            Some(kind @ Parked::Idle) => {
                *kind = Parked::Awaiting;
                true
            }
            Some(Parked::Awaiting) => true,
            Some(Parked::Offline) => false,
            None => {
                self.parked
                    .insert(recipient.into_boxed_str(), Parked::Awaiting);
                true
            }
        }
    }

    /// A presence from a recipient the relay asked, read now: probes go
    /// to every subscribed recipient, those with nothing pending too, and
    /// their answers come in probe order, so any of them read shows that
    /// answers are still being read.
    pub(super) fn heard(&mut self) {
        self.last_answer = Some(Instant::now());
    }

    /// How much longer the pass's retry, due now, waits: answers still
    /// read within `quiet` of each other are a backlog, not silence (on a
    /// large store the router reads them seconds after they were sent),
    /// and a retry now would send to recipients whose "unavailable" is
    /// already queued. At most `most` past the first time it was due,
    /// so that answers trickling in for long do not hold it back.
    pub(super) fn retry_wait(&mut self, quiet: Duration, most: Duration) -> Option<Duration> {
        let first_due = *self.first_due.get_or_insert_with(Instant::now);
        let since = self.last_answer?.elapsed();
        let left = most
            .checked_sub(first_due.elapsed())
            .filter(|left| !left.is_zero())?;
        (since < quiet).then(|| (quiet - since).min(left))
    }

    /// The pass's retry starts: every recipient waiting for it is due.
    pub(super) fn start_retries(&mut self) {
        self.last_answer = None;
        self.first_due = None;
        let parked = self
            .parked
            .iter()
            .filter(|(_, kind)| **kind == Parked::Awaiting)
            .map(|(name, _)| name.to_string());
        let busy = self
            .busy
            .iter()
            .filter(|(_, p)| p.awaits_probe_retry())
            .map(|(r, _)| r.clone());
        self.retry_due = parked.chain(busy).collect();
    }

    /// Whether the pass's retry has recipients left to send to.
    pub(super) fn retrying(&self) -> bool {
        !self.retry_due.is_empty()
    }

    /// The next `n` recipients the retry sends to.
    pub(super) fn next_retries(&mut self, n: usize) -> Vec<String> {
        let keep = self.retry_due.len().saturating_sub(n);
        self.retry_due.split_off(keep)
    }

    /// Parked ones come back with the backoff given last: the initial
    /// one, unless a reload changed it, and a fresh `Peer` would take the
    /// new one too.
    fn set_initial_backoff(&mut self, initial_backoff: Duration) {
        self.idle.backoff = initial_backoff;
        self.offline.backoff = initial_backoff;
        self.awaiting.backoff = initial_backoff;
    }

    fn template(&self, kind: Parked) -> &Peer {
        match kind {
            Parked::Idle => &self.idle,
            Parked::Offline => &self.offline,
            Parked::Awaiting => &self.awaiting,
        }
    }

    fn unpark(&mut self, recipient: &str) {
        if let Some((name, kind)) = self.parked.remove_entry(recipient) {
            let peer = Peer::parked(kind, self.template(kind).backoff);
            self.busy.insert(name.into_string(), Box::new(peer));
        }
    }

    /// Message `seq` left `recipient`'s queue (see [`Peer::removed`]); a
    /// parked recipient has nothing of it and stays parked.
    pub(super) fn removed(&mut self, recipient: &str, seq: u64, timers: &mut DelayQueue<Timer>) {
        if let Some(p) = self.busy.get_mut(recipient) {
            p.removed(seq, timers);
        }
    }

    /// Messages on the wire, over every recipient.
    pub(super) fn in_flight(&self) -> usize {
        self.busy.values().map(|p| p.in_flight.len()).sum()
    }

    /// Recipients with an available resource known from presence.
    pub(super) fn online(&self) -> usize {
        self.busy
            .values()
            .filter(|p| p.presence_known && !p.resources.is_empty())
            .count()
    }

    /// Recipients sending with nothing on the wire: a queue that waits
    /// for something at its head.
    pub(super) fn sending_and_stalled(&self) -> Vec<String> {
        self.busy
            .iter()
            .filter(|(_, p)| p.phase == Phase::Sending && p.in_flight.is_empty())
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// The link went down: presence is unknown again everywhere, nothing
    /// stays in flight or scheduled, no retry is under way. Returns every
    /// recipient held, all idle now, parked where nothing else is left.
    pub(super) fn link_down(
        &mut self,
        timers: &mut DelayQueue<Timer>,
        initial_backoff: Duration,
    ) -> Vec<String> {
        self.retry_due = Vec::new();
        self.last_answer = None;
        self.first_due = None;
        for kind in self.parked.values_mut() {
            *kind = Parked::Idle;
        }
        for peer in self.busy.values_mut() {
            peer.halt(timers);
            peer.resources.clear();
            peer.presence_known = false;
            peer.phase = Phase::Idle;
        }
        let held: Vec<String> = self.busy.keys().cloned().collect();
        for name in &held {
            self.park_if_quiet(name, initial_backoff);
        }
        // Busy and parked are disjoint: each name once.
        self.busy
            .keys()
            .cloned()
            .chain(self.parked.keys().map(|n| n.to_string()))
            .collect()
    }
}
