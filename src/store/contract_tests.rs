//! What every store backend promises, checked on each: every scenario
//! here runs on a fresh sled store and on a fresh PostgreSQL database
//! (`test_databases`).

use super::*;

pub fn msg<'a>(
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

pub const BIG: QueueLimits = QueueLimits {
    max_pending: 100,
    max_bytes: 1 << 20,
    max_store_bytes: 1 << 30,
};

pub fn stored(s: &dyn QueueStore, m: NewMessage<'_>) -> u64 {
    match s.accept(m, BIG).unwrap() {
        Accepted::Stored { seq } => seq,
        other => panic!("{other:?}"),
    }
}

/// Whether bob's message `seq` from alice is kept as a tombstone.
fn kept(s: &dyn QueueStore, seq: u64) -> bool {
    s.assumed_from_sender_upto("bob@x", "alice@x", seq, 100)
        .unwrap()
        .contains(&seq)
}

fn habit(answers: Answers, at: i64) -> Option<Habit> {
    Some(Habit {
        answers,
        missed: 0,
        seen_at_ms: at,
    })
}

/// One test per backend for each scenario.
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod sled {
            $(#[test]
            fn $name() {
                let (s, _dir) = crate::store::test_databases::sled();
                super::$name(&*s);
            })*
        }
        mod postgres {
            $(#[test]
            fn $name() {
                super::$name(&*crate::store::test_databases::postgres());
            })*
        }
    };
}

on_every_backend!(
    a_burst_is_readable_before_its_commit_and_lands_whole,
    a_looked_ahead_burst_decides_as_one_without,
    order_counters_and_dedup,
    origin_id_dedup,
    reused_id_takes_over_only_after_confirmation,
    confirm_keeps_dedup_and_counters,
    totals_age_index_and_top_queues,
    purge_by_scope,
    store_cap_refuses_new_messages_only,
    expiry_walks_in_accept_order_and_prunes_dedup_keys,
    limits_refuse_without_storing,
    assumed_messages_leave_the_queue_and_a_late_bounce_puts_them_back,
    tombstones_are_pruned_after_the_window_in_time_order,
    tombstones_end_with_the_time_to_live_and_count_against_the_store_cap,
    a_marker_finds_the_tombstones_of_its_sender,
    habits_are_per_client_and_bounded,
    contacts_and_subscriptions_are_kept,
    long_ids_jids_and_resources_are_kept,
    a_failed_commit_fails_every_later_one,
);

fn a_burst_is_readable_before_its_commit_and_lands_whole(s: &dyn QueueStore) {
    let first = stored(s, msg("bob@x", "alice@x", "m0", None));
    s.begin();
    let second = stored(s, msg("bob@x", "alice@x", "m1", None));
    assert_eq!(
        s.accept(msg("bob@x", "alice@x", "m1", None), BIG).unwrap(),
        Accepted::Duplicate { seq: second },
        "dedup sees the burst"
    );
    s.confirm("bob@x", &[first]).unwrap();
    let ids = |s: &dyn QueueStore| -> Vec<String> {
        s.pending_from("bob@x", 0, 10)
            .unwrap()
            .into_iter()
            .map(|(_, r)| r.id)
            .collect()
    };
    assert_eq!(ids(s), ["m1"], "reads see the burst");
    assert_eq!(s.recipient("bob@x").unwrap().pending, 1);
    assert_eq!(s.totals().unwrap().pending, 1);
    assert!(s.commit().unwrap() > 0);
    assert_eq!(ids(s), ["m1"]);
    let report = s.check().unwrap();
    assert_eq!((report.messages, report.entries), (1, 2));
    assert!(
        report.problems.iter().all(|p| p.contains("does not parse")),
        "{:?} (the test stanzas have no namespace)",
        report.problems
    );
    // Outside a burst every operation commits at once.
    stored(s, msg("bob@x", "alice@x", "m2", None));
    assert_eq!(s.commit().unwrap(), 0);
}

/// A burst whose messages the router named first (`look_ahead`) decides
/// as one without: duplicates and ids in use within the burst, a limit
/// counting the burst's own accepts, a receipt's lookup and its removal
/// (in the order asked, once each), an id taken over in the burst that
/// freed it, and what the next bursts read.
fn a_looked_ahead_burst_decides_as_one_without(s: &dyn QueueStore) {
    let key = |id| AcceptKey {
        recipient: "bob@x",
        sender_bare: "alice@x",
        id,
        origin_id: None,
    };
    let different = |id| {
        let mut m = msg("bob@x", "alice@x", id, None);
        m.content_hash = 7;
        m
    };
    let ids = |s: &dyn QueueStore| -> Vec<String> {
        s.pending_from("bob@x", 0, 10)
            .unwrap()
            .into_iter()
            .map(|(_, r)| r.id)
            .collect()
    };
    s.begin();
    s.look_ahead(&[key("m0"), key("m1"), key("m0"), key("m2")])
        .unwrap();
    let a = stored(s, msg("bob@x", "alice@x", "m0", None));
    let b = stored(s, msg("bob@x", "alice@x", "m1", None));
    assert!(b > a);
    assert_eq!(
        s.accept(msg("bob@x", "alice@x", "m0", None), BIG).unwrap(),
        Accepted::Duplicate { seq: a }
    );
    assert_eq!(
        s.accept(different("m0"), BIG).unwrap(),
        Accepted::IdInUse { seq: a }
    );
    let two = QueueLimits {
        max_pending: 2,
        ..BIG
    };
    assert_eq!(
        s.accept(msg("bob@x", "alice@x", "m2", None), two).unwrap(),
        Accepted::QueueFull
    );
    assert_eq!(ids(s), ["m0", "m1"]);
    assert_eq!(s.recipient("bob@x").unwrap().pending, 2);
    let c = Contact {
        subscription: Subscription::Requested,
        asked_at_ms: 9,
    };
    s.set_contact("bob@x", "alice@x", c).unwrap();
    assert_eq!(s.contact("bob@x", "alice@x").unwrap(), Some(c));
    s.commit().unwrap();

    s.begin();
    assert_eq!(s.seq_of("bob@x", "alice@x", "m1").unwrap(), Some(b));
    assert_eq!(s.pending_from("bob@x", b, 10).unwrap().len(), 1);
    let done = s.confirm("bob@x", &[b, a, b]).unwrap();
    let seqs: Vec<u64> = done.pending.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, [b, a]);
    assert!(done.counted.is_empty());
    assert_eq!(s.get("bob@x", a).unwrap(), None);
    // Confirmed: a different message may take the id over at once.
    s.look_ahead(&[key("m0")]).unwrap();
    let d = match s.accept(different("m0"), BIG).unwrap() {
        Accepted::Stored { seq } => seq,
        other => panic!("{other:?}"),
    };
    assert!(d > b);
    assert_eq!(s.seq_of("bob@x", "alice@x", "m0").unwrap(), Some(d));
    assert_eq!(
        s.accept(different("m0"), BIG).unwrap(),
        Accepted::Duplicate { seq: d }
    );
    s.commit().unwrap();

    assert_eq!(ids(s), ["m0"]);
    assert_eq!(s.recipient("bob@x").unwrap().pending, 1);
    let t = s.totals().unwrap();
    assert_eq!((t.pending, t.recipients), (1, 1));
    assert_eq!(s.contact("bob@x", "alice@x").unwrap(), Some(c));
    assert_eq!(s.confirm("bob@x", &[d]).unwrap().len(), 1);
    let t = s.totals().unwrap();
    assert_eq!((t.pending, t.bytes, t.recipients), (0, 0, 0));
    // A seq forgotten under another recipient names none of its
    // messages: bob's stays pending with its ids, also where the queue
    // was read before; forgotten under bob, both go.
    let e = stored(s, msg("bob@x", "alice@x", "m9", None));
    assert_eq!(s.pending_from("bob@x", 0, 10).unwrap().len(), 1);
    assert_eq!(s.forget("carol@x", e).unwrap(), None);
    assert_eq!(s.seq_of("bob@x", "alice@x", "m9").unwrap(), Some(e));
    assert_eq!(s.pending_from("bob@x", 0, 10).unwrap().len(), 1);
    assert_eq!(
        s.forget("bob@x", e).unwrap().map(|r| r.id),
        Some("m9".into())
    );
    assert_eq!(s.seq_of("bob@x", "alice@x", "m9").unwrap(), None);
    assert!(s.pending_from("bob@x", 0, 10).unwrap().is_empty());
    let problems = s.check().unwrap().problems;
    assert!(
        problems.iter().all(|p| p.contains("does not parse")),
        "{problems:?}"
    );
}

fn contacts_and_subscriptions_are_kept(s: &dyn QueueStore) {
    assert_eq!(s.contact("bob@x", "alice@x").unwrap(), None);
    let c = Contact {
        subscription: Subscription::Requested,
        asked_at_ms: 42,
    };
    s.set_contact("bob@x", "alice@x", c).unwrap();
    assert_eq!(s.contact("bob@x", "alice@x").unwrap(), Some(c));
    assert_eq!(s.contact("bob@x", "carol@x").unwrap(), None);
    s.set_subscription("bob@x", Subscription::Subscribed)
        .unwrap();
    stored(s, msg("bob@x", "alice@x", "m0", None));
    let st = s.recipient("bob@x").unwrap();
    assert_eq!((st.subscription, st.pending), (Subscription::Subscribed, 1));
    let all = s.recipients().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].0, "bob@x");
    let seq = s.seq_of("bob@x", "alice@x", "m0").unwrap().unwrap();
    assert_eq!(s.get("bob@x", seq).unwrap().unwrap().id, "m0");
    // Forgetting a message lets the same id in as a new one.
    assert_eq!(s.forget("bob@x", seq).unwrap().unwrap().id, "m0");
    assert_eq!(s.seq_of("bob@x", "alice@x", "m0").unwrap(), None);
    assert!(stored(s, msg("bob@x", "alice@x", "m0", None)) > seq);
    assert!(s.next_seq().unwrap() > seq);
    let problems = s.check().unwrap().problems;
    assert!(
        problems.iter().all(|p| p.contains("does not parse")),
        "{problems:?}"
    );
}

/// Ids, origin-ids and resources come from senders and clients: long
/// ones (past PostgreSQL's 2704-byte index entry) are stored and found.
fn long_ids_jids_and_resources_are_kept(s: &dyn QueueStore) {
    // Random text does not compress.
    let long = |n: usize| -> String {
        (0..n)
            .map(|_| char::from(b'a' + rand::random::<u8>() % 26))
            .collect()
    };
    let (id, origin) = (long(5000), long(5000));
    let recipient = format!("{}@x", long(1000));
    let m = || {
        let mut m = msg(&recipient, "alice@x", &id, Some(&origin));
        m.record.stanza = "<message/>".into();
        m
    };
    let seq = stored(s, m());
    assert_eq!(s.accept(m(), BIG).unwrap(), Accepted::Duplicate { seq });
    assert_eq!(s.seq_of(&recipient, "alice@x", &id).unwrap(), Some(seq));
    let sender = format!("{}@x", long(1000));
    let c = Contact {
        subscription: Subscription::Subscribed,
        asked_at_ms: 1,
    };
    s.set_contact(&recipient, &sender, c).unwrap();
    assert_eq!(s.contact(&recipient, &sender).unwrap(), Some(c));
    let resource = long(1000);
    s.set_habit(&recipient, &resource, habit(Answers::All, 5))
        .unwrap();
    assert_eq!(s.habits(&recipient).unwrap()[0].0, resource);
    assert_eq!(s.confirm(&recipient, &[seq]).unwrap().len(), 1);
}

fn a_failed_commit_fails_every_later_one(s: &dyn QueueStore) {
    stored(s, msg("bob@x", "alice@x", "m0", None));
    s.begin();
    stored(s, msg("bob@x", "alice@x", "m1", None));
    s.fail_commits();
    assert!(s.commit().is_err());
    s.begin();
    assert!(s.commit().is_err(), "and stays failed");
}

fn order_counters_and_dedup(s: &dyn QueueStore) {
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

fn origin_id_dedup(s: &dyn QueueStore) {
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
fn reused_id_takes_over_only_after_confirmation(s: &dyn QueueStore) {
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

fn confirm_keeps_dedup_and_counters(s: &dyn QueueStore) {
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

fn totals_age_index_and_top_queues(s: &dyn QueueStore) {
    assert_eq!(s.totals().unwrap(), Totals::default());
    assert!(s.oldest().unwrap().is_none());
    let mut bob = Vec::new();
    for i in 0..5 {
        let mut m = msg("bob@x", "a@x", &format!("b{i}"), None);
        m.record.accepted_at_ms = 100 + i;
        bob.push(stored(s, m));
    }
    for i in 0..3 {
        let mut m = msg("dave@x", "a@x", &format!("d{i}"), None);
        m.record.accepted_at_ms = 200 + i;
        stored(s, m);
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

fn purge_by_scope(s: &dyn QueueStore) {
    let mut seqs = Vec::new();
    for i in 0..4 {
        let mut m = msg("b@x", "a@x", &format!("m{i}"), None);
        m.record.accepted_at_ms = 1000 * (i + 1);
        seqs.push(stored(s, m));
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

fn store_cap_refuses_new_messages_only(s: &dyn QueueStore) {
    let one = "<message id='m0'/>".len() as u64;
    let capped = QueueLimits {
        max_store_bytes: 2 * one,
        ..BIG
    };
    let a = stored(s, msg("a@x", "s@x", "m0", None));
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

fn expiry_walks_in_accept_order_and_prunes_dedup_keys(s: &dyn QueueStore) {
    let mut seqs = Vec::new();
    for i in 0..5 {
        let mut m = msg("b@x", "a@x", &format!("m{i}"), Some("o"));
        m.origin_id = (i == 0).then_some("o0");
        m.record.accepted_at_ms = 1000 * (i + 1);
        seqs.push(stored(s, m));
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

fn limits_refuse_without_storing(s: &dyn QueueStore) {
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

fn assumed_messages_leave_the_queue_and_a_late_bounce_puts_them_back(s: &dyn QueueStore) {
    let a = stored(s, msg("bob@x", "alice@x", "m1", None));
    let b = stored(s, msg("bob@x", "alice@x", "m2", None));
    let c = stored(s, msg("bob@x", "alice@x", "m3", None));
    let removed = s.assume("bob@x", &[a, b], 1_000).unwrap();
    assert_eq!(removed.len(), 2);
    assert_eq!(s.recipient("bob@x").unwrap().pending, 1);
    assert_eq!(s.totals().unwrap().pending, 1);
    assert!(kept(s, a));
    assert_eq!(s.assumed_totals().unwrap().messages, 2);
    // A late bounce of the first: back at its place, before c.
    assert_eq!(s.restore("bob@x", a).unwrap().unwrap().id, "m1");
    let order: Vec<u64> = s
        .pending_from("bob@x", 0, 10)
        .unwrap()
        .into_iter()
        .map(|(q, _)| q)
        .collect();
    assert_eq!(order, vec![a, c]);
    assert_eq!(s.totals().unwrap().pending, 2);
    assert_eq!(s.restore("bob@x", a).unwrap(), None, "restored once");
    // A late receipt for the second confirms it: nothing to put back.
    let settled = s.confirm("bob@x", &[b]).unwrap();
    assert!(settled.pending.is_empty(), "{settled:?}");
    assert_eq!(settled.counted.len(), 1, "it was counted delivered");
    assert!(!kept(s, b));
    assert_eq!(s.restore("bob@x", b).unwrap(), None);
    assert_eq!(s.assumed_totals().unwrap(), AssumedTotals::default());
    let problems = s.check().unwrap().problems;
    assert!(
        problems.iter().all(|p| p.contains("does not parse")),
        "{problems:?}"
    );
}

fn tombstones_are_pruned_after_the_window_in_time_order(s: &dyn QueueStore) {
    let seqs: Vec<u64> = (0..5)
        .map(|n| stored(s, msg("bob@x", "alice@x", &format!("m{n}"), None)))
        .collect();
    s.assume("bob@x", &seqs[..3], 1_000).unwrap();
    s.assume("bob@x", &seqs[3..], 5_000).unwrap();
    assert_eq!(
        s.prune_assumed(2_000, 2).unwrap(),
        Pruned {
            removed: 2,
            more: true
        }
    );
    assert_eq!(
        s.prune_assumed(2_000, 10).unwrap(),
        Pruned {
            removed: 1,
            more: false
        }
    );
    assert_eq!(s.assumed_totals().unwrap().messages, 2);
    assert_eq!(s.restore("bob@x", seqs[0]).unwrap(), None);
    assert!(s.restore("bob@x", seqs[4]).unwrap().is_some());
    assert_eq!(s.assumed_totals().unwrap().messages, 1);
    // Back in a queue that was empty: the store's oldest message again.
    assert_eq!(s.oldest().unwrap().map(|(_, seq, _)| seq), Some(seqs[4]));
    let problems = s.check().unwrap().problems;
    assert!(
        problems.iter().all(|p| p.contains("does not parse")),
        "{problems:?}"
    );
}

fn tombstones_end_with_the_time_to_live_and_count_against_the_store_cap(s: &dyn QueueStore) {
    let a = stored(s, msg("bob@x", "alice@x", "m1", None));
    s.assume("bob@x", &[a], 1_000).unwrap();
    let bytes = s.assumed_totals().unwrap().bytes;
    assert!(bytes > 0);
    // The same id for different content is in use while kept.
    let mut other = msg("bob@x", "alice@x", "m1", None);
    other.content_hash = 7;
    assert_eq!(s.accept(other, BIG).unwrap(), Accepted::IdInUse { seq: a });
    // Kept bytes count against the store cap.
    let tight = QueueLimits {
        max_store_bytes: bytes + 1,
        ..BIG
    };
    assert_eq!(
        s.accept(msg("bob@x", "alice@x", "m2", None), tight)
            .unwrap(),
        Accepted::StoreFull
    );
    // The expiry walk takes the tombstone with the message's entry.
    let step = s.expire(i64::MAX, 10).unwrap();
    assert!(step.messages.is_empty(), "not pending any more");
    assert_eq!(step.entries, 1);
    assert_eq!(s.restore("bob@x", a).unwrap(), None);
    assert_eq!(s.assumed_totals().unwrap(), AssumedTotals::default());
}

fn a_marker_finds_the_tombstones_of_its_sender(s: &dyn QueueStore) {
    let a = stored(s, msg("bob@x", "alice@x", "m1", None));
    let c = stored(s, msg("bob@x", "carol@x", "k1", None));
    let b = stored(s, msg("bob@x", "alice@x", "m2", None));
    let later = stored(s, msg("bob@x", "alice@x", "m3", None));
    s.assume("bob@x", &[a, c, b, later], 1_000).unwrap();
    assert_eq!(
        s.assumed_from_sender_upto("bob@x", "alice@x", b, 100)
            .unwrap(),
        vec![a, b]
    );
}

fn habits_are_per_client_and_bounded(s: &dyn QueueStore) {
    s.set_habit("bob@x", "phone", habit(Answers::Contacts, 1))
        .unwrap();
    s.set_habit("bob@xy", "phone", habit(Answers::All, 1))
        .unwrap();
    assert_eq!(
        s.habits("bob@x").unwrap(),
        vec![("phone".to_owned(), habit(Answers::Contacts, 1).unwrap())],
        "another recipient's prefix is not mixed in"
    );
    for n in 0..MAX_HABITS as i64 {
        s.set_habit("bob@x", &format!("r{n}"), habit(Answers::All, 10 + n))
            .unwrap();
    }
    let known = s.habits("bob@x").unwrap();
    assert_eq!(known.len(), MAX_HABITS);
    assert!(
        !known.iter().any(|(r, _)| r == "phone"),
        "the one heard from longest ago went"
    );
    s.set_habit("bob@x", "r3", None).unwrap();
    assert_eq!(s.habits("bob@x").unwrap().len(), MAX_HABITS - 1);
    assert_eq!(s.habit_counts().unwrap(), (MAX_HABITS as u64, 0));
}
