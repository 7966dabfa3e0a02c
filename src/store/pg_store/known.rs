//! What the leader knows of the tables without asking them, so that the
//! router's hot operations (accept, a receipt's lookup and removal, the
//! next messages of a queue) make no round trip of their own. The leader
//! is the only process that writes the queues, so what it read or wrote
//! stays true until it writes again, and every write goes through here.
//!
//! Two kinds of knowledge, with different lives:
//! - [`Known`], for one burst: the dedup keys, recipients' state and
//!   totals the router said it would need (`look_ahead`, one round trip
//!   for the burst) or that an accept read, kept current by the burst's
//!   own writes, and a block of seqs. Dropped at the commit, and by any
//!   operation that changes the queues in SQL of its own.
//! - [`Tails`], across bursts: for some recipients, every pending message
//!   from some seq on (what a queue's delivery reads next, and what its
//!   receipts remove). Dropped whole when a commit fails, when the lead
//!   is taken, or past its memory cap.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use crate::store::{Contact, Record, Subscription, bare_of};

/// The row of a dedup key: which message holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Holder {
    pub origin: bool,
    pub seq: u64,
    pub hash: Option<i64>,
    /// The message is pending or kept as counted delivered (a tombstone)
    /// as of when this was read or written; see [`Known::holds`].
    pub held: bool,
}

/// A recipient's row, current.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Counters {
    pub subscription: Subscription,
    pub pending: i64,
    pub bytes: i64,
}

/// What one burst knows.
#[derive(Debug, Default)]
pub(super) struct Known {
    /// Key digest → its holder (`None`: no row).
    pub dedup: HashMap<Vec<u8>, Option<Holder>>,
    pub recipients: HashMap<String, Counters>,
    /// Relay contacts by key digest (`None`: no row).
    pub contacts: HashMap<Vec<u8>, Option<Contact>>,
    /// `bytes, assumed_bytes` of the totals row as committed before the
    /// burst (the burst's own changes are in its delta).
    pub totals: Option<(i64, i64)>,
    /// Seqs taken from the sequence for this burst, not used yet. Not
    /// kept past it: a later leader's seqs are higher, and a queue is in
    /// seq order.
    pub seqs: VecDeque<i64>,
    /// Messages removed by this burst's batched confirmations: a holder
    /// read before holds nothing any more.
    pub gone: HashSet<u64>,
}

impl Known {
    /// Forget the rows read (an operation wrote them in SQL of its own);
    /// the totals and the seqs stay true.
    pub(super) fn forget_rows(&mut self) {
        self.dedup.clear();
        self.recipients.clear();
        self.contacts.clear();
        self.gone.clear();
    }

    /// A recipient's subscription was written.
    pub(super) fn subscribed(&mut self, recipient: &str, sub: Subscription) {
        if let Some(c) = self.recipients.get_mut(recipient) {
            c.subscription = sub;
        }
    }

    /// Whether the message a key names is still pending or kept.
    pub(super) fn holds(&self, h: &Holder) -> bool {
        h.held && !self.gone.contains(&h.seq)
    }
}

/// Past these, the tails are dropped (and learned again from reads).
const TAIL_MAX_MESSAGES: usize = 1024;
const TAILS_MAX_BYTES: usize = 32 << 20;
const TAILS_MAX_RECIPIENTS: usize = 65_536;

/// Every pending message of a recipient with seq `from` or above.
#[derive(Debug)]
struct Tail {
    from: u64,
    messages: BTreeMap<u64, Record>,
}

#[derive(Debug, Default)]
pub(super) struct Tails {
    by_recipient: HashMap<String, Tail>,
    bytes: usize,
}

impl Tails {
    pub(super) fn clear(&mut self) {
        self.by_recipient.clear();
        self.bytes = 0;
    }

    /// Up to `limit` pending messages from `from` on, if known.
    pub(super) fn pending_from(
        &self,
        recipient: &str,
        from: u64,
        limit: usize,
    ) -> Option<Vec<(u64, Record)>> {
        let t = self.by_recipient.get(recipient)?;
        (from >= t.from).then(|| {
            t.messages
                .range(from..)
                .take(limit)
                .map(|(s, r)| (*s, r.clone()))
                .collect()
        })
    }

    /// Whether message `seq` is pending (`Some(None)`: known not to be),
    /// if known.
    pub(super) fn get(&self, recipient: &str, seq: u64) -> Option<Option<Record>> {
        let t = self.by_recipient.get(recipient)?;
        (seq >= t.from).then(|| t.messages.get(&seq).cloned())
    }

    /// The pending message of `recipient` from `sender_bare` under `id`,
    /// if the tail holds it (a pending message holds its id: no other
    /// takes it over while it is pending).
    pub(super) fn seq_of(&self, recipient: &str, sender_bare: &str, id: &str) -> Option<u64> {
        let t = self.by_recipient.get(recipient)?;
        t.messages
            .iter()
            .find(|(_, r)| r.id == id && bare_of(&r.sender) == sender_bare)
            .map(|(s, _)| *s)
    }

    /// Messages `seqs` of `recipient`, in that order, if every one is
    /// known pending.
    pub(super) fn all_pending(&self, recipient: &str, seqs: &[u64]) -> Option<Vec<(u64, Record)>> {
        let t = self.by_recipient.get(recipient)?;
        seqs.iter()
            .map(|s| t.messages.get(s).map(|r| (*s, r.clone())))
            .collect()
    }

    /// A read found every pending message of `recipient` from `from` on.
    pub(super) fn learn(&mut self, recipient: &str, from: u64, messages: &[(u64, Record)]) {
        self.forget(recipient);
        if messages.len() > TAIL_MAX_MESSAGES {
            return;
        }
        let tail = Tail {
            from,
            messages: messages.iter().cloned().collect(),
        };
        self.bytes += tail_cost(recipient) + tail.messages.values().map(size).sum::<usize>();
        self.by_recipient.insert(recipient.to_owned(), tail);
        self.cap();
    }

    /// A new message: known if the tail is (or if the queue was empty).
    pub(super) fn accepted(&mut self, recipient: &str, seq: u64, rec: &Record, was_empty: bool) {
        if was_empty && !self.by_recipient.contains_key(recipient) {
            self.bytes += tail_cost(recipient);
            self.by_recipient.insert(
                recipient.to_owned(),
                Tail {
                    from: 0,
                    messages: BTreeMap::new(),
                },
            );
        }
        let Some(t) = self.by_recipient.get_mut(recipient) else {
            return;
        };
        if t.messages.len() >= TAIL_MAX_MESSAGES {
            self.forget(recipient);
            return;
        }
        self.bytes += size(rec);
        t.messages.insert(seq, rec.clone());
        self.cap();
    }

    /// Messages that are no longer pending.
    pub(super) fn removed(&mut self, recipient: &str, seqs: impl IntoIterator<Item = u64>) {
        if let Some(t) = self.by_recipient.get_mut(recipient) {
            for s in seqs {
                if let Some(r) = t.messages.remove(&s) {
                    self.bytes = self.bytes.saturating_sub(size(&r));
                }
            }
        }
    }

    /// Nothing known of `recipient` any more (a message came back).
    pub(super) fn forget(&mut self, recipient: &str) {
        if let Some(t) = self.by_recipient.remove(recipient) {
            let b: usize = tail_cost(recipient) + t.messages.values().map(size).sum::<usize>();
            self.bytes = self.bytes.saturating_sub(b);
        }
    }

    fn cap(&mut self) {
        if self.bytes > TAILS_MAX_BYTES || self.by_recipient.len() > TAILS_MAX_RECIPIENTS {
            self.clear();
        }
    }
}

/// What a tail costs with no message: its recipient's name (a JID may
/// be kilobytes long) and its entry.
fn tail_cost(recipient: &str) -> usize {
    recipient.len() * 2 + 128
}

fn size(r: &Record) -> usize {
    r.stanza.len() + r.sender.len() + r.id.len() + 64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str) -> Record {
        Record {
            accepted_at_ms: 1,
            sender: "a@x/r".into(),
            id: id.into(),
            stanza: "<message/>".into(),
        }
    }

    /// A tail answers only from its first seq on, and only while every
    /// message in it is known: a message that came back makes it unknown.
    #[test]
    fn a_tail_answers_only_what_it_knows() {
        let mut t = Tails::default();
        assert!(t.pending_from("b@x", 0, 10).is_none());
        t.learn("b@x", 5, &[(5, rec("m5")), (7, rec("m7"))]);
        assert!(t.pending_from("b@x", 4, 10).is_none(), "below its start");
        let got: Vec<u64> = t
            .pending_from("b@x", 6, 10)
            .unwrap()
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(got, vec![7]);
        assert_eq!(t.get("b@x", 6), Some(None), "known not pending");
        assert_eq!(t.seq_of("b@x", "a@x", "m7"), Some(7));
        t.accepted("b@x", 9, &rec("m9"), false);
        assert!(t.all_pending("b@x", &[7, 9]).is_some());
        t.removed("b@x", [7]);
        assert!(t.all_pending("b@x", &[7, 9]).is_none());
        t.forget("b@x");
        assert!(t.get("b@x", 9).is_none());
        // An empty queue is known whole from its first message.
        t.accepted("c@x", 3, &rec("m3"), true);
        assert_eq!(t.pending_from("c@x", 0, 10).unwrap().len(), 1);
        // A queue that was not empty is not.
        t.accepted("d@x", 4, &rec("m4"), false);
        assert!(t.pending_from("d@x", 0, 10).is_none());
    }

    /// Past its cap a tail is dropped, not truncated.
    #[test]
    fn a_long_tail_is_dropped() {
        let mut t = Tails::default();
        t.accepted("b@x", 0, &rec("m0"), true);
        for s in 1..=TAIL_MAX_MESSAGES as u64 {
            t.accepted("b@x", s, &rec("m"), false);
        }
        assert!(t.pending_from("b@x", 0, 10).is_none());
        assert_eq!(t.bytes, 0);
    }

    /// Empty tails count against the cap too: their recipients' names
    /// may be long.
    #[test]
    fn empty_tails_of_long_names_are_capped() {
        let mut t = Tails::default();
        let long = "a".repeat(3000);
        for i in 0..20_000 {
            t.learn(&format!("{long}{i}@x"), 0, &[]);
            assert!(t.bytes <= TAILS_MAX_BYTES, "{}", t.bytes);
        }
        assert!(t.by_recipient.len() * 3000 <= TAILS_MAX_BYTES);
        t.clear();
        assert_eq!(t.bytes, 0);
    }
}
