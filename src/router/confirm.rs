//! Receipts and markers: what they confirm, and removing confirmed messages.

use super::*;

impl Router {
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
    pub(super) async fn handle_confirmations(
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
                Ok(None) => {
                    // Names nothing the relay stored: passed on only for a
                    // message it relayed once (a call's "ringing"); any
                    // other id costs the sender up to five times its
                    // length once written, for nothing.
                    let key = (from_key.to_owned(), sender.clone(), id);
                    if self.once_sent.get(&key).is_none() {
                        edits.push((i, None));
                    }
                    continue;
                }
                Err(e) => {
                    // It may confirm a message of ours: relayed only if
                    // the burst commits (it will not: the store failed),
                    // so that no sender sees a receipt for a message
                    // that stays stored and comes again.
                    self.store_failure("id index lookup", &e);
                    matched = true;
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
                        self.store_failure("marker scan", &e);
                        continue;
                    }
                }
            } else {
                if marker {
                    edits.push((i, Some(Element::from(Received { id: id.clone() }))));
                }
                vec![seq]
            };
            let how = if marker {
                Confirmation::Marker
            } else {
                Confirmation::Receipt
            };
            self.confirm(from_key, &seqs, how).await;
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
    pub(super) fn unsent(&self, recipient: &str, seq: u64) -> bool {
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
    pub(super) async fn confirm(&mut self, recipient: &str, seqs: &[u64], how: Confirmation) {
        let assumed = how == Confirmation::NoReceipt;
        let outcome = if assumed {
            self.store
                .assume(recipient, seqs, now_ms())
                .map(|pending| Confirmed {
                    pending,
                    counted: Vec::new(),
                })
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
            for (seq, _) in removed.all() {
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
        // Each message counts once, when it leaves the queue: those
        // counted delivered earlier (`counted`) were counted then.
        let now = now_ms();
        self.stats.confirmed(
            how,
            removed
                .pending
                .iter()
                .map(|(_, rec)| now.saturating_sub(rec.accepted_at_ms)),
        );
        if assumed {
            let keep_s = self.config.late_bounce_window().as_secs();
            for (seq, rec) in removed.pending {
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
            for (seq, rec) in removed.pending {
                info!(to = recipient, id = %rec.id, seq, "confirmed");
            }
            for (seq, rec) in removed.counted {
                info!(
                    to = recipient,
                    id = %rec.id,
                    seq,
                    "confirmed; it had been counted delivered without a receipt"
                );
            }
        }
        self.refill(recipient).await;
        self.forget_if_idle(recipient);
    }
}
