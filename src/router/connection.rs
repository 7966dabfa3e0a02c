//! The component link coming and going: probes after a connect, twin
//! detection, invalid stanzas.

use super::*;

impl Router {
    /// Pings from our domain to our domain, naming this instance.
    pub(super) async fn send_twin_probes(&mut self) {
        for n in 0..twin::PROBES {
            let from = format!("{}@{}", Instance::probe_node(n), self.book.component());
            let Ok(from) = Jid::from_str(&from) else {
                continue;
            };
            let iq = Iq::from_get(self.instance.probe_id(n), tokio_xmpp::parsers::ping::Ping)
                .with_from(from)
                .with_to(self.me.clone());
            self.send(iq).await;
        }
    }

    pub(super) async fn on_twin_probe(&mut self, verdict: Verdict) {
        if let Verdict::Earlier(other) | Verdict::Later(other) = verdict
            && self.store.shared()
        {
            // An instance that led this store (it may have probed just
            // before it died or lost its session, and may have started
            // before this one) is not a twin: it served the same store.
            match self.store.led_here(&other.name()) {
                Ok(true) => {
                    debug!(instance = %other.name(), "a probe of an earlier leader of this store");
                    return;
                }
                Ok(false) => {}
                Err(e) => {
                    warn!(error = %e, "cannot tell whose twin probe this is; ignored");
                    return;
                }
            }
        }
        match verdict {
            Verdict::Mine => {}
            Verdict::Earlier(other) => {
                let e = AnotherInstance {
                    domain: self.book.component().to_string(),
                    started: other.started(),
                };
                error!(error = %e, "stopping");
                self.fatal = Some(Stop::AnotherInstance(e));
            }
            Verdict::Later(other) => {
                warn!(
                    other_started = %other.started(),
                    "another redeliver instance connected under this component's name; \
                     it started later and will stop"
                );
                // Make sure it hears of us soon.
                self.send_twin_probes().await;
            }
        }
    }

    pub(super) async fn on_link_event(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Up { epoch } => self.on_link_up(epoch).await,
            LinkEvent::Down => self.on_link_down(),
            LinkEvent::Stanza(st, arrived_us) if !self.leading => {
                self.forward(*st, arrived_us).await
            }
            LinkEvent::Stanza(st, _) => match *st {
                Stanza::Message(m) => self.on_message(m).await,
                Stanza::Presence(p) => self.on_presence(p).await,
                Stanza::Iq(iq) => self.on_iq(iq).await,
            },
            LinkEvent::Invalid {
                kind,
                from,
                to,
                id,
                type_,
                error,
            } => {
                warn!(kind, ?from, ?to, ?id, %error, "stanza did not parse");
                self.answer_invalid(kind, from, to, id, type_).await;
            }
        }
    }

    pub(super) async fn answer_invalid(
        &mut self,
        kind: &'static str,
        from: Option<String>,
        to: Option<String>,
        id: Option<String>,
        type_: Option<String>,
    ) {
        // Never answer an error or a result: that could loop.
        if matches!(type_.as_deref(), Some("error") | Some("result")) || kind == "presence" {
            return;
        }
        let (Some(from), Some(to)) = (
            from.and_then(|f| Jid::from_str(&f).ok()),
            to.and_then(|t| Jid::from_str(&t).ok()),
        ) else {
            return;
        };
        if to.domain().as_str() != self.book.component().as_str() {
            return;
        }
        let err = stanza_error(
            ErrorType::Modify,
            DefinedCondition::BadRequest,
            "the stanza could not be parsed",
        );
        let id = id.filter(|i| i.len() <= sizes::MAX_ID_BYTES);
        if kind == "iq" {
            let Some(id) = id else {
                warn!(%from, "unparseable iq with no id, or one over the cap: not answered");
                return;
            };
            let iq = Iq::from_error(id, err).with_from(to).with_to(from);
            self.send(iq).await;
        } else {
            if kind == "message" {
                self.stats.refused(&DefinedCondition::BadRequest);
            }
            let mut m = Message::error(Some(from)).with_payload(err);
            m.from = Some(to);
            m.id = id.map(Id);
            self.send(m).await;
        }
    }

    pub(super) async fn on_link_up(&mut self, epoch: u64) {
        if let Some(k) = self.link_down_timer.take() {
            self.timers.try_remove(&k);
        }
        self.epoch = Some(epoch);
        // The server says again what it grants on each connection.
        self.grants = Grants::default();
        self.handoff.link_up();
        self.link_up_since = Some(chrono::Utc::now());
        self.gauge_link();
        if !self.leading {
            info!(
                epoch,
                "link up; handing what arrives to the instance that leads (all-active)"
            );
            return;
        }
        self.serve(epoch).await;
    }

    /// Start serving on the link `epoch`: at link up, or when an
    /// all-active instance takes the lead.
    pub(super) async fn serve(&mut self, epoch: u64) {
        if self.store.shared()
            && let Err(e) = self.store.remember_leader(&self.instance.name())
        {
            // Only a later leader's twin check needs it; the store failed.
            self.store_failure("remember the leader", &e);
        }
        // Roster sets that got no answer are asked again at the pair's
        // next message (not a day later).
        for (_, (recipient, sender)) in std::mem::take(&mut self.roster_sets) {
            if let Some(mut c) = self.contact(&recipient, &sender)
                && c.subscription == Subscription::Requested
            {
                c.asked_at_ms = 0;
                if self.store.set_contact(&recipient, &sender, c).is_ok() {
                    self.cache_contact(&recipient, &sender, c);
                }
            }
        }
        let recipients = match self.store.recipients() {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "cannot list recipients after connect");
                return;
            }
        };
        info!(
            epoch,
            recipients = recipients.len(),
            "link up; probing subscribed recipients"
        );
        // In steps, so that a large store does not hold everything else
        // up (nor buffer a probe per recipient at once).
        self.probe_queue = recipients.into();
        self.timers
            .insert(Timer::ProbeStep { epoch }, Duration::ZERO);
        self.send_twin_probes().await;
        // The walk runs while notices can go out; the first connect starts
        // it at once (a restart may find messages that expired while the
        // process was down).
        if !self.expiry_scheduled {
            self.expiry_scheduled = true;
            self.timers.insert(Timer::Expire, Duration::ZERO);
        }
        if self.twin_timer.is_none() {
            self.twin_timer = Some(self.timers.insert(Timer::TwinCheck, twin::INTERVAL));
        }
    }

    /// Probe the next [`PROBE_STEP`] recipients known at link up: servers
    /// do not queue presence for a disconnected component, so ask again.
    pub(super) async fn probe_step(&mut self, epoch: u64) {
        let initial = self.config.retry_initial();
        for _ in 0..PROBE_STEP {
            let Some((name, state)) = self.probe_queue.pop_front() else {
                break;
            };
            let Ok(jid) = BareJid::from_str(&name) else {
                warn!(recipient = %name, "store holds an invalid recipient JID; skipping");
                continue;
            };
            if state.subscription == Subscription::Subscribed {
                self.send(
                    Presence::probe()
                        .with_from(self.me.clone())
                        .with_to(Jid::from(jid)),
                )
                .await;
            }
            if state.pending > 0 {
                if state.subscription == Subscription::Subscribed {
                    // The probe may answer; the retry waits for the
                    // whole pass (see below).
                    self.probe_waiting.push(name);
                } else {
                    self.resume_unless_known(&name, Duration::ZERO);
                }
            }
        }
        if !self.probe_queue.is_empty() {
            self.timers
                .insert(Timer::ProbeStep { epoch }, Duration::ZERO);
            return;
        }
        // Every probe is out. Where no presence has come back within
        // retry_initial_ms of the last one (presence unknown), a retry
        // decides: timed from the end of the pass, so that a large store
        // does not resend to recipients whose answers are still queued.
        // Its buffer held every recipient known at link up.
        self.probe_queue = VecDeque::new();
        // One timer for the pass, not one per recipient: on a large
        // store most answers are still on their way (docs/benchmarks.md,
        // "Parked recipients").
        let mut unanswered = 0usize;
        for name in std::mem::take(&mut self.probe_waiting) {
            unanswered += usize::from(self.peers.await_probe_answer(name, initial));
        }
        debug!(unanswered, "every recipient probed");
        // Armed even when every answer came: its end of the pass also
        // hands the pass's memory back.
        self.timers.insert(Timer::ProbeRetry { epoch }, initial);
    }

    /// The probe pass's retry: where presence is still unknown, send;
    /// then return what the pass freed to the system.
    pub(super) async fn probe_retry(&mut self, epoch: u64) {
        if self.epoch != Some(epoch) {
            // A later link's pass has its own.
            return;
        }
        if !self.peers.retrying() {
            // A fifth of retry_initial_ms without an answer is silence;
            // four times it past its time, the retry waits no more.
            let initial = self.config.retry_initial();
            if let Some(wait) = self.peers.retry_wait(initial / 5, initial * 4) {
                self.timers.insert(Timer::ProbeRetry { epoch }, wait);
                return;
            }
            self.peers.start_retries();
        }
        // In steps, as the pass: what is read meanwhile is handled
        // between them.
        for name in self.peers.next_retries(PROBE_STEP) {
            if !self
                .peers
                .get(&name)
                .is_some_and(|p| p.awaits_probe_retry())
            {
                // Something else decided meanwhile (an answer read
                // between two steps): a parked one stays parked.
                continue;
            }
            let Some(peer) = self.peers.get_mut(&name) else {
                continue;
            };
            peer.halt(&mut self.timers);
            peer.phase = Phase::Sending;
            self.pump(&name).await;
        }
        if self.peers.retrying() {
            self.timers
                .insert(Timer::ProbeRetry { epoch }, Duration::ZERO);
            return;
        }
        // The pass's buffers, and the state of the recipients parked
        // since, are free.
        crate::memory::release_freed();
    }

    /// Schedule a resume for a recipient nothing is known of yet.
    pub(super) fn resume_unless_known(&mut self, name: &str, delay: Duration) {
        // Known offline, or scheduled: nothing to do (and a parked one
        // stays parked).
        if self
            .peers
            .get(name)
            .is_some_and(|p| p.timer.is_some() || p.phase != Phase::Idle)
        {
            return;
        }
        let initial = self.config.retry_initial();
        let peer = self.peers.entry(name, initial);
        peer.phase = Phase::Backoff;
        peer.timer = Some(self.timers.insert(
            Timer::Resume {
                recipient: name.to_owned(),
            },
            delay,
        ));
    }

    pub(super) fn on_link_down(&mut self) {
        self.epoch = None;
        if self.leading && self.config.store.instances == Instances::AllActive {
            // The others are connected: one of them serves at once.
            self.lose_lead(
                "its link to the server is down and other instances may be \
                            connected"
                    .into(),
            );
        } else if self.leading && self.store.shared() && self.link_down_timer.is_none() {
            self.link_down_timer = Some(self.timers.insert(Timer::LinkDown, LINK_DOWN_LEAD_LIMIT));
        }
        self.probe_queue = VecDeque::new();
        self.probe_waiting.clear();
        self.link_up_since = None;
        self.gauge_link();
        // What was on the wire is in doubt: it stays pending and is
        // replayed once presence is known again.
        let initial = self.config.retry_initial();
        for name in self.peers.link_down(&mut self.timers, initial) {
            self.forget_if_idle(&name);
        }
        self.disco_pending.clear();
        warn!("link down; in-flight messages stay pending");
    }
}
