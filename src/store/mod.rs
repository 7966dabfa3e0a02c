//! What a queue store holds: the types every backend shares. The sled
//! backend, the embedded default, is in `sled_store` (its key layout,
//! bursts and the `store` subcommands).

use serde::{Deserialize, Serialize};

#[cfg(test)]
mod contract_tests;
mod pg_store;
mod queue_store;
mod sled_store;
#[cfg(test)]
pub mod test_databases;
mod transfer;

pub use queue_store::{QueueStore, StoreView};

pub use pg_store::PgStore;
pub use sled_store::SledStore;
pub use transfer::{TransferError, TransferSummary, export, import};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path} is in use by another process (sled lock held)")]
    Locked { path: String },
    #[error(
        "store {path} was written by a newer redeliver (schema {found}, this build reads {reads})"
    )]
    NewerSchema {
        path: String,
        found: u32,
        reads: u32,
    },
    #[error(
        "store {path} was created with store.compression = {created}: set it so to open \
         the store (to change it, export the store and import it into a new one)"
    )]
    Compression { path: String, created: bool },
    #[error("store is corrupted: {0}")]
    Corrupt(String),
    #[error("store error: {0}")]
    Sled(#[from] sled::Error),
    #[error("database error: {0}")]
    Database(String),
    #[error("store error: an earlier write failed ({0}); restart to reopen the store")]
    Failed(String),
}

/// One pending message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Milliseconds since the Unix epoch when the message was accepted.
    pub accepted_at_ms: i64,
    /// The sender's full JID as it reached us; receipts are forwarded there.
    pub sender: String,
    /// The message id as relayed (the sender's, or one we generated).
    pub id: String,
    /// The stanza to relay, already addressed, as XML.
    pub stanza: String,
}

/// Presence subscription of the component's bare domain to a recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Subscription {
    #[default]
    None,
    Requested,
    Subscribed,
}

/// A relay address's presence subscription to one recipient (a relay
/// contact): clients that answer receipts only to roster contacts answer
/// it once the recipient approved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    pub subscription: Subscription,
    /// When the subscription was asked for.
    pub asked_at_ms: i64,
}

/// Per-recipient state, kept incrementally (sled's `len` is a full scan).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RecipientState {
    pub subscription: Subscription,
    pub pending: u64,
    pub bytes: u64,
}

/// Counters over the whole store, kept in the same batches as the queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Totals {
    /// Pending messages.
    pub pending: u64,
    /// Bytes of pending stanzas.
    pub bytes: u64,
    /// Recipients with at least one pending message.
    pub recipients: u64,
}

impl Totals {
    /// Account for a recipient's state going from `before` to `after`.
    fn apply(&mut self, before: &RecipientState, after: &RecipientState) {
        self.pending = (self.pending + after.pending).saturating_sub(before.pending);
        self.bytes = (self.bytes + after.bytes).saturating_sub(before.bytes);
        match (before.pending > 0, after.pending > 0) {
            (false, true) => self.recipients += 1,
            (true, false) => self.recipients = self.recipients.saturating_sub(1),
            _ => {}
        }
    }
}

/// One queue in a [`SledStore::top_queues`] listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSummary {
    pub recipient: String,
    pub pending: u64,
    pub bytes: u64,
    /// Accept time of its oldest pending message.
    pub oldest_ms: Option<i64>,
}

/// A message's accept time and dedup keys, kept until it expires, so
/// that the id indexes do not grow forever: on sled written when the
/// message leaves its queue (while it is pending, its queue entry names
/// them), in stores from before schema 4 with every accept. The expiry
/// walk takes them in seq (so accept) order, with the message if it is
/// still pending.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expiry {
    pub accepted_at_ms: i64,
    pub recipient: String,
    /// The `i` and `o` keys of the message.
    keys: Vec<Vec<u8>>,
}

/// What a confirmation removed: messages still pending, and messages
/// counted delivered earlier without a receipt (their tombstones), which
/// the confirmation now settles for good.
#[derive(Debug, Default)]
pub struct Confirmed {
    pub pending: Vec<(u64, Record)>,
    pub counted: Vec<(u64, Record)>,
}

impl Confirmed {
    pub fn len(&self) -> usize {
        self.pending.len() + self.counted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every removed message, the pending ones first.
    pub fn all(&self) -> impl Iterator<Item = &(u64, Record)> {
        self.pending.iter().chain(&self.counted)
    }
}

/// One step of the expiry walk.
#[derive(Debug, Default)]
pub struct Expired {
    /// Messages that were still pending: (recipient, seq, record).
    pub messages: Vec<(String, u64, Record)>,
    /// Accepted messages whose expiry entry (and dedup keys) went.
    pub entries: usize,
    /// Whether the walk stopped at its limit with more to do.
    pub more: bool,
}

/// Which of a queue's messages a purge takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgeScope {
    /// Only messages with a seq below this (what existed when the
    /// operator looked).
    pub below_seq: u64,
    /// Only messages accepted at or before this time, if set.
    pub accepted_before_ms: Option<i64>,
}

impl PurgeScope {
    fn takes(&self, seq: u64, rec: &Record) -> bool {
        seq < self.below_seq
            && self
                .accepted_before_ms
                .is_none_or(|t| rec.accepted_at_ms <= t)
    }
}

/// A new message to store.
pub struct NewMessage<'a> {
    pub recipient: &'a str,
    /// The sender's bare JID, for the dedup indexes.
    pub sender_bare: &'a str,
    pub origin_id: Option<&'a str>,
    /// [`content_hash`] of what the message says: the same under a used
    /// id is a resubmission, different is another message.
    pub content_hash: u64,
    pub record: Record,
}

/// A message the router is about to accept, as far as it can tell before
/// handling it: what [`QueueStore::look_ahead`] reads for.
#[derive(Debug, Clone, Copy)]
pub struct AcceptKey<'a> {
    pub recipient: &'a str,
    pub sender_bare: &'a str,
    pub id: &'a str,
    pub origin_id: Option<&'a str>,
}

/// Per-recipient limits applied at accept.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub max_pending: u64,
    pub max_bytes: u64,
    /// Bytes of pending stanzas over the whole store.
    pub max_store_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    Stored {
        seq: u64,
    },
    /// The same stanza under the same (sender, recipient, id) or
    /// origin-id as an earlier message: a resubmission, stored once.
    Duplicate {
        seq: u64,
    },
    /// A different message under an id (or origin-id) that a message of
    /// the same sender to the same recipient still pending holds: refused,
    /// since a receipt for that id could not tell the two apart.
    IdInUse {
        seq: u64,
    },
    QueueFull,
    /// The whole store holds `max_store_bytes` of pending stanzas.
    StoreFull,
}

/// Clients remembered per recipient; past that, the one heard from
/// longest ago is forgotten.
pub const MAX_HABITS: usize = 16;

/// To whom a client answers receipt requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Answers {
    /// Only roster contacts it shares presence with (Gajim,
    /// Conversations, Monal, Psi): seen answering a relay address the
    /// recipient had approved.
    Contacts,
    /// Everyone (Dino, Profanity, Movim): seen answering a relay address
    /// the recipient had not approved.
    All,
}

/// One client's habit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Habit {
    pub answers: Answers,
    /// Receipt timeouts in a row (one per silent spell) since its last
    /// answer: at two it is forgotten, so that a client that stopped
    /// answering does not see messages again at every login.
    pub missed: u8,
    /// When it last answered.
    pub seen_at_ms: i64,
}

/// How many tombstones the store keeps, and their stanza bytes (these
/// count against `max_store_bytes` with the pending ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AssumedTotals {
    pub messages: u64,
    pub bytes: u64,
}

impl AssumedTotals {
    pub(crate) fn add(&mut self, rec: &Record) {
        self.messages += 1;
        self.bytes += rec.stanza.len() as u64;
    }

    pub(crate) fn sub(&mut self, rec: &Record) {
        self.messages = self.messages.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(rec.stanza.len() as u64);
    }
}

/// One pruning step.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Tombstones removed.
    pub removed: usize,
    /// Whether the step stopped at its limit with more to do.
    pub more: bool,
}

/// What a check found.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub recipients: u64,
    pub messages: u64,
    pub bytes: u64,
    /// Accepted messages still remembered for dedup, pending or not.
    pub entries: u64,
    pub problems: Vec<String>,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// An accepted message still remembered (pending, or confirmed but
/// inside its time to live for duplicate detection), as `store export`
/// writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remembered {
    pub seq: u64,
    pub accepted_at_ms: i64,
    pub recipient: String,
    /// The (sender, id) keys it holds.
    pub ids: Vec<IdKey>,
    /// The (sender, origin-id) keys it holds.
    pub origins: Vec<IdKey>,
    /// The message, while it is pending.
    pub message: Option<Record>,
}

/// A dedup key a remembered message holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdKey {
    /// The sender's bare JID.
    pub sender: String,
    pub value: String,
    /// The content hash of the message that holds it; without it a
    /// reused id counts as a resubmission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<u64>,
}

/// What tells a resubmission from a different message under a reused
/// id: FNV-1a over what the message says (the router picks the parts;
/// see `router::content_of`). Stable across builds, since it is stored.
pub fn content_hash(content: &[u8]) -> u64 {
    content.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The bare part of a full JID string.
pub fn bare_of(jid: &str) -> &str {
    jid.split_once('/').map_or(jid, |(b, _)| b)
}
