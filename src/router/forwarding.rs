//! Instances connected at once (`store.instances = "all-active"`, for
//! ejabberd, which spreads a component's stanzas over its connections):
//! one instance leads and does everything a lone instance does; the
//! others hand every stanza they receive to it through the store
//! (`QueueStore::forward`), and each tries to take the lead while it has
//! a link, so that one of them carries on when the leader is gone.
//!
//! A forwarded stanza is durable once the forwarding burst commits; the
//! leader takes it in a burst of its own (`take_forwarded`), and handles
//! it exactly as if it had come on its own link.

use super::*;

impl Router {
    /// Not leading: hand a stanza from the link to the leader.
    pub(super) async fn forward(&mut self, st: Stanza, arrived_us: i64) {
        if let Stanza::Message(m) = &st
            && m.type_ != MessageType::Error
            && privilege::announced(m).is_some()
        {
            // The server says what it grants on each connection: this
            // one's, kept for when this instance leads.
            self.on_message(m.clone()).await;
            return;
        }
        // Messages a leader would store: their senders are told if the
        // forwarding fails.
        let told = match &st {
            Stanza::Message(m)
                if m.type_ != MessageType::Error
                    && m.type_ != MessageType::Groupchat
                    && message_kind::kind(m) == Kind::Reliable
                    && !message_kind::only_bookkeeping(m) =>
            {
                Some(m.clone())
            }
            _ => None,
        };
        if self.store_failed {
            if let Some(m) = told {
                self.refuse_unstorable(&m).await;
            }
            return;
        }
        let xml = String::from(&Element::from(st));
        match self.store.forward(&xml, arrived_us) {
            Ok(()) => {
                // Logged once committed (`end_burst`).
                self.burst_handed.push((start_tag(&xml), arrived_us));
                self.stats.handed_over();
                self.burst_forwarded.extend(told);
            }
            Err(e) => {
                self.store_failure("forward", &e);
                error!(error = %e, "could not hand a stanza to the leader");
                if let Some(m) = told {
                    self.refuse_unstorable(&m).await;
                }
            }
        }
    }

    /// Leading: handle up to a burst of what the others forwarded; how
    /// many there were.
    pub(super) async fn take_forwarded(&mut self) -> usize {
        let rows = self.fetch_forwarded(None);
        let taken = rows.len();
        for (_, xml) in rows {
            self.handle_forwarded(xml).await;
        }
        taken
    }

    /// A batch of link events. An all-active leader takes what was
    /// handed over too, and handles both in the order the stanzas
    /// arrived (at this instance, or at the one that handed it over):
    /// a handed-over stanza is a commit late, and this instance's own
    /// queue may be behind.
    pub(super) async fn on_link_batch(&mut self, batch: Vec<LinkEvent>) {
        self.look_ahead(&batch);
        if !(self.leading && self.config.store.instances == Instances::AllActive) {
            for ev in batch {
                self.on_link_event(ev).await;
            }
            return;
        }
        // Not while the link is down or goes down in this batch: the
        // answers would be lost with the rows (and the leader is leaving).
        let rows = if batch.iter().any(|e| matches!(e, LinkEvent::Down)) {
            Vec::new()
        } else {
            // A full batch may leave direct stanzas in the channel: take
            // no row that arrived after the last one here.
            let upto = (batch.len() == BURST)
                .then(|| {
                    batch
                        .iter()
                        .filter_map(|e| match e {
                            LinkEvent::Stanza(_, at) => Some(*at),
                            _ => None,
                        })
                        .max()
                })
                .flatten();
            self.fetch_forwarded(upto)
        };
        let mut rows = rows.into_iter().peekable();
        let mut last = i64::MIN;
        for ev in batch {
            if let LinkEvent::Stanza(_, at) = &ev {
                last = last.max(*at);
            }
            while let Some((_, xml)) = rows.next_if(|(at, _)| *at <= last) {
                self.handle_forwarded(xml).await;
            }
            self.on_link_event(ev).await;
        }
        for (_, xml) in rows {
            self.handle_forwarded(xml).await;
        }
    }

    /// Take up to a burst of handed-over stanzas (those that arrived by
    /// `upto_us`, if given), in the order they arrived. None without a
    /// link: what they would answer could not leave.
    fn fetch_forwarded(&mut self, upto_us: Option<i64>) -> Vec<(i64, String)> {
        if self.store_failed || self.epoch.is_none() {
            return Vec::new();
        }
        let rows = match self.store.take_forwarded(BURST, upto_us) {
            Ok(r) => r,
            Err(e) => {
                self.store_failure("take forwarded", &e);
                return Vec::new();
            }
        };
        if rows.len() == BURST
            && let Some(w) = &self.forwarded_wakeup
        {
            // More wait: the next round takes them.
            w.notify_one();
        }
        if !rows.is_empty() {
            debug!(stanzas = rows.len(), "handling forwarded stanzas");
        }
        rows
    }

    /// One handed-over stanza, as if it had come on the link; what it
    /// causes to be sent waits for the commit that removes it.
    async fn handle_forwarded(&mut self, xml: String) {
        let parsed = Element::from_str(&xml)
            .ok()
            .and_then(|el| Stanza::try_from(el).ok());
        let Some(st) = parsed else {
            // It parsed where it arrived; a build that cannot read it is
            // told in the log.
            warn!(stanza = %xml, "a forwarded stanza did not parse; dropped");
            return;
        };
        self.handling_taken = true;
        self.on_link_event(LinkEvent::Stanza(Box::new(st), 0)).await;
        self.handling_taken = false;
    }

    /// Leading on a shared store: take what other instances hand over.
    /// Whatever this instance's own mode, an all-active one may hand over
    /// (a mixed or changing deployment).
    pub(super) fn start_taking(&mut self) {
        self.forwarded_wakeup = self.store.forwarded_wakeup();
        self.timers
            .insert(Timer::TakeForwarded, TAKE_FORWARDED_EVERY);
    }

    /// Not leading: take the lead if this instance is connected and the
    /// lead is free (its holder is gone).
    pub(super) async fn try_lead(&mut self) {
        let Some(epoch) = self.epoch else {
            // Only a connected instance may lead: on a server that takes
            // one connection (Prosody), the connected one must.
            self.timers.insert(Timer::LeadCheck, LEAD_POLL);
            return;
        };
        let domain = self.config.component.domain.clone();
        match self.store.lead(&domain) {
            Ok(true) => {
                info!(
                    domain,
                    "took the lead: this instance delivers now; the others hand it what they \
                     receive"
                );
                self.leading = true;
                self.gauge_link();
                // What the instance that led before accepted since this
                // one started is in the database, committed, and may have
                // been sent: this process hands out seqs from here on.
                match self.store.next_seq() {
                    Ok(next) => {
                        self.gate.committed_elsewhere_below(next);
                        self.first_seq = next;
                    }
                    Err(e) => self.store_failure("read the sequence", &e),
                }
                self.reread_config();
                self.timers.insert(Timer::LeadCheck, LEAD_CHECK_EVERY);
                self.start_taking();
                self.serve(epoch).await;
                // Everything forwarded while nobody led goes before what
                // arrives from now on, one burst at a time.
                while self.take_forwarded().await == BURST
                    && !self.store_failed
                    && self.fatal.is_none()
                {
                    self.end_burst().await;
                    self.store.begin();
                }
            }
            Ok(false) => {
                self.timers.insert(Timer::LeadCheck, LEAD_POLL);
            }
            Err(e) => self.lose_lead(format!("cannot take the lead: {e}")),
        }
    }
}

/// A stanza's start tag (its first 200 characters at most), for logs.
fn start_tag(xml: &str) -> String {
    let tag = xml.find('>').map_or(xml, |i| &xml[..=i]);
    tag.chars().take(200).collect()
}

impl Router {
    /// On taking the lead of a shared store: the config file as it is
    /// now. The instance that led before may have been told to reload it
    /// (`reload-config` reaches only the leader); settings that need a
    /// restart keep this process's values.
    pub(super) fn reread_config(&mut self) {
        if self.config_path.is_none() {
            return;
        }
        match crate::admin::Ops::reload(self) {
            Ok(changes) if changes.is_empty() => {}
            Ok(changes) => info!(?changes, "took the lead with the config file as it is now"),
            Err(e) => warn!(
                error = %e,
                "the config file changed since this instance started; it keeps the settings \
                 it started with until it restarts"
            ),
        }
    }
}

/// How often an instance that does not lead tries to take the lead (a
/// standby waiting in `app`, or an all-active instance).
pub const LEAD_POLL: Duration = Duration::from_millis(500);
/// How often the leader looks for forwarded stanzas without a wakeup (a
/// notification lost while its listening connection was down).
pub(super) const TAKE_FORWARDED_EVERY: Duration = Duration::from_secs(1);
