//! Which clients answer receipts (learned per client), and so which
//! messages wait for one.

use super::*;

impl Router {
    /// Read `recipient`'s remembered client habits into its peer, once.
    pub(super) fn load_habits(&mut self, recipient: &str) {
        let Some(peer) = self.peers.get_mut(recipient) else {
            return;
        };
        if peer.habits.is_none() {
            let known = self.store.habits(recipient).unwrap_or_else(|e| {
                error!(error = %e, to = recipient, "cannot read client habits");
                Vec::new()
            });
            peer.habits = Some(known.into_iter().collect());
        }
    }

    /// The clients a message sent to `to` (a resource, or the bare JID)
    /// reaches: by presence, or, with presence unknown, every client the
    /// relay remembers for `recipient`.
    pub(super) fn reached(&mut self, recipient: &str, to: Option<&str>) -> Vec<String> {
        self.load_habits(recipient);
        let Some(peer) = self.peers.get(recipient) else {
            return Vec::new();
        };
        if peer.presence_known && !peer.resources.is_empty() || to.is_some() {
            peer.reached_by(to)
        } else {
            peer.habits
                .as_ref()
                .map(|h| h.keys().cloned().collect())
                .unwrap_or_default()
        }
    }

    /// Whether a message from `sender` sent to `to` waits for a receipt
    /// (and, without one, is sent again at the next login), or counts
    /// delivered when no error came back within `unanswered_wait_ms`. It
    /// waits when a client it reaches is known to answer that sender: a
    /// client seen answering a relay address its user had not approved
    /// answers everyone; one seen answering only approved ones answers
    /// the relay contacts its user approved. A client never seen
    /// answering (receipts off, or its user ignored the contact request)
    /// would otherwise be shown the message again at every login.
    pub(super) fn expects_receipt(
        &mut self,
        recipient: &str,
        sender: &str,
        to: Option<&str>,
    ) -> bool {
        let reached = self.reached(recipient, to);
        if reached.is_empty() {
            return false;
        }
        let approved = self
            .contact(recipient, sender)
            .is_some_and(|c| c.subscription == Subscription::Subscribed);
        let Some(peer) = self.peers.get(recipient) else {
            return false;
        };
        let habits = peer.habits.as_ref();
        reached.iter().any(|r| {
            peer.resources
                .get(r)
                .is_none_or(|res| res.receipts != Some(false))
                && habits
                    .and_then(|h| h.get(r))
                    .is_some_and(|h| h.answers == Answers::All || approved)
        })
    }

    /// A receipt or marker from `resource` confirmed a message from
    /// `sender` that the relay sent: remember that this client answers
    /// (everyone, unless its user had approved that sender's relay
    /// contact). Written only when something changes, and the time it
    /// was heard from at most once a day.
    pub(super) fn learn_habit(&mut self, recipient: &str, resource: &str, sender: &str) {
        let approved = self
            .contact(recipient, sender)
            .is_some_and(|c| c.subscription == Subscription::Subscribed);
        let seen = if approved {
            Answers::Contacts
        } else {
            Answers::All
        };
        self.load_habits(recipient);
        let old = match self.peers.get(recipient).and_then(|p| p.habits.as_ref()) {
            Some(h) => h.get(resource).copied(),
            None => self
                .store
                .habits(recipient)
                .ok()
                .and_then(|v| v.into_iter().find(|(r, _)| r == resource).map(|(_, h)| h)),
        };
        let now = now_ms();
        let answers = old.map_or(seen, |h| h.answers.max(seen));
        if let Some(h) = old
            && h.answers == answers
            && h.missed == 0
            && now.saturating_sub(h.seen_at_ms) < 24 * 3600 * 1000
        {
            return;
        }
        let habit = Habit {
            answers,
            missed: 0,
            seen_at_ms: now,
        };
        if let Err(e) = self.store.set_habit(recipient, resource, Some(habit)) {
            error!(error = %e, "cannot record a client's receipt habit");
            return;
        }
        if old.map(|h| h.answers) != Some(answers) {
            info!(
                to = recipient,
                resource,
                ?answers,
                "this client answers receipts; its messages wait for them"
            );
        }
        if let Some(h) = self
            .peers
            .get_mut(recipient)
            .and_then(|p| p.habits.as_mut())
        {
            if h.len() >= crate::store::MAX_HABITS && !h.contains_key(resource) {
                // The store dropped one too; read them again next time.
                self.peers.get_mut(recipient).expect("just seen").habits = None;
            } else {
                h.insert(resource.to_owned(), habit);
            }
        }
        // What is on the wire to it now waits for its receipts too.
        let waiting: Vec<(u64, String, Option<String>)> = self
            .peers
            .get(recipient)
            .map(|p| {
                p.in_flight
                    .iter()
                    .filter(|(_, f)| !f.expect)
                    .map(|(seq, f)| (*seq, f.sender_bare.clone(), f.to_resource.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let timeout = self.config.receipt_timeout();
        for (seq, sender, to) in waiting {
            if self.expects_receipt(recipient, &sender, to.as_deref())
                && let Some(f) = self
                    .peers
                    .get_mut(recipient)
                    .and_then(|p| p.in_flight.get_mut(&seq))
            {
                f.expect = true;
                self.timers.reset(&f.timer, timeout);
            }
        }
    }

    /// A message that waited for a receipt from the clients `to` reaches
    /// timed out: one more silent spell for each remembered one. Two in a
    /// row without an answer between them and it is forgotten, so that a
    /// client whose user turned receipts off is not shown messages again
    /// at every login (a client that froze once answers at its next
    /// login and keeps the full guarantee). With presence unknown every
    /// remembered client is charged, since any may have had it: a client
    /// that answers may be forgotten that way, and is learned again at
    /// its next receipt, but no client is shown a message more than three
    /// times.
    pub(super) fn missed_receipt(&mut self, recipient: &str, to: Option<&str>) {
        let reached = self.reached(recipient, to);
        for r in reached {
            let Some(habits) = self
                .peers
                .get_mut(recipient)
                .and_then(|p| p.habits.as_mut())
            else {
                return;
            };
            let Some(h) = habits.get_mut(&r) else {
                continue;
            };
            h.missed = h.missed.saturating_add(1);
            let update = if h.missed >= 2 {
                habits.remove(&r);
                info!(
                    to = recipient,
                    resource = %r,
                    "client missed receipts twice in a row; its messages no longer wait for them"
                );
                None
            } else {
                Some(*h)
            };
            if let Err(e) = self.store.set_habit(recipient, &r, update) {
                error!(error = %e, "cannot record a client's receipt habit");
            }
        }
    }
}
