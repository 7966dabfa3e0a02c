//! Messages counted delivered without a receipt, kept aside for a while.
//!
//! A client that never answers receipts (its user turned them off, or it
//! answers only roster contacts) would see a message again at every
//! login if the relay waited for a receipt. So for such clients a
//! message counts delivered when no error came back in time: it leaves
//! its queue like a confirmed one, and a tombstone keeps it. A server
//! that bounces it late (a stream-management session that timed out
//! with the message unacknowledged) then finds it here, and it goes back
//! in its queue, at its place. Tombstones are pruned after the late
//! bounce window.

use serde::{Deserialize, Serialize};

use super::Writes;
use super::keys::{
    age_key, decode, encode, expiry_key, queue_key, recipient_key, recipient_seq_key,
    seq_of_queue_key,
};
use super::{AssumedTotals, Pruned, Record, SledStore, StoreError, TOTALS_KEY};

pub(super) const ASSUMED_KEY: &[u8] = b"h";

/// A message counted delivered without a receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Tombstone {
    assumed_at_ms: i64,
    record: Record,
}

fn tomb_key(recipient: &str, seq: u64) -> Vec<u8> {
    recipient_seq_key(b't', recipient, seq)
}

fn tomb_age_key(at_ms: i64, seq: u64) -> [u8; 17] {
    let mut k = [b'u'; 17];
    k[1..9].copy_from_slice(&(at_ms.max(0) as u64).to_be_bytes());
    k[9..].copy_from_slice(&seq.to_be_bytes());
    k
}

impl SledStore {
    /// The tombstones' count and bytes.
    pub fn assumed_totals(&self) -> Result<AssumedTotals, StoreError> {
        match self.read(ASSUMED_KEY)? {
            Some(v) => decode(&v, "assumed totals"),
            None => Ok(AssumedTotals::default()),
        }
    }

    /// Count pending messages as delivered without a receipt: they leave
    /// the queue (counters included) and a tombstone keeps each until
    /// [`SledStore::prune_assumed`] takes it or its time to live ends, in one
    /// batch. Returns what left.
    pub fn assume(
        &self,
        recipient: &str,
        seqs: &[u64],
        now_ms: i64,
    ) -> Result<Vec<(u64, Record)>, StoreError> {
        let (mut batch, removed) = self.removal(recipient, seqs, false)?;
        let removed = removed.pending;
        let mut kept = self.assumed_totals()?;
        for (seq, record) in &removed {
            kept.add(record);
            batch.insert(
                tomb_key(recipient, *seq),
                encode(&Tombstone {
                    assumed_at_ms: now_ms,
                    record: record.clone(),
                }),
            );
            batch.insert(tomb_age_key(now_ms, *seq), recipient.as_bytes());
        }
        if !removed.is_empty() {
            batch.insert(ASSUMED_KEY, encode(&kept));
            self.write(batch)?;
        }
        Ok(removed)
    }

    /// Whether message `seq` for `recipient` was counted delivered
    /// without a receipt and is still kept.
    pub fn is_assumed(&self, recipient: &str, seq: u64) -> Result<bool, StoreError> {
        Ok(self.read(&tomb_key(recipient, seq))?.is_some())
    }

    /// A late bounce showed that message `seq` was not delivered: put it
    /// back in its queue at its place (no limit applies: it was accepted
    /// once). `Ok(None)` when there is no tombstone.
    pub fn restore(&self, recipient: &str, seq: u64) -> Result<Option<Record>, StoreError> {
        let mut batch = Writes::default();
        let mut kept = self.assumed_totals()?;
        let Some(rec) = self.take_tombstone(recipient, seq, &mut batch, &mut kept)? else {
            return Ok(None);
        };
        batch.insert(ASSUMED_KEY, encode(&kept));
        if self.read(&expiry_key(seq))?.is_none() {
            // Past its time to live (the expiry walk drops tombstones
            // with their message, so only a damaged store gets here).
            self.write(batch)?;
            return Ok(None);
        }
        let before = self.recipient(recipient)?;
        let mut state = before;
        state.pending += 1;
        state.bytes += rec.stanza.len() as u64;
        let mut totals = self.totals()?;
        totals.apply(&before, &state);
        let head = self.head_of(recipient)?;
        if head.is_none_or(|h| seq < h) {
            // Back at the head of its queue.
            if let Some(h) = head {
                batch.remove(age_key(h));
            }
            batch.insert(age_key(seq), recipient.as_bytes());
        }
        batch.insert(queue_key(recipient, seq), encode(&rec));
        batch.insert(recipient_key(recipient), encode(&state));
        batch.insert(TOTALS_KEY, encode(&totals));
        self.write(batch)?;
        Ok(Some(rec))
    }

    /// Writes that drop the tombstone of `seq`, if there is one, with
    /// `kept` updated; returns its record.
    pub(super) fn take_tombstone(
        &self,
        recipient: &str,
        seq: u64,
        batch: &mut Writes,
        kept: &mut AssumedTotals,
    ) -> Result<Option<Record>, StoreError> {
        let tkey = tomb_key(recipient, seq);
        let Some(v) = self.read(&tkey)? else {
            return Ok(None);
        };
        let t: Tombstone = decode(&v, "tombstone")?;
        batch.remove(tkey);
        batch.remove(tomb_age_key(t.assumed_at_ms, seq));
        kept.sub(&t.record);
        Ok(Some(t.record))
    }

    /// Drop the tombstones of `seqs` (those there are) in `batch`, with
    /// the totals; their records.
    pub(super) fn drop_tombstones(
        &self,
        recipient: &str,
        seqs: &[u64],
        batch: &mut Writes,
    ) -> Result<Vec<(u64, Record)>, StoreError> {
        let mut kept = self.assumed_totals()?;
        let mut out = Vec::new();
        for &seq in seqs {
            if let Some(rec) = self.take_tombstone(recipient, seq, batch, &mut kept)? {
                out.push((seq, rec));
            }
        }
        if !out.is_empty() {
            batch.insert(ASSUMED_KEY, encode(&kept));
        }
        Ok(out)
    }

    /// One pruning step: up to `limit` of the oldest tombstones written
    /// at or before `cutoff_ms` go.
    pub fn prune_assumed(&self, cutoff_ms: i64, limit: usize) -> Result<Pruned, StoreError> {
        let mut out = Pruned::default();
        let mut batch = Writes::default();
        let mut kept = self.assumed_totals()?;
        for kv in self.scan(b"u") {
            if out.removed == limit {
                out.more = true;
                break;
            }
            let (k, v) = kv?;
            if k.len() != 17 {
                return Err(StoreError::Corrupt(
                    "tombstone age key is not 17 bytes".into(),
                ));
            }
            let at = u64::from_be_bytes(k[1..9].try_into().expect("8 bytes"));
            if at > cutoff_ms.max(0) as u64 {
                break;
            }
            let seq = u64::from_be_bytes(k[9..].try_into().expect("8 bytes"));
            let recipient = std::str::from_utf8(&v)
                .map_err(|_| StoreError::Corrupt("tombstone age value is not UTF-8".into()))?;
            if self
                .take_tombstone(recipient, seq, &mut batch, &mut kept)?
                .is_none()
            {
                batch.remove(&k); // an age key without its tombstone
            }
            out.removed += 1;
        }
        if out.removed > 0 {
            batch.insert(ASSUMED_KEY, encode(&kept));
            self.write(batch)?;
        }
        Ok(out)
    }

    /// `store check` of the tombstones: each with its time key and its
    /// message's expiry entry, none for a pending message (`pending`: seq
    /// to recipient), and the totals matching. Read-only; the problems.
    pub(super) fn check_tombstones(
        &self,
        pending: &std::collections::BTreeMap<u64, String>,
    ) -> Result<Vec<String>, StoreError> {
        let mut problems = Vec::new();
        let mut found = AssumedTotals::default();
        let mut times = 0u64;
        for kv in self.db.scan_prefix(b"u") {
            let (k, v) = kv?;
            times += 1;
            if k.len() != 17 {
                problems.push("tombstone time key is not 17 bytes".to_string());
                continue;
            }
            let seq = u64::from_be_bytes(k[9..].try_into().expect("8 bytes"));
            let recipient = String::from_utf8_lossy(&v).into_owned();
            if self.db.get(tomb_key(&recipient, seq))?.is_none() {
                problems.push(format!(
                    "{recipient} seq {seq}: time key without a tombstone"
                ));
            }
        }
        let mut tombs = 0u64;
        for kv in self.db.scan_prefix(b"t") {
            let (k, v) = kv?;
            tombs += 1;
            let seq = match seq_of_queue_key(&k) {
                Ok(seq) => seq,
                Err(e) => {
                    problems.push(format!("tombstone key: {e}"));
                    continue;
                }
            };
            let t: Tombstone = match decode(&v, "tombstone") {
                Ok(t) => t,
                Err(e) => {
                    problems.push(format!("seq {seq}: {e}"));
                    continue;
                }
            };
            found.add(&t.record);
            if pending.contains_key(&seq) {
                problems.push(format!("seq {seq}: both pending and a tombstone"));
            }
            if self.db.get(expiry_key(seq))?.is_none() {
                problems.push(format!("seq {seq}: tombstone past its expiry entry"));
            }
            if self.db.get(tomb_age_key(t.assumed_at_ms, seq))?.is_none() {
                problems.push(format!("seq {seq}: tombstone without its time key"));
            }
        }
        if times != tombs {
            problems.push(format!("{tombs} tombstones but {times} time keys"));
        }
        let kept = match self.db.get(ASSUMED_KEY)? {
            Some(v) => decode(&v, "assumed totals")?,
            None => AssumedTotals::default(),
        };
        if kept != found {
            problems.push(format!(
                "tombstone totals say {kept:?}, the tombstones are {found:?}"
            ));
        }
        Ok(problems)
    }

    /// Tombstoned messages for `recipient` from `sender_bare` up to and
    /// including `upto`, for a XEP-0333 marker: at most `limit` looked at.
    pub fn assumed_from_sender_upto(
        &self,
        recipient: &str,
        sender_bare: &str,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<u64>, StoreError> {
        let start = tomb_key(recipient, 0);
        let end = tomb_key(recipient, upto);
        let mut out = Vec::new();
        for kv in self.scan_range(&start, &end).take(limit) {
            let (k, v) = kv?;
            let seq = seq_of_queue_key(&k)?;
            let t: Tombstone = decode(&v, "tombstone")?;
            if super::bare_of(&t.record.sender) == sender_bare {
                out.push(seq);
            }
        }
        Ok(out)
    }
}
