use super::keys::*;
use super::*;

/// Open, waiting out the lock of a store just dropped in this process:
/// sled's I/O threads can still hold it for a moment under load.
pub(super) fn open(dir: &Path) -> SledStore {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match SledStore::open(dir, Durability::Fsync, 5, 1 << 20) {
            Err(StoreError::Locked { .. }) if std::time::Instant::now() < end => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other.unwrap(),
        }
    }
}

pub(super) fn msg<'a>(
    recipient: &'a str,
    sender: &'a str,
    id: &str,
    origin: Option<&'a str>,
) -> NewMessage<'a> {
    NewMessage {
        recipient,
        sender_bare: sender,
        origin_id: origin,
        content_hash: 0,
        record: Record {
            accepted_at_ms: 1,
            sender: format!("{sender}/res"),
            id: id.into(),
            stanza: format!("<message id='{id}'/>"),
        },
    }
}

pub(super) const BIG: QueueLimits = QueueLimits {
    max_pending: 100,
    max_bytes: 1 << 20,
    max_store_bytes: 1 << 30,
};

#[test]
fn a_burst_is_readable_before_its_commit_and_lands_whole() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let first = stored(&s, msg("bob@x", "alice@x", "m0", None));
    s.begin();
    let second = stored(&s, msg("bob@x", "alice@x", "m1", None));
    assert_eq!(
        s.accept(msg("bob@x", "alice@x", "m1", None), BIG).unwrap(),
        Accepted::Duplicate { seq: second },
        "dedup sees the burst"
    );
    s.confirm("bob@x", &[first]).unwrap();
    let ids = |s: &SledStore| -> Vec<String> {
        s.pending_from("bob@x", 0, 10)
            .unwrap()
            .into_iter()
            .map(|(_, r)| r.id)
            .collect()
    };
    assert_eq!(ids(&s), ["m1"], "reads merge the burst over sled");
    assert_eq!(s.recipient("bob@x").unwrap().pending, 1);
    assert!(s.db.get(queue_key("bob@x", first)).unwrap().is_some());
    assert!(s.db.get(queue_key("bob@x", second)).unwrap().is_none());
    assert_eq!(
        s.commit().unwrap(),
        8,
        "one batch: 6 keys of the accept, 2 removals"
    );
    assert!(s.db.get(queue_key("bob@x", first)).unwrap().is_none());
    assert!(s.db.get(queue_key("bob@x", second)).unwrap().is_some());
    assert_eq!(ids(&s), ["m1"]);
    let report = s.check().unwrap();
    assert_eq!((report.messages, report.entries), (1, 2));
    // Outside a burst every operation commits at once.
    stored(&s, msg("bob@x", "alice@x", "m2", None));
    assert_eq!(s.commit().unwrap(), 0);
}

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

/// Issue 11, defect 4, in the store: a different message under a used
/// id is stored once the first is confirmed (refused while it is
/// pending), takes the id over, and the first one's expiry leaves the
/// id to it.
#[test]
fn reused_id_takes_over_only_after_confirmation() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    // An origin-id names one message: a match is a resubmission,
    // whatever it says now (a client may re-encrypt on resend).
    let mut o1 = msg("b@x", "a@x", "o-first", Some("o1"));
    o1.content_hash = 7;
    o1.record.stanza =
        "<message xmlns='jabber:component:accept' id='o-first'><body>o</body></message>".into();
    let Accepted::Stored { seq: o_seq } = s.accept(o1, BIG).unwrap() else {
        panic!()
    };
    let mut o2 = msg("b@x", "a@x", "o-second", Some("o1"));
    o2.content_hash = 8;
    assert_eq!(
        s.accept(o2, BIG).unwrap(),
        Accepted::Duplicate { seq: o_seq }
    );
    let with = |hash, at| {
        let mut m = msg("b@x", "a@x", "id1", None);
        m.content_hash = hash;
        m.record.accepted_at_ms = at;
        m.record.stanza = format!(
            "<message xmlns='jabber:component:accept' id='id1'><body>{hash}</body></message>"
        );
        m
    };
    let Accepted::Stored { seq: first } = s.accept(with(1, 10), BIG).unwrap() else {
        panic!()
    };
    assert_eq!(
        s.accept(with(1, 11), BIG).unwrap(),
        Accepted::Duplicate { seq: first }
    );
    assert_eq!(
        s.accept(with(2, 12), BIG).unwrap(),
        Accepted::IdInUse { seq: first }
    );
    s.confirm("b@x", &[first]).unwrap();
    let Accepted::Stored { seq: second } = s.accept(with(2, 20), BIG).unwrap() else {
        panic!("a different message after confirmation is stored")
    };
    assert_eq!(s.seq_of("b@x", "a@x", "id1").unwrap(), Some(second));
    assert_eq!(s.check().unwrap().problems, Vec::<String>::new());
    // The first one's expiry drops its entry but not the id.
    s.expire(15, 10).unwrap();
    assert_eq!(s.seq_of("b@x", "a@x", "id1").unwrap(), Some(second));
    assert_eq!(
        s.accept(with(2, 21), BIG).unwrap(),
        Accepted::Duplicate { seq: second }
    );
    assert!(s.check().unwrap().problems.is_empty());
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
    let upto = s
        .pending_from_sender_upto("b@x", "a@x", seqs[2], 100)
        .unwrap();
    assert_eq!(upto, [seqs[0], seqs[2]]);
    // Issue 11, defect 9: the scan looks at `limit` records at most;
    // the marked message is still confirmed.
    let upto = s
        .pending_from_sender_upto("b@x", "a@x", seqs[2], 0)
        .unwrap();
    assert_eq!(upto, [seqs[2]]);
}

pub(super) fn stored(s: &SledStore, m: NewMessage<'_>) -> u64 {
    match s.accept(m, BIG).unwrap() {
        Accepted::Stored { seq } => seq,
        other => panic!("{other:?}"),
    }
}

#[test]
fn totals_age_index_and_top_queues() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    assert_eq!(s.totals().unwrap(), Totals::default());
    assert!(s.oldest().unwrap().is_none());
    let mut bob = Vec::new();
    for i in 0..5 {
        let mut m = msg("bob@x", "a@x", &format!("b{i}"), None);
        m.record.accepted_at_ms = 100 + i;
        bob.push(stored(&s, m));
    }
    for i in 0..3 {
        let mut m = msg("dave@x", "a@x", &format!("d{i}"), None);
        m.record.accepted_at_ms = 200 + i;
        stored(&s, m);
    }
    let one = "<message id='b0'/>".len() as u64;
    assert_eq!(
        s.totals().unwrap(),
        Totals {
            pending: 8,
            bytes: 8 * one,
            recipients: 2
        }
    );
    let (who, seq, rec) = s.oldest().unwrap().unwrap();
    assert_eq!(
        (who.as_str(), seq, rec.id.as_str()),
        ("bob@x", bob[0], "b0")
    );

    let top = s.top_queues(10).unwrap();
    let names: Vec<_> = top
        .iter()
        .map(|q| (q.recipient.as_str(), q.pending))
        .collect();
    assert_eq!(names, [("bob@x", 5), ("dave@x", 3)]);
    assert_eq!(top[0].oldest_ms, Some(100));
    assert_eq!(top[1].bytes, 3 * one);
    assert_eq!(s.top_queues(1).unwrap().len(), 1);

    // Confirming bob's whole queue moves the oldest to dave's and
    // takes bob out of the recipient count.
    s.confirm("bob@x", &bob).unwrap();
    assert_eq!(
        s.totals().unwrap(),
        Totals {
            pending: 3,
            bytes: 3 * one,
            recipients: 1
        }
    );
    assert_eq!(s.oldest().unwrap().unwrap().0, "dave@x");
    assert_eq!(s.top_queues(10).unwrap().len(), 1);
}

#[test]
fn purge_by_scope() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let mut seqs = Vec::new();
    for i in 0..4 {
        let mut m = msg("b@x", "a@x", &format!("m{i}"), None);
        m.record.accepted_at_ms = 1000 * (i + 1);
        seqs.push(stored(&s, m));
    }
    // Older than t=2000: m0 and m1.
    let old = PurgeScope {
        below_seq: u64::MAX,
        accepted_before_ms: Some(2000),
    };
    assert_eq!(s.count_purgeable("b@x", old).unwrap(), 2);
    // A scope fixed before m3 arrived never takes m3.
    let seen = PurgeScope {
        below_seq: seqs[3],
        accepted_before_ms: None,
    };
    assert_eq!(s.count_purgeable("b@x", seen).unwrap(), 3);
    assert_eq!(s.purge("b@x", old).unwrap(), seqs[..2]);
    assert_eq!(s.recipient("b@x").unwrap().pending, 2);
    assert_eq!(s.totals().unwrap().pending, 2);
    assert_eq!(s.purge("b@x", seen).unwrap(), [seqs[2]]);
    let left: Vec<_> = s.pending_from("b@x", 0, 10).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].1.id, "m3");
    assert_eq!(s.oldest().unwrap().unwrap().1, seqs[3]);
    // Purged ids are still known: a resubmission is a duplicate.
    assert!(matches!(
        s.accept(msg("b@x", "a@x", "m0", None), BIG).unwrap(),
        Accepted::Duplicate { .. }
    ));
    assert_eq!(s.purge("nobody@x", seen).unwrap(), Vec::<u64>::new());
}

#[test]
fn schema_1_store_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let seq = {
        let s = open(dir.path());
        let seq = stored(&s, msg("b@x", "a@x", "m0", None));
        // Make it look like schema 1: no age index, no expiry
        // entries, no totals.
        s.db.remove(age_key(seq)).unwrap();
        s.db.remove(expiry_key(seq)).unwrap();
        s.db.remove(TOTALS_KEY).unwrap();
        s.db.insert(SCHEMA_KEY, &1u32.to_be_bytes()).unwrap();
        s.flush().unwrap();
        seq
    };
    let s = open(dir.path());
    assert_eq!(s.totals().unwrap().pending, 1);
    assert_eq!(s.totals().unwrap().recipients, 1);
    assert_eq!(s.oldest().unwrap().unwrap().1, seq);
    // The expiry entry is back, with the message's accept time and
    // its dedup key: expiring it removes both.
    let step = s.expire(1, 10).unwrap();
    assert_eq!(step.messages.len(), 1);
    assert!(s.seq_of("b@x", "a@x", "m0").unwrap().is_none());
    let v = s.db.get(SCHEMA_KEY).unwrap().unwrap();
    assert_eq!(v.as_ref(), SCHEMA_VERSION.to_be_bytes());
}

#[test]
fn store_cap_refuses_new_messages_only() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let one = "<message id='m0'/>".len() as u64;
    let capped = QueueLimits {
        max_store_bytes: 2 * one,
        ..BIG
    };
    let a = stored(&s, msg("a@x", "s@x", "m0", None));
    s.accept(msg("b@x", "s@x", "m1", None), capped).unwrap();
    assert_eq!(
        s.accept(msg("c@x", "s@x", "m2", None), capped).unwrap(),
        Accepted::StoreFull
    );
    // A confirmation makes room.
    s.confirm("a@x", &[a]).unwrap();
    assert!(matches!(
        s.accept(msg("c@x", "s@x", "m2", None), capped).unwrap(),
        Accepted::Stored { .. }
    ));
}

#[test]
fn expiry_walks_in_accept_order_and_prunes_dedup_keys() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let mut seqs = Vec::new();
    for i in 0..5 {
        let mut m = msg("b@x", "a@x", &format!("m{i}"), Some("o"));
        m.origin_id = (i == 0).then_some("o0");
        m.record.accepted_at_ms = 1000 * (i + 1);
        seqs.push(stored(&s, m));
    }
    // m1 is confirmed: only its dedup keys are left to prune.
    s.confirm("b@x", &[seqs[1]]).unwrap();
    // Up to t=3000 (m0, m1, m2), two entries per step.
    let step = s.expire(3000, 2).unwrap();
    assert!(step.more);
    assert_eq!(step.entries, 2);
    let ids: Vec<_> = step
        .messages
        .iter()
        .map(|(_, _, r)| r.id.as_str())
        .collect();
    assert_eq!(ids, ["m0"]);
    let step = s.expire(3000, 2).unwrap();
    assert!(!step.more);
    assert_eq!(step.entries, 1);
    assert_eq!(step.messages[0].2.id, "m2");
    assert_eq!(s.expire(3000, 2).unwrap().entries, 0, "nothing left to do");
    // Counters follow; the rest stays in order.
    assert_eq!(s.recipient("b@x").unwrap().pending, 2);
    assert_eq!(s.totals().unwrap().pending, 2);
    let left: Vec<_> = s
        .pending_from("b@x", 0, 10)
        .unwrap()
        .into_iter()
        .map(|(_, r)| r.id)
        .collect();
    assert_eq!(left, ["m3", "m4"]);
    assert_eq!(s.oldest().unwrap().unwrap().1, seqs[3]);
    // The dedup keys of expired messages are gone: the same ids (and
    // origin-id) are new messages again; the young ones are not.
    assert!(s.seq_of("b@x", "a@x", "m1").unwrap().is_none());
    assert!(matches!(
        s.accept(msg("b@x", "a@x", "m0", Some("o0")), BIG).unwrap(),
        Accepted::Stored { .. }
    ));
    assert!(matches!(
        s.accept(msg("b@x", "a@x", "m3", None), BIG).unwrap(),
        Accepted::Duplicate { .. }
    ));
}

#[test]
fn limits_refuse_without_storing() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let small = QueueLimits {
        max_pending: 2,
        ..BIG
    };
    s.accept(msg("b@x", "a@x", "1", None), small).unwrap();
    s.accept(msg("b@x", "a@x", "2", None), small).unwrap();
    assert_eq!(
        s.accept(msg("b@x", "a@x", "3", None), small).unwrap(),
        Accepted::QueueFull
    );
    let tiny = QueueLimits {
        max_bytes: 10,
        ..BIG
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
        let Accepted::Stored { seq } = s.accept(msg("b@x", "a@x", "1", None), BIG).unwrap() else {
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
    let err = SledStore::open(dir.path(), Durability::Fsync, 5, 1 << 20)
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
}
