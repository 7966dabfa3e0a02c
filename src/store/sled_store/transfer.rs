//! What `store export` and `store import` need of the sled store: the
//! remembered messages in seq order (from the expiry entries), and
//! writing them back under the same seqs.

use std::collections::HashMap;

use super::keys::*;
use super::*;

impl SledStore {
    pub fn remembered(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Remembered>, StoreError> {
        let start = expiry_key(after.map_or(0, |a| a.saturating_add(1)));
        let mut out = Vec::new();
        for kv in self.db.range(start.as_slice()..).take(limit) {
            let (k, v) = kv?;
            if k.first() != Some(&b'x') {
                break;
            }
            let seq = decode_seq(&k[1..])?;
            if after.is_some_and(|a| seq <= a) {
                continue;
            }
            let e: Expiry = decode(&v, "expiry entry")?;
            let (mut ids, mut origins) = (Vec::new(), Vec::new());
            for key in &e.keys {
                let (_, sender, value) = split_index_key(key)?;
                let hash = match self.db.get(key)? {
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
            out.push(Remembered {
                seq,
                accepted_at_ms: e.accepted_at_ms,
                recipient: e.recipient,
                ids,
                origins,
                message,
            });
        }
        Ok(out)
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
                batch.insert(queue_key(recipient, seq), encode(rec));
                let head = heads.entry(recipient).or_insert(seq);
                *head = (*head).min(seq);
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
