use super::keys::*;
use super::*;
use crate::store::contract_tests::{BIG, msg, stored};

/// Open, waiting out the lock of a store just dropped in this process:
/// sled's I/O threads can still hold it for a moment under load.
pub(super) fn open(dir: &Path) -> SledStore {
    open_waiting(dir, false).unwrap()
}

/// [`open`] with or without compression, its error kept.
fn open_waiting(dir: &Path, compression: bool) -> Result<SledStore, StoreError> {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match SledStore::open_with(dir, Durability::Fsync, 5, 1 << 20, compression) {
            Err(StoreError::Locked { .. }) if std::time::Instant::now() < end => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

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
        9,
        "one batch: m1's entry and index, the newest accept, m0's entry \
         removed and its expiry entry written, the head's age entry moving \
         from m0 to m1 (two keys), counters, totals"
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
fn schema_1_store_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let seq = {
        let s = open(dir.path());
        let seq = stored(&s, msg("b@x", "a@x", "m0", None));
        // Make it look like schema 1: the queue entry ends with its
        // record, no age index, no expiry entries, no totals.
        let rec = s.get("b@x", seq).unwrap().unwrap();
        s.db.insert(queue_key("b@x", seq), encode(&rec)).unwrap();
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
    assert_eq!(v.as_ref(), 4u32.to_be_bytes(), "the layout it migrated to");
}

fn schema(s: &SledStore) -> u32 {
    let v = s.db.get(SCHEMA_KEY).unwrap().unwrap();
    u32::from_be_bytes(v.as_ref().try_into().unwrap())
}

fn age_entries(s: &SledStore) -> Vec<(u64, String)> {
    s.db.scan_prefix(b"a")
        .map(|kv| {
            let (k, v) = kv.unwrap();
            (
                decode_seq(&k[1..]).unwrap(),
                String::from_utf8(v.to_vec()).unwrap(),
            )
        })
        .collect()
}

/// What `store check` finds, but for the test messages' stanzas (not
/// XML).
fn layout_problems(s: &SledStore) -> Vec<String> {
    let mut p = s.check().unwrap().problems;
    p.retain(|p| !p.ends_with("stored stanza does not parse"));
    p
}

/// Three queues as schema 3 kept them: an age entry for every pending
/// message. `mark` leaves the migration half done instead (schema 4 and
/// its marker already written, as after a crash in the pass).
fn schema_3_store(dir: &Path, mark: bool) -> Vec<(String, Vec<u64>)> {
    let s = open(dir);
    let mut queues: Vec<(String, Vec<u64>)> = ["ann@x", "bob@x", "cat@x"]
        .iter()
        .map(|r| (r.to_string(), Vec::new()))
        .collect();
    // Interleaved: a queue's later messages come before another's head
    // in seq order.
    for i in 0..4 {
        for (r, seqs) in &mut queues {
            seqs.push(stored(&s, msg(r, "zed@x", &format!("{r}{i}"), None)));
        }
    }
    for (r, seqs) in &queues {
        for seq in seqs {
            s.db.insert(age_key(*seq), r.as_bytes()).unwrap();
        }
    }
    if mark {
        s.db.insert(MIGRATING_KEY, &[]).unwrap();
    } else {
        s.db.insert(SCHEMA_KEY, &3u32.to_be_bytes()).unwrap();
    }
    s.flush().unwrap();
    assert_eq!(age_entries(&s).len(), 12);
    queues
}

/// Schema 4 keeps one age entry per queue, on its head: a schema 3 store
/// is migrated at its open, and a migration cut short is finished at the
/// next one. The store checks clean either way, the oldest message is
/// found, and the queues carry on.
#[test]
fn a_schema_3_store_is_migrated_to_one_age_entry_per_queue() {
    for mark in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let queues = schema_3_store(dir.path(), mark);
        let s = open(dir.path());
        assert_eq!(schema(&s), 4);
        assert!(s.db.get(MIGRATING_KEY).unwrap().is_none(), "done");
        let heads: Vec<(u64, String)> = queues
            .iter()
            .map(|(r, seqs)| (seqs[0], r.clone()))
            .collect();
        assert_eq!(age_entries(&s), heads);
        let report = s.check().unwrap();
        assert!(layout_problems(&s).is_empty(), "{:?}", report.problems);
        assert_eq!(report.messages, 12);
        assert_eq!(s.oldest().unwrap().unwrap().1, queues[0].1[0]);
        // Confirming a head moves its queue's entry to the next message.
        s.confirm("ann@x", &[queues[0].1[0], queues[0].1[1]])
            .unwrap();
        assert_eq!(s.oldest().unwrap().unwrap().1, queues[1].1[0]);
        assert!(age_entries(&s).contains(&(queues[0].1[2], "ann@x".into())));
        assert!(layout_problems(&s).is_empty());
    }
}

/// What `store check` says of a damaged age index.
#[test]
fn check_finds_a_missing_or_misplaced_age_entry() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let a: Vec<u64> = (0..2)
        .map(|i| stored(&s, msg("ann@x", "zed@x", &format!("a{i}"), None)))
        .collect();
    let b = stored(&s, msg("bob@x", "zed@x", "b0", None));
    assert!(layout_problems(&s).is_empty());
    s.db.remove(age_key(b)).unwrap();
    s.db.insert(age_key(a[1]), "ann@x").unwrap();
    let problems = layout_problems(&s);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("bob@x: no age entry for the head")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("not the head")),
        "{problems:?}"
    );
}

/// A seq base (written by an import only) keeps the store at the
/// newest version (3 brought it: a build that knows nothing of it must
/// refuse the store instead of handing out seqs the imported messages
/// hold), across a reopen; a version 2 store is migrated at its open.
#[test]
fn a_seq_base_is_kept_in_a_store_of_the_newest_version() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        s.db.insert(SCHEMA_KEY, &2u32.to_be_bytes()).unwrap();
        s.flush().unwrap();
    }
    {
        let s = open(dir.path());
        assert_eq!(schema(&s), SCHEMA_VERSION, "migrated");
        s.skip_seqs_below(5_000_000).unwrap();
        assert_eq!(schema(&s), SCHEMA_VERSION);
        assert!(s.next_seq().unwrap() >= 5_000_000);
    }
    let s = open(dir.path());
    assert_eq!(schema(&s), SCHEMA_VERSION);
    assert!(s.next_seq().unwrap() >= 5_000_000, "kept across a reopen");
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

#[test]
fn a_compressed_store_keeps_its_messages_and_refuses_the_other_setting() {
    let dir = tempfile::tempdir().unwrap();
    let open_with = |compression| open_waiting(dir.path(), compression);
    let seq = {
        let s = open_with(true).unwrap();
        let seq = stored(&s, msg("bob@x", "alice@x", "z1", None));
        s.flush().unwrap();
        seq
    };
    // Opened without compression: refused, saying which setting it needs.
    let err = open_with(false).err().unwrap();
    assert!(
        matches!(err, StoreError::Compression { created: true, .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("was created with store.compression = true"),
        "{err}"
    );
    // With it: the message is there, whole.
    let s = open_with(true).unwrap();
    let rec = s.get("bob@x", seq).unwrap().unwrap();
    assert_eq!(rec.id, "z1");
    drop(s);
    // And the other way round.
    let plain = tempfile::tempdir().unwrap();
    drop(open(plain.path()));
    let err = SledStore::open_with(plain.path(), Durability::Fsync, 5, 1 << 20, true)
        .err()
        .unwrap();
    assert!(
        matches!(err, StoreError::Compression { created: false, .. }),
        "{err}"
    );
}

/// Rewrite pending message `seq` of `recipient` as a store before schema
/// 4 kept it: the queue entry ends with its record, and an expiry entry
/// names its dedup keys.
fn make_old_style(s: &SledStore, recipient: &str, seq: u64) {
    let v = s.db.get(queue_key(recipient, seq)).unwrap().unwrap();
    let (rec, extra) = decode_queue_value(&v).unwrap();
    let extra = extra.expect("written by this version");
    s.db.insert(queue_key(recipient, seq), encode(&rec))
        .unwrap();
    s.db.insert(
        expiry_key(seq),
        encode(&left_queue(recipient, &rec, &extra)),
    )
    .unwrap();
}

/// Schema 4: a pending message's queue entry names its dedup keys, and
/// its expiry entry is written when it leaves the queue (so that a
/// million pending messages are a million keys fewer).
#[test]
fn a_pending_message_has_no_expiry_entry_until_it_leaves_its_queue() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let mut m = msg("bob@x", "alice@x", "m1", Some("o1"));
    m.record.accepted_at_ms = 1_000;
    let seq = stored(&s, m);
    assert!(s.db.get(expiry_key(seq)).unwrap().is_none());
    assert!(layout_problems(&s).is_empty());
    // Still a duplicate by id and by origin-id.
    assert_eq!(
        s.accept(msg("bob@x", "alice@x", "m1", None), BIG).unwrap(),
        Accepted::Duplicate { seq }
    );
    assert_eq!(
        s.accept(msg("bob@x", "alice@x", "m9", Some("o1")), BIG)
            .unwrap(),
        Accepted::Duplicate { seq }
    );
    s.confirm("bob@x", &[seq]).unwrap();
    let e: Expiry = decode(&s.db.get(expiry_key(seq)).unwrap().unwrap(), "x").unwrap();
    assert_eq!(e.accepted_at_ms, 1_000);
    assert_eq!(e.keys.len(), 2, "the id and the origin-id");
    assert!(layout_problems(&s).is_empty());
    // After its time to live both keys go.
    assert_eq!(s.expire(1_000, 10).unwrap().entries, 1);
    assert!(s.seq_of("bob@x", "alice@x", "m1").unwrap().is_none());
    assert!(matches!(
        s.accept(msg("bob@x", "alice@x", "m9", Some("o1")), BIG)
            .unwrap(),
        Accepted::Stored { .. }
    ));
}

/// A store migrated from schema 3 holds both kinds of pending message:
/// the expiry walk takes them all in seq order, with their dedup keys,
/// and an export gives them all in seq order, page by page.
#[test]
fn old_and_new_pending_messages_expire_and_export_in_seq_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let mut seqs = Vec::new();
    for i in 0..8 {
        let r = ["ann@x", "bob@x", "cat@x"][i % 3];
        let mut m = msg(r, "zed@x", &format!("m{i}"), None);
        let origin = format!("o{i}");
        m.origin_id = (i % 2 == 0).then_some(origin.as_str());
        m.record.accepted_at_ms = 1_000 * (i as i64 + 1);
        seqs.push((r, stored(&s, m)));
    }
    // Old style: m0 and m3 (ann's) and m4 (bob's); m6 leaves its queue.
    for i in [0, 3, 4] {
        make_old_style(&s, seqs[i].0, seqs[i].1);
    }
    s.confirm(seqs[6].0, &[seqs[6].1]).unwrap();
    assert!(layout_problems(&s).is_empty(), "{:?}", layout_problems(&s));
    // Export, two at a time: every message once, in seq order.
    let mut got = Vec::new();
    let mut after = None;
    loop {
        let page = s.remembered(after, 2).unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.seq);
        got.extend(page.into_iter().map(|r| {
            (
                r.seq,
                r.ids[0].value.clone(),
                r.origins.len(),
                r.message.is_some(),
            )
        }));
    }
    let want: Vec<_> = (0..8)
        .map(|i| (seqs[i].1, format!("m{i}"), usize::from(i % 2 == 0), i != 6))
        .collect();
    assert_eq!(got, want);
    // Expire up to m5 (t = 6000), three at a time.
    let mut expired = Vec::new();
    let mut entries = 0;
    loop {
        let step = s.expire(6_000, 3).unwrap();
        entries += step.entries;
        expired.extend(step.messages.into_iter().map(|(_, _, r)| r.id));
        if !step.more {
            break;
        }
    }
    assert_eq!(entries, 6);
    assert_eq!(expired, ["m0", "m1", "m2", "m3", "m4", "m5"]);
    for (i, (r, _)) in seqs.iter().enumerate().take(6) {
        assert!(
            s.seq_of(r, "zed@x", &format!("m{i}")).unwrap().is_none(),
            "m{i}'s id key went"
        );
    }
    let left: Vec<u64> = ["ann@x", "bob@x", "cat@x"]
        .iter()
        .flat_map(|r| s.pending_from(r, 0, 10).unwrap())
        .map(|(seq, _)| seq)
        .collect();
    assert_eq!(left, [seqs[7].1]);
    assert_eq!(s.oldest().unwrap().unwrap().1, seqs[7].1);
    assert_eq!(s.totals().unwrap().pending, 1);
    assert!(layout_problems(&s).is_empty(), "{:?}", layout_problems(&s));
}

/// Review of schema 4, defect 1: the clean-shutdown marker must change
/// with a burst that accepts one message and removes another of the same
/// size (totals unchanged), or a log cut that lost that burst would go
/// unnoticed: a pending message has no expiry entry to show it.
#[test]
fn the_shutdown_marker_sees_an_accept_that_leaves_the_totals_alike() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let bob = stored(&s, msg("bob@x", "zed@x", "b1", None));
    let carol = stored(&s, msg("carol@x", "zed@x", "c1", None));
    s.confirm("carol@x", &[carol]).unwrap();
    let before = s.marker().unwrap();
    s.begin();
    stored(&s, msg("dave@x", "zed@x", "d1", None));
    s.confirm("bob@x", &[bob]).unwrap();
    s.commit().unwrap();
    let after = s.marker().unwrap();
    assert_eq!(before.totals, after.totals, "the totals alone say nothing");
    assert_ne!(before, after);
}

/// Review of schema 4, defect 2: a queue whose age entry is damaged
/// (pointing at a message that is gone) still expires, and an export
/// that cannot reach every pending message fails instead of writing a
/// file that looks whole.
#[test]
fn a_damaged_age_index_neither_stops_the_expiry_nor_shortens_an_export() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let seqs: Vec<u64> = (0..3)
        .map(|i| {
            let mut m = msg("bob@x", "zed@x", &format!("b{i}"), None);
            m.record.accepted_at_ms = 1_000;
            stored(&s, m)
        })
        .collect();
    // The head's message is lost, its age entry left.
    s.db.remove(queue_key("bob@x", seqs[0])).unwrap();
    let step = s.expire(1_000, 10).unwrap();
    assert_eq!(step.entries, 2, "the messages after it");
    assert!(s.pending_from("bob@x", 0, 10).unwrap().is_empty());

    let other = tempfile::tempdir().unwrap();
    let s = open(other.path());
    stored(&s, msg("bob@x", "zed@x", "b0", None));
    let ann = stored(&s, msg("ann@x", "zed@x", "a0", None));
    s.db.remove(age_key(ann)).unwrap();
    let e = crate::store::transfer::export(&s, &mut Vec::new()).unwrap_err();
    assert!(
        e.to_string()
            .contains("counts 2 pending messages but the export found 1"),
        "{e}"
    );
}
