//! `redeliver store check`: every invariant of the layout, verified.

use std::collections::{BTreeMap, HashMap};

use super::keys::*;
use super::*;

impl SledStore {
    /// Read the whole store and verify the layout's invariants: counters
    /// match the queues, totals match the counters, every queue's head
    /// has the only age entry of its queue, every pending message names
    /// its dedup keys in its queue entry or has its expiry entry, every index key points at a
    /// message's queue or expiry entry, every record decodes and its stanza parses.
    /// Read-only.
    pub fn check(&self) -> Result<CheckReport, StoreError> {
        let mut r = CheckReport::default();
        let mut problems = Vec::new();
        let mut bad = |p: String| {
            if problems.len() < 1000 {
                problems.push(p)
            }
        };
        // Queues, as found.
        let mut found: HashMap<String, (u64, u64)> = HashMap::new();
        let mut pending_seqs: BTreeMap<u64, String> = BTreeMap::new();
        let mut heads: HashMap<String, u64> = HashMap::new();
        // Pending messages whose queue entry names their dedup keys, and
        // how many index keys the queue entries and expiry entries name.
        let mut named_by_queue: std::collections::HashSet<u64> = Default::default();
        let mut owned = 0u64;
        for kv in self.db.scan_prefix(b"q") {
            let (k, v) = kv?;
            let (recipient, seq) = match (recipient_of_queue_key(&k), seq_of_queue_key(&k)) {
                (Ok(rc), Ok(s)) => (rc, s),
                _ => {
                    bad(format!("unreadable queue key {k:?}"));
                    continue;
                }
            };
            if pending_seqs.insert(seq, recipient.clone()).is_some() {
                bad(format!("seq {seq} is in two queues"));
            }
            // Keys come in (recipient, seq) order: the first is the head.
            heads.entry(recipient.clone()).or_insert(seq);
            let (rec, extra) = match decode_queue_value(&v) {
                Ok(r) => r,
                Err(e) => {
                    bad(format!("{recipient} seq {seq}: {e}"));
                    continue;
                }
            };
            if rec.stanza.parse::<tokio_xmpp::minidom::Element>().is_err() {
                bad(format!(
                    "{recipient} seq {seq}: stored stanza does not parse"
                ));
            }
            let e = found.entry(recipient.clone()).or_default();
            e.0 += 1;
            e.1 += rec.stanza.len() as u64;
            let has_entry = self.db.get(expiry_key(seq))?.is_some();
            match extra {
                // Its queue entry names its dedup keys.
                Some(extra) => {
                    if has_entry {
                        bad(format!(
                            "{recipient} seq {seq}: an expiry entry besides the dedup keys its \
                             queue entry names"
                        ));
                    }
                    r.entries += 1;
                    for key in extra.dedup_keys(&recipient, &rec) {
                        owned += 1;
                        match self.db.get(&key)? {
                            Some(v) if decode_index(&v).ok().map(|(s, _)| s) == Some(seq) => {}
                            _ => bad(format!(
                                "{recipient} seq {seq}: index key missing or pointing elsewhere"
                            )),
                        }
                    }
                    named_by_queue.insert(seq);
                }
                None if !has_entry => bad(format!("{recipient} seq {seq}: no expiry entry")),
                None => {}
            }
        }
        // Counters.
        let mut totals = Totals::default();
        for (name, state) in self.recipients()? {
            r.recipients += 1;
            let (n, b) = found.remove(&name).unwrap_or_default();
            if (state.pending, state.bytes) != (n, b) {
                bad(format!(
                    "{name}: counters say {} messages / {} bytes, the queue holds {n} / {b}",
                    state.pending, state.bytes
                ));
            }
            totals.apply(&RecipientState::default(), &state);
        }
        for (name, (n, _)) in found {
            bad(format!(
                "{name}: {n} queued messages but no recipient state"
            ));
        }
        let stored = self.totals()?;
        if stored != totals {
            bad(format!(
                "totals {stored:?} but the recipients add up to {totals:?}"
            ));
        }
        r.messages = pending_seqs.len() as u64;
        r.bytes = totals.bytes;
        // Age index: one entry per queue, on its head.
        let mut headed = 0;
        for kv in self.db.scan_prefix(b"a") {
            let (k, v) = kv?;
            let seq = decode_seq(&k[1..])?;
            match pending_seqs.get(&seq) {
                None => bad(format!("age entry for seq {seq} without a message")),
                Some(rc) if rc.as_bytes() != v.as_ref() => bad(format!(
                    "age entry for seq {seq} names another queue than {rc}"
                )),
                Some(rc) if heads.get(rc) != Some(&seq) => bad(format!(
                    "{rc}: age entry for seq {seq}, which is not the head of its queue"
                )),
                Some(_) => headed += 1,
            }
        }
        if headed != heads.len() {
            for (rc, seq) in &heads {
                if self.db.get(age_key(*seq))?.is_none() {
                    bad(format!(
                        "{rc}: no age entry for the head of its queue (seq {seq})"
                    ));
                }
            }
        }
        // Expiry entries and the indexes they own.
        for kv in self.db.scan_prefix(b"x") {
            let (k, v) = kv?;
            r.entries += 1;
            let seq = decode_seq(&k[1..])?;
            let e: Expiry = match decode(&v, "expiry entry") {
                Ok(e) => e,
                Err(err) => {
                    bad(format!("seq {seq}: {err}"));
                    continue;
                }
            };
            for key in &e.keys {
                owned += 1;
                match self.db.get(key)? {
                    Some(v) if decode_index(&v).ok().map(|(s, _)| s) == Some(seq) => {}
                    _ => bad(format!(
                        "seq {seq}: index key missing or pointing elsewhere"
                    )),
                }
            }
            if let Some(rc) = pending_seqs.get(&seq)
                && *rc != e.recipient
            {
                bad(format!(
                    "seq {seq}: expiry entry names {} not {rc}",
                    e.recipient
                ));
            }
        }
        let mut index_keys = 0u64;
        for prefix in [b"i", b"o"] {
            for kv in self.db.scan_prefix(prefix) {
                let (_, v) = kv?;
                index_keys += 1;
                let (seq, _) = decode_index(&v)?;
                if !named_by_queue.contains(&seq) && self.db.get(expiry_key(seq))?.is_none() {
                    bad(format!(
                        "index key for seq {seq} that no expiry entry or queue entry owns"
                    ));
                }
            }
        }
        if index_keys != owned {
            bad(format!(
                "{index_keys} index keys but expiry and queue entries name {owned}"
            ));
        }
        // Tombstones: each with its time key and expiry entry, none for a
        // pending message, and their totals.
        for p in self.check_tombstones(&pending_seqs)? {
            bad(p);
        }
        r.problems = problems;
        Ok(r)
    }
}
