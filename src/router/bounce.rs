//! Error bounces: for a message in flight, for one counted delivered (a
//! late bounce), for one relayed once; final refusals.

use super::*;

impl Router {
    pub(super) async fn on_bounce(
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
            self.stats.bounced();
            info!(to = %recipient, id, "bounced; recipient marked offline");
            self.fail(&recipient, true).await;
        }
    }

    /// A bounce of a message counted delivered without a receipt (the
    /// server kept it in a stream-management session that then timed
    /// out): it goes back in its queue, at its place, and is sent again
    /// once the recipient is back. Whether the bounce was one.
    pub(super) async fn late_bounce(
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
        let rec = match self.store.restore(recipient, seq) {
            Ok(Some(rec)) => rec,
            Ok(None) => return false,
            Err(e) => {
                self.store_failure("restore", &e);
                return true;
            }
        };
        self.stats.late_bounce();
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
            self.tell_unstored(recipient, seq, durability::Answered::Yes)
                .await;
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
        let peer = self.peers.entry(recipient, initial);
        // It was sent before (its entry may have gone meanwhile): the next
        // send is a replay.
        peer.attempts.entry(seq).or_insert(1);
        match peer.phase {
            Phase::Sending => {
                peer.cursor = peer.cursor.min(seq);
                self.pump(recipient).await;
            }
            Phase::Idle => self.kick(recipient).await,
            Phase::Grace | Phase::Offline | Phase::Backoff => {}
        }
        true
    }

    /// A bounce of a message relayed once goes back to its sender (from
    /// the recipient's relay address, with the same id and error).
    pub(super) async fn bounce_once(
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
        let mut m = Message::error(Some(to)).with_payload(sizes::bounded_error(&error));
        m.from = Some(from);
        m.id = Some(Id(id.to_owned()));
        self.send(m).await;
    }

    /// The recipient's side refused message `seq` in a way that retrying
    /// cannot change: end it, tell its sender with the same condition,
    /// and go on with the queue.
    pub(super) async fn reject(&mut self, recipient: &str, seq: u64, error: &StanzaError) {
        let error = sizes::bounded_error(error);
        // Bounded: the text comes from the other side.
        let said = error
            .texts
            .values()
            .next()
            .map(|t| format!(": {}", t.chars().take(200).collect::<String>()))
            .unwrap_or_default();
        let text = format!("the recipient's server refused this message{said}");
        if self
            .forget_refused(recipient, seq, error.type_, error.defined_condition, &text)
            .await
        {
            self.stats.rejected();
        }
        self.pump(recipient).await;
    }

    /// Message `seq` can never be delivered: remove it and tell its
    /// sender with `condition` and `text`; whether it was there. The
    /// caller goes on with the queue.
    pub(super) async fn forget_refused(
        &mut self,
        recipient: &str,
        seq: u64,
        type_: ErrorType,
        condition: DefinedCondition,
        text: &str,
    ) -> bool {
        let removed = match self.store.forget(recipient, seq) {
            Ok(r) => r.map(|rec| (seq, rec)),
            Err(e) => {
                self.store_failure("reject", &e);
                self.fail(recipient, true).await;
                return false;
            }
        };
        self.gate.removed();
        self.peers.removed(recipient, seq, &mut self.timers);
        let found = removed.is_some();
        if let Some((seq, rec)) = removed {
            warn!(
                to = recipient,
                id = %rec.id,
                seq,
                ?condition,
                text,
                "cannot be delivered; dropped, sender told"
            );
            self.notify_sender(recipient, &rec, type_, condition, text)
                .await;
        }
        found
    }
}
