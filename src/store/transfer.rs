//! `redeliver store export FILE` and `redeliver store import FILE`.
//!
//! A store moves to a new redeliver, a new machine or another backend
//! (sled to PostgreSQL and back) through this export: a versioned,
//! line-oriented format, one JSON object per line, the same from every
//! backend:
//!
//! ```text
//! {"type":"header","format":"redeliver-store-export","version":2,"schema":2,"exported_at":"…","next_seq":42}
//! {"type":"recipient","jid":"bob@example.com","subscription":"subscribed"}
//! {"type":"entry","seq":17,"accepted_at_ms":…,"recipient":"bob@example.com",
//!  "ids":[{"sender":"alice@example.com","value":"m1","hash":…}],"origins":[],
//!  "message":{"accepted_at_ms":…,"sender":"alice@example.com/phone","id":"m1","stanza":"<message …/>"}}
//! {"type":"end","recipients":1,"entries":1,"messages":1}
//! ```
//!
//! - `next_seq` (from version 2 on) is a seq above every seq the store
//!   ever handed out, also those of messages it no longer remembers.
//! - `recipient` lines carry the presence subscription state.
//! - `entry` lines come in accept order, one per accepted message still
//!   remembered (pending, or confirmed but inside its TTL for duplicate
//!   detection); `message` is present while it is pending.
//! - `hash` (optional) is the content hash of the message that holds the
//!   id, which tells a resubmission from a different message under a
//!   reused id; without it a reused id counts as a resubmission.
//! - `end` counts the lines before it, so a truncated file is refused.
//!
//! Import writes into an empty store only, after reading the whole file
//! once to validate it. Each message keeps its `seq`: a relayed message's
//! XEP-0359 stanza-id is its seq (`router::delivery`), the same at every
//! send, and clients may de-duplicate by it. The store then hands out
//! only seqs from `next_seq` (and above every imported one) on, so that
//! a later message never gets the stanza-id of an earlier one.
//!
//! Version 1 (from earlier builds) had no `next_seq`; such a file still
//! imports, and the store then hands out seqs above the imported ones
//! only: a later message may get the stanza-id of one the old store had
//! forgotten after its last remembered one (expired, purged, or
//! confirmed and past its time to live).
//!
//! The `schema` of the header is the exporting backend's schema version,
//! for the record only: the lines mean the same from every backend.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::*;

pub const FORMAT: &str = "redeliver-store-export";
/// 2: the header has `next_seq`.
pub const VERSION: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    SledStore(#[from] StoreError),
    #[error("line {line}: {msg}")]
    Format { line: usize, msg: String },
    #[error("the store already holds data; import into a new, empty store directory")]
    NotEmpty,
    #[error(
        "{0} stanzas handed over by all-active instances wait for a leader: start an instance \
         to handle them, stop every instance, then export"
    )]
    HandedOver(u64),
    #[error(
        "the store counts {pending} pending messages but the export found {exported}: the \
         store is damaged (run `redeliver store check`); the file is incomplete"
    )]
    Incomplete { pending: u64, exported: u64 },
}

/// Counts of an export or import.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferSummary {
    pub recipients: u64,
    pub entries: u64,
    pub messages: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum Line {
    Header {
        format: String,
        version: u32,
        schema: u32,
        exported_at: String,
        /// Above every seq the store handed out (absent in version 1).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next_seq: Option<u64>,
    },
    Recipient {
        jid: String,
        subscription: Subscription,
    },
    Entry {
        seq: u64,
        accepted_at_ms: i64,
        recipient: String,
        ids: Vec<IdKey>,
        origins: Vec<IdKey>,
        message: Option<Record>,
    },
    End {
        recipients: u64,
        entries: u64,
        messages: u64,
    },
}

fn write_line(w: &mut dyn Write, line: &Line) -> Result<(), TransferError> {
    serde_json::to_writer(&mut *w, line).map_err(std::io::Error::other)?;
    w.write_all(b"\n")?;
    Ok(())
}

/// Entries read per step of an export.
const PAGE: usize = 1024;

/// Write the whole store to `w`. Read-only; safe on a store no other
/// process writes to.
pub fn export(store: &dyn StoreView, w: &mut dyn Write) -> Result<TransferSummary, TransferError> {
    // They are not part of the format: they would be lost.
    let waiting = store.handed_over()?;
    if waiting > 0 {
        return Err(TransferError::HandedOver(waiting));
    }
    let mut sum = TransferSummary::default();
    write_line(
        w,
        &Line::Header {
            format: FORMAT.into(),
            version: VERSION,
            schema: store.schema_version(),
            exported_at: chrono::Utc::now().to_rfc3339(),
            next_seq: Some(store.next_seq()?),
        },
    )?;
    for (jid, state) in store.recipients()? {
        sum.recipients += 1;
        write_line(
            w,
            &Line::Recipient {
                jid,
                subscription: state.subscription,
            },
        )?;
    }
    let mut after = None;
    loop {
        let page = store.remembered(after, PAGE)?;
        let Some(last) = page.last() else { break };
        after = Some(last.seq);
        for e in page {
            sum.entries += 1;
            sum.messages += u64::from(e.message.is_some());
            write_line(
                w,
                &Line::Entry {
                    seq: e.seq,
                    accepted_at_ms: e.accepted_at_ms,
                    recipient: e.recipient,
                    ids: e.ids,
                    origins: e.origins,
                    message: e.message,
                },
            )?;
        }
    }
    // A message the walk could not reach (a damaged index) must not
    // leave a file that looks whole.
    let pending = store.totals()?.pending;
    if sum.messages != pending {
        return Err(TransferError::Incomplete {
            pending,
            exported: sum.messages,
        });
    }
    write_line(
        w,
        &Line::End {
            recipients: sum.recipients,
            entries: sum.entries,
            messages: sum.messages,
        },
    )?;
    w.flush()?;
    Ok(sum)
}

/// Read an export into `store`, which must be empty. The file is
/// validated in a first pass; nothing is written unless all of it is good.
pub fn import(store: &dyn QueueStore, path: &Path) -> Result<TransferSummary, TransferError> {
    if !store.is_empty_of_data()? {
        return Err(TransferError::NotEmpty);
    }
    let (expected, next_seq) = validate(path)?;
    // One burst: on PostgreSQL one transaction, so that a failure part
    // way leaves the database empty as it was.
    store.begin();
    // Each message keeps its seq, which its stanza-id is made of: no
    // later message may get one of them, nor one of a message the
    // exported store forgot.
    store.skip_seqs_below(next_seq)?;
    let mut sum = TransferSummary::default();
    let (mut recipients, mut page) = (Vec::new(), Vec::new());
    for (n, line) in BufReader::new(File::open(path)?).lines().enumerate() {
        let line: Line = serde_json::from_str(&line?).map_err(|e| TransferError::Format {
            line: n + 1,
            msg: e.to_string(),
        })?;
        match line {
            Line::Header { .. } | Line::End { .. } => {}
            Line::Recipient { jid, subscription } => {
                sum.recipients += 1;
                recipients.push((jid, subscription));
                if recipients.len() == PAGE {
                    store.import(&std::mem::take(&mut recipients), &[])?;
                }
            }
            Line::Entry {
                seq,
                accepted_at_ms,
                recipient,
                ids,
                origins,
                message,
            } => {
                sum.entries += 1;
                sum.messages += u64::from(message.is_some());
                page.push(Remembered {
                    seq,
                    accepted_at_ms,
                    recipient,
                    ids,
                    origins,
                    message,
                });
                if page.len() == PAGE {
                    store.import(&std::mem::take(&mut recipients), &std::mem::take(&mut page))?;
                }
            }
        }
    }
    store.import(&recipients, &page)?;
    store.commit()?;
    store.flush()?;
    debug_assert_eq!(sum, expected);
    Ok(sum)
}

/// A recipient as a key part: not empty, and free of the 0x00 separator.
fn key_part_ok(jid: &str) -> bool {
    !jid.is_empty() && !jid.contains('\0')
}

/// The largest seq an import takes (and, plus one, the largest
/// `next_seq`): 2^62, far above any store's (sled adds about 2,000,000
/// per restart), so that an imported store still has room for 2^62 more
/// seqs in PostgreSQL's bigint and in any later export.
const MAX_SEQ: u64 = 1 << 62;

/// First pass over an export: every line parses, entries come in order
/// with seqs a store takes, stanzas parse, and the trailer's counts
/// match. The counts, and the seq the importing store must hand out
/// from: the header's `next_seq`, and past every entry's.
fn validate(path: &Path) -> Result<(TransferSummary, u64), TransferError> {
    let mut sum = TransferSummary::default();
    let mut last_seq = None;
    let mut header_next = 0;
    let mut ended = None;
    let bad = |line: usize, msg: String| TransferError::Format { line, msg };
    for (n, text) in BufReader::new(File::open(path)?).lines().enumerate() {
        let n = n + 1;
        let text = text?;
        if ended.is_some() {
            return Err(bad(n, "data after the end line".into()));
        }
        let line: Line = serde_json::from_str(&text).map_err(|e| bad(n, e.to_string()))?;
        match line {
            Line::Header {
                format,
                version,
                next_seq,
                ..
            } => {
                if n != 1 {
                    return Err(bad(n, "a second header".into()));
                }
                if format != FORMAT {
                    return Err(bad(n, format!("not a redeliver export ({format:?})")));
                }
                if version > VERSION {
                    return Err(bad(
                        n,
                        format!(
                            "export format version {version}; this build reads up to {VERSION}"
                        ),
                    ));
                }
                match next_seq {
                    None if version >= 2 => {
                        return Err(bad(
                            n,
                            format!("a version {version} header without next_seq"),
                        ));
                    }
                    Some(s) if s > MAX_SEQ + 1 => {
                        return Err(bad(
                            n,
                            format!("next_seq {s} is larger than {}", MAX_SEQ + 1),
                        ));
                    }
                    _ => header_next = next_seq.unwrap_or(0),
                }
            }
            _ if n == 1 => return Err(bad(n, "no header".into())),
            Line::Recipient { jid, .. } => {
                if !key_part_ok(&jid) {
                    return Err(bad(n, "bad recipient JID".into()));
                }
                sum.recipients += 1;
            }
            Line::Entry {
                seq,
                recipient,
                message,
                ids,
                origins,
                ..
            } => {
                // No NUL anywhere: XML cannot carry one, and PostgreSQL's
                // text refuses it (an import would fail part way).
                let has_nul = ids
                    .iter()
                    .chain(&origins)
                    .flat_map(|k| [k.sender.as_str(), k.value.as_str()])
                    .chain(
                        message
                            .iter()
                            .flat_map(|m| [m.sender.as_str(), m.id.as_str(), m.stanza.as_str()]),
                    )
                    .any(|t| t.contains('\0'));
                if has_nul {
                    return Err(bad(n, "a NUL character".into()));
                }
                if last_seq.is_some_and(|l| seq <= l) {
                    return Err(bad(n, "entries out of order".into()));
                }
                if seq > MAX_SEQ {
                    return Err(bad(n, format!("seq {seq} is larger than {MAX_SEQ}")));
                }
                last_seq = Some(seq);
                if !key_part_ok(&recipient) {
                    return Err(bad(n, "bad recipient JID".into()));
                }
                sum.entries += 1;
                if let Some(rec) = message {
                    if rec.stanza.parse::<tokio_xmpp::minidom::Element>().is_err() {
                        return Err(bad(n, "stanza does not parse".into()));
                    }
                    sum.messages += 1;
                }
            }
            Line::End {
                recipients,
                entries,
                messages,
            } => {
                ended = Some(TransferSummary {
                    recipients,
                    entries,
                    messages,
                });
            }
        }
    }
    let next_seq = last_seq.map_or(0, |l| l + 1).max(header_next);
    match ended {
        Some(end) if end == sum => Ok((sum, next_seq)),
        Some(end) => Err(bad(
            0,
            format!("the end line counts {end:?} but the file holds {sum:?}"),
        )),
        None => Err(bad(0, "no end line: the file is truncated".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract_tests::{msg, stored};
    use crate::store::test_databases;

    /// Export `from` and import the file into `to`.
    fn moved(from: &dyn QueueStore, to: &dyn QueueStore) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("export.jsonl");
        export(from, &mut File::create(&file).unwrap()).unwrap();
        import(to, &file).unwrap();
    }

    /// Stored: a message from alice to bob (with a stanza that parses, as
    /// an import wants).
    fn accepted(s: &dyn QueueStore, id: &str) -> u64 {
        let mut m = msg("bob@x", "alice@x", id, None);
        m.record.stanza = format!("<message xmlns='jabber:client' id='{id}'/>");
        stored(s, m)
    }

    fn seqs(s: &dyn QueueStore) -> Vec<u64> {
        let all = s.remembered(None, 1000).unwrap();
        all.iter().map(|e| e.seq).collect()
    }

    /// A relayed message's stanza-id is its seq (`router::delivery`): a
    /// store that moves keeps every message's seq, and then hands out only
    /// seqs above every one the store it came from handed out, those of
    /// messages it forgot too.
    fn seqs_survive_moves(stores: &[&dyn QueueStore]) {
        let first = stores[0];
        let a = accepted(first, "a");
        // A gap, as the router's start, a purge or an expiry step leaves
        // (each takes a seq).
        first.next_seq().unwrap();
        let b = accepted(first, "b");
        let (c, d) = (accepted(first, "c"), accepted(first, "d"));
        // Confirmed: only its dedup memory stays. Refused for good:
        // forgotten, not in an export, but they may have been sent.
        first.confirm("bob@x", &[a]).unwrap();
        first.forget("bob@x", c).unwrap();
        first.forget("bob@x", d).unwrap();
        let mut handed_out = vec![a, b, c, d];
        for (n, pair) in stores.windows(2).enumerate() {
            let (from, to) = (pair[0], pair[1]);
            let (remembered, pending) = (seqs(from), from.pending_from("bob@x", 0, 100).unwrap());
            moved(from, to);
            assert_eq!(seqs(to), remembered, "move {n}");
            assert_eq!(to.pending_from("bob@x", 0, 100).unwrap(), pending);
            assert_eq!(to.seq_of("bob@x", "alice@x", "a").unwrap(), Some(a));
            let id = format!("after-{n}");
            let new = accepted(to, &id);
            let report = to.check().unwrap();
            assert!(report.ok(), "{:?}", report.problems);
            assert!(
                handed_out.iter().all(|&s| new > s),
                "{id} got seq {new}; handed out before: {handed_out:?}"
            );
            handed_out.push(new);
        }
    }

    /// An export made by hand: a header of `version` with `next_seq` (if
    /// any), a confirmed message at seq 5 and a pending one at seq 9.
    fn hand_made(dir: &Path, version: u32, next_seq: Option<u64>) -> std::path::PathBuf {
        let mut header = serde_json::json!({"type": "header", "format": FORMAT,
            "version": version, "schema": 2, "exported_at": "now"});
        if let Some(s) = next_seq {
            header["next_seq"] = s.into();
        }
        let ids = |id: &str| serde_json::json!([{"sender": "alice@x", "value": id}]);
        let lines = [
            header.to_string(),
            serde_json::json!({"type": "entry", "seq": 5, "accepted_at_ms": 1,
                "recipient": "bob@x", "ids": ids("m5"), "origins": [], "message": null})
            .to_string(),
            serde_json::json!({"type": "entry", "seq": 9, "accepted_at_ms": 1,
                "recipient": "bob@x", "ids": ids("m9"), "origins": [],
                "message": {"accepted_at_ms": 1, "sender": "alice@x/r", "id": "m9",
                    "stanza": "<message xmlns='jabber:client' id='m9'/>"}})
            .to_string(),
            serde_json::json!({"type": "end", "recipients": 0, "entries": 2, "messages": 1})
                .to_string(),
        ];
        let file = dir.join(format!("v{version}.jsonl"));
        std::fs::write(&file, lines.join("\n")).unwrap();
        file
    }

    /// A version 1 export (earlier builds; no `next_seq`) still imports,
    /// its seqs kept, and the store goes on above them; a version 2
    /// export's `next_seq` is where it goes on.
    fn older_and_newer_exports(v1: &dyn QueueStore, v2: &dyn QueueStore) {
        let dir = tempfile::tempdir().unwrap();
        for (s, file, from) in [
            (v1, hand_made(dir.path(), 1, None), 10),
            (v2, hand_made(dir.path(), 2, Some(100)), 100),
        ] {
            import(s, &file).unwrap();
            assert_eq!(seqs(s), [5, 9]);
            assert_eq!(s.seq_of("bob@x", "alice@x", "m5").unwrap(), Some(5));
            let pending = s.pending_from("bob@x", 0, 10).unwrap();
            assert_eq!(
                pending
                    .iter()
                    .map(|(q, r)| (*q, &*r.id))
                    .collect::<Vec<_>>(),
                [(9, "m9")]
            );
            let new = accepted(s, "new");
            assert!(new >= from, "{file:?}: a new message got seq {new}");
        }
    }

    #[test]
    fn older_and_newer_exports_on_sled() {
        let ((a, _a), (b, _b)) = (test_databases::sled(), test_databases::sled());
        older_and_newer_exports(&*a, &*b);
    }

    #[test]
    fn older_and_newer_exports_on_postgres() {
        let (a, b) = (test_databases::postgres(), test_databases::postgres());
        older_and_newer_exports(&*a, &*b);
    }

    /// From version 2 on the header must say where seqs go on: without
    /// it an import could give a new message a forgotten one's stanza-id.
    #[test]
    fn a_version_2_export_without_next_seq_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _guard) = test_databases::sled();
        let e = import(&*s, &hand_made(dir.path(), 2, None))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "line 1: a version 2 header without next_seq");
        assert!(s.is_empty_of_data().unwrap());
    }

    #[test]
    fn seqs_survive_moves_between_sled_stores() {
        let ((a, _a), (b, _b)) = (test_databases::sled(), test_databases::sled());
        let (c, _c) = test_databases::sled();
        seqs_survive_moves(&[&*a, &*b, &*c]);
    }

    #[test]
    fn seqs_survive_moves_from_sled_to_postgres_and_back() {
        let (a, _a) = test_databases::sled();
        let (c, _c) = test_databases::sled();
        seqs_survive_moves(&[&*a, &*test_databases::postgres(), &*c]);
    }

    #[test]
    fn seqs_survive_moves_from_postgres_to_sled_and_back() {
        let (b, _b) = test_databases::sled();
        let (a, c) = (test_databases::postgres(), test_databases::postgres());
        seqs_survive_moves(&[&*a, &*b, &*c]);
    }

    /// A NUL in an export is refused before anything is written: XML
    /// cannot carry one, and PostgreSQL's text refuses it.
    #[test]
    fn an_export_with_a_nul_is_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nul.jsonl");
        let entry = |seq: u64, stanza: &str| {
            serde_json::json!({"type": "entry", "seq": seq, "accepted_at_ms": 1,
                "recipient": "bob@x", "ids": [], "origins": [],
                "message": {"accepted_at_ms": 1, "sender": "alice@x/r", "id": "m",
                    "stanza": stanza}})
            .to_string()
        };
        let lines = [
            serde_json::json!({"type": "header", "format": FORMAT, "version": 1,
                "schema": 2, "exported_at": "now"})
            .to_string(),
            entry(1, "<message xmlns='jabber:client'/>"),
            entry(2, "<message xmlns='jabber:client'>\u{0}</message>"),
            serde_json::json!({"type": "end", "recipients": 0, "entries": 2, "messages": 2})
                .to_string(),
        ];
        std::fs::write(&file, lines.join("\n")).unwrap();
        let (s, _guard) = test_databases::sled();
        let e = import(&*s, &file).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("NUL"), "{e}");
        assert!(s.is_empty_of_data().unwrap());
    }
}
