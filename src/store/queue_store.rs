//! What a queue store promises, whatever holds it: the two traits the
//! router and the admin commands use. `SledStore` (embedded, the default)
//! and `PgStore` (PostgreSQL, shared by several instances) implement them.
//!
//! **Bursts.** Between [`QueueStore::begin`] and [`QueueStore::commit`]
//! every operation's writes are one atomic unit that every read of the
//! same store sees at once; the commit makes them visible to others and
//! (how far depends on the backend) durable. Outside a burst each
//! operation commits by itself. The router wraps each round of events in
//! a burst and sends nothing that depends on a write before its commit.
//!
//! A failed commit leaves the store failed: every later commit fails
//! too, until the process exits and the store is opened again (what a
//! failed sled write needs). [`QueueStore::writable_again`] tells when
//! that is worth doing.
//!
//! Every call is short and may block on the backend (sled's disk reads,
//! PostgreSQL's round trip); [`QueueStore::flush`] may block for an
//! fsync and runs off the async runtime.

use super::{
    AcceptKey, Accepted, AssumedTotals, CheckReport, Confirmed, Contact, Expired, Habit,
    NewMessage, Pruned, PurgeScope, QueueLimits, QueueSummary, RecipientState, Record, Remembered,
    StoreError, Subscription, Totals,
};

/// What the admin commands may read; nothing here writes.
pub trait StoreView: Send + Sync {
    /// Counters over every queue.
    fn totals(&self) -> Result<Totals, StoreError>;
    /// Messages counted delivered without a receipt and still kept.
    fn assumed_totals(&self) -> Result<AssumedTotals, StoreError>;
    /// The oldest pending message of the whole store.
    fn oldest(&self) -> Result<Option<(String, u64, Record)>, StoreError>;
    /// The `n` largest queues by message count, largest first.
    fn top_queues(&self, n: usize) -> Result<Vec<QueueSummary>, StoreError>;
    fn recipient(&self, recipient: &str) -> Result<RecipientState, StoreError>;
    /// Every recipient the store knows, with its state.
    fn recipients(&self) -> Result<Vec<(String, RecipientState)>, StoreError>;
    /// Up to `limit` pending messages with seq >= `from`, in order.
    fn pending_from(
        &self,
        recipient: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Record)>, StoreError>;
    /// How many of a queue's messages `scope` takes.
    fn count_purgeable(&self, recipient: &str, scope: PurgeScope) -> Result<u64, StoreError>;
    /// Clients remembered answering all, and answering contacts only.
    fn habit_counts(&self) -> Result<(u64, u64), StoreError>;
    /// A seq larger than every seq handed out so far (by any instance).
    fn next_seq(&self) -> Result<u64, StoreError>;
    /// Bytes the store takes where it lives.
    fn size_on_disk(&self) -> u64;
    /// Read the whole store and verify its invariants (`store check`).
    fn check(&self) -> Result<CheckReport, StoreError>;
    /// The version of the backend's layout.
    fn schema_version(&self) -> u32;
    /// Up to `limit` remembered messages after seq `after`, in seq order.
    fn remembered(&self, after: Option<u64>, limit: usize) -> Result<Vec<Remembered>, StoreError>;
    /// Stanzas all-active instances handed over that no leader has
    /// taken yet (none where instances cannot share the store).
    fn handed_over(&self) -> Result<u64, StoreError> {
        Ok(0)
    }
}

/// Everything the router does with its store.
pub trait QueueStore: StoreView {
    /// Start a burst (see the module's doc).
    fn begin(&self);
    /// End a burst; how many writes it applied.
    fn commit(&self) -> Result<usize, StoreError>;
    /// Whether the burst's writes may be left for the next burst's commit
    /// (see `router/linger.rs`): there are some, and they wait in memory,
    /// seen by every read, across `begin` (sled's overlay). False on a
    /// store that cannot carry writes over, or after a failed commit.
    fn commit_can_wait(&self) -> bool {
        false
    }
    /// Make every later commit fail, as after a write error (tests).
    #[cfg(test)]
    fn fail_commits(&self);
    /// Make everything committed so far durable. Blocking.
    fn flush(&self) -> Result<usize, StoreError>;
    /// Whether a commit is durable by itself (PostgreSQL waits for its
    /// WAL flush), so that `flush` adds nothing.
    fn durable_at_commit(&self) -> bool {
        false
    }
    /// After the final flush of a clean shutdown: leave what the next
    /// open compares against.
    fn write_shutdown_marker(&self) -> Result<(), StoreError>;
    /// After a failed commit: whether opening the store again would
    /// likely work (space on the disk, the database reachable).
    fn writable_again(&self) -> bool;
    /// Try to take the lead of `domain` among the instances that share
    /// this store: only the leader connects to the server; the others
    /// wait as standbys. Held until this process (or, for PostgreSQL,
    /// its database session) ends. A store only one process can open
    /// (sled) always leads.
    fn lead(&self, domain: &str) -> Result<bool, StoreError>;
    /// Whether this process still holds the lead it took (false once its
    /// database session ended, when another instance may lead).
    fn still_leads(&self, domain: &str) -> Result<bool, StoreError>;
    /// Whether other instances may share this store (and stand by).
    fn shared(&self) -> bool;
    /// Refuse a store that holds another component domain's queues (a
    /// shared store records the domain at its first lead).
    fn check_domain(&self, _domain: &str) -> Result<(), StoreError> {
        Ok(())
    }

    /// Instances connected at once: hand a stanza this instance received
    /// at `arrived_us` (µs since the epoch) to the leader, in the current
    /// burst. Durable once the burst commits; the leader is woken then.
    /// Only a shared store can.
    fn forward(&self, stanza: &str, arrived_us: i64) -> Result<(), StoreError>;
    /// The leader: take up to `max` forwarded stanzas (only those that
    /// arrived at or before `upto_us`, if given), in the order they
    /// arrived, each with its arrival, in the current burst (if it
    /// fails, they stay for the next leader).
    fn take_forwarded(
        &self,
        max: usize,
        upto_us: Option<i64>,
    ) -> Result<Vec<(i64, String)>, StoreError>;
    /// Remember that the instance `name` (its twin probes' name) led this
    /// store, for as long as the store lives.
    fn remember_leader(&self, _name: &str) -> Result<(), StoreError> {
        Ok(())
    }
    /// Whether the instance `name` led this store at some time.
    fn led_here(&self, _name: &str) -> Result<bool, StoreError> {
        Ok(false)
    }
    /// Fires when a stanza was forwarded (only on a shared store; the
    /// first call starts listening).
    fn forwarded_wakeup(&self) -> Option<std::sync::Arc<tokio::sync::Notify>>;

    /// The router is about to accept these (a hint: wrong or missing ones
    /// cost only time): a store whose reads are round trips reads what
    /// their accepts need at once. An error is the store's failure.
    fn look_ahead(&self, _accepts: &[AcceptKey<'_>]) -> Result<(), StoreError> {
        Ok(())
    }
    /// Store a message unless it is a duplicate, its id is in use, or a
    /// limit is reached: dedup, limits and the write are one atomic step.
    fn accept(&self, msg: NewMessage<'_>, limits: QueueLimits) -> Result<Accepted, StoreError>;
    /// The seq of a message by (recipient, sender, id), pending or not.
    fn seq_of(
        &self,
        recipient: &str,
        sender_bare: &str,
        id: &str,
    ) -> Result<Option<u64>, StoreError>;
    fn get(&self, recipient: &str, seq: u64) -> Result<Option<Record>, StoreError>;
    /// Remove confirmed messages (and the tombstones of those counted
    /// delivered earlier); their ids stay remembered for dedup.
    fn confirm(&self, recipient: &str, seqs: &[u64]) -> Result<Confirmed, StoreError>;
    /// Remove a message refused for good, and forget its ids (a seq
    /// under another recipient names none of its messages: nothing goes).
    fn forget(&self, recipient: &str, seq: u64) -> Result<Option<Record>, StoreError>;
    /// Remove what `scope` takes from a queue; the seqs removed.
    fn purge(&self, recipient: &str, scope: PurgeScope) -> Result<Vec<u64>, StoreError>;
    /// One step of the expiry walk, in accept order.
    fn expire(&self, cutoff_ms: i64, limit: usize) -> Result<Expired, StoreError>;
    /// Seqs of pending messages from `sender_bare` up to and including
    /// `upto`, for a XEP-0333 marker: at most `limit` looked at.
    fn pending_from_sender_upto(
        &self,
        recipient: &str,
        sender_bare: &str,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<u64>, StoreError>;

    fn contact(&self, recipient: &str, sender_bare: &str) -> Result<Option<Contact>, StoreError>;
    fn set_contact(
        &self,
        recipient: &str,
        sender_bare: &str,
        contact: Contact,
    ) -> Result<(), StoreError>;
    fn set_subscription(&self, recipient: &str, sub: Subscription) -> Result<(), StoreError>;

    /// Count pending messages delivered without a receipt: they leave the
    /// queue and a tombstone keeps each. What left.
    fn assume(
        &self,
        recipient: &str,
        seqs: &[u64],
        now_ms: i64,
    ) -> Result<Vec<(u64, Record)>, StoreError>;
    /// A late bounce: put a tombstoned message back at its place.
    fn restore(&self, recipient: &str, seq: u64) -> Result<Option<Record>, StoreError>;
    /// One step of pruning the tombstones written at or before `cutoff_ms`.
    fn prune_assumed(&self, cutoff_ms: i64, limit: usize) -> Result<Pruned, StoreError>;
    /// Tombstoned messages from `sender_bare` up to and including `upto`.
    fn assumed_from_sender_upto(
        &self,
        recipient: &str,
        sender_bare: &str,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<u64>, StoreError>;

    /// Every remembered client of `recipient`, by resource.
    fn habits(&self, recipient: &str) -> Result<Vec<(String, Habit)>, StoreError>;
    /// Remember (`Some`) or forget (`None`) what a client does.
    fn set_habit(
        &self,
        recipient: &str,
        resource: &str,
        habit: Option<Habit>,
    ) -> Result<(), StoreError>;

    /// Whether the store holds nothing (an import needs that).
    fn is_empty_of_data(&self) -> Result<bool, StoreError>;
    /// Hand out only seqs of `next` and above from now on (`store
    /// import`, before it writes messages under seqs below `next`).
    fn skip_seqs_below(&self, next: u64) -> Result<(), StoreError>;
    /// Write exported recipients (each with its subscription, even when
    /// it has nothing pending) and messages, each message under its own
    /// seq (which its stanza-id is made of), with its dedup keys and
    /// counters (`store import`).
    fn import(
        &self,
        recipients: &[(String, Subscription)],
        entries: &[Remembered],
    ) -> Result<(), StoreError>;
}
