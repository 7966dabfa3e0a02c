//! Per-sender token buckets: `rate` messages per second on average, up to
//! `burst` at once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Buckets kept before idle (full) ones are dropped.
const PRUNE_AT: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: HashMap<String, Bucket>,
}

impl RateLimiter {
    /// `rate` 0 turns limiting off.
    pub fn new(rate: u32, burst: u32) -> RateLimiter {
        RateLimiter {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            buckets: HashMap::new(),
        }
    }

    /// New settings; buckets keep their tokens (capped at the new burst).
    pub fn set(&mut self, rate: u32, burst: u32) {
        self.rate = f64::from(rate);
        self.burst = f64::from(burst.max(1));
    }

    /// Take one token for `sender` at `now`; false if none is left.
    pub fn allow(&mut self, sender: &str, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        if self.buckets.len() >= PRUNE_AT {
            self.prune(now);
        }
        let (rate, burst) = (self.rate, self.burst);
        let b = self.buckets.entry(sender.to_owned()).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Drop buckets that have refilled: they are the same as no bucket.
    fn prune(&mut self, now: Instant) {
        let full_after = Duration::from_secs_f64(self.burst / self.rate);
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.last) < full_after);
    }

    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(2, 3);
        // A burst of three, then nothing.
        assert!((0..3).all(|_| r.allow("a", t0)));
        assert!(!r.allow("a", t0));
        // Another sender has its own bucket.
        assert!(r.allow("b", t0));
        // Half a second refills one token at 2/s.
        let t1 = t0 + Duration::from_millis(500);
        assert!(r.allow("a", t1));
        assert!(!r.allow("a", t1));
        // A long pause refills up to the burst only.
        let t2 = t1 + Duration::from_secs(60);
        assert!((0..3).all(|_| r.allow("a", t2)));
        assert!(!r.allow("a", t2));
    }

    #[test]
    fn zero_rate_is_unlimited_and_idle_buckets_are_pruned() {
        let t0 = Instant::now();
        let mut off = RateLimiter::new(0, 1);
        assert!((0..1000).all(|_| off.allow("a", t0)));
        assert_eq!(off.tracked(), 0);

        let mut r = RateLimiter::new(10, 10);
        for i in 0..PRUNE_AT {
            r.allow(&format!("s{i}"), t0);
        }
        assert_eq!(r.tracked(), PRUNE_AT);
        // Two seconds later every bucket is full again: all dropped.
        r.allow("new", t0 + Duration::from_secs(2));
        assert_eq!(r.tracked(), 1);
    }
}
