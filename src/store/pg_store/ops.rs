//! The queue operations in SQL: the same results as the sled store's
//! (`sled_store/queue.rs`, `assumed.rs`, `habits.rs`) for the same calls.
//!
//! Queries that do not depend on each other are sent together (one round
//! trip: tokio-postgres pipelines futures polled at once).

use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::store::Remembered;

use super::rows::*;
use super::{PgStore, key_digest};
use crate::store::{
    AcceptKey, Accepted, Answers, Confirmed, Contact, Expired, Habit, MAX_HABITS, NewMessage,
    Pruned, PurgeScope, QueueLimits, QueueStore, Record, StoreError, Subscription, bare_of,
};

/// Seqs of `recipient`'s rows in `table` from `sender_bare` up to `upto`.
fn from_sender(rows: &[Row], sender_bare: &str) -> Vec<u64> {
    rows.iter()
        .filter(|r| bare_of(r.get::<_, &str>(1)) == sender_bare)
        .map(|r| useq(r.get(0)))
        .collect()
}

impl PgStore {
    /// The database holds the store of `found`, not of `domain`.
    fn another_domain(&self, found: &str, domain: &str) -> StoreError {
        StoreError::Database(format!(
            "{} holds the store of {found}, not of {domain}: give each component domain a \
             database of its own",
            self.name()
        ))
    }
}

/// The advisory lock that names the leader of `domain`.
fn lead_key(domain: &str) -> i64 {
    let digest = key_digest(&["redeliver lead", domain]);
    i64::from_be_bytes(digest[..8].try_into().expect("32 bytes"))
}

impl QueueStore for PgStore {
    fn is_empty_of_data(&self) -> Result<bool, StoreError> {
        self.holds_nothing()
    }

    fn skip_seqs_below(&self, next: u64) -> Result<(), StoreError> {
        self.sequence_from(next)
    }

    fn import(
        &self,
        recipients: &[(String, Subscription)],
        entries: &[Remembered],
    ) -> Result<(), StoreError> {
        self.import_page(recipients, entries)
    }

    fn begin(&self) {
        self.begin_burst()
    }

    fn commit(&self) -> Result<usize, StoreError> {
        self.commit_burst()
    }

    #[cfg(test)]
    fn fail_commits(&self) {
        self.fail_now()
    }

    fn flush(&self) -> Result<usize, StoreError> {
        // Every commit is durable already (synchronous_commit = on).
        Ok(0)
    }

    fn write_shutdown_marker(&self) -> Result<(), StoreError> {
        // The database keeps its own log; nothing to compare at the next
        // open.
        Ok(())
    }

    fn writable_again(&self) -> bool {
        self.reachable()
    }

    fn lead(&self, domain: &str) -> Result<bool, StoreError> {
        let key = lead_key(domain);
        let found = self.run(async |db, b| {
            let r = db
                .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
                .await?;
            if !r.get::<_, bool>(0) {
                return Ok(None);
            }
            // Another leader may have written since this process knew.
            b.tails.clear();
            // One database holds one component domain's store: the
            // tables are not divided by domain.
            db.exec(
                "INSERT INTO redeliver_meta VALUES ('domain', $1) ON CONFLICT DO NOTHING",
                &[&domain],
            )
            .await?;
            let r = db
                .query_one(
                    "SELECT value FROM redeliver_meta WHERE name = 'domain'",
                    &[],
                )
                .await?;
            Ok(Some(r.get::<_, String>(0)))
        })?;
        match found {
            None => Ok(false),
            Some(d) if d == domain => Ok(true),
            Some(d) => Err(self.another_domain(&d, domain)),
        }
    }

    fn check_domain(&self, domain: &str) -> Result<(), StoreError> {
        let found = self.read(async |db, _| {
            let r = db
                .query_opt(
                    "SELECT value FROM redeliver_meta WHERE name = 'domain'",
                    &[],
                )
                .await?;
            Ok(r.map(|r| r.get::<_, String>(0)))
        })?;
        match found {
            Some(d) if d != domain => Err(self.another_domain(&d, domain)),
            _ => Ok(()),
        }
    }

    fn still_leads(&self, domain: &str) -> Result<bool, StoreError> {
        let key = lead_key(domain);
        self.read(async |db, _| {
            let r = db
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
                     AND pid = pg_backend_pid() AND granted AND objsubid = 1 \
                     AND ((classid::bigint << 32) | objid::bigint) = $1)",
                    &[&key],
                )
                .await?;
            Ok(r.get::<_, bool>(0))
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn durable_at_commit(&self) -> bool {
        // synchronous_commit = on: COMMIT returns once the WAL is flushed.
        true
    }

    fn forward(&self, stanza: &str, arrived_us: i64) -> Result<(), StoreError> {
        self.forward_stanza(stanza, arrived_us)
    }

    fn take_forwarded(
        &self,
        max: usize,
        upto_us: Option<i64>,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        self.take_from_inbox(max, upto_us)
    }

    fn remember_leader(&self, name: &str) -> Result<(), StoreError> {
        self.remember_instance(name)
    }

    fn led_here(&self, name: &str) -> Result<bool, StoreError> {
        self.knows_instance(name)
    }

    fn forwarded_wakeup(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        Some(self.inbox_wakeup())
    }

    fn look_ahead(&self, accepts: &[AcceptKey<'_>]) -> Result<(), StoreError> {
        self.read_ahead(accepts)
    }

    fn accept(&self, msg: NewMessage<'_>, limits: QueueLimits) -> Result<Accepted, StoreError> {
        self.accept_batched(msg, limits)
    }

    fn seq_of(
        &self,
        recipient: &str,
        sender_bare: &str,
        id: &str,
    ) -> Result<Option<u64>, StoreError> {
        if let Some(known) = self.known_seq_of(recipient, sender_bare, id) {
            return Ok(known);
        }
        let k = key_digest(&[recipient, sender_bare, "i", id]);
        // Every key the batch writes is known: what is not is read as it is.
        let read = async |db: &super::Db<'_>, _: &mut super::Burst| {
            let row = db
                .query_opt("SELECT seq FROM redeliver_dedup WHERE k = $1", &[&k])
                .await?;
            Ok(row.map(|r| useq(r.get(0))))
        };
        match self.failed() {
            true => self.read(read),
            false => self.run_batched(read),
        }
    }

    fn get(&self, recipient: &str, seq: u64) -> Result<Option<Record>, StoreError> {
        if self.failed()
            && let Some(rec) = self.written(recipient, seq)
        {
            return Ok(Some(rec));
        }
        if let Some(known) = self.known_get(recipient, seq) {
            return Ok(known);
        }
        let seq = sq(seq);
        self.read(async |db, _| {
            let row = db
                .query_opt(
                    "SELECT accepted_at_ms, sender, id, stanza FROM redeliver_pending \
                     WHERE recipient = $1 AND seq = $2",
                    &[&recipient, &seq],
                )
                .await?;
            Ok(row.map(|r| record(&r, 0)))
        })
    }

    fn confirm(&self, recipient: &str, seqs: &[u64]) -> Result<Confirmed, StoreError> {
        if let Some(done) = self.confirm_known(recipient, seqs)? {
            return Ok(done);
        }
        self.run(async |db, b| {
            let removed = removal(db, &mut b.delta, recipient, seqs, true).await?;
            b.queues_changed(recipient, removed.all().map(|(s, _)| *s));
            Ok(removed)
        })
    }

    fn forget(&self, recipient: &str, seq: u64) -> Result<Option<Record>, StoreError> {
        let key = sq(seq);
        self.run(async |db, b| {
            let d = &mut b.delta;
            let removed = removal(db, d, recipient, &[seq], true).await?;
            let removed: Vec<_> = removed.all().cloned().collect();
            // A seq names a message of one recipient: under another it
            // names none, and nothing of it is forgotten.
            let k: [&(dyn ToSql + Sync); 2] = [&key, &recipient];
            futures::try_join!(
                db.exec(
                    "DELETE FROM redeliver_dedup WHERE seq = $1 AND recipient = $2",
                    &k
                ),
                db.exec(
                    "DELETE FROM redeliver_entries WHERE seq = $1 AND recipient = $2",
                    &k
                ),
            )?;
            // No tail may answer for the keys that went.
            b.queues_changed(recipient, [seq]);
            b.tails.forget(recipient);
            Ok(removed.into_iter().next().map(|(_, r)| r))
        })
    }

    fn purge(&self, recipient: &str, scope: PurgeScope) -> Result<Vec<u64>, StoreError> {
        let below = sq(scope.below_seq);
        self.run(async |db, b| {
            let d = &mut b.delta;
            let rows = db
                .query(
                    "SELECT seq FROM redeliver_pending WHERE recipient = $1 AND seq < $2 \
                     AND ($3::bigint IS NULL OR accepted_at_ms <= $3) ORDER BY seq",
                    &[&recipient, &below, &scope.accepted_before_ms],
                )
                .await?;
            let seqs: Vec<u64> = rows.iter().map(|r| useq(r.get(0))).collect();
            let removed = removal(db, d, recipient, &seqs, true).await?;
            let seqs: Vec<u64> = removed.all().map(|(s, _)| *s).collect();
            b.queues_changed(recipient, seqs.iter().copied());
            Ok(seqs)
        })
    }

    fn expire(&self, cutoff_ms: i64, limit: usize) -> Result<Expired, StoreError> {
        let fetch = limit as i64 + 1;
        self.run(async |db, b| {
            let d = &mut b.delta;
            let rows = db
                .query(
                    "SELECT seq, accepted_at_ms FROM redeliver_entries ORDER BY seq LIMIT $1",
                    &[&fetch],
                )
                .await?;
            let mut out = Expired::default();
            // In seq order, up to the first one accepted after the cutoff.
            let due: Vec<i64> = rows
                .iter()
                .take(limit)
                .take_while(|r| r.get::<_, i64>(1) <= cutoff_ms)
                .map(|r| r.get(0))
                .collect();
            out.entries = due.len();
            out.more = due.len() == limit && rows.len() > limit;
            if due.is_empty() {
                return Ok(out);
            }
            let k: [&(dyn ToSql + Sync); 1] = [&due];
            let (_, _, pending, kept) = futures::try_join!(
                // Joined from unnest: a prepared `seq = ANY($1)` may
                // plan a scan of the whole table (see `batched`).
                db.exec(
                    "DELETE FROM redeliver_entries x USING unnest($1::bigint[]) AS g(seq) \
                     WHERE x.seq = g.seq",
                    &k
                ),
                db.exec(
                    "DELETE FROM redeliver_dedup x USING unnest($1::bigint[]) AS g(seq) \
                     WHERE x.seq = g.seq",
                    &k
                ),
                db.write(
                    "DELETE FROM redeliver_pending x USING unnest($1::bigint[]) AS g(seq) \
                     WHERE x.seq = g.seq \
                     RETURNING x.recipient, x.seq, x.accepted_at_ms, x.sender, x.id, x.stanza",
                    &k,
                ),
                db.write(
                    "DELETE FROM redeliver_tombstones x USING unnest($1::bigint[]) AS g(seq) \
                     WHERE x.seq = g.seq RETURNING octet_length(x.stanza)",
                    &k,
                ),
            )?;
            d.assumed -= kept.len() as i64;
            d.assumed_bytes -= kept
                .iter()
                .map(|r| i64::from(r.get::<_, i32>(0)))
                .sum::<i64>();
            let mut messages: Vec<(String, u64, Record)> = pending
                .iter()
                .map(|r| (r.get(0), useq(r.get(1)), record(r, 2)))
                .collect();
            messages.sort_by_key(|(_, seq, _)| *seq);
            // In name order: two instances lock recipients' rows in the
            // same order.
            let mut per: std::collections::BTreeMap<&str, (i64, i64)> = Default::default();
            for (recipient, _, rec) in &messages {
                let e = per.entry(recipient.as_str()).or_default();
                e.0 += 1;
                e.1 += rec.stanza.len() as i64;
            }
            for (recipient, (n, bytes)) in per {
                count(db, d, recipient, -n, -bytes).await?;
            }
            b.known.forget_rows();
            for (recipient, seq, _) in &messages {
                b.tails.removed(recipient, [*seq]);
            }
            out.messages = messages;
            Ok(out)
        })
    }

    fn pending_from_sender_upto(
        &self,
        recipient: &str,
        sender_bare: &str,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<u64>, StoreError> {
        let (key, limit) = (sq(upto), limit as i64);
        self.read(async |db, _| {
            let scan: [&(dyn ToSql + Sync); 3] = [&recipient, &key, &limit];
            let one: [&(dyn ToSql + Sync); 2] = [&recipient, &key];
            let (rows, last) = futures::try_join!(
                db.query(
                    "SELECT seq, sender FROM redeliver_pending \
                     WHERE recipient = $1 AND seq <= $2 ORDER BY seq LIMIT $3",
                    &scan,
                ),
                db.query_opt(
                    "SELECT 1 FROM redeliver_pending WHERE recipient = $1 AND seq = $2",
                    &one,
                ),
            )?;
            let mut out = from_sender(&rows, sender_bare);
            // `upto` itself is always included when pending.
            if !out.contains(&upto) && last.is_some() {
                out.push(upto);
            }
            Ok(out)
        })
    }

    fn contact(&self, recipient: &str, sender_bare: &str) -> Result<Option<Contact>, StoreError> {
        self.contact_batched(recipient, sender_bare)
    }

    fn set_contact(
        &self,
        recipient: &str,
        sender_bare: &str,
        contact: Contact,
    ) -> Result<(), StoreError> {
        self.set_contact_batched(recipient, sender_bare, contact)
    }

    fn set_subscription(&self, recipient: &str, sub: Subscription) -> Result<(), StoreError> {
        let sub = sub_code(sub);
        // The batch's counters go to other columns of the same row.
        self.run_batched(async |db, b| {
            // As in sled: no row for a recipient with nothing to keep.
            let row = db
                .query_opt(
                    "SELECT subscription FROM redeliver_recipients WHERE recipient = $1",
                    &[&recipient],
                )
                .await?;
            match row.map(|r| r.get::<_, i16>(0)) {
                Some(now) if now == sub => {}
                None if sub == 0 => {}
                _ => {
                    db.exec(
                        "INSERT INTO redeliver_recipients (recipient, subscription) \
                         VALUES ($1, $2) ON CONFLICT (recipient) \
                         DO UPDATE SET subscription = EXCLUDED.subscription",
                        &[&recipient, &sub],
                    )
                    .await?;
                }
            }
            b.known.subscribed(recipient, sub_of(sub));
            Ok(())
        })
    }

    fn assume(
        &self,
        recipient: &str,
        seqs: &[u64],
        now_ms: i64,
    ) -> Result<Vec<(u64, Record)>, StoreError> {
        let keys: Vec<i64> = seqs.iter().map(|s| sq(*s)).collect();
        self.run(async |db, b| {
            let d = &mut b.delta;
            let rows = db
                .write(
                    "WITH p AS (DELETE FROM redeliver_pending \
                                WHERE recipient = $1 AND seq = ANY($2) RETURNING *) \
                     INSERT INTO redeliver_tombstones \
                     (recipient, seq, assumed_at_ms, accepted_at_ms, sender, id, stanza) \
                     SELECT recipient, seq, $3, accepted_at_ms, sender, id, stanza FROM p \
                     RETURNING seq, accepted_at_ms, sender, id, stanza",
                    &[&recipient, &keys, &now_ms],
                )
                .await?;
            let moved = in_order(rows, seqs);
            let bytes = stanza_bytes(&moved);
            count(db, d, recipient, -(moved.len() as i64), -bytes).await?;
            d.assumed += moved.len() as i64;
            d.assumed_bytes += bytes;
            b.queues_changed(recipient, moved.iter().map(|(s, _)| *s));
            Ok(moved)
        })
    }

    fn restore(&self, recipient: &str, seq: u64) -> Result<Option<Record>, StoreError> {
        let key = sq(seq);
        if self.failed() {
            if self.written(recipient, seq).is_some() {
                return Ok(None); // restored already, in memory
            }
            // Back in memory only, as the sled store's overlay would hold
            // it: readable, so that its sender can be told.
            return self.read(async |db, b| {
                let row = db
                    .query_opt(
                        "SELECT accepted_at_ms, sender, id, stanza FROM redeliver_tombstones \
                         WHERE recipient = $1 AND seq = $2",
                        &[&recipient, &key],
                    )
                    .await?;
                let rec = row.map(|r| record(&r, 0));
                if let Some(rec) = &rec {
                    b.written.insert((recipient.to_owned(), seq), rec.clone());
                }
                Ok(rec)
            });
        }
        self.run(async |db, b| {
            let d = &mut b.delta;
            let one: [&(dyn ToSql + Sync); 2] = [&recipient, &key];
            let k: [&(dyn ToSql + Sync); 1] = [&key];
            let (tomb, entry) = futures::try_join!(
                db.write(
                    "DELETE FROM redeliver_tombstones WHERE recipient = $1 AND seq = $2 \
                     RETURNING accepted_at_ms, sender, id, stanza",
                    &one,
                ),
                db.query_opt("SELECT 1 FROM redeliver_entries WHERE seq = $1", &k),
            )?;
            let Some(rec) = tomb.first().map(|r| record(r, 0)) else {
                return Ok(None);
            };
            b.known.forget_rows();
            d.assumed -= 1;
            d.assumed_bytes -= rec.stanza.len() as i64;
            if entry.is_none() {
                // Past its time to live (only a damaged store gets here).
                return Ok(None);
            }
            db.exec(
                "INSERT INTO redeliver_pending \
                 (recipient, seq, accepted_at_ms, sender, id, stanza) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &recipient,
                    &key,
                    &rec.accepted_at_ms,
                    &rec.sender,
                    &rec.id,
                    &rec.stanza,
                ],
            )
            .await?;
            count(db, d, recipient, 1, rec.stanza.len() as i64).await?;
            // Back in the queue behind what its tail knew.
            b.tails.forget(recipient);
            b.written.insert((recipient.to_owned(), seq), rec.clone());
            Ok(Some(rec))
        })
    }

    fn prune_assumed(&self, cutoff_ms: i64, limit: usize) -> Result<Pruned, StoreError> {
        let (cutoff, limit_sql) = (cutoff_ms.max(0), limit as i64);
        self.run(async |db, b| {
            let d = &mut b.delta;
            let rows = db
                .write(
                    "DELETE FROM redeliver_tombstones WHERE seq IN \
                     (SELECT seq FROM redeliver_tombstones WHERE assumed_at_ms <= $1 \
                      ORDER BY assumed_at_ms, seq LIMIT $2) \
                     RETURNING octet_length(stanza)",
                    &[&cutoff, &limit_sql],
                )
                .await?;
            d.assumed -= rows.len() as i64;
            d.assumed_bytes -= rows
                .iter()
                .map(|r| i64::from(r.get::<_, i32>(0)))
                .sum::<i64>();
            // Their keys hold nothing any more.
            b.known.forget_rows();
            // As in sled: more when the step stopped at its limit and a
            // tombstone is left to look at.
            let more = rows.len() == limit
                && db
                    .query_one("SELECT EXISTS (SELECT 1 FROM redeliver_tombstones)", &[])
                    .await?
                    .get::<_, bool>(0);
            Ok(Pruned {
                removed: rows.len(),
                more,
            })
        })
    }

    fn assumed_from_sender_upto(
        &self,
        recipient: &str,
        sender_bare: &str,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<u64>, StoreError> {
        let (key, limit) = (sq(upto), limit as i64);
        self.read(async |db, _| {
            let rows = db
                .query(
                    "SELECT seq, sender FROM redeliver_tombstones \
                     WHERE recipient = $1 AND seq <= $2 ORDER BY seq LIMIT $3",
                    &[&recipient, &key, &limit],
                )
                .await?;
            Ok(from_sender(&rows, sender_bare))
        })
    }

    fn habits(&self, recipient: &str) -> Result<Vec<(String, Habit)>, StoreError> {
        self.read(async |db, _| {
            let rows = db
                .query(
                    "SELECT resource, answers, missed, seen_at_ms FROM redeliver_habits \
                     WHERE recipient = $1 ORDER BY resource",
                    &[&recipient],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| {
                    (
                        r.get(0),
                        Habit {
                            answers: if r.get::<_, i16>(1) == 1 {
                                Answers::All
                            } else {
                                Answers::Contacts
                            },
                            missed: r.get::<_, i16>(2).clamp(0, 255) as u8,
                            seen_at_ms: r.get(3),
                        },
                    )
                })
                .collect())
        })
    }

    fn set_habit(
        &self,
        recipient: &str,
        resource: &str,
        habit: Option<Habit>,
    ) -> Result<(), StoreError> {
        let k = key_digest(&[recipient, resource]);
        self.run(async |db, _| {
            let Some(h) = habit else {
                db.exec("DELETE FROM redeliver_habits WHERE k = $1", &[&k])
                    .await?;
                return Ok(());
            };
            // A new client past MAX_HABITS replaces the one heard from
            // longest ago.
            let max = MAX_HABITS as i64 - 1;
            db.exec(
                "DELETE FROM redeliver_habits WHERE k IN \
                 (SELECT k FROM redeliver_habits WHERE recipient = $1 \
                  ORDER BY seen_at_ms, resource LIMIT 1) \
                 AND NOT EXISTS (SELECT 1 FROM redeliver_habits WHERE k = $2) \
                 AND (SELECT count(*) FROM redeliver_habits WHERE recipient = $1) > $3",
                &[&recipient, &k, &max],
            )
            .await?;
            db.exec(
                "INSERT INTO redeliver_habits (k, recipient, resource, answers, missed, seen_at_ms) \
                 VALUES ($6, $1, $2, $3, $4, $5) ON CONFLICT (k) DO UPDATE SET \
                 answers = EXCLUDED.answers, missed = EXCLUDED.missed, \
                 seen_at_ms = EXCLUDED.seen_at_ms",
                &[
                    &recipient,
                    &resource,
                    &answers_code(h.answers),
                    &i16::from(h.missed),
                    &h.seen_at_ms,
                    &k,
                ],
            )
            .await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_databases::pg_database;

    /// Instances on one database lead one at a time; the lead passes when
    /// the leader's session ends; another component domain is refused,
    /// at the lead and by the check all-active instances make first.
    #[test]
    fn one_leader_per_database_and_one_domain() {
        let (url, password) = pg_database();
        let open = || PgStore::open(&url, password.as_deref()).unwrap();
        let (first, second) = (open(), open());
        assert!(first.lead("relay.a").unwrap());
        assert!(first.still_leads("relay.a").unwrap());
        assert!(!second.lead("relay.a").unwrap(), "held by the first");
        assert!(!second.still_leads("relay.a").unwrap());
        let e = second.lead("relay.b").unwrap_err().to_string();
        assert!(e.contains("not of relay.b"), "{e}");
        // All-active instances look before they connect.
        let e = second.check_domain("relay.b").unwrap_err().to_string();
        assert!(e.contains("not of relay.b"), "{e}");
        second.check_domain("relay.a").unwrap();
        open().check_domain("relay.b").unwrap_err();
        drop(first);
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !second.lead("relay.a").unwrap() {
            assert!(std::time::Instant::now() < end, "the lead never passed");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(second.still_leads("relay.a").unwrap());
    }
}
