//! Archives (XEP-0313, issue 12 item 4): with the server archiving every
//! message (`mod_mam`), a client that catches up from the archive sees
//! copies of what it was shown live, and of what the relay replayed. A
//! client that tells copies apart by XEP-0359 origin-id (relayed messages
//! carry one equal to their id, the same at every send), or by the relay's
//! XEP-0359 stanza-id (also the same at every send, and kept in the
//! archived copy), shows each message once; the figures say what a client
//! that de-duplicates nothing shows.
//! On Prosody and ejabberd, with the server's offline storage off and on.

#[macro_use]
mod common;

use std::collections::BTreeMap;

use common::*;
use tokio_xmpp::minidom::Element;

const BOB: &str = "bob@relay.localhost";
const SID: &str = "urn:xmpp:sid:0";

/// (id, origin-id, the relay's stanza-id) of a body message.
fn ids_of(m: &Element) -> Option<(String, Option<String>, Option<String>)> {
    m.get_child("body", CLIENT_NS)?;
    let origin = m
        .get_child("origin-id", SID)
        .and_then(|o| o.attr("id"))
        .map(str::to_owned);
    let relay_sid = m
        .children()
        .find(|c| c.is("stanza-id", SID) && c.attr("by") == Some(COMPONENT))
        .and_then(|s| s.attr("id"))
        .map(str::to_owned);
    Some((m.attr("id").unwrap_or("").to_owned(), origin, relay_sid))
}

/// Alice sends three messages while bob's phone is online, three while
/// he is offline; he logs in again (getting replays or the server's
/// offline copies) and his client then catches up from the archive. Every
/// copy he gets carries an origin-id equal to its id; de-duplicated by
/// it, he sees each message exactly once.
async fn scenario(kind: Kind, offline_storage: bool, answers: bool) {
    let server = Server::start(
        kind,
        ServerOpts {
            offline_storage,
            mam: true,
            ..Default::default()
        },
    );
    let relay = Relay::start(&server, RelayOpts::default());
    let opts = ClientOpts {
        receipts: answers,
        ..Default::default()
    };
    let alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    let mut bob = Client::connect(server.c2s_port, "bob", opts.clone()).await;
    let live = ids("live", 3);
    for id in &live {
        alice.message(BOB, id, &format!("body of {id}"));
    }
    let mut copies: Vec<(String, Option<String>, Option<String>)> = Vec::new();
    for _ in 0..3 {
        if let Some(m) = bob.next_body_message(SECS(10)).await {
            copies.extend(ids_of(&m));
        }
    }
    // Past the wait for a receipt or an error.
    tokio::time::sleep(SECS(3)).await;
    bob.close().await;
    let later = ids("later", 3);
    for id in &later {
        alice.message(BOB, id, &format!("body of {id}"));
    }
    tokio::time::sleep(SECS(3)).await;
    let mut bob = Client::connect(server.c2s_port, "bob", opts).await;
    let shown_live = bob.drain(SECS(6)).await;
    copies.extend(shown_live.iter().filter_map(ids_of));
    let (archived, other) = bob.archive().await;
    copies.extend(other.iter().filter_map(ids_of));
    let archived: Vec<_> = archived.iter().filter_map(ids_of).collect();
    let mut all = copies.clone();
    all.extend(archived.iter().cloned());

    let mut by_origin: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_relay_sid: BTreeMap<String, String> = BTreeMap::new();
    for (id, origin, sid) in &all {
        assert_eq!(
            origin.as_deref(),
            Some(id.as_str()),
            "origin-id = id: {all:?}"
        );
        *by_origin.entry(id.clone()).or_default() += 1;
        let sid = sid
            .clone()
            .unwrap_or_else(|| panic!("{id}: no stanza-id by the relay"));
        let first = by_relay_sid.entry(sid).or_insert_with(|| id.clone());
        assert_eq!(
            first, id,
            "one relay stanza-id per message, the same in every copy"
        );
    }
    assert_eq!(by_relay_sid.len(), by_origin.len());
    let mut expected: Vec<String> = live.iter().chain(&later).cloned().collect();
    expected.sort();
    let seen: Vec<String> = by_origin.keys().cloned().collect();
    // Shown live once each; each in the archive (which holds one copy per
    // send: a replay is archived again).
    let mut live_ids: Vec<String> = copies.iter().map(|c| c.0.clone()).collect();
    live_ids.sort();
    assert_eq!(
        live_ids, expected,
        "each shown live exactly once: {copies:?}"
    );
    let mut archived_ids: Vec<String> = archived.iter().map(|c| c.0.clone()).collect();
    archived_ids.sort();
    archived_ids.dedup();
    assert_eq!(archived_ids, expected, "each in the archive: {archived:?}");
    println!(
        "{kind:?} archive on, offline storage {}, client {}: sent 6, shown live {}, in the archive {}, \
         a client that de-duplicates nothing shows {}, one that de-duplicates by origin-id {}",
        if offline_storage { "on" } else { "off" },
        if answers { "answers" } else { "never answers" },
        copies.len(),
        archived.len(),
        all.len(),
        seen.len()
    );
    assert_eq!(seen, expected, "every message, once by origin-id: {all:?}");
    assert!(
        !relay.log_text().contains("panicked"),
        "{}",
        relay.log_text()
    );
}

async fn archives_with_offline_storage_off(kind: Kind) {
    scenario(kind, false, true).await;
    scenario(kind, false, false).await;
}

async fn archives_with_offline_storage_on(kind: Kind) {
    scenario(kind, true, true).await;
    scenario(kind, true, false).await;
}

on_both_servers!(
    archives_with_offline_storage_off,
    archives_with_offline_storage_on
);
