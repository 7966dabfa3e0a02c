//! What a queue store does: accept with dedup and limits, pending in order,
//! confirm, forget, purge, the expiry walk, counters, subscription and
//! contact state.

use super::keys::*;
use super::*;

impl SledStore {
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

    pub(super) fn scan_scope(
        &self,
        recipient: &str,
        scope: PurgeScope,
    ) -> Result<Vec<u64>, StoreError> {
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

    pub fn recipient(&self, recipient: &str) -> Result<RecipientState, StoreError> {
        match self.read(&recipient_key(recipient))? {
            Some(v) => decode(&v, "recipient state"),
            None => Ok(RecipientState::default()),
        }
    }

    pub(super) fn put_recipient(
        &self,
        recipient: &str,
        state: &RecipientState,
    ) -> Result<(), StoreError> {
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
        let extra = QueueExtra::new(&msg.record, msg.sender_bare, msg.origin_id);
        batch.insert(
            queue_key(msg.recipient, seq),
            queue_value(&msg.record, &extra),
        );
        if before.pending == 0 {
            // The head of a queue that was empty (seqs only grow, so a
            // later accept never is one).
            batch.insert(age_key(seq), msg.recipient.as_bytes());
        }
        batch.insert(TOTALS_KEY, encode(&totals));
        // The queue entry names these while the message is pending; its
        // expiry entry is written when it leaves the queue.
        batch.insert(&ikey, index_value(seq, hash));
        if let Some(okey) = okey {
            batch.insert(&okey, index_value(seq, hash));
        }
        batch.insert(recipient_key(msg.recipient), encode(&state));
        batch.insert(NEWEST_KEY, seq.to_be_bytes());
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
    pub fn confirm(&self, recipient: &str, seqs: &[u64]) -> Result<Confirmed, StoreError> {
        let (batch, removed) = self.removal(recipient, seqs, true)?;
        if !batch.0.is_empty() {
            self.write(batch)?;
        }
        Ok(removed)
    }

    /// Remove a message the recipient's side refused for good, and forget
    /// its ids (its expiry entry and index keys go too), so that the
    /// sender may send it again (say, once unblocked).
    pub fn forget(&self, recipient: &str, seq: u64) -> Result<Option<Record>, StoreError> {
        let removed = self.remove(recipient, &[seq])?;
        let mut batch = Writes::default();
        if let Some(v) = self.read(&expiry_key(seq))? {
            let e: Expiry = decode(&v, "expiry entry")?;
            if e.recipient != recipient {
                // A seq names a message of one recipient only.
                return Ok(None);
            }
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
    pub(super) fn remove(
        &self,
        recipient: &str,
        seqs: &[u64],
    ) -> Result<Vec<(u64, Record)>, StoreError> {
        let (batch, removed) = self.removal(recipient, seqs, true)?;
        if !batch.0.is_empty() {
            self.write(batch)?;
        }
        Ok(removed.all().cloned().collect())
    }

    /// The writes that [`SledStore::remove`] applies, and what they remove;
    /// tombstones too if `tombstones`.
    pub(super) fn removal(
        &self,
        recipient: &str,
        seqs: &[u64],
        tombstones: bool,
    ) -> Result<(Writes, Confirmed), StoreError> {
        let before = self.recipient(recipient)?;
        let mut state = before;
        let mut batch = Writes::default();
        let mut removed = Vec::new();
        let mut gone = Vec::new();
        let mut seen = std::collections::HashSet::new();
        // A seq named twice is removed (and counted) once.
        for &seq in seqs.iter().filter(|s| seen.insert(**s)) {
            let k = queue_key(recipient, seq);
            if let Some(v) = self.read(&k)? {
                let (rec, extra) = decode_queue_value(&v)?;
                state.pending = state.pending.saturating_sub(1);
                state.bytes = state.bytes.saturating_sub(rec.stanza.len() as u64);
                batch.remove(k);
                if let Some(extra) = extra {
                    // Its dedup keys outlive it, until the expiry walk.
                    batch.insert(
                        expiry_key(seq),
                        encode(&left_queue(recipient, &rec, &extra)),
                    );
                }
                removed.push((seq, rec));
            } else {
                gone.push(seq);
            }
        }
        if !removed.is_empty() {
            self.rehead(recipient, &seen, &mut batch)?;
        }
        // Counted delivered earlier, confirmed (or purged) now: a late
        // bounce no longer puts them back.
        let removed = Confirmed {
            pending: removed,
            counted: if tombstones {
                self.drop_tombstones(recipient, &gone, &mut batch)?
            } else {
                Vec::new()
            },
        };
        if !removed.is_empty() {
            let mut totals = self.totals()?;
            totals.apply(&before, &state);
            batch.insert(recipient_key(recipient), encode(&state));
            batch.insert(TOTALS_KEY, encode(&totals));
        }
        Ok((batch, removed))
    }

    /// Keep the age index on the queue's head when `removing` leave it:
    /// the head's entry goes, and the first message that stays gets one.
    /// Reads the queue as it is before the removals are written.
    pub(super) fn rehead(
        &self,
        recipient: &str,
        removing: &HashSet<u64>,
        batch: &mut Writes,
    ) -> Result<(), StoreError> {
        let mut head = None;
        let mut stays = None;
        for kv in self.scan(&queue_prefix(recipient)) {
            let seq = seq_of_queue_key(&kv?.0)?;
            head.get_or_insert(seq);
            if !removing.contains(&seq) {
                stays = Some(seq);
                break;
            }
        }
        if head != stays {
            if let Some(old) = head {
                batch.remove(age_key(old));
            }
            if let Some(new) = stays {
                batch.insert(age_key(new), recipient.as_bytes());
            }
        }
        Ok(())
    }

    /// The seq of a queue's head (its oldest pending message).
    pub(super) fn head_of(&self, recipient: &str) -> Result<Option<u64>, StoreError> {
        match self.scan(&queue_prefix(recipient)).next() {
            Some(kv) => Ok(Some(seq_of_queue_key(&kv?.0)?)),
            None => Ok(None),
        }
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
