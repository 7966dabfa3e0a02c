//! When a round's commit may wait for the next round's.
//!
//! On sled every commit is one `apply_batch`, and sled 0.34.7 writes its
//! log buffer and wakes its whole I/O threadpool at every batch
//! (docs/benchmarks.md, "Paced wake-ups"). At a steady pace a message
//! costs two such rounds: its accept, then its receipt's removal. A round
//! whose only writes are removals (and bookkeeping that nothing waits on)
//! may instead leave them in the store's overlay for the next round's
//! batch, for [`LINGER`] (tokio's timer rounds the deadline up to its
//! next millisecond: 1–2 ms): then one batch carries the next accept
//! with the last removals.
//!
//! Nothing the round sends leaves meanwhile: its stanzas (the receipts
//! relayed back to senders among them) stay queued until the commit, in
//! order, and in fsync mode the fsync is asked only after it. What a
//! crash in the window can cost is what a crash before the commit always
//! could: the removed messages come back and are sent again, and their
//! senders have not seen the receipts. A link lost in the window voids
//! the held stanzas, as it voids whatever was queued for it. A clean
//! stop makes the held commit and sends them (`Router::run`).

use std::time::Duration;

use tokio::time::Instant;

/// How long a removal may wait for the next round's commit.
pub(super) const LINGER: Duration = Duration::from_millis(1);

/// Whether a commit is being held, and since when.
#[derive(Debug, Default)]
pub(super) struct Linger {
    since: Option<Instant>,
}

impl Linger {
    /// At a round's end: whether to hold its commit. `may` says whether
    /// the round's writes may wait (only removals, and writes nothing
    /// waits on, and a store that keeps them for the next round). Held
    /// if so and the first held round is not [`LINGER`] old.
    pub(super) fn hold(&mut self, may: bool, now: Instant) -> bool {
        if !may {
            self.since = None;
            return false;
        }
        let since = *self.since.get_or_insert(now);
        if now.duration_since(since) < LINGER {
            return true;
        }
        self.since = None;
        false
    }

    /// When the held commit must be made, if one is held.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.since.map(|s| s + LINGER)
    }

    /// Whether a commit is held.
    pub(super) fn holding(&self) -> bool {
        self.since.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_for_one_linger_from_the_first_held_round() {
        let t0 = Instant::now();
        let mut l = Linger::default();
        assert!(l.deadline().is_none());
        assert!(l.hold(true, t0));
        assert_eq!(l.deadline(), Some(t0 + LINGER));
        // A later round that may wait does not push the deadline.
        assert!(l.hold(true, t0 + LINGER / 2));
        assert_eq!(l.deadline(), Some(t0 + LINGER));
        assert!(!l.hold(true, t0 + LINGER), "due: committed");
        assert!(!l.holding());
    }

    #[test]
    fn a_round_that_may_not_wait_commits_what_was_held() {
        let t0 = Instant::now();
        let mut l = Linger::default();
        assert!(l.hold(true, t0));
        assert!(!l.hold(false, t0));
        assert!(l.deadline().is_none());
        // And a new hold starts its own window.
        assert!(l.hold(true, t0 + LINGER * 3));
        assert_eq!(l.deadline(), Some(t0 + LINGER * 4));
    }
}
