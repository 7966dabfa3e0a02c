//! The only code that touches sled.
//!
//! One sled tree holds everything, under one-byte key prefixes, so that an
//! accept (queue entry + id index + recipient counters) is one atomic
//! `apply_batch`:
//!
//! | key | value |
//! |---|---|
//! | `q` recipient 0x00 seq(u64 BE) | [`Record`] |
//! | `i` recipient 0x00 sender 0x00 id | seq (u64 BE) |
//! | `o` recipient 0x00 sender 0x00 origin-id | seq (u64 BE) |
//! | `r` recipient | [`RecipientState`] |
//! | `m` name | metadata (schema version) |
//!
//! Sequence numbers come from sled's `generate_id`, which is monotonic
//! across restarts, so each recipient's queue is in accept order and a seq
//! also names a message uniquely in the whole store.
//!
//! The router is the only writer, so read-modify-write of the counters
//! needs no transaction. Calls here are short; `flush` blocks and must run
//! off the async runtime.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::Durability;

/// Version of the layout above. Bumped on any incompatible change.
pub const SCHEMA_VERSION: u32 = 1;
const SCHEMA_KEY: &[u8] = b"mschema";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path} is in use by another process (sled lock held)")]
    Locked { path: String },
    #[error(
        "store {path} was written by a newer redeliver (schema {found}, this build reads {SCHEMA_VERSION})"
    )]
    NewerSchema { path: String, found: u32 },
    #[error("store is corrupted: {0}")]
    Corrupt(String),
    #[error("store error: {0}")]
    Sled(#[from] sled::Error),
}

/// One pending message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Milliseconds since the Unix epoch when the message was accepted.
    pub accepted_at_ms: i64,
    /// The sender's full JID as it reached us; receipts are forwarded there.
    pub sender: String,
    /// The message id as relayed (the sender's, or one we generated).
    pub id: String,
    /// The stanza to relay, already addressed, as XML.
    pub stanza: String,
}

/// Presence subscription of the component's bare domain to a recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Subscription {
    #[default]
    None,
    Requested,
    Subscribed,
}

/// Per-recipient state, kept incrementally (sled's `len` is a full scan).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RecipientState {
    pub subscription: Subscription,
    pub pending: u64,
    pub bytes: u64,
}

/// A new message to store.
pub struct NewMessage<'a> {
    pub recipient: &'a str,
    /// The sender's bare JID, for the dedup indexes.
    pub sender_bare: &'a str,
    pub origin_id: Option<&'a str>,
    pub record: Record,
}

/// Per-recipient limits applied at accept.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub max_pending: u64,
    pub max_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    Stored {
        seq: u64,
    },
    /// Same (sender, recipient, id) or origin-id as an earlier message.
    Duplicate {
        seq: u64,
    },
    QueueFull,
}

pub struct Store {
    db: sled::Db,
}

fn key(prefix: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + parts.iter().map(|p| p.len() + 1).sum::<usize>());
    k.push(prefix);
    for (n, p) in parts.iter().enumerate() {
        if n > 0 {
            k.push(0);
        }
        k.extend_from_slice(p);
    }
    k
}

fn queue_prefix(recipient: &str) -> Vec<u8> {
    let mut k = key(b'q', &[recipient.as_bytes()]);
    k.push(0);
    k
}

fn queue_key(recipient: &str, seq: u64) -> Vec<u8> {
    let mut k = queue_prefix(recipient);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn id_key(recipient: &str, sender: &str, id: &str) -> Vec<u8> {
    key(
        b'i',
        &[recipient.as_bytes(), sender.as_bytes(), id.as_bytes()],
    )
}

fn origin_key(recipient: &str, sender: &str, origin: &str) -> Vec<u8> {
    key(
        b'o',
        &[recipient.as_bytes(), sender.as_bytes(), origin.as_bytes()],
    )
}

fn recipient_key(recipient: &str) -> Vec<u8> {
    key(b'r', &[recipient.as_bytes()])
}

fn decode_seq(v: &[u8]) -> Result<u64, StoreError> {
    let b: [u8; 8] = v
        .try_into()
        .map_err(|_| StoreError::Corrupt("index value is not 8 bytes".into()))?;
    Ok(u64::from_be_bytes(b))
}

fn seq_of_queue_key(k: &[u8]) -> Result<u64, StoreError> {
    let tail = k
        .len()
        .checked_sub(8)
        .map(|n| &k[n..])
        .ok_or_else(|| StoreError::Corrupt("short queue key".into()))?;
    decode_seq(tail)
}

fn decode<T: for<'de> Deserialize<'de>>(v: &[u8], what: &str) -> Result<T, StoreError> {
    postcard::from_bytes(v).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("postcard encodes plain structs")
}

impl Store {
    /// Open (or create) the store. Blocking: call it off the runtime.
    pub fn open(
        path: &Path,
        durability: Durability,
        flush_interval_ms: u64,
        cache_bytes: u64,
    ) -> Result<Store, StoreError> {
        let flush_every = match durability {
            // Every write that matters is flushed explicitly (group commit).
            Durability::Fsync => None,
            Durability::Batched => Some(flush_interval_ms),
        };
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .flush_every_ms(flush_every)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                    StoreError::Locked {
                        path: path.display().to_string(),
                    }
                }
                sled::Error::Io(io) if io.to_string().contains("lock") => StoreError::Locked {
                    path: path.display().to_string(),
                },
                sled::Error::Corruption { .. } => StoreError::Corrupt(e.to_string()),
                other => StoreError::Sled(other),
            })?;
        match db.get(SCHEMA_KEY)? {
            None => {
                db.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
                db.flush()?;
            }
            Some(v) => {
                let found = u32::from_be_bytes(
                    v.as_ref()
                        .try_into()
                        .map_err(|_| StoreError::Corrupt("schema key".into()))?,
                );
                if found > SCHEMA_VERSION {
                    return Err(StoreError::NewerSchema {
                        path: path.display().to_string(),
                        found,
                    });
                }
            }
        }
        Ok(Store { db })
    }

    /// Durably write everything so far. Blocking.
    pub fn flush(&self) -> Result<usize, StoreError> {
        Ok(self.db.flush()?)
    }

    /// A handle for the flusher thread.
    pub fn db(&self) -> sled::Db {
        self.db.clone()
    }

    /// A seq larger than every seq stored so far.
    pub fn next_seq(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id()?)
    }

    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    pub fn recipient(&self, recipient: &str) -> Result<RecipientState, StoreError> {
        match self.db.get(recipient_key(recipient))? {
            Some(v) => decode(&v, "recipient state"),
            None => Ok(RecipientState::default()),
        }
    }

    fn put_recipient(&self, recipient: &str, state: &RecipientState) -> Result<(), StoreError> {
        self.db.insert(recipient_key(recipient), encode(state))?;
        Ok(())
    }

    pub fn set_subscription(&self, recipient: &str, sub: Subscription) -> Result<(), StoreError> {
        let mut st = self.recipient(recipient)?;
        if st.subscription != sub {
            st.subscription = sub;
            self.put_recipient(recipient, &st)?;
        }
        Ok(())
    }

    /// Every recipient the store knows, with its state.
    pub fn recipients(&self) -> Result<Vec<(String, RecipientState)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(b"r") {
            let (k, v) = kv?;
            let name = String::from_utf8(k[1..].to_vec())
                .map_err(|_| StoreError::Corrupt("recipient key is not UTF-8".into()))?;
            out.push((name, decode(&v, "recipient state")?));
        }
        Ok(out)
    }

    /// Store a message unless it is a duplicate or the queue is full.
    pub fn accept(&self, msg: NewMessage<'_>, limits: QueueLimits) -> Result<Accepted, StoreError> {
        let ikey = id_key(msg.recipient, msg.sender_bare, &msg.record.id);
        if let Some(v) = self.db.get(&ikey)? {
            return Ok(Accepted::Duplicate {
                seq: decode_seq(&v)?,
            });
        }
        let okey = msg
            .origin_id
            .map(|o| origin_key(msg.recipient, msg.sender_bare, o));
        if let Some(okey) = &okey
            && let Some(v) = self.db.get(okey)?
        {
            return Ok(Accepted::Duplicate {
                seq: decode_seq(&v)?,
            });
        }
        let mut state = self.recipient(msg.recipient)?;
        let size = msg.record.stanza.len() as u64;
        if state.pending >= limits.max_pending || state.bytes + size > limits.max_bytes {
            return Ok(Accepted::QueueFull);
        }
        let seq = self.next_seq()?;
        state.pending += 1;
        state.bytes += size;
        let mut batch = sled::Batch::default();
        batch.insert(queue_key(msg.recipient, seq), encode(&msg.record));
        batch.insert(ikey, &seq.to_be_bytes());
        if let Some(okey) = okey {
            batch.insert(okey, &seq.to_be_bytes());
        }
        batch.insert(recipient_key(msg.recipient), encode(&state));
        self.db.apply_batch(batch)?;
        Ok(Accepted::Stored { seq })
    }

    /// The seq of a message by (recipient, sender, id), pending or not.
    pub fn seq_of(
        &self,
        recipient: &str,
        sender_bare: &str,
        id: &str,
    ) -> Result<Option<u64>, StoreError> {
        self.db
            .get(id_key(recipient, sender_bare, id))?
            .map(|v| decode_seq(&v))
            .transpose()
    }

    pub fn get(&self, recipient: &str, seq: u64) -> Result<Option<Record>, StoreError> {
        self.db
            .get(queue_key(recipient, seq))?
            .map(|v| decode(&v, "record"))
            .transpose()
    }

    /// Up to `limit` pending messages with seq >= `from`, in order.
    pub fn pending_from(
        &self,
        recipient: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Record)>, StoreError> {
        let prefix = queue_prefix(recipient);
        let start = queue_key(recipient, from);
        let mut end = prefix.clone();
        end.extend_from_slice(&u64::MAX.to_be_bytes());
        let mut out = Vec::new();
        for kv in self.db.range(start..=end).take(limit) {
            let (k, v) = kv?;
            out.push((seq_of_queue_key(&k)?, decode(&v, "record")?));
        }
        Ok(out)
    }

    /// Remove confirmed messages; their id index entries stay so that a
    /// resubmission is still recognised. Returns the removed records.
    pub fn confirm(&self, recipient: &str, seqs: &[u64]) -> Result<Vec<(u64, Record)>, StoreError> {
        let mut state = self.recipient(recipient)?;
        let mut batch = sled::Batch::default();
        let mut removed = Vec::new();
        for &seq in seqs {
            let k = queue_key(recipient, seq);
            if let Some(v) = self.db.get(&k)? {
                let rec: Record = decode(&v, "record")?;
                state.pending = state.pending.saturating_sub(1);
                state.bytes = state.bytes.saturating_sub(rec.stanza.len() as u64);
                batch.remove(k);
                removed.push((seq, rec));
            }
        }
        if !removed.is_empty() {
            batch.insert(recipient_key(recipient), encode(&state));
            self.db.apply_batch(batch)?;
        }
        Ok(removed)
    }

    /// Seqs of pending messages from `sender_bare` up to and including
    /// `upto`, for a XEP-0333 marker.
    pub fn pending_from_sender_upto(
        &self,
        recipient: &str,
        sender_bare: &str,
        upto: u64,
    ) -> Result<Vec<u64>, StoreError> {
        let start = queue_key(recipient, 0);
        let end = queue_key(recipient, upto);
        let mut out = Vec::new();
        for kv in self.db.range(start..=end) {
            let (k, v) = kv?;
            let rec: Record = decode(&v, "record")?;
            if bare_of(&rec.sender) == sender_bare {
                out.push(seq_of_queue_key(&k)?);
            }
        }
        Ok(out)
    }
}

/// The bare part of a full JID string.
pub fn bare_of(jid: &str) -> &str {
    jid.split_once('/').map_or(jid, |(b, _)| b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Store {
        Store::open(dir, Durability::Fsync, 5, 1 << 20).unwrap()
    }

    fn msg<'a>(
        recipient: &'a str,
        sender: &'a str,
        id: &str,
        origin: Option<&'a str>,
    ) -> NewMessage<'a> {
        NewMessage {
            recipient,
            sender_bare: sender,
            origin_id: origin,
            record: Record {
                accepted_at_ms: 1,
                sender: format!("{sender}/res"),
                id: id.into(),
                stanza: format!("<message id='{id}'/>"),
            },
        }
    }

    const BIG: QueueLimits = QueueLimits {
        max_pending: 100,
        max_bytes: 1 << 20,
    };

    #[test]
    fn order_counters_and_dedup() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let mut seqs = Vec::new();
        for i in 0..5 {
            match s
                .accept(msg("bob@x", "alice@x", &format!("m{i}"), None), BIG)
                .unwrap()
            {
                Accepted::Stored { seq } => seqs.push(seq),
                other => panic!("{other:?}"),
            }
        }
        // Another recipient interleaved does not disturb bob's queue.
        s.accept(msg("bobby@x", "alice@x", "m0", None), BIG)
            .unwrap();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        let got: Vec<String> = s
            .pending_from("bob@x", 0, 100)
            .unwrap()
            .into_iter()
            .map(|(_, r)| r.id)
            .collect();
        assert_eq!(got, ["m0", "m1", "m2", "m3", "m4"]);
        let st = s.recipient("bob@x").unwrap();
        assert_eq!(st.pending, 5);
        assert_eq!(st.bytes, 5 * "<message id='m0'/>".len() as u64);

        assert_eq!(
            s.accept(msg("bob@x", "alice@x", "m2", None), BIG).unwrap(),
            Accepted::Duplicate { seq: seqs[2] }
        );
        // Same id from another sender is a different message.
        assert!(matches!(
            s.accept(msg("bob@x", "carol@x", "m2", None), BIG).unwrap(),
            Accepted::Stored { .. }
        ));
        assert_eq!(s.recipient("bob@x").unwrap().pending, 6);
    }

    #[test]
    fn origin_id_dedup() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let Accepted::Stored { seq } = s.accept(msg("b@x", "a@x", "id1", Some("o1")), BIG).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            s.accept(msg("b@x", "a@x", "id2", Some("o1")), BIG).unwrap(),
            Accepted::Duplicate { seq }
        );
    }

    #[test]
    fn confirm_keeps_dedup_and_counters() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let mut seqs = Vec::new();
        for i in 0..3 {
            if let Accepted::Stored { seq } = s
                .accept(msg("b@x", "a@x", &format!("m{i}"), None), BIG)
                .unwrap()
            {
                seqs.push(seq);
            }
        }
        let removed = s.confirm("b@x", &[seqs[1]]).unwrap();
        assert_eq!(removed.len(), 1);
        assert_eq!(s.confirm("b@x", &[seqs[1]]).unwrap().len(), 0, "idempotent");
        let st = s.recipient("b@x").unwrap();
        assert_eq!(st.pending, 2);
        assert_eq!(st.bytes, 2 * "<message id='m0'/>".len() as u64);
        assert!(matches!(
            s.accept(msg("b@x", "a@x", "m1", None), BIG).unwrap(),
            Accepted::Duplicate { .. }
        ));
        let upto = s.pending_from_sender_upto("b@x", "a@x", seqs[2]).unwrap();
        assert_eq!(upto, [seqs[0], seqs[2]]);
    }

    #[test]
    fn limits_refuse_without_storing() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let small = QueueLimits {
            max_pending: 2,
            max_bytes: 1 << 20,
        };
        s.accept(msg("b@x", "a@x", "1", None), small).unwrap();
        s.accept(msg("b@x", "a@x", "2", None), small).unwrap();
        assert_eq!(
            s.accept(msg("b@x", "a@x", "3", None), small).unwrap(),
            Accepted::QueueFull
        );
        let tiny = QueueLimits {
            max_pending: 100,
            max_bytes: 10,
        };
        assert_eq!(
            s.accept(msg("c@x", "a@x", "1", None), tiny).unwrap(),
            Accepted::QueueFull
        );
        assert_eq!(s.recipient("c@x").unwrap(), RecipientState::default());
        assert_eq!(s.pending_from("b@x", 0, 10).unwrap().len(), 2);
    }

    #[test]
    fn survives_reopen_and_seq_stays_monotonic() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let s = open(dir.path());
            let Accepted::Stored { seq } = s.accept(msg("b@x", "a@x", "1", None), BIG).unwrap()
            else {
                panic!()
            };
            s.set_subscription("b@x", Subscription::Subscribed).unwrap();
            s.flush().unwrap();
            seq
        };
        let s = open(dir.path());
        let Accepted::Stored { seq } = s.accept(msg("b@x", "a@x", "2", None), BIG).unwrap() else {
            panic!()
        };
        assert!(seq > first);
        let st = s.recipient("b@x").unwrap();
        assert_eq!((st.pending, st.subscription), (2, Subscription::Subscribed));
        assert_eq!(s.recipients().unwrap().len(), 1);
    }

    #[test]
    fn second_open_is_refused_as_locked() {
        let dir = tempfile::tempdir().unwrap();
        let _s = open(dir.path());
        let err = Store::open(dir.path(), Durability::Fsync, 5, 1 << 20)
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    }
}
