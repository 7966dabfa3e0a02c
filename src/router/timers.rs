//! What each timer does when it fires.

use super::*;

impl Router {
    pub(super) async fn on_timer(&mut self, t: Timer) {
        match t {
            Timer::Expire => self.expire_step().await,
            Timer::Gauges => self.update_gauges(),
            Timer::LeadCheck if !self.leading => self.try_lead().await,
            Timer::TakeForwarded => {
                self.take_forwarded().await;
                self.timers
                    .insert(Timer::TakeForwarded, TAKE_FORWARDED_EVERY);
            }
            Timer::LeadCheck => {
                let domain = self.config.component.domain.clone();
                match self.store.still_leads(&domain) {
                    Ok(true) => {
                        self.timers.insert(Timer::LeadCheck, LEAD_CHECK_EVERY);
                    }
                    Ok(false) => self.lose_lead("its database session ended".into()),
                    Err(e) => self.lose_lead(e.to_string()),
                }
            }
            Timer::LinkDown => {
                self.link_down_timer = None;
                self.lose_lead(format!(
                    "no link to the server for {} s",
                    LINK_DOWN_LEAD_LIMIT.as_secs()
                ));
            }
            Timer::DiscoTimeout { id } => {
                self.disco_pending.remove(&id);
            }
            Timer::ContactWait { recipient } => {
                let Some(peer) = self.peers.get_mut(&recipient) else {
                    return;
                };
                // This timer fired: its key may already name another.
                peer.contact_timer = None;
                if peer.phase == Phase::Sending {
                    self.pump(&recipient).await;
                }
            }
            Timer::ProbeRetry { epoch } => self.probe_retry(epoch).await,
            Timer::ProbeStep { epoch } => {
                // A pass of an earlier link is over: it ended with it.
                if self.epoch == Some(epoch) {
                    self.probe_step(epoch).await;
                }
            }
            Timer::SpaceProbe => {
                if self.store.writable_again() {
                    error!("{}", Stop::ReopenStore);
                    self.fatal = Some(Stop::ReopenStore);
                } else {
                    self.timers.insert(Timer::SpaceProbe, SPACE_PROBE_EVERY);
                }
            }
            Timer::TwinCheck => {
                self.send_twin_probes().await;
                self.twin_timer = Some(self.timers.insert(Timer::TwinCheck, twin::INTERVAL));
            }
            Timer::Resume { recipient } => {
                let Some(peer) = self.peers.get_mut(&recipient) else {
                    return;
                };
                if !matches!(peer.phase, Phase::Grace | Phase::Backoff) {
                    // Stale: only grace and backoff arm this timer.
                    return;
                }
                // This timer fired: its key may already name another.
                peer.timer = None;
                // Whatever is in flight goes again from the queue's head,
                // with its receipt timer gone.
                peer.halt(&mut self.timers);
                peer.phase = Phase::Sending;
                self.pump(&recipient).await;
            }
            Timer::Receipt { recipient, seq } => {
                let Some(peer) = self.peers.get_mut(&recipient) else {
                    return;
                };
                let Some(f) = peer.in_flight.remove(&seq) else {
                    return;
                };
                if !f.expect {
                    // No client it reached is known to answer its sender
                    // (they say they send no receipts, or never sent one
                    // to it): no error in time is the best proof there
                    // will be. A late bounce puts it back.
                    self.confirm(&recipient, &[seq], Confirmation::NoReceipt)
                        .await;
                    return;
                }
                self.missed_receipt(&recipient, f.to_resource.as_deref());
                let Some(peer) = self.peers.get_mut(&recipient) else {
                    return;
                };
                // The timeout proves only that what it went to is silent:
                // the other resources, if any, go on.
                let silent = peer.silence(f.to_resource.as_deref());
                if peer.online() {
                    info!(
                        to = %recipient,
                        seq,
                        ?silent,
                        "receipt timeout; those resources left out, delivery goes on to the others"
                    );
                    peer.halt(&mut self.timers);
                    peer.phase = Phase::Sending;
                    self.pump(&recipient).await;
                } else {
                    info!(to = %recipient, seq, "receipt timeout; recipient marked offline");
                    self.fail(&recipient, false).await;
                }
            }
        }
    }

    /// Leave the domain to a standby: exit for the supervisor to restart
    /// this process, which then waits as a standby if another leads.
    pub(super) fn lose_lead(&mut self, why: String) {
        let stop = Stop::LostLead(why);
        error!("{stop}");
        self.fatal = Some(stop);
    }
}
