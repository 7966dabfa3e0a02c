//! What `store export` and `store import` need of the PostgreSQL store.

use std::collections::HashMap;

use super::rows::{count, record, sq, sub_code, useq};
use super::{PgStore, key_digest};
use crate::store::{IdKey, Remembered, StoreError, Subscription};

impl PgStore {
    pub(super) fn remembered_page(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Remembered>, StoreError> {
        let after = after.map_or(-1, sq);
        let limit = limit as i64;
        self.read(async |db, _| {
            let rows = db
                .query(
                    "SELECT e.seq, e.accepted_at_ms, e.recipient, \
                     p.accepted_at_ms, p.sender, p.id, p.stanza \
                     FROM redeliver_entries e LEFT JOIN redeliver_pending p ON p.seq = e.seq \
                     WHERE e.seq > $1 ORDER BY e.seq LIMIT $2",
                    &[&after, &limit],
                )
                .await?;
            let seqs: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
            let keys = db
                .query(
                    "SELECT seq, origin, sender, key, hash FROM redeliver_dedup \
                     WHERE seq = ANY($1) ORDER BY seq, origin, sender, key",
                    &[&seqs],
                )
                .await?;
            let mut by_seq: HashMap<i64, (Vec<IdKey>, Vec<IdKey>)> = HashMap::new();
            for k in &keys {
                let (ids, origins) = by_seq.entry(k.get(0)).or_default();
                let key = IdKey {
                    sender: k.get(2),
                    value: k.get(3),
                    hash: k.get::<_, Option<i64>>(4).map(|h| h as u64),
                };
                if k.get::<_, bool>(1) {
                    origins.push(key);
                } else {
                    ids.push(key);
                }
            }
            Ok(rows
                .iter()
                .map(|r| {
                    let seq: i64 = r.get(0);
                    let (ids, origins) = by_seq.remove(&seq).unwrap_or_default();
                    let pending: Option<i64> = r.get(3);
                    Remembered {
                        seq: useq(seq),
                        accepted_at_ms: r.get(1),
                        recipient: r.get(2),
                        ids,
                        origins,
                        message: pending.map(|_| record(r, 3)),
                    }
                })
                .collect())
        })
    }

    pub(super) fn holds_nothing(&self) -> Result<bool, StoreError> {
        self.read(async |db, _| {
            let r = db
                .query_one(
                    "SELECT NOT EXISTS (SELECT 1 FROM redeliver_entries) \
                     AND NOT EXISTS (SELECT 1 FROM redeliver_recipients) \
                     AND NOT EXISTS (SELECT 1 FROM redeliver_dedup) \
                     AND NOT EXISTS (SELECT 1 FROM redeliver_contacts) \
                     AND NOT EXISTS (SELECT 1 FROM redeliver_tombstones) \
                     AND NOT EXISTS (SELECT 1 FROM redeliver_habits) \
                     AND NOT EXISTS (SELECT 1 FROM redeliver_inbox)",
                    &[],
                )
                .await?;
            Ok(r.get(0))
        })
    }

    /// Make `redeliver_seq` hand out `next` and above from now on
    /// (setval is not undone by a rollback: a failed import leaves the
    /// sequence moved on, which costs nothing).
    pub(super) fn sequence_from(&self, next: u64) -> Result<(), StoreError> {
        let next = sq(next);
        self.run(async |db, b| {
            db.query_one(
                "SELECT setval('redeliver_seq', \
                 GREATEST($1, (SELECT last_value + 1 FROM redeliver_seq)), false)",
                &[&next],
            )
            .await?;
            b.known.seqs.clear();
            Ok(())
        })
    }

    pub(super) fn import_page(
        &self,
        recipients: &[(String, Subscription)],
        entries: &[Remembered],
    ) -> Result<(), StoreError> {
        self.run(async |db, b| {
            b.tails.clear();
            b.known.forget_rows();
            let d = &mut b.delta;
            for (jid, subscription) in recipients {
                db.exec(
                    "INSERT INTO redeliver_recipients (recipient, subscription) VALUES ($1, $2) \
                     ON CONFLICT (recipient) DO UPDATE SET subscription = EXCLUDED.subscription",
                    &[jid, &sub_code(*subscription)],
                )
                .await?;
            }
            for e in entries {
                let seq = sq(e.seq);
                db.exec(
                    "INSERT INTO redeliver_entries (seq, recipient, accepted_at_ms) \
                     VALUES ($1, $2, $3)",
                    &[&seq, &e.recipient, &e.accepted_at_ms],
                )
                .await?;
                let keys = e.ids.iter().map(|k| (false, k));
                for (origin, k) in keys.chain(e.origins.iter().map(|k| (true, k))) {
                    let hash = k.hash.map(|h| h as i64);
                    let kind = if origin { "o" } else { "i" };
                    let digest = key_digest(&[&e.recipient, &k.sender, kind, &k.value]);
                    db.exec(
                        "INSERT INTO redeliver_dedup (k, recipient, sender, origin, key, seq, hash) \
                         VALUES ($7, $1, $2, $3, $4, $5, $6)",
                        &[&e.recipient, &k.sender, &origin, &k.value, &seq, &hash, &digest],
                    )
                    .await?;
                }
                if let Some(rec) = &e.message {
                    db.exec(
                        "INSERT INTO redeliver_pending \
                         (recipient, seq, accepted_at_ms, sender, id, stanza) \
                         VALUES ($1, $2, $3, $4, $5, $6)",
                        &[
                            &e.recipient,
                            &seq,
                            &rec.accepted_at_ms,
                            &rec.sender,
                            &rec.id,
                            &rec.stanza,
                        ],
                    )
                    .await?;
                    count(db, d, &e.recipient, 1, rec.stanza.len() as i64).await?;
                }
            }
            Ok(())
        })
    }
}
