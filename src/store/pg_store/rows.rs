//! What the PostgreSQL operations share: rows to the store's types and
//! back, the per-recipient counters every write keeps, and removing
//! messages with their counters.

use std::collections::HashMap;

use tokio_postgres::Row;

use super::{Db, Delta};
use crate::store::{Answers, Confirmed, Record, Subscription};

pub(super) type PgResult<T> = Result<T, tokio_postgres::Error>;

/// A seq (or bound) as a bigint: seqs come from a PostgreSQL sequence, so
/// they fit; a bound past them saturates.
pub(super) fn sq(seq: u64) -> i64 {
    seq.min(i64::MAX as u64) as i64
}

pub(super) fn useq(v: i64) -> u64 {
    v.max(0) as u64
}

pub(super) fn sub_code(s: Subscription) -> i16 {
    match s {
        Subscription::None => 0,
        Subscription::Requested => 1,
        Subscription::Subscribed => 2,
    }
}

pub(super) fn sub_of(code: i16) -> Subscription {
    match code {
        1 => Subscription::Requested,
        2 => Subscription::Subscribed,
        _ => Subscription::None,
    }
}

pub(super) fn answers_code(a: Answers) -> i16 {
    match a {
        Answers::Contacts => 0,
        Answers::All => 1,
    }
}

/// A record from the columns `accepted_at_ms, sender, id, stanza`
/// starting at `at`.
pub(super) fn record(row: &Row, at: usize) -> Record {
    Record {
        accepted_at_ms: row.get(at),
        sender: row.get(at + 1),
        id: row.get(at + 2),
        stanza: row.get(at + 3),
    }
}

/// `(seq, record)` rows (`seq, accepted_at_ms, sender, id, stanza`) in
/// the order of `seqs`.
pub(super) fn in_order(rows: Vec<Row>, seqs: &[u64]) -> Vec<(u64, Record)> {
    let mut by_seq: HashMap<u64, Record> = rows
        .iter()
        .map(|r| (useq(r.get(0)), record(r, 1)))
        .collect();
    seqs.iter()
        .filter_map(|s| by_seq.remove(s).map(|r| (*s, r)))
        .collect()
}

pub(super) fn stanza_bytes(records: &[(u64, Record)]) -> i64 {
    records.iter().map(|(_, r)| r.stanza.len() as i64).sum()
}

/// Change a recipient's counters by `n` messages and `bytes`, and the
/// number of recipients with pending messages if it crossed zero.
pub(super) async fn count(
    db: &Db<'_>,
    d: &mut Delta,
    recipient: &str,
    n: i64,
    bytes: i64,
) -> PgResult<()> {
    if n == 0 && bytes == 0 {
        return Ok(());
    }
    let row = db
        .write(
            "INSERT INTO redeliver_recipients (recipient, pending, bytes) VALUES ($1, $2, $3) \
             ON CONFLICT (recipient) DO UPDATE SET \
             pending = GREATEST(redeliver_recipients.pending + $2, 0), \
             bytes = GREATEST(redeliver_recipients.bytes + $3, 0) \
             RETURNING pending",
            &[&recipient, &n, &bytes],
        )
        .await?;
    counted(d, row.first().map_or(0, |r| r.get(0)), n, bytes);
    Ok(())
}

/// A recipient's counters moved by `n` messages and `bytes` to `after`
/// pending: the burst's delta of the totals follows.
pub(super) fn counted(d: &mut Delta, after: i64, n: i64, bytes: i64) {
    let before = after - n;
    match (before > 0, after > 0) {
        (false, true) => d.recipients += 1,
        (true, false) => d.recipients -= 1,
        _ => {}
    }
    d.pending += n;
    d.bytes += bytes;
}

/// Remove pending messages (those still there) with their counters; if
/// `tombstones`, the tombstones of the others too.
pub(super) async fn removal(
    db: &Db<'_>,
    d: &mut Delta,
    recipient: &str,
    seqs: &[u64],
    tombstones: bool,
) -> PgResult<Confirmed> {
    if seqs.is_empty() {
        return Ok(Confirmed::default());
    }
    let removed = take(
        db,
        "DELETE FROM redeliver_pending WHERE recipient = $1 AND seq = ANY($2) \
         RETURNING seq, accepted_at_ms, sender, id, stanza",
        recipient,
        seqs,
    )
    .await?;
    let mut counted = Vec::new();
    count(
        db,
        d,
        recipient,
        -(removed.len() as i64),
        -stanza_bytes(&removed),
    )
    .await?;
    if tombstones && removed.len() < seqs.len() {
        let gone: Vec<u64> = seqs
            .iter()
            .copied()
            .filter(|s| !removed.iter().any(|(r, _)| r == s))
            .collect();
        let dropped = take(
            db,
            "DELETE FROM redeliver_tombstones WHERE recipient = $1 AND seq = ANY($2) \
             RETURNING seq, accepted_at_ms, sender, id, stanza",
            recipient,
            &gone,
        )
        .await?;
        d.assumed -= dropped.len() as i64;
        d.assumed_bytes -= stanza_bytes(&dropped);
        counted = dropped;
    }
    Ok(Confirmed {
        pending: removed,
        counted,
    })
}

/// `recipient`'s messages `seqs` deleted by `delete` (a `DELETE … WHERE
/// recipient = $1 AND seq = ANY($2) RETURNING` the record's columns), in
/// the order of `seqs`.
async fn take(
    db: &Db<'_>,
    delete: &'static str,
    recipient: &str,
    seqs: &[u64],
) -> PgResult<Vec<(u64, Record)>> {
    let keys: Vec<i64> = seqs.iter().map(|s| sq(*s)).collect();
    let rows = db.write(delete, &[&recipient, &keys]).await?;
    Ok(in_order(rows, seqs))
}
