//! The expiry walk, and the notices that tell senders what became of their
//! messages.

use super::*;

impl Router {
    /// One bounded step of the expiry walk; the next step is scheduled at
    /// once if there is more to do, else after a pause, so a backlog never
    /// stalls the router.
    pub(super) async fn expire_step(&mut self) {
        const STEP: usize = 1000;
        let ttl = self.config.message_ttl();
        let cutoff = now_ms() - i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let pause = (ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        if self.epoch.is_none() {
            // Nobody to tell: wait for the link.
            self.timers.insert(Timer::Expire, pause);
            return;
        }
        let step = match self.store.expire(cutoff, STEP) {
            Ok(s) => s,
            Err(e) => {
                self.store_failure("expire", &e);
                error!(error = %e, "expiry step failed; retrying later");
                self.timers.insert(Timer::Expire, pause);
                return;
            }
        };
        if !step.messages.is_empty() {
            self.gate.removed();
        }
        // Messages counted delivered without a receipt are kept only for
        // the late bounce window.
        let window =
            i64::try_from(self.config.late_bounce_window().as_millis()).unwrap_or(i64::MAX);
        let pruned = match self
            .store
            .prune_assumed(now_ms().saturating_sub(window), STEP)
        {
            Ok(p) => p,
            Err(e) => {
                self.store_failure("prune", &e);
                Default::default()
            }
        };
        if pruned.removed > 0 {
            debug!(
                count = pruned.removed,
                "late bounce window over for messages counted delivered"
            );
        }
        let notice = self.config.limits.expiry_notice;
        let ttl_s = self.config.limits.message_ttl_s;
        for (recipient, seq, rec) in step.messages {
            self.stats.expired();
            info!(to = %recipient, id = %rec.id, seq, "expired undelivered");
            self.peers.removed(&recipient, seq, &mut self.timers);
            if notice {
                let text =
                    format!("expired undelivered: not confirmed by the recipient within {ttl_s} s");
                self.notify_sender(
                    &recipient,
                    &rec,
                    ErrorType::Wait,
                    DefinedCondition::RecipientUnavailable,
                    &text,
                )
                .await;
            }
        }
        self.timers.insert(
            Timer::Expire,
            if step.more || pruned.more {
                Duration::ZERO
            } else {
                pause
            },
        );
    }

    /// Tell a stored message's sender what became of it, from the
    /// recipient's relay address, two ways: an error with the message's id
    /// to the full JID it came from (a client still there marks the
    /// message failed), and a notice a person can read, kept and relayed
    /// like a message to the sender's bare JID. The error alone is lost
    /// when that resource has gone away, which a week later it usually
    /// has: servers drop an error for a resource that is gone or for a
    /// bare JID (RFC 6121 8.5.2.1.1, 8.5.3.2.1), while a message to the
    /// bare JID waits in the server's offline storage or here.
    pub(super) async fn notify_sender(
        &mut self,
        recipient: &str,
        rec: &Record,
        type_: ErrorType,
        condition: DefinedCondition,
        text: &str,
    ) {
        let (Ok(sender), Ok(recipient)) =
            (Jid::from_str(&rec.sender), BareJid::from_str(recipient))
        else {
            return;
        };
        let Ok(from) = self.book.relay_for(&recipient) else {
            return;
        };
        let mut m =
            Message::error(Some(sender.clone())).with_payload(stanza_error(type_, condition, text));
        m.from = self.book.relay_full(&recipient).ok();
        m.id = Some(Id(rec.id.clone()));
        self.send(m).await;
        self.queue_notice(&recipient, from, &sender.to_bare(), rec, text)
            .await;
    }

    /// Keep a notice for `sender` about `rec` (which was for `recipient`)
    /// in the sender's queue. Its record names as its sender the
    /// recipient's bare JID with an empty resource, which is no JID, so
    /// that no notice is ever sent about a notice.
    pub(super) async fn queue_notice(
        &mut self,
        recipient: &BareJid,
        from: BareJid,
        sender: &BareJid,
        rec: &Record,
        text: &str,
    ) {
        if self.store_failed {
            return;
        }
        let said = Element::from_str(&rec.stanza)
            .ok()
            .and_then(|e| e.children().find(|c| c.name() == "body").map(|b| b.text()))
            .map(|b| {
                let mut q: String = b.chars().take(80).collect();
                if q.len() < b.len() {
                    q.push('…');
                }
                format!("\"{q}\" ")
            })
            .unwrap_or_default();
        let when = chrono::DateTime::from_timestamp_millis(rec.accepted_at_ms)
            .unwrap_or_default()
            .format("%Y-%m-%d %H:%M UTC");
        let body = format!(
            "Not delivered: your message {said}to {recipient} (sent {when}, id {}): {text}.",
            rec.id
        );
        let id = format!("notice-{:016x}", rand::random::<u64>());
        let mut m = Message::chat(Some(Jid::from(sender.clone())));
        m.from = Some(Jid::from(from));
        m.id = Some(Id(id.clone()));
        m.bodies.insert(Lang::default(), body);
        let content_hash = content_of(&m);
        let xml = String::from(&Element::from(m.clone()));
        let size = xml.len();
        let queue = sender.to_string();
        let limits = self.queue_limits();
        let outcome = self.store.accept(
            NewMessage {
                recipient: &queue,
                sender_bare: recipient.as_str(),
                origin_id: None,
                content_hash,
                record: Record {
                    accepted_at_ms: now_ms(),
                    sender: format!("{recipient}/"),
                    id: id.clone(),
                    stanza: xml,
                },
            },
            limits,
        );
        match outcome {
            Ok(Accepted::Stored { seq }) => {
                // A stored message like any other: accepted, relayed and
                // confirmed, so that confirmed (less late bounces) never
                // outgrows accepted.
                self.stats.accepted();
                self.stats.notice();
                info!(to = %queue, id, about = %rec.id, seq, "notice kept for the sender");
                // From the recipient's relay address: a relay contact of
                // the sender's, so that contacts-only clients answer it;
                // not for a hand-off's sender, who never wrote to one
                // (nothing goes into her roster for it).
                if !handoff::is_handed_off(&rec.stanza, self.me.as_str()) {
                    self.ensure_contact(&queue, sender, recipient).await;
                }
                self.on_stored(seq, &queue, sender, m, size).await;
            }
            Ok(other) => {
                warn!(to = %queue, about = %rec.id, ?other, "no room to keep a notice; only the error was sent")
            }
            Err(e) => {
                self.store_failure("notice", &e);
            }
        }
    }
}
