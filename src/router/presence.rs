//! Presence: the subscription to recipients, their resources, and receipt
//! support (disco#info).

use super::*;

impl Router {
    pub(super) async fn ensure_subscribed(&mut self, recipient: &str, jid: &BareJid) {
        if self.granted(jid).presence {
            // The server sends its users' presence without one.
            return;
        }
        match self.store.recipient(recipient) {
            Ok(st) if st.subscription == Subscription::None => {
                // After a refusal, ask again only after a long pause (not
                // once per message).
                let now = tokio::time::Instant::now();
                self.refused_at
                    .retain(|_, t| now.duration_since(*t) < RESUBSCRIBE_AFTER);
                if self.refused_at.contains_key(recipient) {
                    return;
                }
                if let Err(e) = self
                    .store
                    .set_subscription(recipient, Subscription::Requested)
                {
                    error!(error = %e, "cannot record subscription request");
                    return;
                }
                info!(to = recipient, "requesting presence subscription");
                self.send(
                    Presence::subscribe()
                        .with_from(self.me.clone())
                        .with_to(Jid::from(jid.clone())),
                )
                .await;
            }
            Ok(_) => {}
            Err(e) => error!(error = %e, "cannot read recipient state"),
        }
    }

    pub(super) async fn on_presence(&mut self, p: Presence) {
        let (Some(from), Some(to)) = (p.from.clone(), p.to.clone()) else {
            return;
        };
        if to.domain().as_str() != self.book.component().as_str() {
            return;
        }
        match p.type_ {
            PresenceType::Subscribe => {
                // Auto-approve anyone subscribing to any of our JIDs.
                self.send(
                    Presence::subscribed()
                        .with_from(to.to_bare())
                        .with_to(from.to_bare()),
                )
                .await;
                return;
            }
            PresenceType::Unsubscribe => {
                self.send(
                    Presence::new(PresenceType::Unsubscribed)
                        .with_from(to.to_bare())
                        .with_to(from.to_bare()),
                )
                .await;
                return;
            }
            PresenceType::Probe => {
                self.send(Presence::available().with_from(to.to_bare()).with_to(from))
                    .await;
                return;
            }
            _ => {}
        }
        // Delivery tracking only looks at presence for our bare domain;
        // relay-user JIDs in a roster get their own copies, and answers
        // to their (relay contact) subscription requests.
        if let Some(node) = to.node() {
            if matches!(
                p.type_,
                PresenceType::Subscribed | PresenceType::Unsubscribed
            ) && let Ok(sender) = self.book.user_for(Some(node.as_str()))
            {
                let approved = p.type_ == PresenceType::Subscribed;
                self.on_contact_answer(&from.to_bare().to_string(), sender.as_str(), approved)
                    .await;
            }
            return;
        }
        let recipient = from.to_bare().to_string();
        let state = match self.store.recipient(&recipient) {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "cannot read recipient state");
                return;
            }
        };
        // Presence state is taken only from recipients the relay asked for
        // it: anyone else's would grow the store and memory for nothing.
        // Where the server grants presence (XEP-0356 managed_entity) it
        // sends every user's: taken from those the relay is delivering to
        // only. It shows changes since then, so what the relay knows of
        // such a user's resources may be incomplete: a hint, not proof of
        // absence.
        let sub = state.subscription;
        let granted_presence = self.granted(&from.to_bare()).presence;
        let managed = granted_presence && (self.peers.contains(&recipient) || state.pending > 0);
        if sub == Subscription::None && !managed {
            debug!(from = %from, "presence from a JID the relay never asked; ignored");
            return;
        }
        let initial = self.config.retry_initial();
        self.peers.heard();
        match p.type_ {
            PresenceType::Subscribed => {
                info!(to = %recipient, "presence subscription approved");
                let _ = self
                    .store
                    .set_subscription(&recipient, Subscription::Subscribed);
            }
            PresenceType::Unsubscribed => {
                info!(to = %recipient, "presence subscription refused or cancelled");
                let _ = self.store.set_subscription(&recipient, Subscription::None);
                self.refused_at
                    .insert(recipient.clone(), tokio::time::Instant::now());
                if let Some(peer) = self.peers.get_mut(&recipient) {
                    // Without a subscription no presence will say more:
                    // what waited for it is retried with backoff.
                    peer.resources.clear();
                    peer.presence_known = false;
                    if peer.phase == Phase::Offline {
                        peer.phase = Phase::Idle;
                    }
                }
                if self
                    .store
                    .recipient(&recipient)
                    .is_ok_and(|s| s.pending > 0)
                {
                    self.resume_unless_known(&recipient, initial);
                }
            }
            PresenceType::Unavailable => {
                // Prosody acknowledges a subscribe with a bare unavailable:
                // that is not a logout.
                if sub != Subscription::Subscribed && !managed {
                    return;
                }
                let managed_only = sub != Subscription::Subscribed;
                let peer = self.peers.entry(&recipient, initial);
                if managed_only
                    && !from
                        .resource()
                        .is_some_and(|r| peer.resources.contains_key(r.as_str()))
                {
                    // A resource the relay never saw: says nothing of the
                    // others.
                    return;
                }
                peer.presence_known = true;
                match from.resource() {
                    Some(r) => {
                        peer.resources.remove(r.as_str());
                    }
                    None => peer.resources.clear(),
                }
                if !peer.online() {
                    debug!(to = %recipient, "offline");
                    // What went to clients not known to answer counts
                    // delivered now: the server had it before this
                    // unavailable, and if it could not deliver it, it
                    // bounces it (or keeps it offline), and a bounce puts
                    // it back. The rest goes again at the next login.
                    let unanswered: Vec<u64> = peer
                        .in_flight
                        .iter()
                        .filter(|(_, f)| !f.expect)
                        .map(|(seq, _)| *seq)
                        .collect();
                    peer.halt(&mut self.timers);
                    if managed_only {
                        // Maybe still online elsewhere: retried with
                        // backoff, as with presence unknown.
                        peer.presence_known = false;
                        peer.phase = Phase::Idle;
                    } else {
                        peer.phase = Phase::Offline;
                    }
                    if !unanswered.is_empty() {
                        self.confirm(&recipient, &unanswered, Confirmation::NoReceipt)
                            .await;
                    }
                    if managed_only
                        && self
                            .store
                            .recipient(&recipient)
                            .is_ok_and(|s| s.pending > 0)
                    {
                        self.resume_unless_known(&recipient, initial);
                    }
                    // Waiting for presence: a name is enough.
                    self.peers.park_if_quiet(&recipient, initial);
                }
            }
            PresenceType::None => {
                if sub == Subscription::Requested && !granted_presence {
                    // Presence only flows after approval (unless the
                    // server grants it); a lost `subscribed` must not
                    // leave us waiting.
                    let _ = self
                        .store
                        .set_subscription(&recipient, Subscription::Subscribed);
                }
                let Some(resource) = from.resource().map(|r| r.to_string()) else {
                    return;
                };
                let peer = self.peers.entry(&recipient, initial);
                let was_online = peer.online();
                peer.presence_known = true;
                let known = peer.resources.get(&resource).and_then(|r| r.receipts);
                let new_resource = !peer.resources.contains_key(&resource);
                // Any presence from a silent resource shows it alive.
                peer.resources.insert(
                    resource.clone(),
                    Resource {
                        priority: p.priority.0,
                        receipts: known,
                        silent: false,
                    },
                );
                let online = peer.online();
                if new_resource {
                    self.query_receipt_support(&recipient, from.clone(), resource)
                        .await;
                }
                if online && !was_online {
                    info!(to = %recipient, "available");
                    self.seen_alive(&recipient).await;
                    // Presence known now: the window opens.
                    self.pump(&recipient).await;
                }
            }
            _ => {}
        }
    }

    /// Drop the runtime state of a recipient with nothing pending and no
    /// presence known: the map then holds only recipients with work, and
    /// those whose presence the relay asked for (at most one per
    /// recipient in the store).
    pub(super) fn forget_if_idle(&mut self, recipient: &str) {
        let Some(peer) = self.peers.get(recipient) else {
            return;
        };
        if peer.presence_known
            || !peer.in_flight.is_empty()
            || peer.timer.is_some()
            || !peer.unsaved_confirms.is_empty()
        {
            return;
        }
        if self
            .store
            .recipient(recipient)
            .is_ok_and(|s| s.pending == 0)
        {
            self.peers.remove(recipient);
        }
    }

    pub(super) async fn query_receipt_support(
        &mut self,
        recipient: &str,
        full: Jid,
        resource: String,
    ) {
        if self.disco_pending.len() >= MAX_DISCO_PENDING {
            warn!(to = %full, "too many disco#info queries unanswered; not asking");
            return;
        }
        // Unguessable: the answer is matched on id and sender.
        let id = format!(
            "disco-{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        self.disco_pending.insert(
            id.clone(),
            DiscoQuery {
                recipient: recipient.to_owned(),
                resource,
                to: full.clone(),
            },
        );
        self.timers.insert(
            Timer::DiscoTimeout { id: id.clone() },
            self.config.receipt_timeout(),
        );
        let iq = Iq::from_get(id, DiscoInfoQuery { node: None })
            .with_from(self.me.clone())
            .with_to(full);
        self.send(iq).await;
    }
}
