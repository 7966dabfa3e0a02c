//! Transparent mode's side of the router (docs/transparent.md): hand-offs
//! from a server module taken into the store and answered once durable,
//! confirmation copies, and the refusals of a replay. What it keeps
//! between stanzas is [`Handoff`]'s; replays leave through `delivery`.

use super::*;

impl Router {
    /// A hand-off iq from `server`: answered `result` once the message is
    /// durable (or was held already), with an error otherwise, so that
    /// the server keeps its copy.
    pub(super) async fn on_handoff(
        &mut self,
        server: Jid,
        to: Option<Jid>,
        id: String,
        payload: Element,
    ) {
        if id.len() > sizes::MAX_ID_BYTES {
            // Not taken either: taken and unanswered, it would stay with
            // the server too.
            warn!(%server, "hand-off with an iq id over the cap neither taken nor answered");
            return;
        }
        match self.take_handoff(&server, &payload).await {
            Ok(()) => {
                self.stats.handoff(handoff::Outcome::Taken);
                let iq = Iq::Result {
                    from: Some(to.unwrap_or_else(|| self.me.clone())),
                    to: Some(server),
                    id,
                    payload: None,
                };
                // Only once what it answers for is on disk (fsync mode),
                // and only if the burst commits: otherwise no answer, and
                // the server keeps its copy.
                if let Some(st) = self.gate.after_writes(iq.into()) {
                    self.send_after(st, Needs::Accept).await;
                }
            }
            Err(e) => {
                self.stats.handoff(handoff::Outcome::of_error(&e));
                info!(
                    %server,
                    condition = ?e.defined_condition,
                    "hand-off refused; the message stays with the server"
                );
                self.reply_iq(Some(server), to, id, Err(e)).await;
            }
        }
    }

    #[allow(clippy::result_large_err)] // the error is the answer itself
    async fn take_handoff(&mut self, server: &Jid, payload: &Element) -> Result<(), StanzaError> {
        use DefinedCondition as C;
        let book = &self.book;
        let taken = handoff::read(server, payload, &|d| book.serves(d), &self.me, now_ms())?;
        if message_kind::kind(&taken.message) == Kind::Once {
            // Receipts, markers, chat states and other body-less payloads
            // are relayed once, never kept (architecture.md, "What is
            // relayed reliably"): the server delivers its copy.
            return Err(stanza_error(
                ErrorType::Cancel,
                C::NotAcceptable,
                "only messages with content are handed off; the server keeps this one",
            ));
        }
        let sender_domain = taken.sender_bare.domain().to_string();
        if self.handoff.namespace_for(&sender_domain).is_none() {
            return Err(self.handoff.no_grant(&sender_domain));
        }
        if let Some(why) = intake::overlong_id(&taken.message) {
            return Err(stanza_error(ErrorType::Modify, C::PolicyViolation, &why));
        }
        if self.store_failed {
            return Err(stanza_error(
                ErrorType::Wait,
                C::InternalServerError,
                "the component cannot store messages right now",
            ));
        }
        let handoff::Taken {
            message: m,
            sender,
            sender_bare,
            recipient: target,
            id,
            origin_id,
        } = taken;
        let content_hash = content_of(&m);
        let xml = String::from(&Element::from(m.clone()));
        let size = xml.len();
        // Checked as it will be sent: what sending adds, and the envelope.
        let sent_size = size
            + sizes::send_overhead(self.me.as_str(), &id, origin_id.is_some())
            + handoff::ENVELOPE_OVERHEAD;
        if sent_size > self.config.limits.max_stanza_bytes {
            return Err(stanza_error(
                ErrorType::Modify,
                C::PolicyViolation,
                "message too large for the component",
            ));
        }
        let recipient = target.to_string();
        let outcome = self.store.accept(
            NewMessage {
                recipient: &recipient,
                sender_bare: sender_bare.as_str(),
                origin_id: origin_id.as_deref(),
                content_hash,
                record: Record {
                    accepted_at_ms: now_ms(),
                    sender: sender.to_string(),
                    id: id.clone(),
                    stanza: xml,
                },
            },
            self.queue_limits(),
        );
        match outcome {
            Ok(Accepted::Stored { seq }) => {
                self.stats.accepted();
                debug!(to = %recipient, from = %sender, id = %id, seq, "hand-off accepted");
                self.on_stored(seq, &recipient, &target, m, size).await;
                Ok(())
            }
            Ok(Accepted::Duplicate { seq }) => {
                info!(
                    to = %recipient,
                    from = %sender,
                    id = %id,
                    seq,
                    "hand-off of a message already held or delivered; answered as taken"
                );
                Ok(())
            }
            Ok(Accepted::IdInUse { .. }) => Err(stanza_error(
                ErrorType::Cancel,
                C::Conflict,
                "a different message with this id is pending for this recipient",
            )),
            Ok(Accepted::QueueFull) => Err(stanza_error(
                ErrorType::Wait,
                C::ResourceConstraint,
                "the recipient's queue is full",
            )),
            Ok(Accepted::StoreFull) => {
                warn!(to = %recipient, "store holds limits.max_store_bytes; hand-offs left with the server");
                Err(stanza_error(
                    ErrorType::Wait,
                    C::ResourceConstraint,
                    "the component's store is full",
                ))
            }
            Err(e) => {
                self.store_failure("accept", &e);
                error!(error = %e, to = %recipient, "store write failed; hand-off left with the server");
                Err(stanza_error(
                    ErrorType::Wait,
                    C::InternalServerError,
                    "the component cannot store messages right now",
                ))
            }
        }
    }

    /// A copy of a recipient's receipt or marker: it confirms what it
    /// names; nothing is passed on (the sender has the original).
    pub(super) async fn on_confirmation_copy(&mut self, mut receipt: Message) {
        let (Some(from), Some(to)) = (receipt.from.clone(), receipt.to.clone()) else {
            return;
        };
        let recipient = from.to_bare().to_string();
        self.heard_from(&from).await;
        // No habit is learned from it (no resource given): a client that
        // answers its user's real contacts says nothing of how it treats
        // a relay address its user never approved.
        self.handle_confirmations(&recipient, None, &to.to_bare(), &mut receipt)
            .await;
    }

    /// An error about a replay: from the recipient (a server module
    /// dropped it for want of a session), or from the server refusing
    /// the privilege envelope. Whether it was one.
    pub(super) async fn on_replay_error(
        &mut self,
        m: &Message,
        from: &Jid,
        error: Option<StanzaError>,
    ) -> bool {
        let id = m.id.as_ref().map(|i| i.0.as_str());
        if let Some(sender) = handoff::bounced_replay_sender(m) {
            match self.book.relay_for(&sender) {
                // As a bounce of a relayed message, which names its sender
                // by the relay address.
                Ok(relay) => self.on_bounce(from, &Jid::from(relay), id, error).await,
                Err(e) => debug!(%sender, error = %e, "bounced replay from a sender not served"),
            }
            return true;
        }
        let from_server = from.node().is_none() && self.book.serves(from.domain().as_str());
        let Some(recipient) = id
            .filter(|_| from_server)
            .and_then(|i| self.handoff.refused(i))
        else {
            return false;
        };
        let refused = error.as_ref().is_some_and(|e| {
            matches!(
                e.defined_condition,
                DefinedCondition::Forbidden | DefinedCondition::NotAllowed
            )
        });
        if refused {
            // The server no longer lets us send as its users: hold every
            // hand-off from its domain until it grants it again (at the
            // next connect), rather than retry one forever.
            warn!(
                server = %from,
                to = %recipient,
                "the server refused a replay as its sender (XEP-0356): hand-offs from its \
                 domain wait until it grants the message permission again"
            );
            self.handoff.granted(from.domain().as_str(), None);
        } else {
            warn!(
                server = %from,
                to = %recipient,
                condition = ?error.as_ref().map(|e| &e.defined_condition),
                "the server refused a replay as its sender (XEP-0356); retried later"
            );
        }
        self.stats.bounced();
        self.fail(&recipient, true).await;
        true
    }

    /// A server granted the message permission: queues that waited for
    /// it (in order, a hand-off at their head) go on.
    pub(super) async fn resume_held_handoffs(&mut self) {
        for recipient in self.peers.sending_and_stalled() {
            self.pump(&recipient).await;
        }
    }
}
