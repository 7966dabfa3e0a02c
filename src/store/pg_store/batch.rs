//! The burst's queue writes, gathered in memory and sent as one
//! statement per kind of write, the way the fast PostgreSQL queues do
//! (pgmq, River): the new messages as one multi-row `INSERT` of arrays,
//! the removals of confirmed messages as one `DELETE … WHERE seq =
//! ANY(…)`, and the recipients' counters as one upsert that also moves
//! the count of recipients with pending messages (and the relay contacts
//! asked for, as one upsert). They go out pipelined,
//! together with whatever statement needs them next: the commit, or an
//! operation that reads the tables (`PgStore::run`).
//!
//! Nothing here decides anything: the operations decide from what the
//! burst knows (`known`) and leave their writes here.

use std::collections::{BTreeMap, HashMap};

use tokio_postgres::Statement;
use tokio_postgres::types::ToSql;

use super::Db;
use super::rows::PgResult;
use crate::store::Record;

/// New messages: the pending rows and their expiry entries.
const INSERT_MESSAGES: &str = "WITH m AS (SELECT * FROM unnest($1::text[], $2::bigint[], \
     $3::bigint[], $4::text[], $5::text[], $6::text[]) \
     AS m(recipient, seq, accepted_at_ms, sender, id, stanza)), \
     p AS (INSERT INTO redeliver_pending (recipient, seq, accepted_at_ms, sender, id, stanza) \
           SELECT recipient, seq, accepted_at_ms, sender, id, stanza FROM m) \
     INSERT INTO redeliver_entries (seq, recipient, accepted_at_ms) \
     SELECT seq, recipient, accepted_at_ms FROM m";

/// The id and origin-id keys of new messages; a key a confirmed message
/// held passes to the new one.
const UPSERT_DEDUP: &str = "INSERT INTO redeliver_dedup (k, recipient, sender, origin, key, seq, hash) \
     SELECT * FROM unnest($1::bytea[], $2::text[], $3::text[], $4::bool[], $5::text[], \
     $6::bigint[], $7::bigint[]) \
     ON CONFLICT (k) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash";

/// Confirmed messages (seqs are unique over the whole store).
/// (Joined from `unnest`, as the reads in `batched` are, so that the plan
/// goes through the index.)
const DELETE_PENDING: &str = "DELETE FROM redeliver_pending p \
     USING unnest($1::bigint[]) AS g(seq) WHERE p.seq = g.seq";

/// The recipients' counters, and the count of recipients with pending
/// messages, which moves by each recipient's crossing of zero.
const UPSERT_COUNTERS: &str = "WITH i AS (SELECT * FROM unnest($1::text[], $2::bigint[], \
     $3::bigint[]) AS i(recipient, n, bytes)), \
     c AS (INSERT INTO redeliver_recipients AS r (recipient, pending, bytes) \
           SELECT recipient, n, bytes FROM i \
           ON CONFLICT (recipient) DO UPDATE SET \
           pending = GREATEST(r.pending + EXCLUDED.pending, 0), \
           bytes = GREATEST(r.bytes + EXCLUDED.bytes, 0) \
           RETURNING r.recipient, r.pending) \
     UPDATE redeliver_totals SET recipients = recipients + \
     (SELECT COALESCE(sum((c.pending > 0)::int - (c.pending - i.n > 0)::int), 0)::bigint \
      FROM c JOIN i ON c.recipient = i.recipient COLLATE \"C\")";

/// Relay contacts asked for or answered.
const UPSERT_CONTACTS: &str = "INSERT INTO redeliver_contacts \
     (k, recipient, sender, subscription, asked_at_ms) \
     SELECT * FROM unnest($1::bytea[], $2::text[], $3::text[], $4::smallint[], $5::bigint[]) \
     ON CONFLICT (k) DO UPDATE SET \
     subscription = EXCLUDED.subscription, asked_at_ms = EXCLUDED.asked_at_ms";

/// Every statement a flush may send, prepared before a pipeline is built
/// (a statement prepared inside one would let later statements overtake
/// it).
pub(super) const STATEMENTS: [&str; 5] = [
    INSERT_MESSAGES,
    UPSERT_DEDUP,
    DELETE_PENDING,
    UPSERT_COUNTERS,
    UPSERT_CONTACTS,
];

/// One id or origin-id key of a new message.
#[derive(Debug, Clone)]
pub(super) struct DedupRow {
    pub recipient: String,
    pub sender: String,
    pub origin: bool,
    pub key: String,
    pub seq: i64,
    pub hash: Option<i64>,
}

/// Writes not yet sent.
#[derive(Debug, Default)]
pub(super) struct Batch {
    messages: Vec<(String, i64, Record)>,
    /// By key digest: the last write of a key wins (one row per key per
    /// statement, as `ON CONFLICT` needs).
    dedup: HashMap<Vec<u8>, DedupRow>,
    deletes: Vec<i64>,
    /// By recipient, in name order: rows are locked in one order.
    counters: BTreeMap<String, (i64, i64)>,
    /// By key digest, the last write wins.
    contacts: HashMap<Vec<u8>, ContactRow>,
}

/// A relay contact's row.
#[derive(Debug, Clone)]
pub(super) struct ContactRow {
    pub recipient: String,
    pub sender: String,
    pub subscription: i16,
    pub asked_at_ms: i64,
}

impl Batch {
    pub(super) fn is_empty(&self) -> bool {
        self.messages.is_empty()
            && self.dedup.is_empty()
            && self.deletes.is_empty()
            && self.counters.is_empty()
            && self.contacts.is_empty()
    }

    pub(super) fn contact(&mut self, k: Vec<u8>, row: ContactRow) {
        self.contacts.insert(k, row);
    }

    /// A new pending message, with its dedup keys.
    pub(super) fn insert(&mut self, recipient: &str, seq: i64, record: Record) {
        self.messages.push((recipient.to_owned(), seq, record));
    }

    pub(super) fn key(&mut self, k: Vec<u8>, row: DedupRow) {
        self.dedup.insert(k, row);
    }

    /// A pending message removed (one this process knows is pending).
    pub(super) fn delete(&mut self, seq: i64) {
        self.deletes.push(seq);
    }

    /// A recipient's counters move by `n` messages and `bytes`.
    pub(super) fn count(&mut self, recipient: &str, n: i64, bytes: i64) {
        let c = self.counters.entry(recipient.to_owned()).or_default();
        c.0 += n;
        c.1 += bytes;
    }

    /// The counters' change not yet sent for `recipient`.
    pub(super) fn unsent_count(&self, recipient: &str) -> (i64, i64) {
        self.counters.get(recipient).copied().unwrap_or_default()
    }

    /// Send every write, in one pipeline (the statements are prepared
    /// already: see [`prepare`]); rows written. The batch is empty after,
    /// whatever the outcome (on an error the transaction is lost anyway).
    pub(super) async fn flush(&mut self, db: &Db<'_>, s: &Prepared) -> PgResult<u64> {
        let b = std::mem::take(self);
        // One array per column; `col` borrows each from the rows.
        fn col<'r, R, T>(rows: &'r [R], f: impl Fn(&'r R) -> T) -> Vec<T> {
            rows.iter().map(f).collect()
        }
        let m = &b.messages;
        let (mr, ms, ma) = (
            col(m, |m| &m.0),
            col(m, |m| m.1),
            col(m, |m| m.2.accepted_at_ms),
        );
        let (mf, mi, mt) = (
            col(m, |m| &m.2.sender),
            col(m, |m| &m.2.id),
            col(m, |m| &m.2.stanza),
        );
        let d: Vec<(&Vec<u8>, &DedupRow)> = b.dedup.iter().collect();
        let (dk, dr, dsender) = (
            col(&d, |d| d.0),
            col(&d, |d| &d.1.recipient),
            col(&d, |d| &d.1.sender),
        );
        let (dorigin, dkey) = (col(&d, |d| d.1.origin), col(&d, |d| &d.1.key));
        let (dseq, dhash) = (col(&d, |d| d.1.seq), col(&d, |d| d.1.hash));
        let c: Vec<(&String, &(i64, i64))> = b
            .counters
            .iter()
            .filter(|(_, (n, bytes))| *n != 0 || *bytes != 0)
            .collect();
        let (cr, cn, cb) = (col(&c, |c| c.0), col(&c, |c| c.1.0), col(&c, |c| c.1.1));
        let k: Vec<(&Vec<u8>, &ContactRow)> = b.contacts.iter().collect();
        let (kk, kr, ks) = (
            col(&k, |k| k.0),
            col(&k, |k| &k.1.recipient),
            col(&k, |k| &k.1.sender),
        );
        let (ksub, kat) = (col(&k, |k| k.1.subscription), col(&k, |k| k.1.asked_at_ms));
        let deletes = &b.deletes;
        let messages: [&(dyn ToSql + Sync); 6] = [&mr, &ms, &ma, &mf, &mi, &mt];
        let keys: [&(dyn ToSql + Sync); 7] = [&dk, &dr, &dsender, &dorigin, &dkey, &dseq, &dhash];
        let removed: [&(dyn ToSql + Sync); 1] = [deletes];
        let counters: [&(dyn ToSql + Sync); 3] = [&cr, &cn, &cb];
        let contacts: [&(dyn ToSql + Sync); 5] = [&kk, &kr, &ks, &ksub, &kat];
        let (a, b2, c, d, e) = futures::try_join!(
            db.exec_if(!mr.is_empty(), &s[0], &messages),
            db.exec_if(!dk.is_empty(), &s[1], &keys),
            db.exec_if(!deletes.is_empty(), &s[2], &removed),
            db.exec_if(!cr.is_empty(), &s[3], &counters),
            db.exec_if(!kk.is_empty(), &s[4], &contacts),
        )?;
        Ok(a + b2 + c + d + e)
    }
}

/// The flush's statements, in [`STATEMENTS`] order.
pub(super) type Prepared = [Statement; 5];

/// Prepare the flush's statements (a round trip the first time only).
pub(super) async fn prepare(db: &Db<'_>) -> PgResult<Prepared> {
    Ok([
        db.statement(STATEMENTS[0]).await?,
        db.statement(STATEMENTS[1]).await?,
        db.statement(STATEMENTS[2]).await?,
        db.statement(STATEMENTS[3]).await?,
        db.statement(STATEMENTS[4]).await?,
    ])
}
