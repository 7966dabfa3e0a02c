//! The only code that touches sled.
//!
//! One sled tree holds everything, under one-byte key prefixes, so that an
//! accept (queue entry + id index + recipient counters) is one atomic
//! `apply_batch`:
//!
//! | key | value |
//! |---|---|
//! | `q` recipient 0x00 seq(u64 BE) | [`Record`] |
//! | `i` recipient 0x00 sender 0x00 id | seq (u64 BE) |
//! | `o` recipient 0x00 sender 0x00 origin-id | seq (u64 BE) |
//! | `r` recipient | [`RecipientState`] |
//! | `a` seq(u64 BE) | recipient (age index: the first key is the oldest pending message) |
//! | `g` | [`Totals`] over all recipients |
//! | `x` seq(u64 BE) | [`Expiry`]: when the message was accepted and its dedup keys |
//! | `m` name | metadata (schema version) |
//! | `c` recipient 0x00 sender | [`Contact`]: the sender's relay address's subscription |
//! | `t` recipient 0x00 seq(u64 BE) | a message counted delivered without a receipt (`assumed.rs`) |
//! | `u` at(u64 BE) seq(u64 BE) | recipient (when each `t` entry was written, for pruning) |
//! | `l` recipient 0x00 resource | [`Habit`]: whether that client answers receipts |
//! | `h` | [`AssumedTotals`]: how many `t` entries, and their stanza bytes |
//!
//! Sequence numbers come from sled's `generate_id`, which is monotonic
//! across restarts, so each recipient's queue is in accept order and a seq
//! also names a message uniquely in the whole store.
//!
//! The router is the only writer, so read-modify-write of the counters
//! needs no transaction. Calls here are short; `flush` blocks and must run
//! off the async runtime.
//!
//! **Bursts.** sled 0.34 seals and writes its log buffer on every
//! `apply_batch` (measured: 17 KB written to disk per relayed message,
//! and the router stalled in sled's thread pool, when every accept and
//! every confirmation was a batch of its own). So between [`Store::begin`]
//! and [`Store::commit`] the writes of every operation gather in an
//! in-memory overlay that every read here sees, and the commit applies
//! them as one atomic batch. Outside a burst each operation commits at
//! once. The router wraps each round of events in a burst and sends
//! nothing that depends on a write before its commit.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::path::Path;
use std::sync::Mutex;

use sled::IVec;

use serde::{Deserialize, Serialize};

use crate::config::Durability;

mod assumed;
mod check;
mod habits;
mod transfer;

pub use assumed::{AssumedTotals, Pruned};
pub use check::CheckReport;
pub use habits::{Answers, Habit, MAX_HABITS};
pub use transfer::{TransferError, TransferSummary};

/// Version of the layout above. Bumped on any incompatible change.
pub const SCHEMA_VERSION: u32 = 2;
const SCHEMA_KEY: &[u8] = b"mschema";
const TOTALS_KEY: &[u8] = b"g";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path} is in use by another process (sled lock held)")]
    Locked { path: String },
    #[error(
        "store {path} was written by a newer redeliver (schema {found}, this build reads {SCHEMA_VERSION})"
    )]
    NewerSchema { path: String, found: u32 },
    #[error("store is corrupted: {0}")]
    Corrupt(String),
    #[error("store error: {0}")]
    Sled(#[from] sled::Error),
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

/// One queue in a [`Store::top_queues`] listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSummary {
    pub recipient: String,
    pub pending: u64,
    pub bytes: u64,
    /// Accept time of its oldest pending message.
    pub oldest_ms: Option<i64>,
}

/// Written with every accepted message, removed when it expires: the
/// expiry walk goes through these in seq (so accept) order, drops the
/// message if it is still pending, and always drops its dedup keys, so
/// that the id indexes do not grow forever.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expiry {
    pub accepted_at_ms: i64,
    pub recipient: String,
    /// The `i` and `o` keys of the message.
    keys: Vec<Vec<u8>>,
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

pub struct Store {
    db: sled::Db,
    path: std::path::PathBuf,
    overlay: Mutex<Overlay>,
}

/// Writes not yet applied to sled (see "Bursts" above).
#[derive(Default)]
struct Overlay {
    /// Inside a burst: writes wait for [`Store::commit`].
    deferred: bool,
    /// Key to new value; `None` removes the key.
    writes: BTreeMap<Vec<u8>, Option<IVec>>,
    /// A commit failed: sled fails (or hangs) on every later write in
    /// this process, so nothing more is tried; writes stay in memory,
    /// readable, until the process exits to reopen the store.
    failed: Option<String>,
}

/// The writes of one operation, applied together.
#[derive(Default)]
struct Writes(Vec<(Vec<u8>, Option<IVec>)>);

impl Writes {
    fn insert(&mut self, k: impl AsRef<[u8]>, v: impl AsRef<[u8]>) {
        self.0
            .push((k.as_ref().to_vec(), Some(IVec::from(v.as_ref()))));
    }

    fn remove(&mut self, k: impl AsRef<[u8]>) {
        self.0.push((k.as_ref().to_vec(), None));
    }
}

/// sled's entries in a key range with the overlay's writes laid over
/// them, in key order.
struct Merged {
    db: std::iter::Peekable<sled::Iter>,
    overlay: std::iter::Peekable<std::vec::IntoIter<(Vec<u8>, Option<IVec>)>>,
}

impl Merged {
    /// `writes`: the overlay's entries in the same range, in key order
    /// (copied, so that the overlay's lock is not held while iterating).
    fn new<'a>(
        db: sled::Iter,
        writes: impl Iterator<Item = (&'a Vec<u8>, &'a Option<IVec>)>,
    ) -> Merged {
        let overlay: Vec<_> = writes.map(|(k, v)| (k.clone(), v.clone())).collect();
        Merged {
            db: db.peekable(),
            overlay: overlay.into_iter().peekable(),
        }
    }
}

impl Iterator for Merged {
    type Item = Result<(IVec, IVec), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        use std::cmp::Ordering;
        loop {
            let order = match (self.db.peek(), self.overlay.peek()) {
                (None, None) => return None,
                (Some(Err(_)), _) | (Some(Ok(_)), None) => Ordering::Greater,
                (None, Some(_)) => Ordering::Less,
                (Some(Ok((dk, _))), Some((ok, _))) => ok.as_slice().cmp(dk.as_ref()),
            };
            if order == Ordering::Greater {
                return self.db.next().map(|kv| kv.map_err(StoreError::from));
            }
            if order == Ordering::Equal {
                self.db.next(); // overwritten (or removed) in the overlay
            }
            let (k, v) = self.overlay.next()?;
            if let Some(v) = v {
                return Some(Ok((IVec::from(k), v)));
            }
        }
    }
}

/// Written next to sled's files after a clean shutdown's final flush,
/// removed at the next open after comparing. sled recovers a damaged log
/// by cutting it at the first bad record, silently; a store damaged while
/// stopped (disk, copy, backup) then opens with fewer messages than it
/// was stopped with, which this catches.
const SHUTDOWN_MARKER: &str = "redeliver-clean-shutdown";

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct ShutdownMarker {
    totals: Totals,
    /// Seq of the newest remembered message.
    last_entry: Option<u64>,
}

fn key(prefix: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + parts.iter().map(|p| p.len() + 1).sum::<usize>());
    k.push(prefix);
    for (n, p) in parts.iter().enumerate() {
        if n > 0 {
            k.push(0);
        }
        k.extend_from_slice(p);
    }
    k
}

fn queue_prefix(recipient: &str) -> Vec<u8> {
    let mut k = key(b'q', &[recipient.as_bytes()]);
    k.push(0);
    k
}

fn queue_key(recipient: &str, seq: u64) -> Vec<u8> {
    let mut k = queue_prefix(recipient);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn id_key(recipient: &str, sender: &str, id: &str) -> Vec<u8> {
    key(
        b'i',
        &[recipient.as_bytes(), sender.as_bytes(), id.as_bytes()],
    )
}

fn origin_key(recipient: &str, sender: &str, origin: &str) -> Vec<u8> {
    key(
        b'o',
        &[recipient.as_bytes(), sender.as_bytes(), origin.as_bytes()],
    )
}

fn contact_key(recipient: &str, sender_bare: &str) -> Vec<u8> {
    key(b'c', &[recipient.as_bytes(), sender_bare.as_bytes()])
}

fn recipient_key(recipient: &str) -> Vec<u8> {
    key(b'r', &[recipient.as_bytes()])
}

fn seq_key(prefix: u8, seq: u64) -> [u8; 9] {
    let mut k = [prefix; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn age_key(seq: u64) -> [u8; 9] {
    seq_key(b'a', seq)
}

fn expiry_key(seq: u64) -> [u8; 9] {
    seq_key(b'x', seq)
}

/// (recipient, sender, id or origin-id) of an `i` or `o` key: the
/// inverse of [`id_key`] and [`origin_key`].
fn split_index_key(k: &[u8]) -> Result<(String, String, String), StoreError> {
    let bad = || StoreError::Corrupt("unreadable index key".into());
    let mut parts = k.get(1..).ok_or_else(bad)?.splitn(3, |&b| b == 0);
    let mut next = || {
        parts
            .next()
            .and_then(|p| String::from_utf8(p.to_vec()).ok())
            .ok_or_else(bad)
    };
    Ok((next()?, next()?, next()?))
}

/// The recipient of a queue key (`q` recipient 0x00 seq).
fn recipient_of_queue_key(k: &[u8]) -> Result<String, StoreError> {
    let name = k
        .len()
        .checked_sub(9)
        .filter(|&n| n >= 1)
        .map(|n| &k[1..n])
        .ok_or_else(|| StoreError::Corrupt("short queue key".into()))?;
    String::from_utf8(name.to_vec())
        .map_err(|_| StoreError::Corrupt("queue key is not UTF-8".into()))
}

/// An id index value: the seq of the message that holds the id, then
/// the [`content_hash`] of its stanza (absent in entries written before
/// the hash was kept, and in imports of such stores).
fn index_value(seq: u64, hash: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&seq.to_be_bytes());
    v[8..].copy_from_slice(&hash.to_be_bytes());
    v
}

/// The seq and, if kept, the content hash of an id index value.
fn decode_index(v: &[u8]) -> Result<(u64, Option<u64>), StoreError> {
    match v.len() {
        8 => Ok((decode_seq(v)?, None)),
        16 => Ok((decode_seq(&v[..8])?, Some(decode_seq(&v[8..])?))),
        n => Err(StoreError::Corrupt(format!(
            "index value is {n} bytes, not 8 or 16"
        ))),
    }
}

/// What tells a resubmission from a different message under a reused
/// id: FNV-1a over what the message says (the router picks the parts;
/// see `router::content_of`). Stable across builds, since it is stored.
pub fn content_hash(content: &[u8]) -> u64 {
    content.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn decode_seq(v: &[u8]) -> Result<u64, StoreError> {
    let b: [u8; 8] = v
        .try_into()
        .map_err(|_| StoreError::Corrupt("index value is not 8 bytes".into()))?;
    Ok(u64::from_be_bytes(b))
}

fn seq_of_queue_key(k: &[u8]) -> Result<u64, StoreError> {
    let tail = k
        .len()
        .checked_sub(8)
        .map(|n| &k[n..])
        .ok_or_else(|| StoreError::Corrupt("short queue key".into()))?;
    decode_seq(tail)
}

fn decode<T: for<'de> Deserialize<'de>>(v: &[u8], what: &str) -> Result<T, StoreError> {
    postcard::from_bytes(v).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("postcard encodes plain structs")
}

impl Store {
    fn overlay(&self) -> std::sync::MutexGuard<'_, Overlay> {
        // A panic while holding it cannot leave a half-made write behind
        // (inserts into the map are whole), so a poisoned lock is usable.
        self.overlay.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Make every later commit fail, as after a write error (tests).
    #[cfg(test)]
    pub fn fail_commits(&self) {
        self.overlay().failed = Some("injected failure".into());
    }

    /// Start a burst: writes wait in memory until [`Store::commit`].
    pub fn begin(&self) {
        self.overlay().deferred = true;
    }

    /// End a burst: apply its writes to sled as one atomic batch. On
    /// failure they stay in memory, readable (so that the senders of what
    /// was not stored can be told), and every later commit fails too.
    pub fn commit(&self) -> Result<usize, StoreError> {
        let mut o = self.overlay();
        o.deferred = false;
        Self::apply_overlay(&self.db, &mut o)
    }

    fn apply_overlay(db: &sled::Db, o: &mut Overlay) -> Result<usize, StoreError> {
        if let Some(e) = &o.failed {
            return Err(StoreError::Failed(e.clone()));
        }
        if o.writes.is_empty() {
            return Ok(0);
        }
        let n = o.writes.len();
        let mut batch = sled::Batch::default();
        for (k, v) in &o.writes {
            match v {
                Some(v) => batch.insert(k.as_slice(), v.clone()),
                None => batch.remove(k.as_slice()),
            }
        }
        if let Err(e) = db.apply_batch(batch) {
            o.failed = Some(e.to_string());
            return Err(e.into());
        }
        o.writes.clear();
        Ok(n)
    }

    /// Apply one operation's writes (now, or at the burst's commit).
    fn write(&self, w: Writes) -> Result<(), StoreError> {
        let mut o = self.overlay();
        o.writes.extend(w.0);
        if !o.deferred {
            Self::apply_overlay(&self.db, &mut o)?;
        }
        Ok(())
    }

    fn read(&self, k: &[u8]) -> Result<Option<IVec>, StoreError> {
        if let Some(v) = self.overlay().writes.get(k) {
            return Ok(v.clone());
        }
        Ok(self.db.get(k)?)
    }

    /// Entries whose keys start with `prefix`, in key order.
    fn scan(&self, prefix: &[u8]) -> Merged {
        let o = self.overlay();
        let writes = o
            .writes
            .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix));
        Merged::new(self.db.scan_prefix(prefix), writes)
    }

    /// Entries with `lo <= key <= hi`, in key order.
    fn scan_range(&self, lo: &[u8], hi: &[u8]) -> Merged {
        let o = self.overlay();
        let writes = o
            .writes
            .range::<[u8], _>((Bound::Included(lo), Bound::Included(hi)));
        Merged::new(self.db.range(lo..=hi), writes)
    }

    /// Open (or create) the store. Blocking: call it off the runtime.
    pub fn open(
        path: &Path,
        durability: Durability,
        flush_interval_ms: u64,
        cache_bytes: u64,
    ) -> Result<Store, StoreError> {
        let flush_every = match durability {
            // Every write that matters is flushed explicitly (group commit).
            Durability::Fsync => None,
            Durability::Batched => Some(flush_interval_ms),
        };
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .flush_every_ms(flush_every)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                    StoreError::Locked {
                        path: path.display().to_string(),
                    }
                }
                sled::Error::Io(io) if io.to_string().contains("lock") => StoreError::Locked {
                    path: path.display().to_string(),
                },
                sled::Error::Corruption { .. } => StoreError::Corrupt(e.to_string()),
                other => StoreError::Sled(other),
            })?;
        let store = Store {
            db,
            path: path.to_owned(),
            overlay: Mutex::default(),
        };
        match store.db.get(SCHEMA_KEY)? {
            None => {
                store.db.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
                store.db.flush()?;
            }
            Some(v) => {
                let found = u32::from_be_bytes(
                    v.as_ref()
                        .try_into()
                        .map_err(|_| StoreError::Corrupt("schema key".into()))?,
                );
                if found > SCHEMA_VERSION {
                    return Err(StoreError::NewerSchema {
                        path: path.display().to_string(),
                        found,
                    });
                }
                if found < 2 {
                    store.migrate_to_2()?;
                }
            }
        }
        store.compare_shutdown_marker()?;
        Ok(store)
    }

    fn marker(&self) -> Result<ShutdownMarker, StoreError> {
        let last_entry = match self.db.scan_prefix(b"x").next_back() {
            Some(kv) => Some(decode_seq(&kv?.0[1..])?),
            None => None,
        };
        Ok(ShutdownMarker {
            totals: self.totals()?,
            last_entry,
        })
    }

    /// After the final flush of a clean shutdown: record what the store
    /// holds, for the next open to compare.
    pub fn write_shutdown_marker(&self) -> Result<(), StoreError> {
        use std::io::Write;
        let m = self.marker()?;
        let path = self.path.join(SHUTDOWN_MARKER);
        let mut f = std::fs::File::create(&path).map_err(sled::Error::Io)?;
        f.write_all(&encode(&m)).map_err(sled::Error::Io)?;
        f.sync_all().map_err(sled::Error::Io)?;
        Ok(())
    }

    fn compare_shutdown_marker(&self) -> Result<(), StoreError> {
        let path = self.path.join(SHUTDOWN_MARKER);
        let Ok(bytes) = std::fs::read(&path) else {
            return Ok(()); // first start, or after a crash
        };
        let recorded: ShutdownMarker = decode(&bytes, "shutdown marker")?;
        let found = self.marker()?;
        if recorded != found {
            return Err(StoreError::Corrupt(format!(
                "{} was stopped cleanly holding {} pending messages (newest entry {:?}) but now \
                 holds {} (newest {:?}): the store was damaged while stopped and sled cut its \
                 log. Restore it from a backup or an export; to accept the loss, delete {}",
                self.path.display(),
                recorded.totals.pending,
                recorded.last_entry,
                found.totals.pending,
                found.last_entry,
                path.display()
            )));
        }
        // From now on the store changes; a crash leaves no marker.
        std::fs::remove_file(&path).map_err(sled::Error::Io)?;
        Ok(())
    }

    /// Schema 1 had neither the age index, the expiry entries nor the
    /// totals: build them from the queues and the id indexes, once. A
    /// confirmed message's accept time is not known any more: its dedup
    /// keys count from the migration.
    fn migrate_to_2(&self) -> Result<(), StoreError> {
        let now = chrono::Utc::now().timestamp_millis();
        let mut batch = sled::Batch::default();
        let mut expiries: std::collections::BTreeMap<u64, Expiry> = Default::default();
        for kv in self.db.scan_prefix(b"q") {
            let (k, v) = kv?;
            let seq = seq_of_queue_key(&k)?;
            let recipient = recipient_of_queue_key(&k)?;
            batch.insert(&age_key(seq), recipient.as_bytes());
            let rec: Record = decode(&v, "record")?;
            expiries.insert(
                seq,
                Expiry {
                    accepted_at_ms: rec.accepted_at_ms,
                    recipient,
                    keys: vec![],
                },
            );
        }
        for prefix in [b"i", b"o"] {
            for kv in self.db.scan_prefix(prefix) {
                let (k, v) = kv?;
                let (seq, _) = decode_index(&v)?;
                let (recipient, _, _) = split_index_key(&k)?;
                expiries
                    .entry(seq)
                    .or_insert_with(|| Expiry {
                        accepted_at_ms: now,
                        recipient,
                        keys: vec![],
                    })
                    .keys
                    .push(k.to_vec());
            }
        }
        for (seq, e) in &expiries {
            batch.insert(&expiry_key(*seq), encode(e));
        }
        let mut totals = Totals::default();
        for (_, state) in self.recipients()? {
            totals.apply(&RecipientState::default(), &state);
        }
        batch.insert(TOTALS_KEY, encode(&totals));
        batch.insert(SCHEMA_KEY, &2u32.to_be_bytes());
        self.db.apply_batch(batch)?;
        self.db.flush()?;
        Ok(())
    }

    /// Counters over every queue.
    pub fn totals(&self) -> Result<Totals, StoreError> {
        match self.read(TOTALS_KEY)? {
            Some(v) => decode(&v, "totals"),
            None => Ok(Totals::default()),
        }
    }

    /// The oldest pending message in the whole store.
    pub fn oldest(&self) -> Result<Option<(String, u64, Record)>, StoreError> {
        // An age entry always has its queue entry (same batches), but a
        // reader between two batches is harmless: skip what is gone.
        for kv in self.scan(b"a") {
            let (k, v) = kv?;
            let seq = decode_seq(&k[1..])?;
            let recipient = String::from_utf8(v.to_vec())
                .map_err(|_| StoreError::Corrupt("age index value is not UTF-8".into()))?;
            if let Some(rec) = self.get(&recipient, seq)? {
                return Ok(Some((recipient, seq, rec)));
            }
        }
        Ok(None)
    }

    /// The `n` largest queues by message count, largest first. Reads every
    /// recipient's state (not the queues).
    pub fn top_queues(&self, n: usize) -> Result<Vec<QueueSummary>, StoreError> {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let mut heap = BinaryHeap::new();
        for kv in self.scan(b"r") {
            let (k, v) = kv?;
            let state: RecipientState = decode(&v, "recipient state")?;
            if state.pending == 0 {
                continue;
            }
            heap.push(Reverse((state.pending, state.bytes, k.to_vec())));
            if heap.len() > n {
                heap.pop();
            }
        }
        let mut out = Vec::with_capacity(heap.len());
        for Reverse((pending, bytes, k)) in heap.into_sorted_vec() {
            let recipient = String::from_utf8(k[1..].to_vec())
                .map_err(|_| StoreError::Corrupt("recipient key is not UTF-8".into()))?;
            let oldest_ms = self
                .pending_from(&recipient, 0, 1)?
                .first()
                .map(|(_, r)| r.accepted_at_ms);
            out.push(QueueSummary {
                recipient,
                pending,
                bytes,
                oldest_ms,
            });
        }
        Ok(out)
    }

    /// How many of a queue's messages `scope` takes.
    pub fn count_purgeable(&self, recipient: &str, scope: PurgeScope) -> Result<u64, StoreError> {
        Ok(self.scan_scope(recipient, scope)?.len() as u64)
    }

    fn scan_scope(&self, recipient: &str, scope: PurgeScope) -> Result<Vec<u64>, StoreError> {
        let mut out = Vec::new();
        for kv in self.scan(&queue_prefix(recipient)) {
            let (k, v) = kv?;
            let seq = seq_of_queue_key(&k)?;
            if seq >= scope.below_seq {
                break;
            }
            if scope.takes(seq, &decode(&v, "record")?) {
                out.push(seq);
            }
        }
        Ok(out)
    }

    /// Remove what `scope` takes from a queue, as an operator's decision.
    /// Like a confirmation, the id indexes stay: a client resubmitting a
    /// purged message is still recognised as a duplicate.
    pub fn purge(&self, recipient: &str, scope: PurgeScope) -> Result<Vec<u64>, StoreError> {
        let seqs = self.scan_scope(recipient, scope)?;
        Ok(self
            .remove(recipient, &seqs)?
            .into_iter()
            .map(|(seq, _)| seq)
            .collect())
    }

    /// Durably write everything so far. Blocking.
    pub fn flush(&self) -> Result<usize, StoreError> {
        Ok(self.db.flush()?)
    }

    /// A handle for the flusher thread.
    pub fn db(&self) -> sled::Db {
        self.db.clone()
    }

    /// A seq larger than every seq stored so far.
    pub fn next_seq(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id()?)
    }

    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    pub fn recipient(&self, recipient: &str) -> Result<RecipientState, StoreError> {
        match self.read(&recipient_key(recipient))? {
            Some(v) => decode(&v, "recipient state"),
            None => Ok(RecipientState::default()),
        }
    }

    fn put_recipient(&self, recipient: &str, state: &RecipientState) -> Result<(), StoreError> {
        let mut w = Writes::default();
        w.insert(recipient_key(recipient), encode(state));
        self.write(w)
    }

    /// The relay contact `sender_bare`'s relay address has with
    /// `recipient`: whether it asked for, and got, a presence
    /// subscription.
    pub fn contact(
        &self,
        recipient: &str,
        sender_bare: &str,
    ) -> Result<Option<Contact>, StoreError> {
        self.read(&contact_key(recipient, sender_bare))?
            .map(|v| decode(&v, "contact"))
            .transpose()
    }

    pub fn set_contact(
        &self,
        recipient: &str,
        sender_bare: &str,
        contact: Contact,
    ) -> Result<(), StoreError> {
        let mut w = Writes::default();
        w.insert(contact_key(recipient, sender_bare), encode(&contact));
        self.write(w)
    }

    pub fn set_subscription(&self, recipient: &str, sub: Subscription) -> Result<(), StoreError> {
        let mut st = self.recipient(recipient)?;
        if st.subscription != sub {
            st.subscription = sub;
            self.put_recipient(recipient, &st)?;
        }
        Ok(())
    }

    /// Every recipient the store knows, with its state.
    pub fn recipients(&self) -> Result<Vec<(String, RecipientState)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.scan(b"r") {
            let (k, v) = kv?;
            let name = String::from_utf8(k[1..].to_vec())
                .map_err(|_| StoreError::Corrupt("recipient key is not UTF-8".into()))?;
            out.push((name, decode(&v, "recipient state")?));
        }
        Ok(out)
    }

    /// One step of the expiry walk: up to `limit` of the oldest expiry
    /// entries accepted at or before `cutoff_ms` go, with their dedup keys
    /// and, if still pending, their messages (counters included). One
    /// atomic batch.
    pub fn expire(&self, cutoff_ms: i64, limit: usize) -> Result<Expired, StoreError> {
        let mut out = Expired::default();
        let mut batch = Writes::default();
        let mut states: HashMap<String, (RecipientState, RecipientState)> = HashMap::new();
        let mut tombstoned = Vec::new();
        for kv in self.scan(b"x") {
            if out.entries == limit {
                out.more = true;
                break;
            }
            let (k, v) = kv?;
            let e: Expiry = decode(&v, "expiry entry")?;
            if e.accepted_at_ms > cutoff_ms {
                break;
            }
            let seq = decode_seq(&k[1..])?;
            batch.remove(k);
            for key in &e.keys {
                batch.remove(key);
            }
            let qkey = queue_key(&e.recipient, seq);
            if let Some(v) = self.read(&qkey)? {
                let rec: Record = decode(&v, "record")?;
                let (_, after) = match states.entry(e.recipient.clone()) {
                    std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        let st = self.recipient(&e.recipient)?;
                        v.insert((st, st))
                    }
                };
                after.pending = after.pending.saturating_sub(1);
                after.bytes = after.bytes.saturating_sub(rec.stanza.len() as u64);
                batch.remove(qkey);
                batch.remove(age_key(seq));
                out.messages.push((e.recipient.clone(), seq, rec));
            }
            tombstoned.push((e.recipient, seq));
            out.entries += 1;
        }
        if out.entries == 0 {
            return Ok(out);
        }
        // Kept for a late bounce at most until their time to live ends.
        let mut kept = self.assumed_totals()?;
        let mut dropped = false;
        for (recipient, seq) in &tombstoned {
            dropped |= self
                .take_tombstone(recipient, *seq, &mut batch, &mut kept)?
                .is_some();
        }
        if dropped {
            batch.insert(assumed::ASSUMED_KEY, encode(&kept));
        }
        if !states.is_empty() {
            let mut totals = self.totals()?;
            for (recipient, (before, after)) in &states {
                totals.apply(before, after);
                batch.insert(recipient_key(recipient), encode(after));
            }
            batch.insert(TOTALS_KEY, encode(&totals));
        }
        self.write(batch)?;
        Ok(out)
    }

    /// Store a message unless it is a duplicate or the queue is full.
    pub fn accept(&self, msg: NewMessage<'_>, limits: QueueLimits) -> Result<Accepted, StoreError> {
        let hash = msg.content_hash;
        let ikey = id_key(msg.recipient, msg.sender_bare, &msg.record.id);
        let okey = msg
            .origin_id
            .map(|o| origin_key(msg.recipient, msg.sender_bare, o));
        // An origin-id names one message (XEP-0359): a match is a
        // resubmission whatever it says now (a client may re-encrypt).
        if let Some(okey) = &okey
            && let Some(v) = self.read(okey)?
        {
            return Ok(Accepted::Duplicate {
                seq: decode_index(&v)?.0,
            });
        }
        // The index key of an earlier, confirmed message that this one
        // takes over: (key, seq of the earlier message).
        let mut taken = Vec::new();
        if let Some(v) = self.read(&ikey)? {
            let (seq, old_hash) = decode_index(&v)?;
            if old_hash.is_none_or(|h| h == hash) {
                return Ok(Accepted::Duplicate { seq });
            }
            if self.read(&queue_key(msg.recipient, seq))?.is_some()
                || self.is_assumed(msg.recipient, seq)?
            {
                return Ok(Accepted::IdInUse { seq });
            }
            taken.push((ikey.clone(), seq));
        }
        let mut state = self.recipient(msg.recipient)?;
        let size = msg.record.stanza.len() as u64;
        if state.pending >= limits.max_pending || state.bytes + size > limits.max_bytes {
            return Ok(Accepted::QueueFull);
        }
        let mut totals = self.totals()?;
        let kept = self.assumed_totals()?;
        if totals.bytes + kept.bytes + size > limits.max_store_bytes {
            return Ok(Accepted::StoreFull);
        }
        let seq = self.next_seq()?;
        let before = state;
        state.pending += 1;
        state.bytes += size;
        totals.apply(&before, &state);
        let mut batch = Writes::default();
        // The earlier owners of reused keys let go of them, so that their
        // expiry does not take this message's dedup and receipt lookup.
        let mut owners: HashMap<u64, Expiry> = HashMap::new();
        for (key, old_seq) in taken {
            let e = match owners.entry(old_seq) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    match self.read(&expiry_key(old_seq))? {
                        Some(x) => v.insert(decode(&x, "expiry entry")?),
                        None => continue,
                    }
                }
            };
            e.keys.retain(|k| *k != key);
        }
        for (old_seq, e) in owners {
            batch.insert(expiry_key(old_seq), encode(&e));
        }
        batch.insert(queue_key(msg.recipient, seq), encode(&msg.record));
        batch.insert(age_key(seq), msg.recipient.as_bytes());
        batch.insert(TOTALS_KEY, encode(&totals));
        batch.insert(&ikey, index_value(seq, hash));
        let mut keys = vec![ikey];
        if let Some(okey) = okey {
            batch.insert(&okey, index_value(seq, hash));
            keys.push(okey);
        }
        batch.insert(
            expiry_key(seq),
            encode(&Expiry {
                accepted_at_ms: msg.record.accepted_at_ms,
                recipient: msg.recipient.to_owned(),
                keys,
            }),
        );
        batch.insert(recipient_key(msg.recipient), encode(&state));
        self.write(batch)?;
        Ok(Accepted::Stored { seq })
    }

    /// The seq of a message by (recipient, sender, id), pending or not.
    pub fn seq_of(
        &self,
        recipient: &str,
        sender_bare: &str,
        id: &str,
    ) -> Result<Option<u64>, StoreError> {
        self.read(&id_key(recipient, sender_bare, id))?
            .map(|v| decode_index(&v).map(|(seq, _)| seq))
            .transpose()
    }

    pub fn get(&self, recipient: &str, seq: u64) -> Result<Option<Record>, StoreError> {
        self.read(&queue_key(recipient, seq))?
            .map(|v| decode(&v, "record"))
            .transpose()
    }

    /// Up to `limit` pending messages with seq >= `from`, in order.
    pub fn pending_from(
        &self,
        recipient: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Record)>, StoreError> {
        let prefix = queue_prefix(recipient);
        let start = queue_key(recipient, from);
        let mut end = prefix.clone();
        end.extend_from_slice(&u64::MAX.to_be_bytes());
        let mut out = Vec::new();
        for kv in self.scan_range(&start, &end).take(limit) {
            let (k, v) = kv?;
            out.push((seq_of_queue_key(&k)?, decode(&v, "record")?));
        }
        Ok(out)
    }

    /// Remove confirmed messages; their id index entries stay so that a
    /// resubmission is still recognised. Returns the removed records.
    pub fn confirm(&self, recipient: &str, seqs: &[u64]) -> Result<Vec<(u64, Record)>, StoreError> {
        self.remove(recipient, seqs)
    }

    /// Remove a message the recipient's side refused for good, and forget
    /// its ids (its expiry entry and index keys go too), so that the
    /// sender may send it again (say, once unblocked).
    pub fn forget(&self, recipient: &str, seq: u64) -> Result<Option<Record>, StoreError> {
        let removed = self.remove(recipient, &[seq])?;
        let mut batch = Writes::default();
        if let Some(v) = self.read(&expiry_key(seq))? {
            let e: Expiry = decode(&v, "expiry entry")?;
            for key in &e.keys {
                batch.remove(key);
            }
            batch.remove(expiry_key(seq));
            self.write(batch)?;
        }
        Ok(removed.into_iter().next().map(|(_, rec)| rec))
    }

    /// Remove pending messages (those still there) in one batch, with
    /// their age entries and counters. A message counted delivered without
    /// a receipt (see `assumed.rs`) is removed too: its tombstone goes, so
    /// that a late bounce no longer puts it back.
    fn remove(&self, recipient: &str, seqs: &[u64]) -> Result<Vec<(u64, Record)>, StoreError> {
        let (batch, removed) = self.removal(recipient, seqs, true)?;
        if !batch.0.is_empty() {
            self.write(batch)?;
        }
        Ok(removed)
    }

    /// The writes that [`Store::remove`] applies, and what they remove;
    /// tombstones too if `tombstones`.
    fn removal(
        &self,
        recipient: &str,
        seqs: &[u64],
        tombstones: bool,
    ) -> Result<(Writes, Vec<(u64, Record)>), StoreError> {
        let before = self.recipient(recipient)?;
        let mut state = before;
        let mut batch = Writes::default();
        let mut removed = Vec::new();
        let mut gone = Vec::new();
        for &seq in seqs {
            let k = queue_key(recipient, seq);
            if let Some(v) = self.read(&k)? {
                let rec: Record = decode(&v, "record")?;
                state.pending = state.pending.saturating_sub(1);
                state.bytes = state.bytes.saturating_sub(rec.stanza.len() as u64);
                batch.remove(k);
                batch.remove(age_key(seq));
                removed.push((seq, rec));
            } else {
                gone.push(seq);
            }
        }
        // Counted delivered earlier, confirmed (or purged) now: a late
        // bounce no longer puts them back.
        if tombstones {
            removed.extend(self.drop_tombstones(recipient, &gone, &mut batch)?);
        }
        if !removed.is_empty() {
            let mut totals = self.totals()?;
            totals.apply(&before, &state);
            batch.insert(recipient_key(recipient), encode(&state));
            batch.insert(TOTALS_KEY, encode(&totals));
        }
        Ok((batch, removed))
    }

    /// Seqs of pending messages from `sender_bare` up to and including
    /// `upto`, for a XEP-0333 marker: at most `limit` records are looked
    /// at (from the head of the queue), and of each only its sender is
    /// decoded. `upto` itself is always included when pending.
    pub fn pending_from_sender_upto(
        &self,
        recipient: &str,
        sender_bare: &str,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<u64>, StoreError> {
        /// The leading fields of a [`Record`], borrowed.
        #[derive(Deserialize)]
        struct Head<'a> {
            #[allow(dead_code)]
            accepted_at_ms: i64,
            sender: &'a str,
        }
        let start = queue_key(recipient, 0);
        let end = queue_key(recipient, upto);
        let mut out = Vec::new();
        let mut seen_upto = false;
        for kv in self.scan_range(&start, &end).take(limit) {
            let (k, v) = kv?;
            let seq = seq_of_queue_key(&k)?;
            let head: Head<'_> = postcard::from_bytes(&v)
                .map_err(|e| StoreError::Corrupt(format!("record: {e}")))?;
            if bare_of(head.sender) == sender_bare {
                out.push(seq);
                seen_upto |= seq == upto;
            }
        }
        if !seen_upto && self.read(&end)?.is_some() {
            out.push(upto);
        }
        Ok(out)
    }
}

/// The bare part of a full JID string.
pub fn bare_of(jid: &str) -> &str {
    jid.split_once('/').map_or(jid, |(b, _)| b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Open, waiting out the lock of a store just dropped in this process:
    /// sled's I/O threads can still hold it for a moment under load.
    pub(super) fn open(dir: &Path) -> Store {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match Store::open(dir, Durability::Fsync, 5, 1 << 20) {
                Err(StoreError::Locked { .. }) if std::time::Instant::now() < end => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => return other.unwrap(),
            }
        }
    }

    pub(super) fn msg<'a>(
        recipient: &'a str,
        sender: &'a str,
        id: &str,
        origin: Option<&'a str>,
    ) -> NewMessage<'a> {
        NewMessage {
            recipient,
            sender_bare: sender,
            origin_id: origin,
            content_hash: 0,
            record: Record {
                accepted_at_ms: 1,
                sender: format!("{sender}/res"),
                id: id.into(),
                stanza: format!("<message id='{id}'/>"),
            },
        }
    }

    pub(super) const BIG: QueueLimits = QueueLimits {
        max_pending: 100,
        max_bytes: 1 << 20,
        max_store_bytes: 1 << 30,
    };

    #[test]
    fn a_burst_is_readable_before_its_commit_and_lands_whole() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let first = stored(&s, msg("bob@x", "alice@x", "m0", None));
        s.begin();
        let second = stored(&s, msg("bob@x", "alice@x", "m1", None));
        assert_eq!(
            s.accept(msg("bob@x", "alice@x", "m1", None), BIG).unwrap(),
            Accepted::Duplicate { seq: second },
            "dedup sees the burst"
        );
        s.confirm("bob@x", &[first]).unwrap();
        let ids = |s: &Store| -> Vec<String> {
            s.pending_from("bob@x", 0, 10)
                .unwrap()
                .into_iter()
                .map(|(_, r)| r.id)
                .collect()
        };
        assert_eq!(ids(&s), ["m1"], "reads merge the burst over sled");
        assert_eq!(s.recipient("bob@x").unwrap().pending, 1);
        assert!(s.db.get(queue_key("bob@x", first)).unwrap().is_some());
        assert!(s.db.get(queue_key("bob@x", second)).unwrap().is_none());
        assert_eq!(
            s.commit().unwrap(),
            8,
            "one batch: 6 keys of the accept, 2 removals"
        );
        assert!(s.db.get(queue_key("bob@x", first)).unwrap().is_none());
        assert!(s.db.get(queue_key("bob@x", second)).unwrap().is_some());
        assert_eq!(ids(&s), ["m1"]);
        let report = s.check().unwrap();
        assert_eq!((report.messages, report.entries), (1, 2));
        // Outside a burst every operation commits at once.
        stored(&s, msg("bob@x", "alice@x", "m2", None));
        assert_eq!(s.commit().unwrap(), 0);
    }

    #[test]
    fn order_counters_and_dedup() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let mut seqs = Vec::new();
        for i in 0..5 {
            match s
                .accept(msg("bob@x", "alice@x", &format!("m{i}"), None), BIG)
                .unwrap()
            {
                Accepted::Stored { seq } => seqs.push(seq),
                other => panic!("{other:?}"),
            }
        }
        // Another recipient interleaved does not disturb bob's queue.
        s.accept(msg("bobby@x", "alice@x", "m0", None), BIG)
            .unwrap();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        let got: Vec<String> = s
            .pending_from("bob@x", 0, 100)
            .unwrap()
            .into_iter()
            .map(|(_, r)| r.id)
            .collect();
        assert_eq!(got, ["m0", "m1", "m2", "m3", "m4"]);
        let st = s.recipient("bob@x").unwrap();
        assert_eq!(st.pending, 5);
        assert_eq!(st.bytes, 5 * "<message id='m0'/>".len() as u64);

        assert_eq!(
            s.accept(msg("bob@x", "alice@x", "m2", None), BIG).unwrap(),
            Accepted::Duplicate { seq: seqs[2] }
        );
        // Same id from another sender is a different message.
        assert!(matches!(
            s.accept(msg("bob@x", "carol@x", "m2", None), BIG).unwrap(),
            Accepted::Stored { .. }
        ));
        assert_eq!(s.recipient("bob@x").unwrap().pending, 6);
    }

    #[test]
    fn origin_id_dedup() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let Accepted::Stored { seq } = s.accept(msg("b@x", "a@x", "id1", Some("o1")), BIG).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            s.accept(msg("b@x", "a@x", "id2", Some("o1")), BIG).unwrap(),
            Accepted::Duplicate { seq }
        );
    }

    /// Issue 11, defect 4, in the store: a different message under a used
    /// id is stored once the first is confirmed (refused while it is
    /// pending), takes the id over, and the first one's expiry leaves the
    /// id to it.
    #[test]
    fn reused_id_takes_over_only_after_confirmation() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        // An origin-id names one message: a match is a resubmission,
        // whatever it says now (a client may re-encrypt on resend).
        let mut o1 = msg("b@x", "a@x", "o-first", Some("o1"));
        o1.content_hash = 7;
        o1.record.stanza =
            "<message xmlns='jabber:component:accept' id='o-first'><body>o</body></message>".into();
        let Accepted::Stored { seq: o_seq } = s.accept(o1, BIG).unwrap() else {
            panic!()
        };
        let mut o2 = msg("b@x", "a@x", "o-second", Some("o1"));
        o2.content_hash = 8;
        assert_eq!(
            s.accept(o2, BIG).unwrap(),
            Accepted::Duplicate { seq: o_seq }
        );
        let with = |hash, at| {
            let mut m = msg("b@x", "a@x", "id1", None);
            m.content_hash = hash;
            m.record.accepted_at_ms = at;
            m.record.stanza = format!(
                "<message xmlns='jabber:component:accept' id='id1'><body>{hash}</body></message>"
            );
            m
        };
        let Accepted::Stored { seq: first } = s.accept(with(1, 10), BIG).unwrap() else {
            panic!()
        };
        assert_eq!(
            s.accept(with(1, 11), BIG).unwrap(),
            Accepted::Duplicate { seq: first }
        );
        assert_eq!(
            s.accept(with(2, 12), BIG).unwrap(),
            Accepted::IdInUse { seq: first }
        );
        s.confirm("b@x", &[first]).unwrap();
        let Accepted::Stored { seq: second } = s.accept(with(2, 20), BIG).unwrap() else {
            panic!("a different message after confirmation is stored")
        };
        assert_eq!(s.seq_of("b@x", "a@x", "id1").unwrap(), Some(second));
        assert_eq!(s.check().unwrap().problems, Vec::<String>::new());
        // The first one's expiry drops its entry but not the id.
        s.expire(15, 10).unwrap();
        assert_eq!(s.seq_of("b@x", "a@x", "id1").unwrap(), Some(second));
        assert_eq!(
            s.accept(with(2, 21), BIG).unwrap(),
            Accepted::Duplicate { seq: second }
        );
        assert!(s.check().unwrap().problems.is_empty());
    }

    #[test]
    fn confirm_keeps_dedup_and_counters() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let mut seqs = Vec::new();
        for i in 0..3 {
            if let Accepted::Stored { seq } = s
                .accept(msg("b@x", "a@x", &format!("m{i}"), None), BIG)
                .unwrap()
            {
                seqs.push(seq);
            }
        }
        let removed = s.confirm("b@x", &[seqs[1]]).unwrap();
        assert_eq!(removed.len(), 1);
        assert_eq!(s.confirm("b@x", &[seqs[1]]).unwrap().len(), 0, "idempotent");
        let st = s.recipient("b@x").unwrap();
        assert_eq!(st.pending, 2);
        assert_eq!(st.bytes, 2 * "<message id='m0'/>".len() as u64);
        assert!(matches!(
            s.accept(msg("b@x", "a@x", "m1", None), BIG).unwrap(),
            Accepted::Duplicate { .. }
        ));
        let upto = s
            .pending_from_sender_upto("b@x", "a@x", seqs[2], 100)
            .unwrap();
        assert_eq!(upto, [seqs[0], seqs[2]]);
        // Issue 11, defect 9: the scan looks at `limit` records at most;
        // the marked message is still confirmed.
        let upto = s
            .pending_from_sender_upto("b@x", "a@x", seqs[2], 0)
            .unwrap();
        assert_eq!(upto, [seqs[2]]);
    }

    pub(super) fn stored(s: &Store, m: NewMessage<'_>) -> u64 {
        match s.accept(m, BIG).unwrap() {
            Accepted::Stored { seq } => seq,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn totals_age_index_and_top_queues() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        assert_eq!(s.totals().unwrap(), Totals::default());
        assert!(s.oldest().unwrap().is_none());
        let mut bob = Vec::new();
        for i in 0..5 {
            let mut m = msg("bob@x", "a@x", &format!("b{i}"), None);
            m.record.accepted_at_ms = 100 + i;
            bob.push(stored(&s, m));
        }
        for i in 0..3 {
            let mut m = msg("dave@x", "a@x", &format!("d{i}"), None);
            m.record.accepted_at_ms = 200 + i;
            stored(&s, m);
        }
        let one = "<message id='b0'/>".len() as u64;
        assert_eq!(
            s.totals().unwrap(),
            Totals {
                pending: 8,
                bytes: 8 * one,
                recipients: 2
            }
        );
        let (who, seq, rec) = s.oldest().unwrap().unwrap();
        assert_eq!(
            (who.as_str(), seq, rec.id.as_str()),
            ("bob@x", bob[0], "b0")
        );

        let top = s.top_queues(10).unwrap();
        let names: Vec<_> = top
            .iter()
            .map(|q| (q.recipient.as_str(), q.pending))
            .collect();
        assert_eq!(names, [("bob@x", 5), ("dave@x", 3)]);
        assert_eq!(top[0].oldest_ms, Some(100));
        assert_eq!(top[1].bytes, 3 * one);
        assert_eq!(s.top_queues(1).unwrap().len(), 1);

        // Confirming bob's whole queue moves the oldest to dave's and
        // takes bob out of the recipient count.
        s.confirm("bob@x", &bob).unwrap();
        assert_eq!(
            s.totals().unwrap(),
            Totals {
                pending: 3,
                bytes: 3 * one,
                recipients: 1
            }
        );
        assert_eq!(s.oldest().unwrap().unwrap().0, "dave@x");
        assert_eq!(s.top_queues(10).unwrap().len(), 1);
    }

    #[test]
    fn purge_by_scope() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let mut seqs = Vec::new();
        for i in 0..4 {
            let mut m = msg("b@x", "a@x", &format!("m{i}"), None);
            m.record.accepted_at_ms = 1000 * (i + 1);
            seqs.push(stored(&s, m));
        }
        // Older than t=2000: m0 and m1.
        let old = PurgeScope {
            below_seq: u64::MAX,
            accepted_before_ms: Some(2000),
        };
        assert_eq!(s.count_purgeable("b@x", old).unwrap(), 2);
        // A scope fixed before m3 arrived never takes m3.
        let seen = PurgeScope {
            below_seq: seqs[3],
            accepted_before_ms: None,
        };
        assert_eq!(s.count_purgeable("b@x", seen).unwrap(), 3);
        assert_eq!(s.purge("b@x", old).unwrap(), seqs[..2]);
        assert_eq!(s.recipient("b@x").unwrap().pending, 2);
        assert_eq!(s.totals().unwrap().pending, 2);
        assert_eq!(s.purge("b@x", seen).unwrap(), [seqs[2]]);
        let left: Vec<_> = s.pending_from("b@x", 0, 10).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].1.id, "m3");
        assert_eq!(s.oldest().unwrap().unwrap().1, seqs[3]);
        // Purged ids are still known: a resubmission is a duplicate.
        assert!(matches!(
            s.accept(msg("b@x", "a@x", "m0", None), BIG).unwrap(),
            Accepted::Duplicate { .. }
        ));
        assert_eq!(s.purge("nobody@x", seen).unwrap(), Vec::<u64>::new());
    }

    #[test]
    fn schema_1_store_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let seq = {
            let s = open(dir.path());
            let seq = stored(&s, msg("b@x", "a@x", "m0", None));
            // Make it look like schema 1: no age index, no expiry
            // entries, no totals.
            s.db.remove(age_key(seq)).unwrap();
            s.db.remove(expiry_key(seq)).unwrap();
            s.db.remove(TOTALS_KEY).unwrap();
            s.db.insert(SCHEMA_KEY, &1u32.to_be_bytes()).unwrap();
            s.flush().unwrap();
            seq
        };
        let s = open(dir.path());
        assert_eq!(s.totals().unwrap().pending, 1);
        assert_eq!(s.totals().unwrap().recipients, 1);
        assert_eq!(s.oldest().unwrap().unwrap().1, seq);
        // The expiry entry is back, with the message's accept time and
        // its dedup key: expiring it removes both.
        let step = s.expire(1, 10).unwrap();
        assert_eq!(step.messages.len(), 1);
        assert!(s.seq_of("b@x", "a@x", "m0").unwrap().is_none());
        let v = s.db.get(SCHEMA_KEY).unwrap().unwrap();
        assert_eq!(v.as_ref(), SCHEMA_VERSION.to_be_bytes());
    }

    #[test]
    fn store_cap_refuses_new_messages_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let one = "<message id='m0'/>".len() as u64;
        let capped = QueueLimits {
            max_store_bytes: 2 * one,
            ..BIG
        };
        let a = stored(&s, msg("a@x", "s@x", "m0", None));
        s.accept(msg("b@x", "s@x", "m1", None), capped).unwrap();
        assert_eq!(
            s.accept(msg("c@x", "s@x", "m2", None), capped).unwrap(),
            Accepted::StoreFull
        );
        // A confirmation makes room.
        s.confirm("a@x", &[a]).unwrap();
        assert!(matches!(
            s.accept(msg("c@x", "s@x", "m2", None), capped).unwrap(),
            Accepted::Stored { .. }
        ));
    }

    #[test]
    fn expiry_walks_in_accept_order_and_prunes_dedup_keys() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let mut seqs = Vec::new();
        for i in 0..5 {
            let mut m = msg("b@x", "a@x", &format!("m{i}"), Some("o"));
            m.origin_id = (i == 0).then_some("o0");
            m.record.accepted_at_ms = 1000 * (i + 1);
            seqs.push(stored(&s, m));
        }
        // m1 is confirmed: only its dedup keys are left to prune.
        s.confirm("b@x", &[seqs[1]]).unwrap();
        // Up to t=3000 (m0, m1, m2), two entries per step.
        let step = s.expire(3000, 2).unwrap();
        assert!(step.more);
        assert_eq!(step.entries, 2);
        let ids: Vec<_> = step
            .messages
            .iter()
            .map(|(_, _, r)| r.id.as_str())
            .collect();
        assert_eq!(ids, ["m0"]);
        let step = s.expire(3000, 2).unwrap();
        assert!(!step.more);
        assert_eq!(step.entries, 1);
        assert_eq!(step.messages[0].2.id, "m2");
        assert_eq!(s.expire(3000, 2).unwrap().entries, 0, "nothing left to do");
        // Counters follow; the rest stays in order.
        assert_eq!(s.recipient("b@x").unwrap().pending, 2);
        assert_eq!(s.totals().unwrap().pending, 2);
        let left: Vec<_> = s
            .pending_from("b@x", 0, 10)
            .unwrap()
            .into_iter()
            .map(|(_, r)| r.id)
            .collect();
        assert_eq!(left, ["m3", "m4"]);
        assert_eq!(s.oldest().unwrap().unwrap().1, seqs[3]);
        // The dedup keys of expired messages are gone: the same ids (and
        // origin-id) are new messages again; the young ones are not.
        assert!(s.seq_of("b@x", "a@x", "m1").unwrap().is_none());
        assert!(matches!(
            s.accept(msg("b@x", "a@x", "m0", Some("o0")), BIG).unwrap(),
            Accepted::Stored { .. }
        ));
        assert!(matches!(
            s.accept(msg("b@x", "a@x", "m3", None), BIG).unwrap(),
            Accepted::Duplicate { .. }
        ));
    }

    #[test]
    fn limits_refuse_without_storing() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let small = QueueLimits {
            max_pending: 2,
            ..BIG
        };
        s.accept(msg("b@x", "a@x", "1", None), small).unwrap();
        s.accept(msg("b@x", "a@x", "2", None), small).unwrap();
        assert_eq!(
            s.accept(msg("b@x", "a@x", "3", None), small).unwrap(),
            Accepted::QueueFull
        );
        let tiny = QueueLimits {
            max_bytes: 10,
            ..BIG
        };
        assert_eq!(
            s.accept(msg("c@x", "a@x", "1", None), tiny).unwrap(),
            Accepted::QueueFull
        );
        assert_eq!(s.recipient("c@x").unwrap(), RecipientState::default());
        assert_eq!(s.pending_from("b@x", 0, 10).unwrap().len(), 2);
    }

    #[test]
    fn survives_reopen_and_seq_stays_monotonic() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let s = open(dir.path());
            let Accepted::Stored { seq } = s.accept(msg("b@x", "a@x", "1", None), BIG).unwrap()
            else {
                panic!()
            };
            s.set_subscription("b@x", Subscription::Subscribed).unwrap();
            s.flush().unwrap();
            seq
        };
        let s = open(dir.path());
        let Accepted::Stored { seq } = s.accept(msg("b@x", "a@x", "2", None), BIG).unwrap() else {
            panic!()
        };
        assert!(seq > first);
        let st = s.recipient("b@x").unwrap();
        assert_eq!((st.pending, st.subscription), (2, Subscription::Subscribed));
        assert_eq!(s.recipients().unwrap().len(), 1);
    }

    #[test]
    fn second_open_is_refused_as_locked() {
        let dir = tempfile::tempdir().unwrap();
        let _s = open(dir.path());
        let err = Store::open(dir.path(), Durability::Fsync, 5, 1 << 20)
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    }
}
