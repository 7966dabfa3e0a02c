//! The XEP-0050 admin commands end to end: a real server (Prosody and
//! ejabberd), the real binary, and a c2s client that runs the commands as an operator would.

#[macro_use]
mod common;

use std::collections::HashMap;

use common::operator::*;
use common::*;
use tokio_xmpp::minidom::Element;

const STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
const BOB: &str = "bob@relay.localhost";
const DAVE: &str = "dave@relay.localhost";
const CAROL: &str = "carol@relay.localhost";

/// The rows of the form's `<item/>` table.
fn rows(cmd: &Element) -> Vec<HashMap<String, String>> {
    let x = cmd.get_child("x", DATA).expect("form");
    assert!(x.get_child("reported", DATA).is_some(), "a reported header");
    x.children()
        .filter(|c| c.name() == "item")
        .map(|item| {
            item.children()
                .map(|f| {
                    (
                        f.attr("var").unwrap_or("").to_owned(),
                        f.get_child("value", DATA)
                            .map(|v| v.text())
                            .unwrap_or_default(),
                    )
                })
                .collect()
        })
        .collect()
}

fn column(rows: &[HashMap<String, String>], var: &str) -> Vec<String> {
    rows.iter().map(|r| r[var].clone()).collect()
}

/// (defined condition, XEP-0050 condition) of an iq error.
fn error_of(iq: &Element) -> (String, Option<String>) {
    assert_eq!(iq.attr("type"), Some("error"), "{iq:?}");
    let e = iq
        .get_child("error", "jabber:client")
        .expect("error element");
    let cond = e
        .children()
        .find(|c| c.ns() == STANZAS && c.name() != "text")
        .map(|c| c.name().to_owned())
        .unwrap_or_default();
    let app = e
        .children()
        .find(|c| c.ns() == COMMANDS)
        .map(|c| c.name().to_owned());
    (cond, app)
}

const ALL: [&str; 7] = [
    "stats",
    "list-queue",
    "top-queues",
    "replay",
    "purge",
    "status",
    "reload-config",
];

async fn start(kind: Kind) -> (Server, Relay) {
    let server = Server::start(kind, ServerOpts::default());
    let relay = Relay::start(&server, RelayOpts::default());
    (server, relay)
}

/// 5 pending for bob, 3 for dave (both offline, server storage off):
/// every command, with the fields and values it promises.
async fn admin_runs_every_command_on_a_known_queue(kind: Kind) {
    let (server, relay) = start(kind).await;
    send_all(&server, BOB, &ids("b", 5)).await;
    send_all(&server, DAVE, &ids("d", 3)).await;
    let mut op = Operator::connect(&server, "admin").await;

    // Discovery.
    let info = op.disco("info", None).await;
    let q = info.children().next().expect("query");
    let features: Vec<_> = q
        .children()
        .filter(|c| c.name() == "feature")
        .filter_map(|c| c.attr("var"))
        .collect();
    for f in [COMMANDS, "urn:xmpp:receipts", "urn:xmpp:ping"] {
        assert!(features.contains(&f), "{f} in {features:?}");
    }
    let identity = q.children().find(|c| c.name() == "identity").unwrap();
    assert_eq!(identity.attr("category"), Some("component"));
    assert_eq!(identity.attr("name"), Some("redeliver"));
    let items = op.disco("items", Some(COMMANDS)).await;
    let nodes: Vec<_> = items
        .children()
        .next()
        .unwrap()
        .children()
        .map(|i| {
            assert_eq!(i.attr("jid"), Some(COMPONENT));
            i.attr("node").unwrap().to_owned()
        })
        .collect();
    assert_eq!(nodes, ALL);
    let node_info = op.disco("info", Some("purge")).await;
    let q = node_info.children().next().expect("query");
    let identity = q.children().find(|c| c.name() == "identity").unwrap();
    assert_eq!(identity.attr("category"), Some("automation"));
    assert_eq!(identity.attr("type"), Some("command-node"));

    // stats
    let stats = op.run("stats", &[]).await;
    assert_eq!(number(&stats, "pending-messages"), 8);
    assert_eq!(number(&stats, "pending-recipients"), 2);
    let pending_bytes = number(&stats, "pending-bytes");
    assert!(pending_bytes > 8 * 50, "{pending_bytes}");
    assert!(number(&stats, "oldest-pending-age-seconds") < 60);
    assert_eq!(number(&stats, "confirmed-total"), 0);
    number(&stats, "replays-total");
    number(&stats, "bounces-total");
    number(&stats, "uptime-seconds");
    assert!(number(&stats, "store-bytes") > 0);

    // list-queue, the interactive way: form first, then submit.
    let iq = op.command("list-queue", None, "execute", &[]).await;
    let c = command(&iq);
    assert_eq!(c.attr("status"), Some("executing"));
    let sid = c.attr("sessionid").expect("sessionid").to_owned();
    let form = c.get_child("x", DATA).unwrap();
    assert_eq!(form.attr("type"), Some("form"));
    assert!(
        form.children()
            .any(|f| f.attr("var") == Some("jid") && f.has_child("required", DATA))
    );
    let iq = op
        .command(
            "list-queue",
            Some(&sid),
            "complete",
            &[("jid", "bob@localhost")],
        )
        .await;
    let c = command(&iq);
    assert_eq!(c.attr("status"), Some("completed"));
    assert_eq!(number(c, "pending"), 5);
    let r = rows(c);
    assert_eq!(column(&r, "id"), ids("b", 5));
    assert!(r.iter().all(|r| r["from"] == "alice@localhost/test"));
    assert_eq!(r[0]["preview"], "body of b1");
    assert!(
        r.iter()
            .all(|r| r["age-seconds"].parse::<u64>().unwrap() < 60)
    );
    // Bob's presence is unknown: one message at a time, so the head has
    // been tried (and bounced), the rest wait behind it.
    assert!(r[0]["attempts"].parse::<u64>().unwrap() >= 1);
    assert!(r.iter().all(|r| r["attempts"].parse::<u64>().is_ok()));
    let seqs: Vec<u64> = column(&r, "seq")
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    assert_eq!(value(c, "next-after"), None, "one page holds it all");

    // Paged, two at a time; the relay address names the same queue.
    let mut seen = Vec::new();
    let mut after = String::new();
    for page in 0.. {
        let mut fields = vec![("jid", BOB), ("max", "2")];
        if !after.is_empty() {
            fields.push(("after", &after));
        }
        let c = op.run("list-queue", &fields).await;
        seen.extend(column(&rows(&c), "id"));
        match value(&c, "next-after") {
            Some(a) => after = a,
            None => {
                assert_eq!(page, 2, "three pages");
                break;
            }
        }
    }
    assert_eq!(seen, ids("b", 5));

    // top-queues (its only field is optional, but the form comes first)
    let iq = op.command("top-queues", None, "execute", &[]).await;
    let sid = command(&iq).attr("sessionid").unwrap().to_owned();
    let iq = op
        .command("top-queues", Some(&sid), "complete", &[("max", "")])
        .await;
    let c = command(&iq).clone();
    assert_eq!(c.attr("status"), Some("completed"));
    let r = rows(&c);
    assert_eq!(column(&r, "jid"), ["bob@localhost", "dave@localhost"]);
    assert_eq!(column(&r, "count"), ["5", "3"]);
    let bytes: u64 = column(&r, "bytes")
        .iter()
        .map(|b| b.parse::<u64>().unwrap())
        .sum();
    assert_eq!(bytes, pending_bytes);
    assert!(r[0]["oldest-age-seconds"].parse::<u64>().unwrap() < 60);
    let c = op.run("top-queues", &[("max", "1")]).await;
    assert_eq!(column(&rows(&c), "jid"), ["bob@localhost"]);

    // status
    let c = op.run("status", &[]).await;
    assert_eq!(value(&c, "link").as_deref(), Some("up"));
    assert!(!value(&c, "connected-since").unwrap().is_empty());
    assert_eq!(
        value(&c, "server"),
        Some(format!("127.0.0.1:{}", server.component_port))
    );
    assert_eq!(value(&c, "durability").as_deref(), Some("fsync"));
    assert_eq!(
        value(&c, "version").as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        value(&c, "config-path"),
        Some(relay.config.display().to_string())
    );

    // replay and purge here only prove they answer; what they change is
    // the next test's subject.
    let c = op.run("replay", &[("jid", "dave@localhost")]).await;
    assert_eq!(number(&c, "pending"), 3);
    let iq = op
        .command("purge", None, "execute", &[("jid", "dave@localhost")])
        .await;
    assert_eq!(number(command(&iq), "would-purge"), 3);
    let c = op.run("reload-config", &[]).await;
    assert_eq!(value(&c, "applied").as_deref(), Some("true"));
}

/// Anyone not in `[admin] jids` sees no commands and may run none, and
/// the queue is untouched.
async fn non_admin_is_forbidden_and_changes_nothing(kind: Kind) {
    let (server, _relay) = start(kind).await;
    send_all(&server, BOB, &ids("b", 5)).await;
    let mut carol = Operator::connect(&server, "carol").await;
    let items = carol.disco("items", Some(COMMANDS)).await;
    assert_eq!(items.children().next().unwrap().children().count(), 0);
    for node in ALL {
        let iq = carol.command(node, None, "execute", &[]).await;
        assert_eq!(error_of(&iq).0, "forbidden", "{node}");
        let iq = carol
            .command(node, None, "execute", &[("jid", "bob@localhost")])
            .await;
        assert_eq!(error_of(&iq).0, "forbidden", "{node}");
        let e = iq.get_child("error", "jabber:client").unwrap();
        assert_eq!(e.attr("type"), Some("auth"));
    }
    // Bob still gets all five: carol's purge and replay did nothing.
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    expect_exactly(&mut bob, &ids("b", 5)).await;
    let mut op = Operator::connect(&server, "admin").await;
    let stats = op.run("stats", &[]).await;
    assert_eq!(number(&stats, "pending-messages"), 0);
    assert_eq!(number(&stats, "confirmed-total"), 5);
    assert_eq!(number(&stats, "purged-total"), 0);
}

/// replay sends a queue the relay was holding back; purge removes one so
/// that the recipient never gets it.
async fn purge_and_replay_change_what_recipients_receive(kind: Kind) {
    let (server, relay) = start(kind).await;
    // Bob's client answered receipts once, then shows the messages but
    // sends no receipts: after the receipt timeout the relay holds his
    // queue until a sign of life.
    answers_once(&server, &relay, "bob", "test").await;
    let mut bob = Client::connect(
        server.c2s_port,
        "bob",
        ClientOpts {
            receipts: false,
            ..Default::default()
        },
    )
    .await;
    let sent = ids("b", 5);
    send_all(&server, BOB, &sent).await;
    assert_eq!(bob.body_ids(5, SECS(10)).await, sent);
    wait_log(&relay, "receipt timeout").await;
    assert!(bob.body_ids(1, SECS(2)).await.is_empty(), "held back");

    let mut op = Operator::connect(&server, "admin").await;
    let c = op.run("replay", &[("jid", "bob@localhost")]).await;
    assert_eq!(number(&c, "replayed"), 5);
    assert_eq!(number(&c, "pending"), 5);
    let mut again = Vec::new();
    for _ in 0..5 {
        let m = bob.next_body_message(SECS(10)).await.expect("replayed");
        assert!(m.has_child("delay", "urn:xmpp:delay"), "marked as a replay");
        again.push(m.attr("id").unwrap().to_owned());
    }
    assert_eq!(again, sent);
    // Bob leaves before his client's second silent spell ends: a client
    // silent twice in a row is no longer waited for (architecture.md), and
    // his queue is to stay as it is for the purge below.
    bob.close().await;

    // Dave is offline with three pending; purge them, interactively.
    send_all(&server, DAVE, &ids("d", 3)).await;
    let iq = op.command("purge", None, "execute", &[]).await;
    let c = command(&iq);
    assert_eq!(c.attr("status"), Some("executing"));
    let sid = c.attr("sessionid").unwrap().to_owned();
    let iq = op
        .command(
            "purge",
            Some(&sid),
            "next",
            &[("jid", "dave@localhost"), ("older-than-seconds", "")],
        )
        .await;
    let c = command(&iq);
    assert_eq!(number(c, "would-purge"), 3);
    let actions = c.get_child("actions", COMMANDS).unwrap();
    assert!(actions.has_child("complete", COMMANDS) && actions.has_child("prev", COMMANDS));
    let iq = op.command("purge", Some(&sid), "complete", &[]).await;
    let c = command(&iq);
    assert_eq!(c.attr("status"), Some("completed"));
    assert_eq!(number(c, "purged"), 3);
    let c = op.run("list-queue", &[("jid", "dave@localhost")]).await;
    assert_eq!(number(&c, "pending"), 0);
    assert!(rows(&c).is_empty());
    let stats = op.run("stats", &[]).await;
    assert_eq!(number(&stats, "pending-messages"), 5, "bob's five are left");
    assert_eq!(number(&stats, "purged-total"), 3);

    let mut dave = Client::connect(server.c2s_port, "dave", ClientOpts::default()).await;
    assert!(
        dave.body_ids(1, SECS(3)).await.is_empty(),
        "purged messages never arrive"
    );

    // A scope that takes nothing, then cancelled.
    let iq = op
        .command(
            "purge",
            None,
            "execute",
            &[("jid", "bob@localhost"), ("older-than-seconds", "3600")],
        )
        .await;
    let c = command(&iq);
    assert_eq!(number(c, "would-purge"), 0);
    let sid = c.attr("sessionid").unwrap().to_owned();
    let iq = op.command("purge", Some(&sid), "cancel", &[]).await;
    assert_eq!(command(&iq).attr("status"), Some("canceled"));
    let stats = op.run("stats", &[]).await;
    assert_eq!(number(&stats, "pending-messages"), 5);
}

/// reload-config applies a new limit that the next message meets, and
/// refuses (applying nothing) a file that changes what needs a restart or
/// does not parse.
async fn reload_config_applies_limits_and_refuses_the_rest(kind: Kind) {
    let (server, relay) = start(kind).await;
    let mut op = Operator::connect(&server, "admin").await;
    let c = op.run("reload-config", &[]).await;
    assert_eq!(value(&c, "applied").as_deref(), Some("true"));
    assert!(
        c.get_child("note", COMMANDS)
            .unwrap()
            .text()
            .contains("nothing changed")
    );

    let original = std::fs::read_to_string(&relay.config).unwrap();
    let limited = original.replace(
        "max_pending_per_recipient = 10000",
        "max_pending_per_recipient = 2",
    );
    assert_ne!(limited, original);
    std::fs::write(&relay.config, &limited).unwrap();
    let c = op.run("reload-config", &[]).await;
    assert_eq!(value(&c, "applied").as_deref(), Some("true"));
    let changes: Vec<String> = c
        .get_child("x", DATA)
        .unwrap()
        .children()
        .find(|f| f.attr("var") == Some("changes"))
        .unwrap()
        .children()
        .map(|v| v.text())
        .collect();
    assert_eq!(changes, ["limits.max_pending_per_recipient: 10000 -> 2"]);

    // Carol is offline: two fit, the third is refused.
    let mut alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    for id in ["c1", "c2", "c3"] {
        alice.message(CAROL, id, "hello");
    }
    let (id, cond) = alice.next_error(SECS(10)).await.expect("a refusal");
    assert_eq!((id.as_str(), cond.as_str()), ("c3", "resource-constraint"));

    // A new domain needs a restart: refused, nothing applied.
    let moved = limited
        .replace(
            "domain = \"relay.localhost\"",
            "domain = \"moved.localhost\"",
        )
        .replace(
            "max_pending_per_recipient = 2",
            "max_pending_per_recipient = 50",
        );
    assert_ne!(moved, limited);
    std::fs::write(&relay.config, &moved).unwrap();
    let c = op.run("reload-config", &[]).await;
    assert_eq!(value(&c, "applied").as_deref(), Some("false"));
    let note = c.get_child("note", COMMANDS).unwrap();
    assert_eq!(note.attr("type"), Some("error"));
    assert!(note.text().contains("component.domain"), "{}", note.text());
    alice.message(CAROL, "c4", "hello");
    let (id, cond) = alice.next_error(SECS(10)).await.expect("still limited");
    assert_eq!((id.as_str(), cond.as_str()), ("c4", "resource-constraint"));

    // A file that does not parse.
    std::fs::write(&relay.config, "[component\n").unwrap();
    let c = op.run("reload-config", &[]).await;
    assert_eq!(value(&c, "applied").as_deref(), Some("false"));
    assert_eq!(
        c.get_child("note", COMMANDS).unwrap().attr("type"),
        Some("error")
    );
    assert!(relay.log_text().contains("configuration reloaded"));
}

/// Sessions end by cancel or time out; malformed requests get the
/// XEP-0050 error conditions.
async fn sessions_cancel_time_out_and_malformed_requests(kind: Kind) {
    let server = Server::start(kind, ServerOpts::default());
    let _relay = Relay::start(
        &server,
        RelayOpts {
            session_timeout_s: 1,
            ..Default::default()
        },
    );
    let mut op = Operator::connect(&server, "admin").await;

    let iq = op.command("list-queue", None, "execute", &[]).await;
    let sid = command(&iq).attr("sessionid").unwrap().to_owned();
    let iq = op.command("list-queue", Some(&sid), "cancel", &[]).await;
    assert_eq!(command(&iq).attr("status"), Some("canceled"));
    let iq = op
        .command(
            "list-queue",
            Some(&sid),
            "complete",
            &[("jid", "bob@localhost")],
        )
        .await;
    assert_eq!(
        error_of(&iq),
        ("bad-request".into(), Some("bad-sessionid".into()))
    );

    let iq = op.command("replay", None, "execute", &[]).await;
    let sid = command(&iq).attr("sessionid").unwrap().to_owned();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let iq = op
        .command(
            "replay",
            Some(&sid),
            "complete",
            &[("jid", "bob@localhost")],
        )
        .await;
    assert_eq!(
        error_of(&iq),
        ("not-allowed".into(), Some("session-expired".into()))
    );

    let iq = op
        .command("list-queue", None, "execute", &[("jid", "not a jid@@")])
        .await;
    assert_eq!(
        error_of(&iq),
        ("bad-request".into(), Some("bad-payload".into()))
    );
    let iq = op.command("stats", None, "jump", &[]).await;
    assert_eq!(
        error_of(&iq),
        ("bad-request".into(), Some("malformed-action".into()))
    );
    let iq = op.command("reboot", None, "execute", &[]).await;
    assert_eq!(error_of(&iq).0, "item-not-found");
    // The relay still answers after all of that.
    op.run("stats", &[]).await;
}

on_both_servers!(
    admin_runs_every_command_on_a_known_queue,
    non_admin_is_forbidden_and_changes_nothing,
    purge_and_replay_change_what_recipients_receive,
    reload_config_applies_limits_and_refuses_the_rest,
    sessions_cancel_time_out_and_malformed_requests,
);
