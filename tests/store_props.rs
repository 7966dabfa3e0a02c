//! Property tests of the store: any sequence of accept, confirm, expire,
//! purge and restart keeps every queue in order, the counters and totals
//! right, and the id indexes consistent (`SledStore::check`), and matches a
//! plain in-memory model. An export/import round trip at the end of each
//! sequence keeps all of it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use proptest::prelude::*;
use redeliver::config::Durability;
use redeliver::store::{Accepted, NewMessage, PurgeScope, QueueLimits, Record, SledStore};

const LIMITS: QueueLimits = QueueLimits {
    max_pending: 1000,
    max_bytes: 1 << 30,
    max_store_bytes: 1 << 30,
};

#[derive(Debug, Clone)]
enum Op {
    Accept {
        recipient: u8,
        sender: u8,
        id: u8,
        origin: Option<u8>,
        dt: u8,
    },
    Confirm {
        recipient: u8,
        nth: u8,
    },
    Expire {
        back: u8,
    },
    Purge {
        recipient: u8,
        older: Option<u8>,
    },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..3, 0u8..2, 0u8..12, proptest::option::of(0u8..4), 0u8..5).prop_map(
            |(recipient, sender, id, origin, dt)| Op::Accept { recipient, sender, id, origin, dt }
        ),
        3 => (0u8..3, 0u8..5).prop_map(|(recipient, nth)| Op::Confirm { recipient, nth }),
        1 => (0u8..30).prop_map(|back| Op::Expire { back }),
        1 => (0u8..3, proptest::option::of(0u8..30))
            .prop_map(|(recipient, older)| Op::Purge { recipient, older }),
        1 => Just(Op::Restart),
    ]
}

/// A pending message in the model.
#[derive(Debug, Clone, PartialEq)]
struct Pending {
    seq: u64,
    id: String,
    t: i64,
}

/// (recipient, sender, "i:id" or "o:origin")
type Key = (String, String, String);

#[derive(Default)]
struct Model {
    /// recipient → pending in order.
    queues: BTreeMap<String, Vec<Pending>>,
    /// dedup key → accept time.
    keys: HashMap<Key, i64>,
    /// seq → (time, its dedup keys), for expiry.
    entries: BTreeMap<u64, (i64, Vec<Key>)>,
}

/// Open, waiting out the lock of the store just dropped: sled's I/O
/// threads can hold it for a moment under load (seen once in a full run
/// of `scripts/test`, as in the store's unit tests before).
fn open(dir: &Path) -> SledStore {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match SledStore::open(dir, Durability::Batched, 5, 1 << 20) {
            Err(redeliver::store::StoreError::Locked { .. }) if std::time::Instant::now() < end => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other.unwrap(),
        }
    }
}

fn verify(store: &SledStore, model: &Model) {
    let report = store.check().unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    let mut total = 0;
    for (r, q) in &model.queues {
        let got: Vec<(u64, String)> = store
            .pending_from(r, 0, 10_000)
            .unwrap()
            .into_iter()
            .map(|(s, rec)| (s, rec.id))
            .collect();
        let want: Vec<(u64, String)> = q.iter().map(|p| (p.seq, p.id.clone())).collect();
        assert_eq!(got, want, "queue of {r}");
        assert_eq!(store.recipient(r).unwrap().pending, q.len() as u64);
        total += q.len() as u64;
    }
    assert_eq!(store.totals().unwrap().pending, total);
    assert_eq!(report.entries, model.entries.len() as u64);
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let mut model = Model::default();
    let mut now: i64 = 1_000;
    for op in ops {
        match op {
            Op::Accept {
                recipient,
                sender,
                id,
                origin,
                dt,
            } => {
                now += i64::from(dt);
                let r = format!("r{recipient}@x");
                let s = format!("s{sender}@x");
                let id = format!("m{id}");
                let origin = origin.map(|o| format!("o{o}"));
                let mut keys = vec![(r.clone(), s.clone(), format!("i:{id}"))];
                if let Some(o) = &origin {
                    keys.push((r.clone(), s.clone(), format!("o:{o}")));
                }
                let dup = keys.iter().any(|k| model.keys.contains_key(k));
                let got = store
                    .accept(
                        NewMessage {
                            recipient: &r,
                            sender_bare: &s,
                            origin_id: origin.as_deref(),
                            content_hash: 0,
                            record: Record {
                                accepted_at_ms: now,
                                sender: format!("{s}/res"),
                                id: id.clone(),
                                stanza: format!("<message xmlns='jabber:component:accept' id='{id}'><body>b</body></message>"),
                            },
                        },
                        LIMITS,
                    )
                    .unwrap();
                match got {
                    Accepted::Stored { seq } => {
                        assert!(!dup, "stored a duplicate");
                        for k in &keys {
                            model.keys.insert(k.clone(), now);
                        }
                        model.entries.insert(seq, (now, keys));
                        model
                            .queues
                            .entry(r)
                            .or_default()
                            .push(Pending { seq, id, t: now });
                    }
                    Accepted::Duplicate { .. } => {
                        assert!(dup, "a new message taken for a duplicate")
                    }
                    other => panic!("{other:?}"),
                }
            }
            Op::Confirm { recipient, nth } => {
                let r = format!("r{recipient}@x");
                let q = model.queues.entry(r.clone()).or_default();
                if let Some(p) = q.get(nth as usize).cloned() {
                    q.remove(nth as usize);
                    let removed = store.confirm(&r, &[p.seq]).unwrap();
                    assert_eq!(removed.len(), 1);
                }
            }
            Op::Expire { back } => {
                let cutoff = now - i64::from(back);
                loop {
                    let step = store.expire(cutoff, 3).unwrap();
                    if !step.more {
                        break;
                    }
                }
                let gone: Vec<u64> = model
                    .entries
                    .iter()
                    .filter(|(_, (t, _))| *t <= cutoff)
                    .map(|(s, _)| *s)
                    .collect();
                for s in gone {
                    let (_, keys) = model.entries.remove(&s).unwrap();
                    for k in keys {
                        model.keys.remove(&k);
                    }
                }
                for q in model.queues.values_mut() {
                    q.retain(|p| p.t > cutoff);
                }
            }
            Op::Purge { recipient, older } => {
                let r = format!("r{recipient}@x");
                let before = older.map(|o| now - i64::from(o));
                let scope = PurgeScope {
                    below_seq: store.next_seq().unwrap(),
                    accepted_before_ms: before,
                };
                let n = store.purge(&r, scope).unwrap().len();
                let q = model.queues.entry(r).or_default();
                let len = q.len();
                q.retain(|p| before.is_some_and(|b| p.t > b));
                assert_eq!(n, len - q.len());
            }
            Op::Restart => {
                store.flush().unwrap();
                drop(store);
                store = open(dir.path());
            }
        }
        verify(&store, &model);
    }
    // Export, import into a fresh store: the same queues and ids.
    let file = dir.path().join("export.jsonl");
    let sum = redeliver::store::export(
        &store,
        &mut std::io::BufWriter::new(std::fs::File::create(&file).unwrap()),
    )
    .unwrap();
    let other = tempfile::tempdir().unwrap();
    let copy = open(other.path());
    assert_eq!(redeliver::store::import(&copy, &file).unwrap(), sum);
    let report = copy.check().unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    for (r, q) in &model.queues {
        let got: Vec<String> = copy
            .pending_from(r, 0, 10_000)
            .unwrap()
            .into_iter()
            .map(|(_, rec)| rec.id)
            .collect();
        let want: Vec<String> = q.iter().map(|p| p.id.clone()).collect();
        assert_eq!(got, want);
    }
    for (r, s, k) in model.keys.keys() {
        if let Some(id) = k.strip_prefix("i:") {
            assert!(
                copy.seq_of(r, s, id).unwrap().is_some(),
                "dedup of {r} {s} {id} kept"
            );
        }
    }
    // Importing into a store with data is refused.
    if sum.entries + sum.recipients > 0 {
        assert!(redeliver::store::import(&copy, &file).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]
    #[test]
    fn any_sequence_keeps_the_store_consistent(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops);
    }
}
