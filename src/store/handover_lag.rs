//! How long stanzas handed to the leader (all-active instances) took of
//! late to become visible to it: from their arrival at the instance that
//! handed them over to the leader hearing of their commit.
//!
//! The leader holds its own stanzas for that long before it merges the
//! two paths by arrival (`router/forwarding.rs`): a stanza handed over a
//! commit late then goes before a direct one that arrived after it,
//! instead of the direct one overtaking every hand-over still in flight.
//! The figure is the largest seen in the last ten to twenty seconds, so
//! it follows the database's commit time up and down, and it is capped: a
//! clock that disagrees, or a leader that was away, costs at most
//! `MAX_HOLD` per batch.

use std::sync::Mutex;
use std::time::Duration;

/// The longest a leader holds its own stanzas for hand-overs.
pub const MAX_HOLD: Duration = Duration::from_millis(50);

/// Ten seconds: a chat's bursts are seconds apart, and the first
/// hand-over after a pause is as slow as the last before it.
const BUCKET_US: i64 = 10_000_000;

/// The largest lag per ten-second bucket, for the current bucket and the
/// one before it.
#[derive(Debug, Default)]
pub struct HandoverLag(Mutex<Window>);

#[derive(Debug, Default)]
struct Window {
    /// The current bucket (µs since the epoch ÷ 10 s); 0 before the first
    /// sample.
    bucket: i64,
    current_us: i64,
    previous_us: i64,
}

impl HandoverLag {
    /// A stanza that arrived at `arrived_us` (the other instance's clock)
    /// was heard of as committed at `seen_us` (this one's).
    pub fn observe(&self, arrived_us: i64, seen_us: i64) {
        let lag = seen_us
            .saturating_sub(arrived_us)
            .clamp(0, MAX_HOLD.as_micros() as i64);
        let bucket = seen_us.div_euclid(BUCKET_US);
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if bucket > w.bucket {
            w.previous_us = if bucket == w.bucket + 1 {
                w.current_us
            } else {
                0
            };
            w.current_us = 0;
            w.bucket = bucket;
        }
        // A clock stepped back counts into the current bucket.
        w.current_us = w.current_us.max(lag);
    }

    /// How long to hold a stanza that arrived at `arrived_us`, at
    /// `now_us`: until the largest recent lag has passed since its
    /// arrival. Zero when nothing was handed over in the last ten to
    /// twenty seconds (a lone leader never waits).
    pub fn hold(&self, arrived_us: i64, now_us: i64) -> Duration {
        let lag = {
            let w = self.0.lock().unwrap_or_else(|p| p.into_inner());
            let bucket = now_us.div_euclid(BUCKET_US);
            if bucket <= w.bucket {
                w.current_us.max(w.previous_us)
            } else if bucket == w.bucket + 1 {
                w.current_us
            } else {
                0
            }
        };
        let left = arrived_us.saturating_add(lag).saturating_sub(now_us);
        Duration::from_micros(u64::try_from(left).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = BUCKET_US;

    #[test]
    fn nothing_handed_over_holds_nothing() {
        let lag = HandoverLag::default();
        assert_eq!(lag.hold(10 * S, 10 * S), Duration::ZERO);
    }

    #[test]
    fn a_stanza_is_held_until_the_recent_lag_has_passed_since_it_arrived() {
        let lag = HandoverLag::default();
        lag.observe(10 * S, 10 * S + 12_000);
        lag.observe(10 * S + 100, 10 * S + 5_100);
        // The largest lag counts: 12 ms after arrival, 4 ms from now.
        assert_eq!(
            lag.hold(10 * S + 50_000, 10 * S + 58_000),
            Duration::from_millis(4)
        );
        // Long enough ago: no wait.
        assert_eq!(lag.hold(10 * S, 10 * S + 20_000), Duration::ZERO);
    }

    #[test]
    fn the_lag_is_forgotten_after_one_to_two_buckets() {
        let lag = HandoverLag::default();
        lag.observe(10 * S, 10 * S + 20_000);
        lag.observe(11 * S, 11 * S + 3_000);
        // In the next bucket both count.
        assert_eq!(
            lag.hold(11 * S + 500, 11 * S + 500),
            Duration::from_millis(20)
        );
        // A bucket later only the newer one.
        assert_eq!(lag.hold(12 * S, 12 * S), Duration::from_millis(3));
        // Two buckets later nothing.
        assert_eq!(lag.hold(13 * S, 13 * S), Duration::ZERO);
        // A sample after a gap starts afresh.
        lag.observe(20 * S, 20 * S + 1_000);
        assert_eq!(lag.hold(20 * S, 20 * S), Duration::from_millis(1));
    }

    #[test]
    fn clocks_that_disagree_cost_at_most_the_cap() {
        let lag = HandoverLag::default();
        // The other clock is ahead: no lag.
        lag.observe(10 * S + 5_000, 10 * S);
        assert_eq!(lag.hold(10 * S, 10 * S), Duration::ZERO);
        // Far behind (or a leader that was away): the cap.
        lag.observe(0, 10 * S);
        assert_eq!(lag.hold(10 * S, 10 * S), MAX_HOLD);
        // Odd inputs do not panic.
        lag.observe(i64::MIN, i64::MAX);
        lag.observe(i64::MAX, i64::MIN);
        let _ = lag.hold(i64::MIN, i64::MAX);
        let _ = lag.hold(i64::MAX, i64::MIN);
    }
}
