//! Relay contacts, asked for or (privileged, XEP-0356) added, and granted
//! presence.

use super::*;

/// Issue 12, item 1: the first message from a sender makes its relay
/// address ask the recipient for a subscription, with a XEP-0172 nick
/// naming the sender; messages from that sender wait for the answer
/// (here approval), or at most `contact_wait_ms`, then go.
#[tokio::test(start_paused = true)]
async fn a_relay_contact_is_asked_for_and_its_answer_awaited() {
    let mut h = harness_with(64, "contact_wait_ms = 5000\n").await;
    h.msg("c1").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let out = h.drain_all();
    let asks: Vec<(String, String)> = out
        .iter()
        .filter_map(|st| match st {
            Stanza::Presence(p) if p.type_ == PresenceType::Subscribe => Some((
                p.from.as_ref().unwrap().to_string(),
                p.payloads
                    .iter()
                    .find(|e| e.is("nick", NICK))
                    .map(|e| e.text())
                    .unwrap_or_default(),
            )),
            _ => None,
        })
        .collect();
    assert!(
        asks.contains(&("alice@relay.x".to_string(), "alice@x".to_string())),
        "{asks:?}"
    );
    assert!(messages(&out).is_empty(), "held for the answer");
    h.feed(&format!(
        "<presence xmlns='{NS}' from='bob@x' to='alice@relay.x' type='subscribed'/>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(ids_of(&h.drain()), ["c1"], "sent once approved");
    h.receipt("c1").await;

    // Carol's first message: nobody answers, it goes after the wait.
    h.feed(&format!(
        "<message xmlns='{NS}' from='carol@x/r' to='bob@relay.x' id='k1' type='chat'><body>k1</body></message>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(4900)).await;
    assert!(!ids_of(&h.drain()).contains(&"k1"), "still waiting");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(ids_of(&h.drain()).contains(&"k1"), "sent after the wait");
}

/// Review of privileged mode: presence granted by the server shows
/// only changes since the relay started delivering to a user, so a
/// logout of a resource it never saw does not make him offline, and
/// when the ones it saw are gone his queue is still retried.
#[tokio::test(start_paused = true)]
async fn granted_presence_is_a_hint_not_proof_of_absence() {
    let mut h = harness_with(64, "unanswered_wait_ms = 200\n").await;
    grant(&h, "x", PRESENCE).await;
    // phone and desktop were online before anything was pending.
    h.presence("phone").await;
    h.presence("desktop").await;
    h.msg("m1").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    h.unavailable("desktop").await;
    h.msg("m2").await;
    // As soon as m1 counts delivered (200 ms): nothing says bob left
    // (a backoff retry would be 500 ms).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = h.drain_all();
    let sent: Vec<String> = messages(&out).into_iter().map(|(_, id, _)| id).collect();
    assert!(sent.contains(&"m2".to_string()), "{sent:?}");
    assert!(
        subscribes_from(&out).iter().all(|f| f != "relay.x"),
        "no subscription asked for the domain: {out:?}"
    );
    // A presence seen, then its logout: nothing known is left, and a
    // message after that is still tried (with backoff).
    h.presence("tablet").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    h.unavailable("tablet").await;
    h.msg("m3").await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(ids_of(&h.drain()).contains(&"m3"));
    assert_eq!(
        h.store.recipient("bob@x").unwrap().subscription,
        Subscription::None,
        "granted presence approves nothing"
    );
}

/// Review of privileged mode: a roster set that fails for one user
/// (one that does not exist) falls back for that pair only; one the
/// server refuses as such (ejabberd 23.01: internal-server-error)
/// ends roster sets for the connection. Unanswered ones are sent
/// again after a reconnect, and a relay contact the user removed is
/// asked for, not put back.
#[tokio::test(start_paused = true)]
async fn privileged_roster_sets_fall_back_with_care() {
    let mut h = harness_with(64, "unanswered_wait_ms = 200\n").await;
    grant(&h, "x", ROSTER).await;
    // A grant from another domain is ignored.
    grant(&h, "y", "<perm access='presence' type='managed_entity'/>").await;
    h.feed(&format!(
        "<message xmlns='{NS}' from='alice@x/r' to='nobody@relay.x' id='n1' type='chat'><body>n1</body></message>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let out = h.drain_all();
    let sets = roster_sets(&out);
    assert_eq!(sets.len(), 1, "{out:?}");
    h.feed(&format!(
        "<iq xmlns='{NS}' type='error' from='nobody@x' to='relay.x' id='{}'><error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
        sets[0].0
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        subscribes_from(&h.drain_all()),
        ["alice@relay.x"],
        "asked instead"
    );
    // Bob: still a roster set.
    h.msg("b1").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let out = h.drain_all();
    let sets = roster_sets(&out);
    assert_eq!(sets.len(), 1, "{out:?}");
    assert_eq!(sets[0].1, "bob@x");
    assert_eq!(sets[0].2, "alice@relay.x");
    // The link drops before the answer: sent again afterwards.
    h.events.send(LinkEvent::Down).await.unwrap();
    h.events.send(LinkEvent::Up { epoch: 2 }).await.unwrap();
    grant(&h, "x", ROSTER).await;
    h.msg("b2").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let sets = roster_sets(&h.drain_all());
    assert_eq!(sets.len(), 1, "asked again");
    h.feed(&format!(
        "<iq xmlns='{NS}' type='result' from='bob@x' to='relay.x' id='{}'/>",
        sets[0].0
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        h.store
            .contact("bob@x", "alice@x")
            .unwrap()
            .unwrap()
            .subscription,
        Subscription::Subscribed
    );
    // Bob removes the contact; a day later alice's next message asks
    // him instead of putting it back.
    h.feed(&format!(
        "<presence xmlns='{NS}' from='bob@x' to='alice@relay.x' type='unsubscribed'/>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut c = h.store.contact("bob@x", "alice@x").unwrap().unwrap();
    assert_eq!(c.subscription, Subscription::None);
    c.asked_at_ms -= 25 * 3600 * 1000;
    h.store.set_contact("bob@x", "alice@x", c).unwrap();
    // (the relay's cache still holds the fresh one: a carol→bob pair
    // shows the same rule on a cold cache)
    h.store
        .set_contact(
            "bob@x",
            "carol@x",
            Contact {
                subscription: Subscription::None,
                asked_at_ms: 1,
            },
        )
        .unwrap();
    h.drain_all();
    h.feed(&format!(
        "<message xmlns='{NS}' from='carol@x/r' to='bob@relay.x' id='k1' type='chat'><body>k1</body></message>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let out = h.drain_all();
    assert!(roster_sets(&out).is_empty(), "not put back: {out:?}");
    assert_eq!(subscribes_from(&out), ["carol@relay.x"]);
    // ejabberd 23.01's answer ends roster sets for the connection.
    h.feed(&format!(
        "<message xmlns='{NS}' from='dave@x/r' to='bob@relay.x' id='d1' type='chat'><body>d1</body></message>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let sets = roster_sets(&h.drain_all());
    assert_eq!(sets.len(), 1);
    h.feed(&format!(
        "<iq xmlns='{NS}' type='error' from='bob@x' to='relay.x' id='{}'><error type='wait'><internal-server-error xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
        sets[0].0
    ))
    .await;
    h.feed(&format!(
        "<message xmlns='{NS}' from='erin@x/r' to='bob@relay.x' id='e1' type='chat'><body>e1</body></message>"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let out = h.drain_all();
    assert!(roster_sets(&out).is_empty(), "{out:?}");
    assert_eq!(subscribes_from(&out), ["dave@relay.x", "erin@relay.x"]);
}
