//! Which messages may leave without a XEP-0203 `<delay/>`.

use std::collections::HashSet;

/// The messages that may still go out "at once", with no delay: those
/// accepted in the current round, and those whose own write the current
/// round made durable (an fsync, or a PostgreSQL commit). A message that
/// goes out later waited for something (the recipient, a relay contact,
/// room in the window, a retry, a restart), and its client must show it
/// with the time it was accepted, not the time it arrived; so its first
/// send carries the delay as much as any replay.
#[derive(Debug, Default)]
pub(super) struct AtOnce {
    seqs: HashSet<u64>,
}

impl AtOnce {
    /// Message `seq` was accepted, or became durable, in this round.
    pub(super) fn mark(&mut self, seq: u64) {
        self.seqs.insert(seq);
    }

    /// Whether message `seq`, sent now for the first time, goes at once.
    pub(super) fn contains(&self, seq: u64) -> bool {
        self.seqs.contains(&seq)
    }

    /// The round is over: what did not leave in it has waited.
    pub(super) fn end_round(&mut self) {
        self.seqs.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_round_counts() {
        let mut a = AtOnce::default();
        a.mark(7);
        assert!(a.contains(7) && !a.contains(8));
        a.end_round();
        assert!(!a.contains(7), "a later round has waited");
    }
}
