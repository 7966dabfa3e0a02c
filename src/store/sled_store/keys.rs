//! The key layout (see the table in mod.rs) and the encoding of values.

use super::*;

pub(super) fn key(prefix: u8, parts: &[&[u8]]) -> Vec<u8> {
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

/// `prefix` recipient 0x00: where a recipient's keys of one kind start.
pub(super) fn recipient_prefix(prefix: u8, recipient: &str) -> Vec<u8> {
    let mut k = key(prefix, &[recipient.as_bytes()]);
    k.push(0);
    k
}

/// `prefix` recipient 0x00 seq (u64 BE): one message of a recipient's
/// (a queue entry, a tombstone); its seq is read back by
/// [`seq_of_queue_key`].
pub(super) fn recipient_seq_key(prefix: u8, recipient: &str, seq: u64) -> Vec<u8> {
    let mut k = recipient_prefix(prefix, recipient);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub(super) fn queue_prefix(recipient: &str) -> Vec<u8> {
    recipient_prefix(b'q', recipient)
}

pub(super) fn queue_key(recipient: &str, seq: u64) -> Vec<u8> {
    recipient_seq_key(b'q', recipient, seq)
}

pub(super) fn id_key(recipient: &str, sender: &str, id: &str) -> Vec<u8> {
    key(
        b'i',
        &[recipient.as_bytes(), sender.as_bytes(), id.as_bytes()],
    )
}

pub(super) fn origin_key(recipient: &str, sender: &str, origin: &str) -> Vec<u8> {
    key(
        b'o',
        &[recipient.as_bytes(), sender.as_bytes(), origin.as_bytes()],
    )
}

pub(super) fn contact_key(recipient: &str, sender_bare: &str) -> Vec<u8> {
    key(b'c', &[recipient.as_bytes(), sender_bare.as_bytes()])
}

pub(super) fn recipient_key(recipient: &str) -> Vec<u8> {
    key(b'r', &[recipient.as_bytes()])
}

pub(super) fn seq_key(prefix: u8, seq: u64) -> [u8; 9] {
    let mut k = [prefix; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub(super) fn age_key(seq: u64) -> [u8; 9] {
    seq_key(b'a', seq)
}

pub(super) fn expiry_key(seq: u64) -> [u8; 9] {
    seq_key(b'x', seq)
}

/// (recipient, sender, id or origin-id) of an `i` or `o` key: the
/// inverse of [`id_key`] and [`origin_key`].
pub(super) fn split_index_key(k: &[u8]) -> Result<(String, String, String), StoreError> {
    let bad = || StoreError::Corrupt("unreadable index key".into());
    let mut parts = k.get(1..).ok_or_else(bad)?.splitn(3, |&b| b == 0);
    let mut next = || {
        parts
            .next()
            .and_then(|p| String::from_utf8(p.to_vec()).ok())
            .ok_or_else(bad)
    };
    Ok((next()?, next()?, next()?))
}

/// The recipient of a queue key (`q` recipient 0x00 seq).
pub(super) fn recipient_of_queue_key(k: &[u8]) -> Result<String, StoreError> {
    let name = k
        .len()
        .checked_sub(9)
        .filter(|&n| n >= 1)
        .map(|n| &k[1..n])
        .ok_or_else(|| StoreError::Corrupt("short queue key".into()))?;
    String::from_utf8(name.to_vec())
        .map_err(|_| StoreError::Corrupt("queue key is not UTF-8".into()))
}

/// An id index value: the seq of the message that holds the id, then
/// the [`content_hash`] of its stanza (absent in entries written before
/// the hash was kept, and in imports of such stores).
pub(super) fn index_value(seq: u64, hash: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&seq.to_be_bytes());
    v[8..].copy_from_slice(&hash.to_be_bytes());
    v
}

/// The seq and, if kept, the content hash of an id index value.
pub(super) fn decode_index(v: &[u8]) -> Result<(u64, Option<u64>), StoreError> {
    match v.len() {
        8 => Ok((decode_seq(v)?, None)),
        16 => Ok((decode_seq(&v[..8])?, Some(decode_seq(&v[8..])?))),
        n => Err(StoreError::Corrupt(format!(
            "index value is {n} bytes, not 8 or 16"
        ))),
    }
}

pub(super) fn decode_seq(v: &[u8]) -> Result<u64, StoreError> {
    let b: [u8; 8] = v
        .try_into()
        .map_err(|_| StoreError::Corrupt("index value is not 8 bytes".into()))?;
    Ok(u64::from_be_bytes(b))
}

pub(super) fn seq_of_queue_key(k: &[u8]) -> Result<u64, StoreError> {
    let tail = k
        .len()
        .checked_sub(8)
        .map(|n| &k[n..])
        .ok_or_else(|| StoreError::Corrupt("short queue key".into()))?;
    decode_seq(tail)
}

pub(super) fn decode<T: for<'de> Deserialize<'de>>(v: &[u8], what: &str) -> Result<T, StoreError> {
    postcard::from_bytes(v).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

pub(super) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("postcard encodes plain structs")
}

/// What a queue entry holds after its [`Record`] since schema 4: enough
/// to name its dedup keys, so that a pending message needs no expiry
/// entry (one is written when it leaves its queue). An entry that ends
/// with its record (written before, or put back from a tombstone) has
/// its expiry entry.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct QueueExtra {
    pub(super) origin_id: Option<String>,
    /// The sender's bare JID where it is not that of `Record::sender`.
    pub(super) sender_bare: Option<String>,
}

impl QueueExtra {
    pub(super) fn new(rec: &Record, sender_bare: &str, origin_id: Option<&str>) -> QueueExtra {
        QueueExtra {
            origin_id: origin_id.map(str::to_owned),
            sender_bare: (bare_of(&rec.sender) != sender_bare).then(|| sender_bare.to_owned()),
        }
    }

    /// The `i` and `o` keys of the pending message `rec` of `recipient`.
    pub(super) fn dedup_keys(&self, recipient: &str, rec: &Record) -> Vec<Vec<u8>> {
        let sender = self
            .sender_bare
            .as_deref()
            .unwrap_or_else(|| bare_of(&rec.sender));
        let mut keys = vec![id_key(recipient, sender, &rec.id)];
        if let Some(o) = &self.origin_id {
            keys.push(origin_key(recipient, sender, o));
        }
        keys
    }
}

/// A queue entry's value: the record (what every reader of a [`Record`]
/// decodes: postcard leaves what follows), then its [`QueueExtra`].
pub(super) fn queue_value(rec: &Record, extra: &QueueExtra) -> Vec<u8> {
    let mut v = encode(rec);
    v.extend_from_slice(&encode(extra));
    v
}

/// A queue entry's record, and its [`QueueExtra`] unless the entry has an
/// expiry entry instead.
pub(super) fn decode_queue_value(v: &[u8]) -> Result<(Record, Option<QueueExtra>), StoreError> {
    let (rec, rest) = postcard::take_from_bytes::<Record>(v)
        .map_err(|e| StoreError::Corrupt(format!("record: {e}")))?;
    if rest.is_empty() {
        return Ok((rec, None));
    }
    Ok((rec, Some(decode(rest, "queue entry's dedup keys")?)))
}

/// The expiry entry of a message that leaves its queue.
pub(super) fn left_queue(recipient: &str, rec: &Record, extra: &QueueExtra) -> Expiry {
    Expiry {
        accepted_at_ms: rec.accepted_at_ms,
        recipient: recipient.to_owned(),
        keys: extra.dedup_keys(recipient, rec),
    }
}
