//! The router's hot operations on PostgreSQL: the look-ahead that reads
//! in one round trip what a burst's accepts need, the accept itself, a
//! receipt's lookup and the removal it makes. Each decides from what the
//! leader knows (`known`) and leaves its writes in the burst's batch
//! (`batch`); what is not known is read first, and an operation that
//! cannot be decided so falls back to the SQL of `ops`.
//!
//! Lists are joined from `unnest(…)`, not matched with `= ANY(…)`: the
//! generic plan of a prepared `= ANY` scanned the whole table (measured:
//! 70% of the server's CPU went to comparing keys at 40,000 messages).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

use super::batch::{ContactRow, DedupRow};
use super::known::{Counters, Holder};
use super::rows::*;
use super::{Burst, Db, PgStore, key_digest};
use crate::store::{AcceptKey, Accepted, Confirmed, Contact, NewMessage, QueueLimits, Record};

/// A key's row, with whether its message is pending or kept.
const DEDUP_ROWS: &str = "SELECT d.k, d.origin, d.seq, d.hash, \
     EXISTS (SELECT 1 FROM redeliver_pending p \
             WHERE p.recipient = d.recipient AND p.seq = d.seq) \
     OR EXISTS (SELECT 1 FROM redeliver_tombstones t \
             WHERE t.recipient = d.recipient AND t.seq = d.seq) \
     FROM unnest($1::bytea[]) AS w(k) JOIN redeliver_dedup d ON d.k = w.k";

const RECIPIENT_ROWS: &str = "SELECT r.recipient, r.subscription, r.pending, r.bytes \
     FROM unnest($1::text[]) AS w(recipient) \
     JOIN redeliver_recipients r ON r.recipient = w.recipient COLLATE \"C\"";

const CONTACT_ROWS: &str = "SELECT c.k, c.subscription, c.asked_at_ms \
     FROM unnest($1::bytea[]) AS w(k) JOIN redeliver_contacts c ON c.k = w.k";

const TOTALS_ROW: &str = "SELECT bytes, assumed_bytes FROM redeliver_totals";

const NEXT_SEQS: &str = "SELECT nextval('redeliver_seq') FROM generate_series(1, $1::int)";

/// The dedup keys of a message to `recipient` from `sender_bare`.
fn keys(
    recipient: &str,
    sender_bare: &str,
    id: &str,
    origin: Option<&str>,
) -> [Option<Vec<u8>>; 2] {
    [
        Some(key_digest(&[recipient, sender_bare, "i", id])),
        origin.map(|o| key_digest(&[recipient, sender_bare, "o", o])),
    ]
}

/// Those of `wanted` that `known` lacks, sorted, each once.
fn missing<'w, Q, K, V>(wanted: &[&'w Q], known: &HashMap<K, V>) -> Vec<&'w Q>
where
    Q: ?Sized + Ord + Hash + Eq,
    K: Borrow<Q> + Hash + Eq,
{
    let mut out: Vec<&Q> = wanted
        .iter()
        .copied()
        .filter(|w| !known.contains_key(*w))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The key of a relay contact's row.
fn contact_key(recipient: &str, sender_bare: &str) -> Vec<u8> {
    key_digest(&[recipient, sender_bare])
}

/// Read what `known` lacks of `keys`, `recipients`, `contacts`, the totals and
/// `seqs` free seqs, in one round trip (none if nothing lacks). Only
/// reads: the batch's writes are accounted in `known` (and a recipient's
/// counters not yet sent are added to what is read).
async fn learn(
    db: &Db<'_>,
    b: &mut Burst,
    keys: &[&Vec<u8>],
    recipients: &[&str],
    contacts: &[&Vec<u8>],
    seqs: usize,
) -> PgResult<()> {
    let k = &b.known;
    let want_contacts = missing(contacts, &k.contacts);
    let want_keys = missing(keys, &k.dedup);
    let want_recipients = missing(recipients, &k.recipients);
    let want_totals = k.totals.is_none();
    let want_seqs = seqs.saturating_sub(k.seqs.len()) as i32;
    if want_keys.is_empty()
        && want_recipients.is_empty()
        && want_contacts.is_empty()
        && !want_totals
        && want_seqs == 0
    {
        return Ok(());
    }
    let (dedup, counters, contact_rows, totals, fresh) = futures::try_join!(
        async {
            match want_keys.is_empty() {
                true => Ok(Vec::new()),
                false => db.query(DEDUP_ROWS, &[&want_keys]).await,
            }
        },
        async {
            match want_recipients.is_empty() {
                true => Ok(Vec::new()),
                false => db.query(RECIPIENT_ROWS, &[&want_recipients]).await,
            }
        },
        async {
            match want_contacts.is_empty() {
                true => Ok(Vec::new()),
                false => db.query(CONTACT_ROWS, &[&want_contacts]).await,
            }
        },
        async {
            // `query_one`: a missing row fails the store.
            match want_totals {
                true => db.query_one(TOTALS_ROW, &[]).await.map(Some),
                false => Ok(None),
            }
        },
        async {
            match want_seqs > 0 {
                true => db.query(NEXT_SEQS, &[&want_seqs]).await,
                false => Ok(Vec::new()),
            }
        },
    )?;
    let k = &mut b.known;
    for key in want_keys {
        k.dedup.insert(key.clone(), None);
    }
    for r in dedup {
        let holder = Holder {
            origin: r.get(1),
            seq: useq(r.get(2)),
            hash: r.get(3),
            held: r.get(4),
        };
        k.dedup.insert(r.get::<_, Vec<u8>>(0), Some(holder));
    }
    for r in want_recipients {
        let (n, bytes) = b.batch.unsent_count(r);
        k.recipients.insert(
            r.to_owned(),
            Counters {
                pending: n,
                bytes,
                ..Default::default()
            },
        );
    }
    for r in counters {
        let c = k
            .recipients
            .get_mut(r.get::<_, &str>(0))
            .expect("asked for");
        c.subscription = sub_of(r.get(1));
        c.pending += r.get::<_, i64>(2);
        c.bytes += r.get::<_, i64>(3);
    }
    for c in want_contacts {
        k.contacts.insert(c.clone(), None);
    }
    for r in contact_rows {
        let c = Contact {
            subscription: sub_of(r.get(1)),
            asked_at_ms: r.get(2),
        };
        k.contacts.insert(r.get::<_, Vec<u8>>(0), Some(c));
    }
    if let Some(t) = totals {
        k.totals = Some((t.get(0), t.get(1)));
    }
    let mut fresh: Vec<i64> = fresh.iter().map(|r| r.get(0)).collect();
    fresh.sort_unstable();
    k.seqs.extend(fresh);
    Ok(())
}

impl PgStore {
    /// What a burst's accepts will need, read at once.
    pub(super) fn read_ahead(
        &self,
        accepts: &[AcceptKey<'_>],
    ) -> Result<(), crate::store::StoreError> {
        if accepts.is_empty() || self.failed() {
            return Ok(());
        }
        let keys: Vec<Vec<u8>> = accepts
            .iter()
            .flat_map(|a| keys(a.recipient, a.sender_bare, a.id, a.origin_id))
            .flatten()
            .collect();
        let key_refs: Vec<&Vec<u8>> = keys.iter().collect();
        let recipients: Vec<&str> = accepts.iter().map(|a| a.recipient).collect();
        let contacts: Vec<Vec<u8>> = accepts
            .iter()
            .map(|a| contact_key(a.recipient, a.sender_bare))
            .collect();
        let contact_refs: Vec<&Vec<u8>> = contacts.iter().collect();
        self.run_batched(async |db, b| {
            learn(db, b, &key_refs, &recipients, &contact_refs, accepts.len()).await
        })
    }

    /// [`crate::store::QueueStore::accept`], decided from what is known.
    pub(super) fn accept_batched(
        &self,
        msg: NewMessage<'_>,
        limits: QueueLimits,
    ) -> Result<Accepted, crate::store::StoreError> {
        let size = msg.record.stanza.len() as i64;
        let hash = msg.content_hash as i64;
        let r = &msg.record;
        let [ik, ok] = keys(msg.recipient, msg.sender_bare, &r.id, msg.origin_id);
        let ik = ik.expect("an id key");
        self.run_batched(async |db, b| {
            let wanted: Vec<&Vec<u8>> = [Some(&ik), ok.as_ref()].into_iter().flatten().collect();
            learn(db, b, &wanted, &[msg.recipient], &[], 1).await?;
            let k = &b.known;
            let origin_row = ok.as_ref().and_then(|o| k.dedup[o]);
            // An origin-id names one message (XEP-0359): a match is a
            // resubmission whatever it says now.
            if let Some(o) = origin_row.filter(|h| h.origin) {
                return Ok(Accepted::Duplicate { seq: o.seq });
            }
            if let Some(i) = k.dedup[&ik] {
                if i.hash.is_none_or(|h| h == hash) {
                    return Ok(Accepted::Duplicate { seq: i.seq });
                }
                if k.holds(&i) {
                    return Ok(Accepted::IdInUse { seq: i.seq });
                }
                // Confirmed earlier: this message takes the id over.
            }
            let c = k.recipients[msg.recipient];
            if useq(c.pending) >= limits.max_pending || useq(c.bytes + size) > limits.max_bytes {
                return Ok(Accepted::QueueFull);
            }
            let (tb, tab) = k.totals.expect("read");
            let d = &b.delta;
            if useq(tb + d.bytes + tab + d.assumed_bytes + size) > limits.max_store_bytes {
                return Ok(Accepted::StoreFull);
            }
            let k = &mut b.known;
            let seq = k.seqs.pop_front().expect("read");
            let useq_ = useq(seq);
            let holder = |origin| {
                Some(Holder {
                    origin,
                    seq: useq_,
                    hash: Some(hash),
                    held: true,
                })
            };
            k.dedup.insert(ik.clone(), holder(false));
            if let Some(o) = &ok {
                k.dedup.insert(o.clone(), holder(true));
            }
            let c = k.recipients.get_mut(msg.recipient).expect("read");
            let was_empty = c.pending == 0;
            c.pending += 1;
            c.bytes += size;
            let row = |origin, key: &str| DedupRow {
                recipient: msg.recipient.to_owned(),
                sender: msg.sender_bare.to_owned(),
                origin,
                key: key.to_owned(),
                seq,
                hash: Some(hash),
            };
            b.batch.key(ik.clone(), row(false, &r.id));
            if let (Some(o), Some(origin)) = (&ok, msg.origin_id) {
                b.batch.key(o.clone(), row(true, origin));
            }
            b.batch.insert(msg.recipient, seq, r.clone());
            b.batch.count(msg.recipient, 1, size);
            // The count of recipients with pending messages moves in the
            // batch's counters statement.
            b.delta.pending += 1;
            b.delta.bytes += size;
            b.tails.accepted(msg.recipient, useq_, r, was_empty);
            b.written
                .insert((msg.recipient.to_owned(), useq_), r.clone());
            Ok(Accepted::Stored { seq: useq_ })
        })
    }

    /// The seq of (recipient, sender, id), if known without a read.
    pub(super) fn known_seq_of(
        &self,
        recipient: &str,
        sender_bare: &str,
        id: &str,
    ) -> Option<Option<u64>> {
        let b = self.burst();
        if b.failed.is_some() {
            return None;
        }
        let [ik, _] = keys(recipient, sender_bare, id, None);
        if let Some(h) = b.known.dedup.get(&ik.expect("an id key")) {
            return Some(h.map(|h| h.seq));
        }
        b.tails.seq_of(recipient, sender_bare, id).map(Some)
    }

    /// Message `seq` of `recipient` if pending, if known without a read.
    pub(super) fn known_get(&self, recipient: &str, seq: u64) -> Option<Option<Record>> {
        let b = self.burst();
        if b.failed.is_some() {
            return None;
        }
        b.tails.get(recipient, seq)
    }

    /// [`crate::store::QueueStore::contact`]: known, or read.
    pub(super) fn contact_batched(
        &self,
        recipient: &str,
        sender_bare: &str,
    ) -> Result<Option<Contact>, crate::store::StoreError> {
        let k = contact_key(recipient, sender_bare);
        if self.failed() {
            return self.read(async |db, _| {
                let rows = db.query(CONTACT_ROWS, &[&vec![k.clone()]]).await?;
                Ok(rows.first().map(|r| Contact {
                    subscription: sub_of(r.get(1)),
                    asked_at_ms: r.get(2),
                }))
            });
        }
        // Every contact the batch writes is known.
        self.run_batched(async |db, b| {
            learn(db, b, &[], &[], &[&k], 0).await?;
            Ok(b.known.contacts[&k])
        })
    }

    /// [`crate::store::QueueStore::set_contact`], in the batch.
    pub(super) fn set_contact_batched(
        &self,
        recipient: &str,
        sender_bare: &str,
        contact: Contact,
    ) -> Result<(), crate::store::StoreError> {
        let k = contact_key(recipient, sender_bare);
        self.run_batched(async |_, b| {
            b.known.contacts.insert(k.clone(), Some(contact));
            b.batch.contact(
                k,
                ContactRow {
                    recipient: recipient.to_owned(),
                    sender: sender_bare.to_owned(),
                    subscription: sub_code(contact.subscription),
                    asked_at_ms: contact.asked_at_ms,
                },
            );
            Ok(())
        })
    }

    /// A recipient's state, if this burst knows it.
    pub(super) fn known_recipient(&self, recipient: &str) -> Option<Counters> {
        let b = self.burst();
        if b.failed.is_some() {
            return None;
        }
        b.known.recipients.get(recipient).copied()
    }

    /// Up to `limit` pending messages from `from` on, if known.
    pub(super) fn known_pending_from(
        &self,
        recipient: &str,
        from: u64,
        limit: usize,
    ) -> Option<Vec<(u64, Record)>> {
        let b = self.burst();
        if b.failed.is_some() {
            return None;
        }
        b.tails.pending_from(recipient, from, limit)
    }

    /// Remove confirmed messages all known pending, in the batch; `None`
    /// if some are not known so (the caller removes them in SQL).
    pub(super) fn confirm_known(
        &self,
        recipient: &str,
        seqs: &[u64],
    ) -> Result<Option<Confirmed>, crate::store::StoreError> {
        let mut unique = seqs.to_vec();
        unique.sort_unstable();
        unique.dedup();
        self.run_batched(async |_, b| {
            let Some(mut found) = b.tails.all_pending(recipient, &unique) else {
                return Ok(None);
            };
            let order: std::collections::HashMap<u64, usize> = seqs
                .iter()
                .enumerate()
                .rev()
                .map(|(i, s)| (*s, i))
                .collect();
            found.sort_by_key(|(s, _)| order[s]);
            let bytes = stanza_bytes(&found);
            let n = found.len() as i64;
            for (seq, _) in &found {
                b.batch.delete(sq(*seq));
                b.known.gone.insert(*seq);
            }
            b.batch.count(recipient, -n, -bytes);
            if let Some(c) = b.known.recipients.get_mut(recipient) {
                c.pending -= n;
                c.bytes -= bytes;
            }
            b.delta.pending -= n;
            b.delta.bytes -= bytes;
            b.tails.removed(recipient, unique.iter().copied());
            Ok(Some(Confirmed {
                pending: found,
                counted: Vec::new(),
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::store::contract_tests::{BIG, msg};
    use crate::store::test_databases::pg_database;
    use crate::store::{PgStore, QueueStore};

    /// A damaged database (its totals row gone) fails the store: the
    /// accept is an error, not a panic, and so is the commit.
    #[test]
    fn a_missing_totals_row_fails_the_store() {
        let (url, password) = pg_database();
        let s = PgStore::open(&url, password.as_deref()).unwrap();
        s.run(async |db, _| db.exec("DELETE FROM redeliver_totals", &[]).await)
            .unwrap();
        s.begin();
        assert!(s.accept(msg("bob@x", "alice@x", "m0", None), BIG).is_err());
        assert!(s.commit().is_err());
    }
}
