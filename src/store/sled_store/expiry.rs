//! The expiry walk: once `message_ttl_s` has passed since its accept, a
//! message goes with its dedup keys, in accept (seq) order.
//!
//! Two sources are merged by seq. A message that left its queue has an
//! expiry entry (`x`, in seq order). A pending one is in its queue, which
//! is in seq order too: the heads' age entries (`a`, in seq order) open
//! each queue in turn, and a queue's next message joins the walk once the
//! one before it went. A pending message written before schema 4 (or put
//! back from a tombstone) has an expiry entry, and goes with it.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::keys::*;
use super::*;

/// One step's writes and what they take.
#[derive(Default)]
struct Step {
    out: Expired,
    batch: Writes,
    /// Recipients' counters before and after the step.
    states: HashMap<String, (RecipientState, RecipientState)>,
    /// Pending messages taken, per queue (for its age entry).
    taken: HashMap<String, HashSet<u64>>,
    /// Expiry entries taken: their tombstones go too.
    entries: Vec<(String, u64)>,
}

impl Step {
    /// Take the pending message `seq` of `recipient`.
    fn take_pending(
        &mut self,
        store: &SledStore,
        recipient: &str,
        seq: u64,
        rec: Record,
    ) -> Result<(), StoreError> {
        let after = match self.states.entry(recipient.to_owned()) {
            std::collections::hash_map::Entry::Occupied(o) => &mut o.into_mut().1,
            std::collections::hash_map::Entry::Vacant(v) => {
                let st = store.recipient(recipient)?;
                &mut v.insert((st, st)).1
            }
        };
        after.pending = after.pending.saturating_sub(1);
        after.bytes = after.bytes.saturating_sub(rec.stanza.len() as u64);
        self.batch.remove(queue_key(recipient, seq));
        self.taken
            .entry(recipient.to_owned())
            .or_default()
            .insert(seq);
        self.out.messages.push((recipient.to_owned(), seq, rec));
        Ok(())
    }
}

impl SledStore {
    /// One step of the expiry walk: up to `limit` of the oldest messages
    /// accepted at or before `cutoff_ms` go, pending or not, with their
    /// dedup keys (counters included). One atomic batch.
    pub fn expire(&self, cutoff_ms: i64, limit: usize) -> Result<Expired, StoreError> {
        let mut step = Step::default();
        let mut entries = self.scan(b"x").peekable();
        let mut heads = self.scan(b"a").peekable();
        // Queues opened by the walk: the seq of each one's next message.
        let mut opened: BinaryHeap<Reverse<(u64, String)>> = BinaryHeap::new();
        let (mut entries_done, mut pending_done) = (false, false);
        loop {
            let next_entry = if entries_done {
                None
            } else {
                peek_seq(&mut entries)?
            };
            let next_head = if pending_done {
                None
            } else {
                peek_seq(&mut heads)?
            };
            let next_opened = opened
                .peek()
                .filter(|_| !pending_done)
                .map(|Reverse((seq, _))| *seq);
            let next_pending = match (next_head, next_opened) {
                (Some(h), Some(o)) => Some(h.min(o)),
                (h, o) => h.or(o),
            };
            if next_entry.is_none() && next_pending.is_none() {
                break;
            }
            if step.out.entries == limit {
                step.out.more = true;
                break;
            }
            if next_pending.is_none_or(|p| next_entry.is_some_and(|e| e < p)) {
                let (k, v) = entries.next().expect("peeked")?;
                let e: Expiry = decode(&v, "expiry entry")?;
                if e.accepted_at_ms > cutoff_ms {
                    entries_done = true;
                    continue;
                }
                let seq = decode_seq(&k[1..])?;
                step.batch.remove(k);
                for key in &e.keys {
                    step.batch.remove(key);
                }
                if let Some(v) = self.read(&queue_key(&e.recipient, seq))? {
                    // Pending, from before schema 4.
                    let (rec, _) = decode_queue_value(&v)?;
                    step.take_pending(self, &e.recipient, seq, rec)?;
                }
                step.entries.push((e.recipient, seq));
                step.out.entries += 1;
                continue;
            }
            let (seq, recipient) = if next_opened == next_pending {
                let Reverse(next) = opened.pop().expect("peeked");
                next
            } else {
                let (_, v) = heads.next().expect("peeked")?;
                let recipient = String::from_utf8(v.to_vec())
                    .map_err(|_| StoreError::Corrupt("age index value is not UTF-8".into()))?;
                (next_head.expect("the head is next"), recipient)
            };
            let Some(v) = self.read(&queue_key(&recipient, seq))? else {
                // An age entry without its message (a damaged index): the
                // queue goes on from the message after it.
                if let Some(next) = self.next_in_queue(&recipient, seq)? {
                    opened.push(Reverse((next, recipient)));
                }
                continue;
            };
            let (rec, extra) = decode_queue_value(&v)?;
            if rec.accepted_at_ms > cutoff_ms {
                pending_done = true;
                continue;
            }
            if let Some(next) = self.next_in_queue(&recipient, seq)? {
                opened.push(Reverse((next, recipient.clone())));
            }
            // One with an expiry entry goes with it, above.
            if let Some(extra) = extra {
                for key in extra.dedup_keys(&recipient, &rec) {
                    step.batch.remove(key);
                }
                step.take_pending(self, &recipient, seq, rec)?;
                step.out.entries += 1;
            }
        }
        drop((entries, heads));
        if step.out.entries == 0 {
            return Ok(step.out);
        }
        let Step {
            out,
            mut batch,
            states,
            taken,
            entries,
        } = step;
        for (recipient, seqs) in &taken {
            self.rehead(recipient, seqs, &mut batch)?;
        }
        // Kept for a late bounce at most until their time to live ends.
        let mut kept = self.assumed_totals()?;
        let mut dropped = false;
        for (recipient, seq) in &entries {
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

    /// The seq of the message after `seq` in `recipient`'s queue.
    pub(super) fn next_in_queue(
        &self,
        recipient: &str,
        seq: u64,
    ) -> Result<Option<u64>, StoreError> {
        let Some(from) = seq.checked_add(1) else {
            return Ok(None);
        };
        match self
            .scan_range(&queue_key(recipient, from), &queue_key(recipient, u64::MAX))
            .next()
        {
            Some(kv) => Ok(Some(seq_of_queue_key(&kv?.0)?)),
            None => Ok(None),
        }
    }
}
