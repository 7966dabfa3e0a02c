//! What is on disk decides what may leave: durable tickets, store failures
//! and the senders they concern.

use super::*;

impl Router {
    /// Messages of a burst whose commit failed (batched mode): never sent
    /// by this process, and their senders told.
    pub(super) async fn abandon_unstored(&mut self, accepted: Vec<(u64, String)>) {
        for (seq, recipient) in accepted {
            if let Some(peer) = self.peers.get_mut(&recipient) {
                peer.never_again(seq, &mut self.timers);
            }
            self.tell_unstored(&recipient, seq, Answered::No).await;
        }
    }

    /// Tell the sender of message `seq` that it was not stored. A
    /// hand-off whose answer was withheld (`Answered::No`) is the
    /// server's still: nobody is told.
    pub(super) async fn tell_unstored(&mut self, recipient: &str, seq: u64, answered: Answered) {
        if self.taken_seqs.contains(&seq) {
            // Its stanza stays handed over: the next leader accepts it.
            warn!(to = %recipient, seq, "not stored; it stays handed over for the next leader");
            return;
        }
        match self.store.get(recipient, seq) {
            Ok(Some(rec))
                if answered == Answered::No
                    && handoff::is_handed_off(&rec.stanza, self.me.as_str()) =>
            {
                // Its hand-off was never answered: the server keeps its
                // copy and delivers it, or hands it off again.
                warn!(to = %recipient, id = %rec.id, seq, "hand-off not stored durably; left with the server");
            }
            Ok(Some(rec)) => {
                warn!(to = %recipient, id = %rec.id, seq, "not stored durably; sender told");
                // Counted accepted before its commit failed.
                self.stats.refused(&DefinedCondition::ResourceConstraint);
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

    pub(super) async fn on_durable(&mut self, ticket: u64) {
        let (released, durable) = self.gate.durable(ticket);
        if !durable.is_empty() {
            debug!(upto_seq = self.gate.durable_seq(), "messages on disk");
        }
        for stanza in released {
            self.send(stanza).await;
        }
        // Only a recipient with a message that just became durable can
        // have been held back by the gate; sent now, such a message
        // still goes at once.
        let mut recipients = Vec::with_capacity(durable.len());
        for (seq, recipient) in durable {
            self.at_once.mark(seq);
            recipients.push(recipient);
        }
        recipients.sort_unstable();
        recipients.dedup();
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

    pub(super) fn store_failure(&mut self, what: &'static str, e: &dyn std::fmt::Display) {
        self.stats.store_failed(what);
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
    pub(super) async fn abandon_undurable(&mut self) {
        let (waiting, dropped) = self.gate.abandon_waiting();
        if dropped > 0 {
            warn!(
                receipts = dropped,
                "receipts not relayed: the removals they confirm never reached disk"
            );
        }
        for (seq, recipient) in waiting {
            self.tell_unstored(&recipient, seq, Answered::No).await;
        }
    }

    /// Stop, in fsync mode: the stanzas that wait for an fsync (receipts
    /// for removals made) leave after one last fsync, so that a clean
    /// stop keeps no receipt from its sender. Messages waiting for theirs
    /// stay stored: the next start sends them.
    pub(super) async fn release_at_stop(&mut self) {
        if self.store_failed || !self.gate.holds_stanzas() {
            return;
        }
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.flush()).await {
            Ok(Ok(_)) => {
                self.store.begin();
                for stanza in self.gate.all_durable() {
                    self.send(stanza).await;
                }
                self.end_burst().await;
            }
            Ok(Err(e)) => error!(error = %e, "fsync at stop failed; held receipts not relayed"),
            Err(e) => error!(error = %e, "fsync at stop panicked; held receipts not relayed"),
        }
    }

    /// Stop: make the store durable. Blocking work runs off the runtime.
    pub async fn flush_store(store: Arc<dyn QueueStore>) {
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

/// Whether the store's answer for a message went out: a relayed message
/// was relayed, a hand-off answered `result` (then the server dropped its
/// copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answered {
    Yes,
    No,
}
