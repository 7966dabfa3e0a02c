//! Messages arriving from senders: checks, limits, and acceptance into the
//! store (or relaying once).

use super::*;

impl Router {
    pub(super) async fn on_message(&mut self, mut m: Message) {
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
            if self.on_replay_error(&m, &from, error.clone()).await {
                return;
            }
            self.on_bounce(&from, &to, m.id.as_ref().map(|i| i.0.as_str()), error)
                .await;
            return;
        }
        if from.node().is_none() && handoff::is_confirmation_copy(&m) {
            let book = &self.book;
            match handoff::read_confirmation(&m, &|d| book.serves(d)) {
                Some(receipt) => self.on_confirmation_copy(receipt).await,
                None => {
                    debug!(server = %from, "confirmation copy not from a served domain; ignored")
                }
            }
            return;
        }
        if let Some(g) = privilege::announced(&m) {
            if self.book.serves(from.domain().as_str()) {
                self.handoff.granted(from.domain().as_str(), g.message);
                if g.message.is_some() {
                    self.resume_held_handoffs().await;
                }
            }
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
            self.grants = g;
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
        self.heard_from(&from).await;
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

    /// Name to the store the messages of a round it is about to accept
    /// (see [`QueueStore::look_ahead`]), as far as their addresses tell
    /// before they are handled: a hint, so a message named wrongly or not
    /// at all only costs the store a read of its own.
    pub(super) fn look_ahead(&mut self, batch: &[LinkEvent]) {
        if self.store_failed || !self.leading {
            return;
        }
        let mut named: Vec<(String, String, String, Option<String>)> = Vec::new();
        for ev in batch {
            let LinkEvent::Stanza(st, _) = ev else {
                continue;
            };
            let Stanza::Message(m) = &**st else { continue };
            let (Some(from), Some(to), Some(id)) = (&m.from, &m.to, &m.id) else {
                continue;
            };
            if matches!(m.type_, MessageType::Error | MessageType::Groupchat)
                || id.0.is_empty()
                || to.domain().as_str() != self.book.component().as_str()
                || message_kind::kind(m) == Kind::Once
            {
                continue;
            }
            let Ok(target) = self.book.user_for(to.node().map(|n| n.as_str())) else {
                continue;
            };
            named.push((
                target.to_string(),
                from.to_bare().to_string(),
                id.0.clone(),
                message_kind::origin_id(m),
            ));
        }
        if named.is_empty() {
            return;
        }
        let keys: Vec<AcceptKey<'_>> = named
            .iter()
            .map(|(recipient, sender_bare, id, origin)| AcceptKey {
                recipient,
                sender_bare,
                id,
                origin_id: origin.as_deref(),
            })
            .collect();
        if let Err(e) = self.store.look_ahead(&keys) {
            self.store_failure("look-ahead", &e);
        }
    }

    /// Anything from a recipient shows it is reachable again, and the
    /// resource it came from is not silent.
    pub(super) async fn heard_from(&mut self, from: &Jid) {
        let key = from.to_bare().to_string();
        if let Some(r) = from.resource()
            && let Some(peer) = self.peers.get_mut(&key)
            && let Some(res) = peer.resources.get_mut(r.as_str())
        {
            res.silent = false;
        }
        self.seen_alive(&key).await;
    }

    /// Why a message from `sender` is refused, if it is: `too_large`
    /// (over `max_stanza_bytes`), or over the sender's rate (which this
    /// counts). The condition is `policy-violation` either way.
    pub(super) fn over_size_or_rate(
        &mut self,
        too_large: bool,
        sender: &BareJid,
    ) -> Option<(ErrorType, &'static str)> {
        if too_large {
            return Some((ErrorType::Modify, "message too large for the relay"));
        }
        let now = tokio::time::Instant::now().into_std();
        (!self.rate.allow(sender.as_str(), now))
            .then_some((ErrorType::Wait, "too many messages; slow down"))
    }

    pub(super) fn queue_limits(&self) -> QueueLimits {
        let l = &self.config.limits;
        QueueLimits {
            max_pending: l.max_pending_per_recipient,
            max_bytes: l.max_bytes_per_recipient,
            max_store_bytes: l.max_store_bytes,
        }
    }

    /// The store cannot take it (write failure, full disk).
    pub(super) async fn refuse_unstorable(&mut self, m: &Message) {
        self.refuse_message(
            m,
            ErrorType::Wait,
            DefinedCondition::ResourceConstraint,
            "the relay cannot store messages right now",
        )
        .await;
    }

    pub(super) async fn refuse_message(
        &mut self,
        m: &Message,
        t: ErrorType,
        c: DefinedCondition,
        text: &str,
    ) {
        self.stats.refused(&c);
        info!(from = ?m.from, to = ?m.to, id = ?m.id, condition = ?c, "refused message");
        let Some(from) = m.from.clone() else { return };
        let mut reply = Message::error(Some(from)).with_payload(stanza_error(t, c, text));
        reply.from = m.to.clone();
        // An id past the cap is not written back (it may be most of the
        // server's limit once escaped); the refusal says why.
        reply.id = m.id.clone().filter(|i| i.0.len() <= sizes::MAX_ID_BYTES);
        self.send(reply).await;
    }

    pub(super) async fn accept(
        &mut self,
        mut m: Message,
        from: &Jid,
        from_bare: &BareJid,
        target: &BareJid,
    ) {
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
        if let Some(why) = overlong_id(&m) {
            self.refuse_message(
                &m,
                ErrorType::Modify,
                DefinedCondition::PolicyViolation,
                &why,
            )
            .await;
            return;
        }
        let original = m.clone();
        let id = match &m.id {
            Some(id) if !id.0.is_empty() => id.0.clone(),
            _ => random_id(),
        };
        let origin_id = crate::message_kind::origin_id(&m);
        m.id = Some(Id(id.clone()));
        m.from = Some(Jid::from(relay_from));
        m.to = Some(Jid::from(target.clone()));
        // Ours is added at send time.
        m.payloads.retain(|p| !p.is("request", ns::RECEIPTS));
        self.strip_claims_in_our_name(&mut m);
        let content_hash = content_of(&m);
        let xml = String::from(&Element::from(m.clone()));
        let size = xml.len();
        // Checked as it will be sent, with what sending adds.
        let sent_size = size + sizes::send_overhead(self.me.as_str(), &id, origin_id.is_some());
        let too_large = sent_size > self.config.limits.max_stanza_bytes;
        if let Some((t, text)) = self.over_size_or_rate(too_large, from_bare) {
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
                self.stats.accepted();
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
    pub(super) async fn on_stored(
        &mut self,
        seq: u64,
        recipient: &str,
        target: &BareJid,
        m: Message,
        size: usize,
    ) {
        self.burst_accepted.push((seq, recipient.to_owned()));
        self.at_once.mark(seq);
        if self.handling_taken {
            self.taken_seqs.insert(seq);
        }
        self.fresh.put(seq, m, size);
        self.gate.accepted(seq, recipient);
        self.ensure_subscribed(recipient, target).await;
        self.kick(recipient).await;
    }

    /// Relay a message that goes once ([`message_kind::kind`]): nothing
    /// to store, no receipt to request.
    ///
    /// Receipts, markers and hints alone are not held to the sender's
    /// rate (they confirm what the relay sent); anything else counts
    /// against it like a message. Everything is held to the size limit,
    /// as it will be written. `confirmed`: it confirmed stored messages,
    /// so it tells the sender they are done with and leaves only once
    /// their removal is on disk (fsync mode; never after a store failure).
    pub(super) async fn relay_once(
        &mut self,
        mut m: Message,
        from: &Jid,
        from_bare: &BareJid,
        target: &BareJid,
        confirmed: bool,
    ) {
        let bookkeeping = message_kind::only_bookkeeping(&m);
        let Ok(relay_from) = self.book.relay_full(from_bare) else {
            return;
        };
        // What a refusal answers: the stanza as it came.
        let mut came = Message::new(Some(m.to.clone().unwrap_or_else(|| relay_from.clone())));
        came.from = Some(from.clone());
        came.id = m.id.clone();
        m.from = Some(relay_from);
        m.to = Some(Jid::from(target.clone()));
        self.strip_claims_in_our_name(&mut m);
        let too_large = sizes::written_over(&m, self.config.limits.max_stanza_bytes);
        let refusal = match overlong_id(&m) {
            Some(why) => Some((ErrorType::Modify, why)),
            None if bookkeeping => too_large.then(|| {
                (
                    ErrorType::Modify,
                    "message too large for the relay".to_owned(),
                )
            }),
            None => self
                .over_size_or_rate(too_large, from_bare)
                .map(|(t, text)| (t, text.to_owned())),
        };
        if let Some((t, text)) = refusal {
            if bookkeeping {
                // What it confirmed stays confirmed; only the copy to the
                // sender is not written.
                warn!(from = %from, "receipts or markers too large to pass on; not relayed");
            }
            self.refuse_message(&came, t, DefinedCondition::PolicyViolation, &text)
                .await;
            return;
        }
        if !bookkeeping && let Some(id) = &m.id {
            self.once_sent.put(
                (target.to_string(), from_bare.to_string(), id.0.clone()),
                from.clone(),
            );
        }
        if !confirmed {
            self.send(m).await;
        } else if let Some(m) = self.gate.after_writes(m.into()) {
            self.send_after(m, Needs::Removals).await;
        }
    }

    /// Never relay a claim made in our name (a delay or a stanza-id of
    /// ours is added at send time, by us only).
    pub(super) fn strip_claims_in_our_name(&self, m: &mut Message) {
        let me = self.me.to_string();
        m.payloads.retain(|p| {
            !(p.is("delay", ns::DELAY) && p.attr("from") == Some(me.as_str())
                || p.is("stanza-id", ns::SID) && p.attr("by") == Some(me.as_str()))
        });
    }
}

/// Why `m` is refused for an id past [`sizes::MAX_ID_BYTES`], if it is:
/// its id or its XEP-0359 origin-id.
pub(super) fn overlong_id(m: &Message) -> Option<String> {
    let long_id =
        m.id.as_ref()
            .is_some_and(|i| i.0.len() > sizes::MAX_ID_BYTES);
    let long_origin = m
        .payloads
        .iter()
        .filter(|p| p.is("origin-id", ns::SID))
        .any(|p| p.attr("id").is_some_and(|i| i.len() > sizes::MAX_ID_BYTES));
    let what = if long_id {
        "message id"
    } else if long_origin {
        "origin-id"
    } else {
        return None;
    };
    Some(format!(
        "the {what} is longer than {} bytes",
        sizes::MAX_ID_BYTES
    ))
}
