//! What `store export` and `store import` need of the sled store: the
//! remembered messages in seq order (from the expiry entries and the
//! queues), and writing them back under the same seqs.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use super::keys::*;
use super::*;

/// The queues an export walks: each one's next message, by seq.
pub(super) type Opened = BinaryHeap<Reverse<(u64, String)>>;

/// The dedup keys an accept would have given the pending message `rec`
/// that `e` holds, if `e` holds such keys at all: one id key for the
/// record's id, and at most one origin-id key, from the same sender.
fn pending_extra(e: &Remembered, rec: &Record) -> Option<QueueExtra> {
    let [id] = e.ids.as_slice() else { return None };
    if id.value != rec.id || e.accepted_at_ms != rec.accepted_at_ms {
        return None;
    }
    let origin_id = match e.origins.as_slice() {
        [] => None,
        [o] if o.sender == id.sender => Some(o.value.as_str()),
        _ => return None,
    };
    Some(QueueExtra::new(rec, &id.sender, origin_id))
}

impl SledStore {
    /// Up to `limit` remembered messages after seq `after`, in seq order:
    /// those with an expiry entry, merged with the pending ones whose
    /// queue entry names their dedup keys (the queues, opened from their
    /// heads). An export calls it page by page, each from the last seq
    /// of the one before, on a store nobody writes (the CLI holds its
    /// lock): the walk over the queues carries on from where it stood.
    pub fn remembered(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Remembered>, StoreError> {
        let mut walk = self.export_walk.lock().unwrap_or_else(|p| p.into_inner());
        let mut opened = match walk.take() {
            Some((at, opened)) if at == after => opened,
            _ => self.queues_after(after)?,
        };
        let start = expiry_key(after.map_or(0, |a| a.saturating_add(1)));
        let end = expiry_key(u64::MAX);
        let mut entries = self.scan_range(&start, &end).peekable();
        let mut out = Vec::new();
        while out.len() < limit {
            let next_entry = peek_seq(&mut entries)?;
            let next_pending = opened.peek().map(|Reverse((seq, _))| *seq);
            match (next_entry, next_pending) {
                (None, None) => break,
                (Some(e), p) if p.is_none_or(|p| e < p) => {
                    let (_, v) = entries.next().expect("peeked")?;
                    let x: Expiry = decode(&v, "expiry entry")?;
                    out.push(self.remembered_entry(e, x)?);
                }
                _ => {
                    let Reverse((seq, recipient)) = opened.pop().expect("peeked");
                    if let Some(next) = self.next_in_queue(&recipient, seq)? {
                        opened.push(Reverse((next, recipient.clone())));
                    }
                    let Some(v) = self.read(&queue_key(&recipient, seq))? else {
                        continue;
                    };
                    // One without its dedup keys has an expiry entry.
                    if let (rec, Some(extra)) = decode_queue_value(&v)? {
                        let x = left_queue(&recipient, &rec, &extra);
                        out.push(self.remembered_entry(seq, x)?);
                    }
                }
            }
        }
        if let Some(last) = out.last() {
            *walk = Some((Some(last.seq), opened));
        }
        Ok(out)
    }

    /// Each queue's first message after `after`, by seq.
    fn queues_after(&self, after: Option<u64>) -> Result<Opened, StoreError> {
        let mut opened = Opened::new();
        for kv in self.scan(b"a") {
            let (k, v) = kv?;
            let head = decode_seq(&k[1..])?;
            let recipient = String::from_utf8(v.to_vec())
                .map_err(|_| StoreError::Corrupt("age index value is not UTF-8".into()))?;
            let first = match after {
                Some(a) if head <= a => self.next_in_queue(&recipient, a)?,
                _ => Some(head),
            };
            if let Some(seq) = first {
                opened.push(Reverse((seq, recipient)));
            }
        }
        Ok(opened)
    }

    /// A remembered message as its expiry entry `e` names it.
    fn remembered_entry(&self, seq: u64, e: Expiry) -> Result<Remembered, StoreError> {
        let (mut ids, mut origins) = (Vec::new(), Vec::new());
        for key in &e.keys {
            let (_, sender, value) = split_index_key(key)?;
            let hash = match self.read(key)? {
                Some(v) => decode_index(&v)?.1,
                None => None,
            };
            let list = if key.first() == Some(&b'o') {
                &mut origins
            } else {
                &mut ids
            };
            list.push(IdKey {
                sender,
                value,
                hash,
            });
        }
        let message = self.get(&e.recipient, seq)?;
        Ok(Remembered {
            seq,
            accepted_at_ms: e.accepted_at_ms,
            recipient: e.recipient,
            ids,
            origins,
            message,
        })
    }

    pub fn is_empty_of_data(&self) -> Result<bool, StoreError> {
        for p in [b"q", b"r", b"x", b"i", b"o", b"a", b"c", b"t", b"u", b"l"] {
            if self.db.scan_prefix(p).next().is_some() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    pub fn import(
        &self,
        recipients: &[(String, Subscription)],
        entries: &[Remembered],
    ) -> Result<(), StoreError> {
        let mut states: HashMap<&str, RecipientState> = HashMap::new();
        for (jid, subscription) in recipients {
            let mut st = self.recipient(jid)?;
            st.subscription = *subscription;
            states.insert(jid, st);
        }
        let mut totals = self.totals()?;
        let mut batch = sled::Batch::default();
        // The lowest seq imported into each queue: its head, unless the
        // queue already had an older one.
        let mut heads: HashMap<&str, u64> = HashMap::new();
        for e in entries {
            let seq = e.seq;
            let recipient = e.recipient.as_str();
            let mut keys = Vec::new();
            let with_keys = e
                .ids
                .iter()
                .map(|k| (id_key(recipient, &k.sender, &k.value), k.hash))
                .chain(
                    e.origins
                        .iter()
                        .map(|k| (origin_key(recipient, &k.sender, &k.value), k.hash)),
                );
            for (k, hash) in with_keys {
                match hash {
                    Some(h) => batch.insert(k.as_slice(), &index_value(seq, h)),
                    None => batch.insert(k.as_slice(), &seq.to_be_bytes()),
                }
                keys.push(k);
            }
            if let Some(rec) = &e.message {
                if !states.contains_key(recipient) {
                    states.insert(recipient, self.recipient(recipient)?);
                }
                let st = states.get_mut(recipient).expect("just inserted");
                let before = *st;
                st.pending += 1;
                st.bytes += rec.stanza.len() as u64;
                totals.apply(&before, st);
                let head = heads.entry(recipient).or_insert(seq);
                *head = (*head).min(seq);
                // A pending message's queue entry names its dedup keys
                // where they are the ones an accept gives it (always, for
                // an export of a store by this version).
                if let Some(extra) = pending_extra(e, rec)
                    && extra.dedup_keys(recipient, rec) == keys
                {
                    batch.insert(queue_key(recipient, seq), queue_value(rec, &extra));
                    continue;
                }
                batch.insert(queue_key(recipient, seq), encode(rec));
            }
            batch.insert(
                &expiry_key(seq),
                encode(&Expiry {
                    accepted_at_ms: e.accepted_at_ms,
                    recipient: e.recipient.clone(),
                    keys,
                }),
            );
        }
        if let Some(newest) = entries.iter().map(|e| e.seq).max() {
            batch.insert(NEWEST_KEY, &newest.to_be_bytes());
        }
        for (recipient, seq) in heads {
            let had = self.head_of(recipient)?;
            if had.is_none_or(|h| seq < h) {
                if let Some(h) = had {
                    batch.remove(&age_key(h));
                }
                batch.insert(&age_key(seq), recipient.as_bytes());
            }
        }
        for (jid, st) in &states {
            batch.insert(recipient_key(jid), encode(st));
        }
        batch.insert(TOTALS_KEY, encode(&totals));
        self.db.apply_batch(batch)?;
        Ok(())
    }
}
