//! Sending a recipient's queue in order within its window, and what a
//! failed send does.

use super::*;

impl Router {
    /// A message is new (or back) in `recipient`'s queue: send if we may.
    pub(super) async fn kick(&mut self, recipient: &str) {
        let initial = self.config.retry_initial();
        let peer = self.peers.entry(recipient, initial);
        match peer.phase {
            Phase::Sending => {
                self.pump(recipient).await;
            }
            Phase::Idle => {
                if peer.online() || !peer.presence_known {
                    peer.phase = Phase::Sending;
                    peer.cursor = 0;
                    self.pump(recipient).await;
                } else {
                    peer.phase = Phase::Offline;
                }
            }
            Phase::Grace | Phase::Offline | Phase::Backoff => {}
        }
        // Held for presence or the probe pass's retry: a name is enough.
        self.peers.park_if_quiet(recipient, initial);
    }

    /// Send pending messages in order while the window has room; how
    /// many went.
    pub(super) async fn pump(&mut self, recipient: &str) -> usize {
        self.pump_some(recipient, false).await
    }

    /// After confirmations: refill only once half the window is free, so
    /// that a backlog leaves in clumps (fewer, larger writes for the
    /// server to read) rather than one message per receipt.
    pub(super) async fn refill(&mut self, recipient: &str) -> usize {
        self.pump_some(recipient, true).await
    }

    pub(super) async fn pump_some(&mut self, recipient: &str, clump: bool) -> usize {
        let mut sent = 0;
        loop {
            let (n, too_big) = self.pump_round(recipient, clump).await;
            sent += n;
            if too_big.is_empty() {
                return sent;
            }
            for seq in too_big {
                // Boxed: telling the sender may pump another queue.
                Box::pin(self.forget_refused(
                    recipient,
                    seq,
                    ErrorType::Modify,
                    DefinedCondition::PolicyViolation,
                    "this message is too large to deliver under the server's stanza limit",
                ))
                .await;
            }
        }
    }

    /// One pass of [`Router::pump_some`]: how many went, and the messages
    /// that could not go because, written, they would pass the server's
    /// limit (for the caller to end).
    async fn pump_round(&mut self, recipient: &str, clump: bool) -> (usize, Vec<u64>) {
        let mut too_big = Vec::new();
        if self.epoch.is_none() {
            return (0, too_big);
        }
        let Some(peer) = self.peers.get(recipient) else {
            return (0, too_big);
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
            return (0, too_big);
        }
        let room = window - peer.in_flight.len();
        let batch = match self.store.pending_from(recipient, peer.cursor, room) {
            Ok(b) => b,
            Err(e) => {
                // On PostgreSQL the read carries the burst's batched
                // writes: its error may be theirs.
                error!(error = %e, to = recipient, "cannot read queue");
                self.store_failure("read queue", &e);
                return (0, too_big);
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
            if held.contains(sender) {
                continue;
            }
            if let Some(left) = self.held_for_contact(recipient, sender) {
                held.insert(sender.to_owned());
                soonest = Some(soonest.map_or(left, |s| s.min(left)));
            } else if handoff::is_handed_off(&rec.stanza, self.me.as_str())
                && self.replay_namespace(sender).is_none()
            {
                // Replayed as its sender only with the server's message
                // permission, which this connection has not (yet) given.
                debug!(
                    to = recipient,
                    from = sender,
                    "hand-off waits for the message permission"
                );
                held.insert(sender.to_owned());
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
                let first = *attempts == 1;
                let delayed = !(first && self.at_once.contains(seq));
                to_send.push((seq, rec, delayed, first));
            }
        }
        let mut sent = 0;
        for (seq, rec, delayed, first) in to_send {
            let needs = if self.burst_accepted.iter().any(|(s, _)| *s == seq) {
                Needs::Accept
            } else {
                Needs::Nothing
            };
            let fresh = self.fresh.take(seq);
            match self.outgoing(seq, &rec, delayed, fresh) {
                Some(mut m) => {
                    if let Some(full) = target
                        .as_ref()
                        .and_then(|r| Jid::from_str(&format!("{recipient}/{r}")).ok())
                    {
                        m.to = Some(full);
                    }
                    let as_sender = m
                        .from
                        .as_ref()
                        .filter(|_| handoff::goes_as_sender(&m, &self.me))
                        .and_then(|f| self.handoff.namespace_for(f.domain().as_str()));
                    let envelope = if let Some(ns) = as_sender {
                        m = self.handoff.envelope(recipient, ns, m);
                        handoff::ENVELOPE_OVERHEAD
                    } else {
                        0
                    };
                    if sizes::may_pass_limit(rec.stanza.len() + envelope, &rec.id, self.me.as_str())
                        && sizes::written_len(&m) > SERVER_STANZA_LIMIT
                    {
                        // Stored by a version that checked less, or
                        // imported: written, it would drop the link at
                        // every reconnect. It ends, its sender told.
                        error!(
                            to = recipient,
                            seq,
                            bytes = rec.stanza.len(),
                            "stored message too large to send under the server's limit; refused"
                        );
                        too_big.push(seq);
                        continue;
                    }
                    sent += 1;
                    if envelope > 0 {
                        self.stats.handoff_replayed();
                    }
                    let waited_ms = now_ms().saturating_sub(rec.accepted_at_ms);
                    if needs == Needs::Accept {
                        // Leaves only if the burst commits.
                        self.burst_relays.push((first, waited_ms));
                    } else {
                        self.stats.sent(first, waited_ms);
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
        (sent, too_big)
    }

    /// Rebuild the stanza for the wire from its record.
    /// `delayed`: it did not go at once ([`AtOnce`]), so it carries its
    /// accept time. `fresh`: the same message as accepted, if still at
    /// hand.
    pub(super) fn outgoing(
        &self,
        seq: u64,
        rec: &Record,
        delayed: bool,
        fresh: Option<Message>,
    ) -> Option<Message> {
        let mut m = match fresh {
            Some(m) => m,
            None => Message::try_from(Element::from_str(&rec.stanza).ok()?).ok()?,
        };
        // A hand-off goes as its sender (bare, as servers require), with
        // the one delay it was stored with.
        let handed_off = handoff::goes_as_sender(&m, &self.me);
        // From the relay address's full JID (stored stanzas name the bare
        // one): some clients answer receipts to a full JID only.
        if let Some(from) = &m.from
            && !handed_off
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
        if delayed && !handed_off {
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

    /// The privilege namespace to replay a hand-off from `sender` (a bare
    /// JID) in, if its server granted the message permission.
    fn replay_namespace(&self, sender: &str) -> Option<&'static str> {
        let domain = sender.rsplit_once('@').map_or(sender, |(_, d)| d);
        self.handoff.namespace_for(domain)
    }

    /// A send failed. After a bounce the server certainly kept nothing,
    /// so with presence unknown we retry with backoff. After a silent
    /// receipt timeout the server may hold a copy (offline storage, a
    /// frozen client): resending would only duplicate it, so we wait for
    /// presence or any stanza from the recipient.
    pub(super) async fn fail(&mut self, recipient: &str, bounced: bool) {
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
    pub(super) async fn seen_alive(&mut self, recipient: &str) {
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
}
