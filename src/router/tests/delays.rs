//! XEP-0203 `<delay/>`: every message that goes out later than the round
//! that accepted it carries the component's delay with its accept time,
//! so that the client shows when it was sent, not when it arrived; one
//! relayed at once carries none.

use super::*;

/// A relayed body message as the client sees it: its id, and its delay's
/// `from` and stamp (ms since the epoch), if it has one.
#[derive(Debug)]
struct Seen {
    id: String,
    delay: Option<(String, i64)>,
}

fn seen(out: Vec<Stanza>) -> Vec<Seen> {
    out.into_iter()
        .filter_map(|st| match st {
            Stanza::Message(m) if !m.bodies.is_empty() => {
                let delays: Vec<Delay> = m
                    .payloads
                    .iter()
                    .filter(|p| p.is("delay", ns::DELAY))
                    .map(|p| Delay::try_from(p.clone()).unwrap())
                    .collect();
                assert!(delays.len() <= 1, "one delay of ours at most: {delays:?}");
                Some(Seen {
                    id: m.id.unwrap().0,
                    delay: delays.into_iter().next().map(|d| {
                        (
                            d.from.map(|f| f.to_string()).unwrap_or_default(),
                            d.stamp.0.timestamp_millis(),
                        )
                    }),
                })
            }
            _ => None,
        })
        .collect()
}

/// The wall clock in ms (the delay's stamp is wall time, not tokio's
/// paused clock).
fn wall_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// `s` is message `id` with the component's delay, stamped inside
/// `[from, to]` (when it was accepted).
fn assert_delayed(s: &Seen, id: &str, (from, to): (i64, i64)) {
    assert_eq!(s.id, id);
    let Some((by, stamp)) = &s.delay else {
        panic!("{id} went out later than its accept without a <delay/>: {s:?}");
    };
    assert_eq!(by, "relay.x", "{s:?}");
    assert!(
        (from..=to).contains(stamp),
        "{id}: stamp {stamp} is not its accept time ({from}..={to})"
    );
}

/// Send message `id` from alice; the wall-clock span it was accepted in.
async fn accepted(h: &Harness, id: &str) -> (i64, i64) {
    let from = wall_ms();
    h.msg(id).await;
    settle().await;
    (from, wall_ms())
}

#[tokio::test(start_paused = true)]
async fn relayed_at_once_carries_no_delay() {
    for durability in ["batched", "fsync"] {
        let mut h = harness_full(64, durability, "").await;
        subscribed_and_online(&h).await;
        h.msg("now").await;
        settle().await;
        // In fsync mode it leaves once its own write is on disk.
        while let Ok(t) = h.flushes.try_recv() {
            h.internal.send(Flushed::Durable(t)).await.unwrap();
        }
        settle().await;
        let s = seen(h.drain_all());
        assert_eq!(s.len(), 1, "{durability}: {s:?}");
        assert_eq!(s[0].id, "now");
        assert!(s[0].delay.is_none(), "{durability}: {s:?}");
    }
}

/// Offline at send time: the replay at login carries the accept time.
#[tokio::test(start_paused = true)]
async fn held_while_offline_then_sent_at_login() {
    let mut h = harness(64).await;
    h.subscribe_and_go_offline().await;
    let t1 = accepted(&h, "m1").await;
    let t2 = accepted(&h, "m2").await;
    assert!(h.drain().is_empty(), "offline: nothing sent");
    h.available().await;
    tokio::time::sleep(Duration::from_millis(310)).await;
    let s = seen(h.drain_all());
    assert_eq!(s.len(), 2, "{s:?}");
    assert_delayed(&s[0], "m1", t1);
    assert_delayed(&s[1], "m2", t2);
}

/// Issue 23, item 1: the first message from a sender waits for the relay
/// contact's answer; when it goes (approved at login, or the wait is
/// over), it is a first send, and it went without a delay before.
#[tokio::test(start_paused = true)]
async fn held_for_a_relay_contact_then_sent() {
    let mut h = harness_with(64, "contact_wait_ms = 5000\n").await;
    let t = accepted(&h, "c1").await;
    assert!(h.drain().is_empty(), "held for the answer");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    h.feed(&format!(
        "<presence xmlns='{NS}' from='bob@x' to='alice@relay.x' type='subscribed'/>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let s = seen(h.drain_all());
    assert_eq!(s.len(), 1, "{s:?}");
    assert_delayed(&s[0], "c1", t);
    h.receipt("c1").await;

    // Nobody answers for carol: hers goes after the wait, delayed too.
    let from = wall_ms();
    h.feed(&format!(
        "<message xmlns='{NS}' from='carol@x/r' to='bob@relay.x' id='k1' type='chat'><body>k1</body></message>"
    ))
    .await;
    settle().await;
    let t = (from, wall_ms());
    tokio::time::sleep(Duration::from_millis(5100)).await;
    let s = seen(h.drain_all());
    let k1: Vec<&Seen> = s.iter().filter(|s| s.id == "k1").collect();
    assert_eq!(k1.len(), 1, "{s:?}");
    assert_delayed(k1[0], "k1", t);
}

/// Issue 23, item 1: a message that waits for room in the window is a
/// first send when it goes, and it went without a delay before.
#[tokio::test(start_paused = true)]
async fn waiting_for_the_window_then_sent() {
    let mut h = harness(1).await;
    h.bob_online().await;
    h.drain_all();
    accepted(&h, "w1").await;
    let t2 = accepted(&h, "w2").await;
    let s = seen(h.drain_all());
    assert_eq!(s.len(), 1, "{s:?}");
    assert!(s[0].id == "w1" && s[0].delay.is_none(), "{s:?}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    h.receipt("w1").await;
    settle().await;
    let s = seen(h.drain_all());
    assert_eq!(s.len(), 1, "{s:?}");
    assert_delayed(&s[0], "w2", t2);
}

/// A message refused for the recipient's quota, sent again and accepted
/// while the recipient is offline, carries its (second) accept time at
/// login; one accepted when there is room and the recipient is there
/// goes at once, without.
#[tokio::test(start_paused = true)]
async fn refused_for_quota_then_accepted() {
    let mut h = harness_with(64, "[limits]\nmax_pending_per_recipient = 1\n").await;
    h.subscribe_and_go_offline().await;
    let t1 = accepted(&h, "q1").await;
    h.msg("q2").await;
    settle().await;
    let out = h.drain_all();
    assert!(
        out.iter()
            .any(|st| condition(st) == Some(DefinedCondition::ResourceConstraint)),
        "q2 refused: {out:?}"
    );
    h.available().await;
    tokio::time::sleep(Duration::from_millis(310)).await;
    let s = seen(h.drain_all());
    assert_eq!(s.len(), 1, "{s:?}");
    assert_delayed(&s[0], "q1", t1);
    h.unavailable("r").await;
    h.receipt("q1").await;
    settle().await;
    h.drain_all();
    // Room again, bob away: accepted now, delivered at his login.
    let t2 = accepted(&h, "q2").await;
    assert!(h.drain().is_empty());
    h.available().await;
    tokio::time::sleep(Duration::from_millis(310)).await;
    let s = seen(h.drain_all());
    assert_eq!(s.len(), 1, "{s:?}");
    assert_delayed(&s[0], "q2", t2);
    h.receipt("q2").await;
    settle().await;
    h.msg("q3").await;
    settle().await;
    let s = seen(h.drain_all());
    assert_eq!(s.len(), 1, "{s:?}");
    assert!(s[0].id == "q3" && s[0].delay.is_none(), "{s:?}");
}

/// A replay after a receipt timeout carries the accept time, and so do
/// the messages that waited behind it.
#[tokio::test(start_paused = true)]
async fn replayed_after_a_receipt_timeout() {
    let mut h = harness(64).await;
    h.bob_online().await;
    h.drain_all();
    let t1 = accepted(&h, "r1").await;
    let s = seen(h.drain_all());
    assert!(s.len() == 1 && s[0].delay.is_none(), "{s:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t2 = accepted(&h, "r2").await;
    assert!(h.drain().is_empty(), "bob counts offline after the timeout");
    h.presence("r2").await;
    tokio::time::sleep(Duration::from_millis(310)).await;
    let s = seen(h.drain_all());
    assert_eq!(s.len(), 2, "{s:?}");
    assert_delayed(&s[0], "r1", t1);
    assert_delayed(&s[1], "r2", t2);
}
