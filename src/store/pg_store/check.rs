//! `redeliver store check` on PostgreSQL: the invariants the sled check
//! verifies, as queries. Read-only.

use super::PgStore;
use crate::store::{CheckReport, StoreError};

/// Each query returns one text column per problem found.
const PROBLEMS: &[&str] = &[
    // Counters match the queues.
    "SELECT format('%s: counters say %s messages / %s bytes, the queue holds %s / %s', \
       COALESCE(r.recipient, q.recipient), COALESCE(r.pending, 0), COALESCE(r.bytes, 0), \
       COALESCE(q.n, 0), COALESCE(q.b, 0)) \
     FROM redeliver_recipients r FULL JOIN \
       (SELECT recipient, count(*) AS n, sum(octet_length(stanza)) AS b \
        FROM redeliver_pending GROUP BY recipient) q ON q.recipient = r.recipient \
     WHERE COALESCE(r.pending, 0) <> COALESCE(q.n, 0) OR COALESCE(r.bytes, 0) <> COALESCE(q.b, 0)",
    // The totals match the counters and the tombstones.
    "SELECT format('totals say %s/%s/%s/%s/%s (pending, bytes, recipients, kept, kept bytes), \
       the tables hold %s/%s/%s/%s/%s', t.pending, t.bytes, t.recipients, t.assumed, \
       t.assumed_bytes, r.p, r.b, r.n, k.n, k.b) \
     FROM redeliver_totals t, \
       (SELECT COALESCE(sum(pending), 0) AS p, COALESCE(sum(bytes), 0) AS b, \
               count(*) FILTER (WHERE pending > 0) AS n FROM redeliver_recipients) r, \
       (SELECT count(*) AS n, COALESCE(sum(octet_length(stanza)), 0) AS b \
        FROM redeliver_tombstones) k \
     WHERE (t.pending, t.bytes, t.recipients, t.assumed, t.assumed_bytes) \
        <> (r.p, r.b, r.n, k.n, k.b)",
    // Every pending message and tombstone has its entry, for its recipient.
    "SELECT format('%s seq %s: no expiry entry', p.recipient, p.seq) \
     FROM redeliver_pending p LEFT JOIN redeliver_entries e ON e.seq = p.seq \
     WHERE e.seq IS NULL OR e.recipient <> p.recipient",
    "SELECT format('seq %s: tombstone past its expiry entry', t.seq) \
     FROM redeliver_tombstones t LEFT JOIN redeliver_entries e ON e.seq = t.seq \
     WHERE e.seq IS NULL",
    "SELECT format('seq %s: both pending and a tombstone', t.seq) \
     FROM redeliver_tombstones t JOIN redeliver_pending p ON p.seq = t.seq",
    // Every dedup key belongs to a remembered message.
    "SELECT format('%s: id %s of %s points at seq %s, which is not remembered', \
       d.recipient, d.key, d.sender, d.seq) \
     FROM redeliver_dedup d LEFT JOIN redeliver_entries e ON e.seq = d.seq \
     WHERE e.seq IS NULL",
    // Nothing handed over waits without a leader to take it (the store
    // is not at rest).
    "SELECT format('%s stanzas handed over by all-active instances wait in redeliver_inbox \
     for a leader: start an instance to handle them', count(*)) \
     FROM redeliver_inbox HAVING count(*) > 0",
    // No seq beyond the sequence (an import or a restore gone wrong).
    "SELECT format('seq %s is past the sequence (%s)', e.seq, s.last_value) \
     FROM redeliver_entries e, redeliver_seq s WHERE e.seq > s.last_value",
];

impl PgStore {
    pub(super) fn check_tables(&self) -> Result<CheckReport, StoreError> {
        self.read(async |db, _| {
            let mut r = CheckReport::default();
            for sql in PROBLEMS {
                for row in db.query(sql, &[]).await? {
                    if r.problems.len() < 1000 {
                        r.problems.push(row.get(0));
                    }
                }
            }
            let counts = db
                .query_one(
                    "SELECT (SELECT count(*) FROM redeliver_recipients), \
                     (SELECT count(*) FROM redeliver_pending), \
                     (SELECT COALESCE(sum(octet_length(stanza)), 0) FROM redeliver_pending)::bigint, \
                     (SELECT count(*) FROM redeliver_entries)",
                    &[],
                )
                .await?;
            r.recipients = counts.get::<_, i64>(0) as u64;
            r.messages = counts.get::<_, i64>(1) as u64;
            r.bytes = counts.get::<_, i64>(2) as u64;
            r.entries = counts.get::<_, i64>(3) as u64;
            // Every stored stanza parses.
            for row in db
                .query(
                    "SELECT recipient, seq, stanza FROM redeliver_pending ORDER BY seq",
                    &[],
                )
                .await?
            {
                let stanza: &str = row.get(2);
                if stanza.parse::<tokio_xmpp::minidom::Element>().is_err() && r.problems.len() < 1000
                {
                    r.problems.push(format!(
                        "{} seq {}: stored stanza does not parse",
                        row.get::<_, &str>(0),
                        row.get::<_, i64>(1)
                    ));
                }
            }
            Ok(r)
        })
    }
}
