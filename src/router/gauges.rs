//! The gauges a Prometheus scrape reads (`[metrics] listen`): the link,
//! the lead, and every few seconds the store's totals and the delivery
//! state. Counters and latencies are recorded where they happen
//! ([`crate::stats`]).

use metrics::gauge;

use super::*;
use crate::prometheus as m;

/// How often the store's totals are read for the gauges: a scrape every
/// 15 s (Prometheus's default) sees values at most this old.
pub(super) const GAUGES_EVERY: Duration = Duration::from_secs(5);

impl Router {
    pub(super) fn gauge_link(&self) {
        gauge!(m::LINK_UP).set(if self.epoch.is_some() { 1.0 } else { 0.0 });
        gauge!(m::LEADER).set(if self.leading { 1.0 } else { 0.0 });
    }

    /// Read the gauges' values and schedule the next reading. Only the
    /// leader reads the store: the others' view would be the same rows,
    /// counted once per instance.
    pub(super) fn update_gauges(&mut self) {
        self.timers.insert(Timer::Gauges, GAUGES_EVERY);
        self.gauge_link();
        gauge!(m::RECIPIENTS_ONLINE).set(self.peers.online() as f64);
        gauge!(m::IN_FLIGHT).set(self.peers.in_flight() as f64);
        if !self.leading {
            return;
        }
        match self.store.totals() {
            Ok(t) => {
                gauge!(m::PENDING_MESSAGES).set(t.pending as f64);
                gauge!(m::PENDING_BYTES).set(t.bytes as f64);
                gauge!(m::PENDING_RECIPIENTS).set(t.recipients as f64);
            }
            Err(e) => warn!(error = %e, "cannot read the store's totals for the metrics"),
        }
        match self.store.assumed_totals() {
            Ok(k) => {
                gauge!(m::KEPT_MESSAGES).set(k.messages as f64);
                gauge!(m::KEPT_BYTES).set(k.bytes as f64);
            }
            Err(e) => warn!(error = %e, "cannot read the kept messages' totals for the metrics"),
        }
        match self.store.oldest() {
            Ok(oldest) => {
                let age_ms = oldest
                    .map(|(_, _, rec)| now_ms().saturating_sub(rec.accepted_at_ms).max(0))
                    .unwrap_or(0);
                gauge!(m::OLDEST_PENDING_AGE).set(age_ms as f64 / 1000.0);
            }
            Err(e) => warn!(error = %e, "cannot read the oldest message for the metrics"),
        }
    }
}
