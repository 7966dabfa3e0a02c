//! Relay contacts: each sender's relay address in the recipient's roster,
//! asked for or (privileged) added.

use super::*;

impl Router {
    /// The first message from `sender` to `recipient` makes the sender's
    /// relay address ask the recipient for a presence subscription (with
    /// a XEP-0172 nick naming the sender), so that clients that answer
    /// receipts only to roster contacts (Gajim, Conversations, Monal,
    /// Psi) answer it once the recipient approves.
    pub(super) async fn ensure_contact(
        &mut self,
        recipient: &str,
        target: &BareJid,
        sender: &BareJid,
    ) {
        let sender_key = sender.to_string();
        let known = self.contact(recipient, &sender_key);
        // Asked (or refused) within the last day: not again. A request
        // lost on the way, or refused, is asked again after that.
        if let Some(c) = known
            && (c.subscription == Subscription::Subscribed
                || now_ms().saturating_sub(c.asked_at_ms) < RESUBSCRIBE_AFTER.as_millis() as i64)
        {
            return;
        }
        // A contact the recipient removed or refused is not put back into
        // the roster without asking (privileged mode asks then).
        let refused_before = known.is_some_and(|c| c.subscription == Subscription::None);
        let Ok(from) = self.book.relay_for(sender) else {
            return;
        };
        let contact = Contact {
            subscription: Subscription::Requested,
            asked_at_ms: now_ms(),
        };
        if let Err(e) = self.store.set_contact(recipient, &sender_key, contact) {
            error!(error = %e, "cannot record a relay contact request");
            return;
        }
        self.cache_contact(recipient, &sender_key, contact);
        if self.contact_asked.len() >= CONTACT_CACHE {
            self.contact_asked.clear();
        }
        self.contact_asked.insert(
            (recipient.to_owned(), sender_key.clone()),
            tokio::time::Instant::now(),
        );
        if self.granted(target).roster_set
            && !refused_before
            && self.roster_sets.len() < MAX_DISCO_PENDING
        {
            // No prompt: the item goes straight into the roster.
            let id = format!("roster-{}", random_id());
            self.roster_sets
                .insert(id.clone(), (recipient.to_owned(), sender_key.clone()));
            info!(to = recipient, contact = %from, "adding a relay contact to the roster (privileged)");
            let name = format!("{sender_key} (via {})", self.book.component());
            self.send(privilege::roster_item(
                id,
                self.me.clone(),
                target,
                from,
                &name,
            ))
            .await;
            return;
        }
        self.ask_contact(recipient, target, &from, &sender_key)
            .await;
    }

    /// What the server of `user` granted the component: only the
    /// component's own server grants, for the default domain's users.
    pub(super) fn granted(&self, user: &BareJid) -> Grants {
        if user.domain().as_str() == self.config.relay.default_domain {
            self.grants
        } else {
            Grants::default()
        }
    }

    /// The answer to a privileged roster set: the contact is in the
    /// roster with subscription both, or (refused: ejabberd 23.01 fails
    /// every such set) the relay stops trying on that server and asks for
    /// the subscription instead.
    pub(super) async fn on_roster_set_answer(
        &mut self,
        id: &str,
        from: Option<&Jid>,
        error: Option<&StanzaError>,
    ) -> bool {
        let Some((recipient, sender)) = self.roster_sets.get(id).cloned() else {
            return false;
        };
        if from.map(|f| f.to_bare().to_string()) != Some(recipient.clone()) {
            return false;
        }
        self.roster_sets.remove(id);
        let Some(error) = error else {
            self.on_contact_answer(&recipient, &sender, true).await;
            return true;
        };
        let (Ok(target), Ok(sender_jid)) =
            (BareJid::from_str(&recipient), BareJid::from_str(&sender))
        else {
            return true;
        };
        // A refusal of the permission itself ends roster sets on that
        // server for this connection (ejabberd 23.01 answers every one
        // with internal-server-error); anything else (a user that does
        // not exist, say) concerns this pair only.
        let refused = matches!(
            error.defined_condition,
            DefinedCondition::InternalServerError
                | DefinedCondition::Forbidden
                | DefinedCondition::NotAllowed
                | DefinedCondition::FeatureNotImplemented
        );
        if refused && self.granted(&target).roster_set {
            warn!(server = %target.domain(), condition = ?error.defined_condition, "the server refused a privileged roster set; asking recipients instead");
            self.grants.roster_set = false;
        } else {
            info!(to = %recipient, condition = ?error.defined_condition, "a privileged roster set failed for this recipient; asking instead");
        }
        if let Ok(from) = self.book.relay_for(&sender_jid) {
            self.ask_contact(&recipient, &target, &from, &sender).await;
        }
        true
    }

    /// Ask `target` for a presence subscription from the relay address
    /// `from` (for `sender`).
    pub(super) async fn ask_contact(
        &mut self,
        recipient: &str,
        target: &BareJid,
        from: &BareJid,
        sender_key: &str,
    ) {
        info!(to = recipient, contact = %from, "asking for a relay contact");
        let nick = Element::builder("nick", NICK)
            .append(sender_key.to_owned())
            .build();
        self.send(
            Presence::subscribe()
                .with_from(Jid::from(from.clone()))
                .with_to(Jid::from(target.clone()))
                .with_payloads(vec![nick]),
        )
        .await;
    }

    /// The recipient answered a relay contact's request.
    pub(super) async fn on_contact_answer(
        &mut self,
        recipient: &str,
        sender: &str,
        approved: bool,
    ) {
        let Some(mut c) = self.contact(recipient, sender) else {
            return; // never asked
        };
        let sub = if approved {
            Subscription::Subscribed
        } else {
            Subscription::None
        };
        if c.subscription == sub {
            return;
        }
        c.subscription = sub;
        if !approved {
            // Asked again only a day after the refusal.
            c.asked_at_ms = now_ms();
        }
        if let Err(e) = self.store.set_contact(recipient, sender, c) {
            error!(error = %e, "cannot record a relay contact answer");
            return;
        }
        self.cache_contact(recipient, sender, c);
        if approved {
            info!(to = recipient, from = sender, "relay contact approved");
        } else {
            info!(
                to = recipient,
                from = sender,
                "relay contact refused or cancelled"
            );
        }
        // What waited for the answer goes now.
        if self
            .peers
            .get(recipient)
            .is_some_and(|p| p.phase == Phase::Sending)
        {
            self.pump(recipient).await;
        }
    }

    pub(super) fn contact(&mut self, recipient: &str, sender: &str) -> Option<Contact> {
        let key = (recipient.to_owned(), sender.to_owned());
        if let Some(c) = self.contacts.get(&key) {
            return Some(*c);
        }
        let c = self.store.contact(recipient, sender).ok().flatten()?;
        self.cache_contact(recipient, sender, c);
        Some(c)
    }

    pub(super) fn cache_contact(&mut self, recipient: &str, sender: &str, c: Contact) {
        if self.contacts.len() >= CONTACT_CACHE {
            self.contacts.clear();
        }
        self.contacts
            .insert((recipient.to_owned(), sender.to_owned()), c);
    }

    /// How much longer a message from `sender` to `recipient` waits for
    /// the recipient's answer to the relay contact's request, if it does:
    /// at most `contact_wait_ms` after this process asked (after a
    /// restart, nothing waits).
    pub(super) fn held_for_contact(&mut self, recipient: &str, sender: &str) -> Option<Duration> {
        let key = (recipient.to_owned(), sender.to_owned());
        let asked = *self.contact_asked.get(&key)?;
        let wait = Duration::from_millis(self.config.delivery.contact_wait_ms);
        let left = wait.saturating_sub(asked.elapsed());
        let waiting = self
            .contact(recipient, sender)
            .is_some_and(|c| c.subscription == Subscription::Requested);
        if !waiting || left.is_zero() {
            self.contact_asked.remove(&key);
            return None;
        }
        Some(left)
    }
}
