//! `redeliver store export FILE` and `redeliver store import FILE`.
//!
//! A store moves to a new redeliver, a new machine or another backend
//! (sled to PostgreSQL and back) through this export: a versioned,
//! line-oriented format, one JSON object per line, the same from every
//! backend:
//!
//! ```text
//! {"type":"header","format":"redeliver-store-export","version":1,"schema":2,"exported_at":"…"}
//! {"type":"recipient","jid":"bob@example.com","subscription":"subscribed"}
//! {"type":"entry","seq":17,"accepted_at_ms":…,"recipient":"bob@example.com",
//!  "ids":[{"sender":"alice@example.com","value":"m1","hash":…}],"origins":[],
//!  "message":{"accepted_at_ms":…,"sender":"alice@example.com/phone","id":"m1","stanza":"<message …/>"}}
//! {"type":"end","recipients":1,"entries":1,"messages":1}
//! ```
//!
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
//! only seqs above every imported one, so that a later message never
//! gets the stanza-id of an earlier one.
//!
//! The `schema` of the header is the exporting backend's schema version,
//! for the record only: the lines mean the same from every backend.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::*;

pub const FORMAT: &str = "redeliver-store-export";
pub const VERSION: u32 = 1;

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
    // later message may get one of them.
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

/// The largest seq an import takes: PostgreSQL's bigint holds the seq
/// after it too.
const MAX_SEQ: u64 = i64::MAX as u64 - 1;

/// First pass over an export: every line parses, entries come in order
/// with seqs a store takes, stanzas parse, and the trailer's counts
/// match. The counts, and the seq the importing store must hand out
/// from, past every entry's.
fn validate(path: &Path) -> Result<(TransferSummary, u64), TransferError> {
    let mut sum = TransferSummary::default();
    let mut last_seq = None;
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
                format, version, ..
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
    let next_seq = last_seq.map_or(0, |l| l + 1);
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
    /// seqs above every one it holds.
    fn seqs_survive_moves(stores: &[&dyn QueueStore]) {
        let first = stores[0];
        let a = accepted(first, "a");
        // A gap, as the router's start, a purge or an expiry step leaves
        // (each takes a seq).
        first.next_seq().unwrap();
        let b = accepted(first, "b");
        // Confirmed: only its dedup memory stays.
        first.confirm("bob@x", &[a]).unwrap();
        let mut handed_out = vec![a, b];
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
