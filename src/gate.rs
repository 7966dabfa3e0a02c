//! What may leave the process, given what is on disk.
//!
//! In `fsync` mode every store write that matters (an accepted message, a
//! confirmation's removal) takes a ticket and asks the flusher for an
//! fsync; the flusher answers with the highest ticket one fsync covered
//! (group commit: every request queued meanwhile shares it). The
//! [`Gate`] turns tickets back into promises kept:
//!
//! - an accepted message is relayed only once the fsync after its write
//!   is done (`durable_seq`);
//! - a receipt or marker is relayed back to the sender only once every
//!   removal made so far is on disk, so a sender that has seen a receipt
//!   never sees that message again, crash or not.
//!
//! Tickets are taken during a burst of router work but asked for only
//! when the burst's writes are committed to sled ([`Gate::submit`]):
//! an fsync that ran before the commit would not cover them.
//!
//! In `batched` mode sled flushes on its own timer: nothing is held.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_xmpp::Stanza;
use tracing::error;

use crate::store::QueueStore;

/// The flusher's answers.
#[derive(Debug)]
pub enum Flushed {
    /// Every write before this ticket's request is on disk.
    Durable(u64),
    /// An fsync failed (disk full, I/O error); nothing is released until
    /// one succeeds.
    Failed(String),
}

pub struct Gate {
    /// `None` in batched mode.
    requests: Option<mpsc::UnboundedSender<u64>>,
    last_ticket: u64,
    /// The highest ticket asked of the flusher.
    submitted: u64,
    done_ticket: u64,
    /// Accepted (ticket, seq, recipient) waiting for their fsync, in
    /// ticket order.
    seqs: VecDeque<(u64, u64, String)>,
    /// Stanzas waiting for their ticket, in ticket order.
    held: VecDeque<(u64, Stanza)>,
    /// Highest seq known to be on disk: nothing above it is relayed.
    durable_seq: u64,
    /// An fsync failed: nothing will become durable in this process.
    failed: bool,
}

impl Gate {
    /// Fsync mode: `recovered` is a seq above everything already on disk
    /// at open.
    pub fn fsync(requests: mpsc::UnboundedSender<u64>, recovered: u64) -> Gate {
        Gate {
            requests: Some(requests),
            last_ticket: 0,
            submitted: 0,
            done_ticket: 0,
            seqs: VecDeque::new(),
            held: VecDeque::new(),
            durable_seq: recovered,
            failed: false,
        }
    }

    /// Batched mode: everything counts as durable at once.
    pub fn batched() -> Gate {
        Gate {
            requests: None,
            last_ticket: 0,
            submitted: 0,
            done_ticket: 0,
            seqs: VecDeque::new(),
            held: VecDeque::new(),
            durable_seq: u64::MAX,
            failed: false,
        }
    }

    /// Every seq below `next` was written and committed by another
    /// process (an instance that led the shared store before this one
    /// took the lead): it counts as on disk.
    pub fn committed_elsewhere_below(&mut self, next: u64) {
        self.durable_seq = self.durable_seq.max(next);
    }

    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    fn request(&mut self) -> Option<u64> {
        self.requests.as_ref()?;
        self.last_ticket += 1;
        Some(self.last_ticket)
    }

    /// The writes behind every ticket so far are committed to sled: ask
    /// the flusher for one fsync covering them all.
    pub fn submit(&mut self) {
        if let Some(tx) = &self.requests
            && self.last_ticket > self.submitted
        {
            self.submitted = self.last_ticket;
            // If the flusher is gone the process is stopping; nothing is
            // released then, which is the safe side.
            let _ = tx.send(self.last_ticket);
        }
    }

    /// The writes behind every ticket so far were made durable by their
    /// commit: the last ticket, to release at once (none if nothing new
    /// waits), instead of asking the flusher.
    pub fn committed_durable(&mut self) -> Option<u64> {
        (self.requests.is_some() && self.last_ticket > self.submitted).then(|| {
            self.submitted = self.last_ticket;
            self.last_ticket
        })
    }

    /// A message for `recipient` was written under `seq`.
    pub fn accepted(&mut self, seq: u64, recipient: &str) {
        if let Some(t) = self.request() {
            self.seqs.push_back((t, seq, recipient.to_owned()));
        }
    }

    /// A write or an fsync failed, and the store will not recover in
    /// this process: the messages still waiting for an fsync are never
    /// relayed (returned as (seq, recipient) so their senders can be
    /// told), and the receipts held back are dropped (their number
    /// returned), as will be any later ones: the removals they confirm
    /// never reach disk, so those messages come back after the restart,
    /// and a sender must not have seen a receipt for them.
    pub fn abandon_waiting(&mut self) -> (Vec<(u64, String)>, usize) {
        self.failed = true;
        let seqs = self.seqs.drain(..).map(|(_, s, r)| (s, r)).collect();
        let dropped = self.held.len();
        self.held.clear();
        (seqs, dropped)
    }

    pub fn is_batched(&self) -> bool {
        self.requests.is_none()
    }

    /// Messages were removed (confirmed, purged or expired).
    pub fn removed(&mut self) {
        self.request();
    }

    /// Relay `stanza` once every write so far is on disk: now, if it
    /// already is; never, after a failure.
    pub fn after_writes(&mut self, stanza: Stanza) -> Option<Stanza> {
        if self.failed {
            return None;
        }
        if self.requests.is_none() || self.done_ticket >= self.last_ticket {
            return Some(stanza);
        }
        self.held.push_back((self.last_ticket, stanza));
        None
    }

    /// Whether stanzas wait for an fsync.
    pub fn holds_stanzas(&self) -> bool {
        !self.held.is_empty()
    }

    /// Every write so far was made durable (the last fsync at a stop):
    /// the stanzas held for it, now free to go.
    pub fn all_durable(&mut self) -> Vec<Stanza> {
        self.submitted = self.last_ticket;
        self.durable(self.last_ticket).0
    }

    /// The flusher reports `ticket` durable: the stanzas now free to go,
    /// and the messages that became durable, as (seq, recipient).
    pub fn durable(&mut self, ticket: u64) -> (Vec<Stanza>, Vec<(u64, String)>) {
        if ticket <= self.done_ticket {
            return (vec![], vec![]);
        }
        self.done_ticket = ticket;
        let mut messages = Vec::new();
        while self.seqs.front().is_some_and(|(t, _, _)| *t <= ticket) {
            if let Some((_, seq, recipient)) = self.seqs.pop_front() {
                self.durable_seq = self.durable_seq.max(seq);
                messages.push((seq, recipient));
            }
        }
        let mut out = Vec::new();
        while self.held.front().is_some_and(|(t, _)| *t <= ticket) {
            if let Some((_, s)) = self.held.pop_front() {
                out.push(s);
            }
        }
        (out, messages)
    }
}

/// The group-commit flusher: every request is answered by one fsync that
/// covers it and every request queued with it.
pub async fn run_flusher(
    store: Arc<dyn QueueStore>,
    mut requests: mpsc::UnboundedReceiver<u64>,
    done: mpsc::Sender<Flushed>,
) {
    while let Some(mut ticket) = requests.recv().await {
        while let Ok(t) = requests.try_recv() {
            ticket = ticket.max(t);
        }
        let mut told = false;
        loop {
            let s = store.clone();
            let failure = match tokio::task::spawn_blocking(move || s.flush()).await {
                Ok(Ok(_)) => break,
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            // Nothing is released until a flush succeeds.
            error!(error = %failure, "store flush failed; holding messages, retrying");
            if !told {
                told = true;
                if done.send(Flushed::Failed(failure)).await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if done.send(Flushed::Durable(ticket)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_xmpp::parsers::message::Message;

    fn stanza() -> Stanza {
        Message::new(None).into()
    }

    #[test]
    fn seqs_and_held_stanzas_wait_for_their_fsync() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut g = Gate::fsync(tx, 10);
        assert_eq!(g.durable_seq(), 10);
        // Nothing pending: a receipt goes at once.
        assert!(g.after_writes(stanza()).is_some());
        g.accepted(11, "b@x");
        g.accepted(12, "b@x");
        g.removed();
        assert!(
            g.after_writes(stanza()).is_none(),
            "held behind the removal"
        );
        assert!(rx.try_recv().is_err(), "nothing asked before the commit");
        g.submit();
        g.submit();
        let tickets: Vec<u64> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(tickets, [3], "one fsync asked for the whole burst");
        // One fsync covered the first accept only.
        let (out, moved) = g.durable(1);
        assert!(out.is_empty());
        assert_eq!(moved, [(11, "b@x".to_owned())]);
        assert_eq!(g.durable_seq(), 11);
        // A later one covers the rest, the removal included.
        let (out, moved) = g.durable(3);
        assert_eq!(out.len(), 1);
        assert_eq!(moved, [(12, "b@x".to_owned())]);
        assert_eq!(g.durable_seq(), 12);
        // Stale answers change nothing.
        assert_eq!(g.durable(2).0.len(), 0);
        assert!(g.after_writes(stanza()).is_some());
    }

    #[test]
    fn batched_holds_nothing() {
        let mut g = Gate::batched();
        g.accepted(5, "b@x");
        g.removed();
        assert!(g.after_writes(stanza()).is_some());
        assert_eq!(g.durable_seq(), u64::MAX);
    }
}
