//! The sled store, the embedded default. This file holds the sled
//! mechanics: bursts (writes gathered in an overlay that every read sees,
//! applied as one batch), opening, the clean-shutdown marker and schema
//! migrations; `keys` the key layout and encodings, `queue` what a queue
//! store does (accept, confirm, purge, counters, subscription and
//! contact state), `expiry` the expiry walk, `assumed` messages counted delivered without a
//! receipt, `habits` what clients do with receipts, `check` and
//! `transfer` the `store` subcommands.
//!
//! One sled tree holds everything, under one-byte key prefixes, so that an
//! accept (queue entry + id index + recipient counters) is one atomic
//! `apply_batch`. A pending message is two keys (three with an origin-id),
//! and a message that left its queue is its dedup keys and its expiry
//! entry until its time to live ends:
//!
//! | key | value |
//! |---|---|
//! | `q` recipient 0x00 seq(u64 BE) | [`Record`], then (schema 4) [`keys::QueueExtra`]: what names its dedup keys |
//! | `i` recipient 0x00 sender 0x00 id | seq (u64 BE) |
//! | `o` recipient 0x00 sender 0x00 origin-id | seq (u64 BE) |
//! | `r` recipient | [`RecipientState`] |
//! | `a` seq(u64 BE) | recipient (age index: one entry per queue, on its head; the first key is the oldest pending message) |
//! | `g` | [`Totals`] over all recipients |
//! | `x` seq(u64 BE) | [`Expiry`]: when the message was accepted and its dedup keys; written when it leaves its queue (a queue entry without a `QueueExtra` has one while pending) |
//! | `m` name | metadata: `mschema` the schema version, `mseqbase` (u64 BE) what seqs start from, `mnewest` (u64 BE) the newest accept's seq, `mmigrate4` while a migration is under way |
//! | `c` recipient 0x00 sender | [`Contact`]: the sender's relay address's subscription |
//! | `t` recipient 0x00 seq(u64 BE) | a message counted delivered without a receipt (`assumed.rs`) |
//! | `u` at(u64 BE) seq(u64 BE) | recipient (when each `t` entry was written, for pruning) |
//! | `l` recipient 0x00 resource | [`Habit`]: whether that client answers receipts |
//! | `h` | [`AssumedTotals`]: how many `t` entries, and their stanza bytes |
//!
//! Sequence numbers are `mseqbase` (0 unless an import set it) plus
//! sled's `generate_id`, which is monotonic across restarts, so each
//! recipient's queue is in accept order and a seq also names a message
//! uniquely in the whole store. An import writes messages under the seqs
//! they had (a relayed message's stanza-id is its seq) and first moves
//! `mseqbase` past them and to the export's `next_seq`, so that no later
//! message gets a seq the exported store handed out.
//!
//! The router is the only writer, so read-modify-write of the counters
//! needs no transaction. Calls here are short; `flush` blocks and must run
//! off the async runtime.
//!
//! **Bursts.** sled 0.34 seals and writes its log buffer on every
//! `apply_batch` (measured: 17 KB written to disk per relayed message,
//! and the router stalled in sled's thread pool, when every accept and
//! every confirmation was a batch of its own). So between [`SledStore::begin`]
//! and [`SledStore::commit`] the writes of every operation gather in an
//! in-memory overlay that every read here sees, and the commit applies
//! them as one atomic batch. Outside a burst each operation commits at
//! once. The router wraps each round of events in a burst (a round of
//! removals only may leave its writes for the next round's commit:
//! `begin` keeps what the overlay holds, see `router/linger.rs`) and
//! sends nothing that depends on a write before its commit.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sled::IVec;

use super::*;
use crate::config::Durability;
use keys::*;

/// Version of the layout above. Bumped on any incompatible change.
/// 3: seqs may start from `mseqbase`, which only an import writes (with
/// the version), so that a build that knows nothing of it refuses the
/// store instead of handing out seqs the imported messages hold; a store
/// without it is a version 2 store, read alike.
/// 4: one age entry per queue, on its head, instead of one per pending
/// message (`migrate_to_4`); a queue entry written by 4 names its
/// message's dedup keys after its record, and the message has no expiry
/// entry until it leaves its queue (entries written before keep theirs;
/// an older build would never expire such a message).
pub const SCHEMA_VERSION: u32 = 4;
const SCHEMA_KEY: &[u8] = b"mschema";
/// Present while the migration to 4 has age entries left to drop.
const MIGRATING_KEY: &[u8] = b"mmigrate4";
/// The seq of the newest accept (u64 BE), for the shutdown marker: a
/// pending message has no expiry entry that would show it.
pub(super) const NEWEST_KEY: &[u8] = b"mnewest";
const SEQ_BASE_KEY: &[u8] = b"mseqbase";
const TOTALS_KEY: &[u8] = b"g";

mod assumed;
mod check;
mod expiry;
mod habits;
mod keys;
mod queue;
mod traits;
mod transfer;

pub struct SledStore {
    pub(super) db: sled::Db,
    pub(super) path: std::path::PathBuf,
    pub(super) overlay: Mutex<Overlay>,
    /// `mseqbase`, what seqs start from.
    pub(super) seq_base: AtomicU64,
    /// Where an export's walk over the queues stands: the last seq it
    /// gave, and each queue's next message (`transfer.rs`).
    pub(super) export_walk: Mutex<Option<(Option<u64>, transfer::Opened)>>,
}

/// Writes not yet applied to sled (see "Bursts" above).
#[derive(Default)]
pub(super) struct Overlay {
    /// Inside a burst: writes wait for [`SledStore::commit`].
    pub(super) deferred: bool,
    /// Key to new value; `None` removes the key.
    pub(super) writes: BTreeMap<Vec<u8>, Option<IVec>>,
    /// A commit failed: sled fails (or hangs) on every later write in
    /// this process, so nothing more is tried; writes stay in memory,
    /// readable, until the process exits to reopen the store.
    pub(super) failed: Option<String>,
}

/// The writes of one operation, applied together.
#[derive(Default)]
pub(super) struct Writes(pub(super) Vec<(Vec<u8>, Option<IVec>)>);

impl Writes {
    pub(super) fn insert(&mut self, k: impl AsRef<[u8]>, v: impl AsRef<[u8]>) {
        self.0
            .push((k.as_ref().to_vec(), Some(IVec::from(v.as_ref()))));
    }

    pub(super) fn remove(&mut self, k: impl AsRef<[u8]>) {
        self.0.push((k.as_ref().to_vec(), None));
    }
}

/// sled's entries in a key range with the overlay's writes laid over
/// them, in key order.
pub(super) struct Merged {
    db: std::iter::Peekable<sled::Iter>,
    overlay: std::iter::Peekable<std::vec::IntoIter<(Vec<u8>, Option<IVec>)>>,
}

impl Merged {
    /// `writes`: the overlay's entries in the same range, in key order
    /// (copied, so that the overlay's lock is not held while iterating).
    pub(super) fn new<'a>(
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

/// The seq in the next key of a walk over keys of a prefix byte and a
/// seq (`x`, `a`).
pub(super) fn peek_seq(it: &mut std::iter::Peekable<Merged>) -> Result<Option<u64>, StoreError> {
    if matches!(it.peek(), Some(Err(_))) {
        return Err(it.next().and_then(Result::err).expect("peeked an error"));
    }
    match it.peek() {
        Some(Ok((k, _))) => Ok(Some(decode_seq(&k[1..])?)),
        _ => Ok(None),
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
pub(super) const SHUTDOWN_MARKER: &str = "redeliver-clean-shutdown";

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct ShutdownMarker {
    pub(super) totals: Totals,
    /// The newest seq of an expiry entry or of an accept (`mnewest`):
    /// whichever is later. (Before schema 4 every accept wrote an expiry
    /// entry, and `mnewest` was absent: the same figure.)
    pub(super) last_entry: Option<u64>,
}

impl SledStore {
    pub(super) fn overlay(&self) -> std::sync::MutexGuard<'_, Overlay> {
        // A panic while holding it cannot leave a half-made write behind
        // (inserts into the map are whole), so a poisoned lock is usable.
        self.overlay.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Make every later commit fail, as after a write error (tests).
    #[cfg(test)]
    pub fn fail_commits(&self) {
        self.overlay().failed = Some("injected failure".into());
    }

    /// Start a burst: writes wait in memory until [`SledStore::commit`].
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

    /// Whether there are writes that a later burst's commit may carry:
    /// they stay in the overlay across [`SledStore::begin`].
    pub fn commit_can_wait(&self) -> bool {
        let o = self.overlay();
        o.failed.is_none() && !o.writes.is_empty()
    }

    pub(super) fn apply_overlay(db: &sled::Db, o: &mut Overlay) -> Result<usize, StoreError> {
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
    pub(super) fn write(&self, w: Writes) -> Result<(), StoreError> {
        // An export's walk holds no longer.
        *self.export_walk.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let mut o = self.overlay();
        o.writes.extend(w.0);
        if !o.deferred {
            Self::apply_overlay(&self.db, &mut o)?;
        }
        Ok(())
    }

    pub(super) fn read(&self, k: &[u8]) -> Result<Option<IVec>, StoreError> {
        if let Some(v) = self.overlay().writes.get(k) {
            return Ok(v.clone());
        }
        Ok(self.db.get(k)?)
    }

    /// Entries whose keys start with `prefix`, in key order.
    pub(super) fn scan(&self, prefix: &[u8]) -> Merged {
        let o = self.overlay();
        let writes = o
            .writes
            .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix));
        Merged::new(self.db.scan_prefix(prefix), writes)
    }

    /// Entries with `lo <= key <= hi`, in key order.
    pub(super) fn scan_range(&self, lo: &[u8], hi: &[u8]) -> Merged {
        let o = self.overlay();
        let writes = o
            .writes
            .range::<[u8], _>((Bound::Included(lo), Bound::Included(hi)));
        Merged::new(self.db.range(lo..=hi), writes)
    }

    /// Open (or create) a store without compression. Blocking: call it
    /// off the runtime.
    pub fn open(
        path: &Path,
        durability: Durability,
        flush_interval_ms: u64,
        cache_bytes: u64,
    ) -> Result<SledStore, StoreError> {
        Self::open_with(path, durability, flush_interval_ms, cache_bytes, false)
    }

    /// Open (or create) the store, its pages compressed with zstd if
    /// `compression` (which must be what the store was created with).
    pub fn open_with(
        path: &Path,
        durability: Durability,
        flush_interval_ms: u64,
        cache_bytes: u64,
        compression: bool,
    ) -> Result<SledStore, StoreError> {
        let flush_every = match durability {
            // Every write that matters is flushed explicitly (group commit).
            Durability::Fsync => None,
            Durability::Batched => Some(flush_interval_ms),
        };
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .flush_every_ms(flush_every)
            .use_compression(compression)
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
                // sled's words: "cannot change compression values across
                // restarts".
                sled::Error::Unsupported(m) if m.contains("compression") => {
                    StoreError::Compression {
                        path: path.display().to_string(),
                        created: !compression,
                    }
                }
                other => StoreError::Sled(other),
            })?;
        let seq_base = match db.get(SEQ_BASE_KEY)? {
            Some(v) => decode_seq(&v)?,
            None => 0,
        };
        let store = SledStore {
            db,
            path: path.to_owned(),
            overlay: Mutex::default(),
            seq_base: AtomicU64::new(seq_base),
            export_walk: Mutex::default(),
        };
        match store.db.get(SCHEMA_KEY)? {
            None => {
                store.db.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
                store.db.flush()?;
                store.compare_shutdown_marker()?;
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
                        reads: SCHEMA_VERSION,
                    });
                }
                // A store damaged while stopped is refused before a
                // migration rewrites it (migrations leave the marker's
                // figures as they are).
                store.compare_shutdown_marker()?;
                if found < 2 {
                    store.migrate_to_2()?;
                }
                if found < 4 || store.db.get(MIGRATING_KEY)?.is_some() {
                    store.migrate_to_4(found)?;
                }
            }
        }
        Ok(store)
    }

    pub(super) fn marker(&self) -> Result<ShutdownMarker, StoreError> {
        let last_x = match self.db.scan_prefix(b"x").next_back() {
            Some(kv) => Some(decode_seq(&kv?.0[1..])?),
            None => None,
        };
        let newest = match self.db.get(NEWEST_KEY)? {
            Some(v) => Some(decode_seq(&v)?),
            None => None,
        };
        let last_entry = last_x.max(newest);
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

    pub(super) fn compare_shutdown_marker(&self) -> Result<(), StoreError> {
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
    pub(super) fn migrate_to_2(&self) -> Result<(), StoreError> {
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

    /// Schemas 2 and 3 kept an age entry for every pending message, and
    /// sled's page table follows the number of keys (issue 25: four keys
    /// per pending message, 170 MiB at a million). Schema 4 keeps only
    /// each queue's head. The store says 4 before the first entry goes,
    /// so that an older build refuses it from then on, and a marker stays
    /// until the pass is done: an open after a crash runs it again. The
    /// pass can: in seq order, a queue's first age entry is its head's.
    pub(super) fn migrate_to_4(&self, found: u32) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        if found < 4 {
            let mut batch = sled::Batch::default();
            batch.insert(SCHEMA_KEY, &4u32.to_be_bytes());
            batch.insert(MIGRATING_KEY, &[]);
            self.db.apply_batch(batch)?;
            self.db.flush()?;
        }
        let mut heads: HashSet<IVec> = HashSet::new();
        let mut batch = sled::Batch::default();
        let (mut in_batch, mut dropped) = (0, 0u64);
        for kv in self.db.scan_prefix(b"a") {
            let (k, recipient) = kv?;
            if heads.insert(recipient) {
                continue;
            }
            batch.remove(k);
            in_batch += 1;
            dropped += 1;
            if in_batch == 10_000 {
                self.db.apply_batch(std::mem::take(&mut batch))?;
                in_batch = 0;
            }
        }
        batch.remove(MIGRATING_KEY);
        self.db.apply_batch(batch)?;
        self.db.flush()?;
        tracing::info!(
            store = %self.path.display(),
            from = found,
            queues = heads.len(),
            age_entries_dropped = dropped,
            ms = started.elapsed().as_millis() as u64,
            "store migrated to schema 4 (one age entry per queue)"
        );
        Ok(())
    }

    /// Durably write everything so far. Blocking.
    pub fn flush(&self) -> Result<usize, StoreError> {
        Ok(self.db.flush()?)
    }

    /// A handle for the flusher thread.
    pub fn db(&self) -> sled::Db {
        self.db.clone()
    }

    /// A seq larger than every seq handed out so far.
    pub fn next_seq(&self) -> Result<u64, StoreError> {
        let id = self.db.generate_id()?;
        self.seq_base
            .load(Ordering::Acquire)
            .checked_add(id)
            .ok_or_else(|| StoreError::Corrupt("seqs ran out (past 2^64)".into()))
    }

    /// Hand out only seqs of `next` and above from now on: `mseqbase`
    /// goes to `next` unless seqs are past it already. Written at once,
    /// ahead of the messages an import writes under their own seqs.
    pub fn skip_seqs_below(&self, next: u64) -> Result<(), StoreError> {
        if self.next_seq()? >= next {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        batch.insert(SEQ_BASE_KEY, &next.to_be_bytes());
        batch.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes());
        self.db.apply_batch(batch)?;
        // On disk before any message written under its own seq.
        self.db.flush()?;
        self.seq_base.store(next, Ordering::Release);
        Ok(())
    }

    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests;
