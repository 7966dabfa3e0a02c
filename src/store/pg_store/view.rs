//! The PostgreSQL store's reads for the admin commands (`StoreView`).

use super::PgStore;
use super::rows::*;
use crate::store::{
    AssumedTotals, CheckReport, PurgeScope, QueueSummary, RecipientState, Record, Remembered,
    StoreError, StoreView, Totals,
};

impl StoreView for PgStore {
    fn totals(&self) -> Result<Totals, StoreError> {
        self.read(async |db, b| {
            let d = &mut b.delta;
            let r = db
                .query_one(
                    "SELECT pending, bytes, recipients FROM redeliver_totals",
                    &[],
                )
                .await?;
            Ok(Totals {
                pending: useq(r.get::<_, i64>(0) + d.pending),
                bytes: useq(r.get::<_, i64>(1) + d.bytes),
                recipients: useq(r.get::<_, i64>(2) + d.recipients),
            })
        })
    }

    fn assumed_totals(&self) -> Result<AssumedTotals, StoreError> {
        self.read(async |db, b| {
            let d = &mut b.delta;
            let r = db
                .query_one("SELECT assumed, assumed_bytes FROM redeliver_totals", &[])
                .await?;
            Ok(AssumedTotals {
                messages: useq(r.get::<_, i64>(0) + d.assumed),
                bytes: useq(r.get::<_, i64>(1) + d.assumed_bytes),
            })
        })
    }

    fn oldest(&self) -> Result<Option<(String, u64, Record)>, StoreError> {
        self.read(async |db, _| {
            let row = db
                .query_opt(
                    "SELECT recipient, seq, accepted_at_ms, sender, id, stanza \
                     FROM redeliver_pending ORDER BY seq LIMIT 1",
                    &[],
                )
                .await?;
            Ok(row.map(|r| (r.get(0), useq(r.get(1)), record(&r, 2))))
        })
    }

    fn top_queues(&self, n: usize) -> Result<Vec<QueueSummary>, StoreError> {
        let n = n as i64;
        self.read(async |db, _| {
            let rows = db
                .query(
                    "SELECT r.recipient, r.pending, r.bytes, \
                     (SELECT p.accepted_at_ms FROM redeliver_pending p \
                      WHERE p.recipient = r.recipient ORDER BY p.seq LIMIT 1) \
                     FROM redeliver_recipients r WHERE r.pending > 0 \
                     ORDER BY r.pending DESC, r.bytes DESC, r.recipient DESC LIMIT $1",
                    &[&n],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| QueueSummary {
                    recipient: r.get(0),
                    pending: useq(r.get(1)),
                    bytes: useq(r.get(2)),
                    oldest_ms: r.get(3),
                })
                .collect())
        })
    }

    fn recipient(&self, recipient: &str) -> Result<RecipientState, StoreError> {
        if let Some(c) = self.known_recipient(recipient) {
            return Ok(RecipientState {
                subscription: c.subscription,
                pending: useq(c.pending),
                bytes: useq(c.bytes),
            });
        }
        self.read(async |db, _| {
            let row = db
                .query_opt(
                    "SELECT subscription, pending, bytes FROM redeliver_recipients \
                     WHERE recipient = $1",
                    &[&recipient],
                )
                .await?;
            Ok(
                row.map_or_else(RecipientState::default, |r| RecipientState {
                    subscription: sub_of(r.get(0)),
                    pending: useq(r.get(1)),
                    bytes: useq(r.get(2)),
                }),
            )
        })
    }

    fn recipients(&self) -> Result<Vec<(String, RecipientState)>, StoreError> {
        self.read(async |db, _| {
            let rows = db
                .query(
                    "SELECT recipient, subscription, pending, bytes FROM redeliver_recipients \
                     ORDER BY recipient",
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| {
                    (
                        r.get(0),
                        RecipientState {
                            subscription: sub_of(r.get(1)),
                            pending: useq(r.get(2)),
                            bytes: useq(r.get(3)),
                        },
                    )
                })
                .collect())
        })
    }

    fn pending_from(
        &self,
        recipient: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Record)>, StoreError> {
        if let Some(known) = self.known_pending_from(recipient, from, limit) {
            return Ok(known);
        }
        // One more than asked: fewer than that back is the whole rest of
        // the queue, which the next reads then need not ask for.
        let (from_sql, ask) = (
            sq(from),
            limit.saturating_add(1).min(i64::MAX as usize) as i64,
        );
        self.read(async |db, b| {
            let rows = db
                .query(
                    "SELECT seq, accepted_at_ms, sender, id, stanza FROM redeliver_pending \
                     WHERE recipient = $1 AND seq >= $2 ORDER BY seq LIMIT $3",
                    &[&recipient, &from_sql, &ask],
                )
                .await?;
            let mut found: Vec<(u64, Record)> = rows
                .iter()
                .map(|r| (useq(r.get(0)), record(r, 1)))
                .collect();
            if found.len() <= limit && b.failed.is_none() {
                b.tails.learn(recipient, from, &found);
            }
            found.truncate(limit);
            Ok(found)
        })
    }

    fn count_purgeable(&self, recipient: &str, scope: PurgeScope) -> Result<u64, StoreError> {
        let below = sq(scope.below_seq);
        self.read(async |db, _| {
            let r = db
                .query_one(
                    "SELECT count(*) FROM redeliver_pending WHERE recipient = $1 AND seq < $2 \
                     AND ($3::bigint IS NULL OR accepted_at_ms <= $3)",
                    &[&recipient, &below, &scope.accepted_before_ms],
                )
                .await?;
            Ok(useq(r.get(0)))
        })
    }

    fn habit_counts(&self) -> Result<(u64, u64), StoreError> {
        self.read(async |db, _| {
            let r = db
                .query_one(
                    "SELECT count(*) FILTER (WHERE answers = 1), \
                     count(*) FILTER (WHERE answers = 0) FROM redeliver_habits",
                    &[],
                )
                .await?;
            Ok((useq(r.get(0)), useq(r.get(1))))
        })
    }

    fn next_seq(&self) -> Result<u64, StoreError> {
        self.read(async |db, _| {
            let r = db.query_one("SELECT nextval('redeliver_seq')", &[]).await?;
            Ok(useq(r.get(0)))
        })
    }

    fn size_on_disk(&self) -> u64 {
        let tables: Vec<&str> = super::schema::TABLES.to_vec();
        self.read(async |db, _| {
            let r = db
                .query_one(
                    "SELECT COALESCE(sum(pg_total_relation_size(c.oid)), 0)::bigint \
                     FROM pg_class c WHERE c.relname = ANY($1) AND c.relkind = 'r' \
                     AND pg_table_is_visible(c.oid)",
                    &[&tables],
                )
                .await?;
            Ok(useq(r.get(0)))
        })
        .unwrap_or(0)
    }

    fn check(&self) -> Result<CheckReport, StoreError> {
        self.check_tables()
    }

    fn schema_version(&self) -> u32 {
        super::SCHEMA_VERSION
    }

    fn remembered(&self, after: Option<u64>, limit: usize) -> Result<Vec<Remembered>, StoreError> {
        self.remembered_page(after, limit)
    }

    fn handed_over(&self) -> Result<u64, StoreError> {
        self.read(async |db, _| {
            let r = db
                .query_one("SELECT count(*) FROM redeliver_inbox", &[])
                .await?;
            Ok(r.get::<_, i64>(0) as u64)
        })
    }
}
