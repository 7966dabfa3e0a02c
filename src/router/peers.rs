//! The router's delivery state of every recipient it knows something of:
//! a whole [`Peer`] for those it is busy with, only the name of those in
//! one of two states with nothing else to remember: known offline, or
//! probed and awaiting the answer.
//!
//! After a connect every recipient with a subscription is probed, and on
//! a large store most answer "unavailable", many after the probe pass has
//! ended. Kept as a `Peer` with a retry timer each, that cost about 400
//! bytes per recipient (the boxed state, its key, its slot in the map and
//! the timer's); parked, it costs the name and a slot, about 50
//! (docs/benchmarks.md, "Parked recipients").

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::time::DelayQueue;

use super::Timer;
use super::peer::{Peer, Phase};

pub(super) struct Peers {
    busy: HashMap<String, Box<Peer>>,
    /// Known offline and waiting for presence, nothing in flight, nothing
    /// scheduled, nothing counted: what [`Peer::parked`] reads as.
    offline: HashSet<Box<str>>,
    /// Probed after a connect, presence still unknown when the pass
    /// ended: in backoff until the pass's one retry
    /// ([`Peers::probe_retries`]), what [`Peer::awaiting`] reads as.
    awaiting: HashSet<Box<str>>,
    /// The states of parked recipients, handed out by `get` and copied
    /// into a whole `Peer` by `get_mut` and `entry`.
    parked: Peer,
    awaiting_state: Peer,
    /// When a recipient last left `awaiting` (its answer, mostly): the
    /// pass's retry waits while answers still come in.
    last_answer: Option<Instant>,
}

impl Peers {
    pub(super) fn new(initial_backoff: Duration) -> Peers {
        Peers {
            busy: HashMap::new(),
            offline: HashSet::new(),
            awaiting: HashSet::new(),
            parked: Peer::parked(initial_backoff),
            awaiting_state: Peer::awaiting(initial_backoff),
            last_answer: None,
        }
    }

    pub(super) fn get(&self, recipient: &str) -> Option<&Peer> {
        if let Some(p) = self.busy.get(recipient) {
            Some(p)
        } else if self.offline.contains(recipient) {
            Some(&self.parked)
        } else {
            self.awaiting
                .contains(recipient)
                .then_some(&self.awaiting_state)
        }
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
        self.busy.contains_key(recipient)
            || self.offline.contains(recipient)
            || self.awaiting.contains(recipient)
    }

    pub(super) fn remove(&mut self, recipient: &str) {
        self.busy.remove(recipient);
        self.offline.remove(recipient);
        self.awaiting.remove(recipient);
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
        match self.busy.get_mut(&recipient) {
            Some(p) if p.phase == Phase::Idle && p.timer.is_none() => {
                p.phase = Phase::Backoff;
                true
            }
            Some(_) => false,
            None if self.offline.contains(recipient.as_str()) => false,
            None => {
                self.awaiting.insert(recipient.into_boxed_str());
                true
            }
        }
    }

    /// How much longer the pass's retry waits: answers still coming in
    /// within `quiet` of each other are a backlog being read, not silence
    /// (on a large store the router reads them seconds after they were
    /// sent), and a retry now would send to recipients whose
    /// "unavailable" is already queued.
    pub(super) fn answers_still_coming(&self, quiet: Duration) -> Option<Duration> {
        let since = self.last_answer?.elapsed();
        (since < quiet && !self.awaiting.is_empty()).then(|| quiet - since)
    }

    /// The pass's retry is due: those still waiting for it, in backoff
    /// with no timer of their own, all whole `Peer`s now (they are about
    /// to be sent to).
    pub(super) fn probe_retries(&mut self) -> Vec<String> {
        self.last_answer = None;
        for name in std::mem::take(&mut self.awaiting) {
            let peer = Peer::awaiting(self.awaiting_state.backoff);
            self.busy.insert(name.into_string(), Box::new(peer));
        }
        self.busy
            .iter()
            .filter(|(_, p)| p.phase == Phase::Backoff && p.timer.is_none())
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// Keep only the name of `recipient` when its state says no more than
    /// "offline, waiting for presence": the client habits it holds are a
    /// cache of the store's, read again at first use.
    pub(super) fn park_if_quiet(&mut self, recipient: &str, initial_backoff: Duration) {
        let Some(p) = self.busy.get(recipient) else {
            return;
        };
        let quiet = p.phase == Phase::Offline
            && p.presence_known
            && p.resources.is_empty()
            && p.in_flight.is_empty()
            && p.cursor == 0
            && p.timer.is_none()
            && p.backoff == initial_backoff
            && p.attempts.is_empty()
            && p.unsaved_confirms.is_empty()
            && !p.forced
            && p.contact_timer.is_none();
        if !quiet {
            return;
        }
        self.set_initial_backoff(initial_backoff);
        if let Some((name, _)) = self.busy.remove_entry(recipient) {
            self.offline.insert(name.into_boxed_str());
        }
    }

    /// Parked ones come back with the backoff given last: the initial
    /// one, unless a reload changed it, and a fresh `Peer` would take the
    /// new one too.
    fn set_initial_backoff(&mut self, initial_backoff: Duration) {
        self.parked.backoff = initial_backoff;
        self.awaiting_state.backoff = initial_backoff;
    }

    fn unpark(&mut self, recipient: &str) {
        if let Some(name) = self.offline.take(recipient) {
            let peer = Peer::parked(self.parked.backoff);
            self.busy.insert(name.into_string(), Box::new(peer));
        } else if let Some(name) = self.awaiting.take(recipient) {
            self.last_answer = Some(Instant::now());
            let peer = Peer::awaiting(self.awaiting_state.backoff);
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
    /// stays in flight or scheduled. Returns the recipients held, all
    /// idle now (the parked ones too).
    pub(super) fn link_down(&mut self, timers: &mut DelayQueue<Timer>) -> Vec<String> {
        let parked = std::mem::take(&mut self.offline)
            .into_iter()
            .chain(std::mem::take(&mut self.awaiting));
        for name in parked {
            let peer = Peer::new(self.parked.backoff);
            self.busy.insert(name.into_string(), Box::new(peer));
        }
        for peer in self.busy.values_mut() {
            peer.halt(timers);
            peer.resources.clear();
            peer.presence_known = false;
            peer.phase = Phase::Idle;
        }
        self.busy.keys().cloned().collect()
    }
}
