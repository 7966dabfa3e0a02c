//! The Prometheus endpoint (`[metrics] listen`), scraped over HTTP as
//! Prometheus does and parsed by a Prometheus text-format parser, after
//! known traffic through a real server.

#[macro_use]
mod common;

use std::time::Duration;

use common::*;
use prometheus_parse::{Scrape, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BOB: &str = "bob@relay.localhost";
const CAROL: &str = "carol@relay.localhost";
const DAVE: &str = "dave@relay.localhost";

/// One scrape of `port`: the HTTP status line, the Content-Type and the
/// parsed body.
async fn scrape(port: u16) -> (String, String, Scrape) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the metrics listener");
    // HTTP/1.0: the body ends with the connection, never chunked.
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(SECS(10), s.read_to_end(&mut raw))
        .await
        .expect("the scrape answers within 10 s")
        .unwrap();
    let text = String::from_utf8(raw).expect("UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("headers end");
    let status = head.lines().next().unwrap_or_default().to_owned();
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let parsed = Scrape::parse(lines).expect("Prometheus text format");
    (status, content_type, parsed)
}

/// The value of the sample `name` with exactly these labels (among
/// others it may have none), if the scrape has it.
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .find_map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(*v),
            _ => None,
        })
}

/// Confirmed messages, whichever way.
fn confirmed_total(s: &Scrape) -> f64 {
    ["receipt", "marker", "no_receipt"]
        .iter()
        .filter_map(|how| value(s, "redeliver_messages_confirmed_total", &[("how", how)]))
        .sum()
}

/// The number of observations of the histogram `name`.
fn observations(s: &Scrape, name: &str) -> Option<u64> {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .find_map(|x| match &x.value {
            Value::Histogram(buckets) => buckets
                .iter()
                .find(|b| b.less_than == f64::INFINITY)
                .map(|b| b.count as u64),
            _ => None,
        })
        .or_else(|| value(s, &format!("{name}_count"), &[]).map(|v| v as u64))
}

/// Scrape until `ok` holds (gauges are read every few seconds), at most
/// 30 s; the last scrape either way.
async fn scrape_until(port: u16, ok: impl Fn(&Scrape) -> bool) -> Scrape {
    let end = tokio::time::Instant::now() + SECS(30);
    loop {
        let (_, _, s) = scrape(port).await;
        if ok(&s) || tokio::time::Instant::now() >= end {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Known traffic, then a scrape: messages accepted, confirmed by receipt
/// and by marker, refused, pending for an offline recipient, the link up,
/// and latencies observed once per confirmed message.
async fn a_scrape_says_what_the_relay_did(kind: Kind) {
    let server = Server::start(kind, ServerOpts::default());
    let port = free_port();
    let relay = Relay::start(
        &server,
        RelayOpts {
            metrics_port: Some(port),
            ..Default::default()
        },
    );
    let (status, content_type, s) = scrape(port).await;
    assert!(status.contains(" 200"), "{status}");
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    // Every counter is there from the start, at zero.
    assert_eq!(
        value(&s, "redeliver_messages_accepted_total", &[]),
        Some(0.0)
    );
    for how in ["receipt", "marker", "no_receipt"] {
        assert_eq!(
            value(&s, "redeliver_messages_confirmed_total", &[("how", how)]),
            Some(0.0),
            "{how}"
        );
    }
    for name in [
        "redeliver_messages_accepted_total",
        "redeliver_messages_confirmed_total",
        "redeliver_link_up",
    ] {
        assert!(s.docs.contains_key(name), "no HELP for {name}");
    }
    // So are the ones an alert fires on at their first increase.
    assert_eq!(value(&s, "redeliver_store_failures_total", &[]), Some(0.0));
    assert_eq!(
        value(
            &s,
            "redeliver_messages_refused_total",
            &[("condition", "resource-constraint")]
        ),
        Some(0.0)
    );
    let s = scrape_until(port, |s| value(s, "redeliver_link_up", &[]) == Some(1.0)).await;
    assert_eq!(value(&s, "redeliver_link_up", &[]), Some(1.0));
    assert_eq!(value(&s, "redeliver_leader", &[]), Some(1.0));

    // Three messages to bob, confirmed by his client's receipts.
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    let mut alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    let sent = ids("m", 3);
    for id in &sent {
        alice.message(BOB, id, "hello");
    }
    assert_eq!(bob.body_ids(3, SECS(10)).await, sent);
    assert_eq!(alice.receipt_ids(3, SECS(10)).await, sent);

    // One to carol, whose client sends markers and no receipts.
    let mut carol = Client::connect(
        server.c2s_port,
        "carol",
        ClientOpts {
            receipts: false,
            ..Default::default()
        },
    )
    .await;
    alice.message(CAROL, "c1", "read me");
    assert_eq!(carol.body_ids(1, SECS(10)).await, ["c1"]);
    carol.send(xml(
        "<message xmlns='jabber:client' to='alice@relay.localhost' id='mk1'>\
         <displayed xmlns='urn:xmpp:chat-markers:0' id='c1'/></message>",
    ));
    wait_log_line(&relay, &[" confirmed", "id=c1 "]).await;
    // Another to carol: her client is not known to answer receipts, so
    // with no error back it counts delivered without one; her marker
    // later settles it, and it is still one confirmed message.
    alice.message(CAROL, "c2", "read me too");
    assert_eq!(carol.body_ids(1, SECS(10)).await, ["c2"]);
    wait_log_line(&relay, &["counted delivered", "id=c2 "]).await;
    carol.send(xml(
        "<message xmlns='jabber:client' to='alice@relay.localhost' id='mk2'>\
         <displayed xmlns='urn:xmpp:chat-markers:0' id='c2'/></message>",
    ));
    wait_log_line(&relay, &["had been counted delivered", "id=c2 "]).await;

    // Two to dave, who never logs in: they stay pending.
    alice.message(DAVE, "d1", "later");
    alice.message(DAVE, "d2", "later still");
    wait_stored(&relay, &["d1", "d2"]).await;

    // One too large: refused with policy-violation.
    alice.message(BOB, "big", &"x".repeat(9000));
    assert_eq!(
        alice.next_error(SECS(10)).await,
        Some(("big".to_owned(), "policy-violation".to_owned()))
    );

    let s = scrape_until(port, |s| {
        value(s, "redeliver_pending_messages", &[]) == Some(2.0)
    })
    .await;
    assert_eq!(
        value(&s, "redeliver_messages_accepted_total", &[]),
        Some(7.0)
    );
    assert_eq!(
        value(
            &s,
            "redeliver_messages_confirmed_total",
            &[("how", "receipt")]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            &s,
            "redeliver_messages_confirmed_total",
            &[("how", "marker")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &s,
            "redeliver_messages_confirmed_total",
            &[("how", "no_receipt")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &s,
            "redeliver_messages_refused_total",
            &[("condition", "policy-violation")]
        ),
        Some(1.0)
    );
    assert_eq!(value(&s, "redeliver_pending_messages", &[]), Some(2.0));
    assert_eq!(value(&s, "redeliver_pending_recipients", &[]), Some(1.0));
    assert!(value(&s, "redeliver_pending_bytes", &[]).is_some_and(|b| b > 0.0));
    assert_eq!(
        observations(&s, "redeliver_accept_to_confirm_seconds"),
        Some(5),
        "one observation per confirmed message"
    );

    // dave logs in and gets his two; each of the seven messages was sent
    // for the first time exactly once, whatever was sent again.
    let mut dave = Client::connect(server.c2s_port, "dave", ClientOpts::default()).await;
    assert_eq!(dave.body_ids(2, SECS(20)).await, ["d1", "d2"]);
    let s = scrape_until(port, |s| {
        value(s, "redeliver_pending_messages", &[]) == Some(0.0)
    })
    .await;
    assert_eq!(value(&s, "redeliver_pending_messages", &[]), Some(0.0));
    let confirmed = confirmed_total(&s);
    assert_eq!(confirmed, 7.0, "each accepted message confirmed once");
    assert_eq!(
        value(&s, "redeliver_messages_relayed_total", &[]),
        Some(7.0)
    );
    assert_eq!(
        observations(&s, "redeliver_accept_to_relay_seconds"),
        Some(7)
    );
    assert_eq!(
        observations(&s, "redeliver_accept_to_confirm_seconds"),
        Some(7)
    );

    // A late bounce puts a message counted delivered back in its queue:
    // it goes again (a replay, not a first send), and counts once more
    // when its marker takes it out; confirmed less late bounces stays
    // within accepted.
    alice.message(CAROL, "c3", "bounced late");
    assert_eq!(carol.body_ids(1, SECS(10)).await, ["c3"]);
    wait_log_line(&relay, &["counted delivered", "id=c3 "]).await;
    carol.send(xml(
        "<message xmlns='jabber:client' type='error' to='alice@relay.localhost' id='c3'>\
         <error type='wait'><recipient-unavailable \
         xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>",
    ));
    assert_eq!(carol.body_ids(1, SECS(10)).await, ["c3"], "sent again");
    carol.send(xml(
        "<message xmlns='jabber:client' to='alice@relay.localhost' id='mk3'>\
         <displayed xmlns='urn:xmpp:chat-markers:0' id='c3'/></message>",
    ));
    let s = scrape_until(port, |s| {
        value(
            s,
            "redeliver_messages_confirmed_total",
            &[("how", "marker")],
        ) == Some(2.0)
    })
    .await;
    assert_eq!(value(&s, "redeliver_late_bounces_total", &[]), Some(1.0));
    assert_eq!(
        value(&s, "redeliver_messages_accepted_total", &[]),
        Some(8.0)
    );
    assert_eq!(
        value(&s, "redeliver_messages_relayed_total", &[]),
        Some(8.0),
        "the resend is no first send"
    );
    assert!(value(&s, "redeliver_messages_replayed_total", &[]).is_some_and(|v| v >= 1.0));
    let confirmed = confirmed_total(&s);
    assert_eq!(confirmed, 9.0, "8 accepted, one of them put back once");
    assert_eq!(
        observations(&s, "redeliver_accept_to_confirm_seconds"),
        Some(9)
    );
    drop(relay);
}

on_both_servers!(a_scrape_says_what_the_relay_did);

/// Every metric the shipped Grafana dashboard queries is one redeliver
/// exports (src/prometheus.rs names them all).
#[test]
fn the_dashboard_queries_only_exported_metrics() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let names = std::fs::read_to_string(root.join("src/prometheus.rs")).unwrap();
    let exported: Vec<&str> = names
        .split('"')
        .filter(|s| s.starts_with("redeliver_"))
        .collect();
    assert!(exported.len() >= 20, "{exported:?}");
    let text =
        std::fs::read_to_string(root.join("component-config/grafana-dashboard.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut queried = 0;
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if !word.starts_with("redeliver_") {
                    continue;
                }
                let base = word.strip_suffix("_bucket").unwrap_or(word);
                assert!(
                    exported.contains(&base),
                    "panel {:?} queries {word}, which redeliver does not export",
                    panel["title"]
                );
                queried += 1;
            }
        }
    }
    assert!(queried >= 20, "{queried}");
    // Only a panel where 1 means healthy turns red below 1.
    for panel in dash["panels"].as_array().unwrap() {
        let steps = &panel["fieldConfig"]["defaults"]["thresholds"]["steps"];
        let red_base = steps[0]["color"] == "red";
        let title = panel["title"].as_str().unwrap_or_default();
        assert_eq!(
            red_base,
            ["Link up", "Leader"].contains(&title),
            "thresholds of {title:?}: {steps}"
        );
    }
    // The four names the operators' alerts are built on.
    for name in [
        "redeliver_messages_accepted_total",
        "redeliver_messages_confirmed_total",
        "redeliver_pending_messages",
        "redeliver_link_up",
    ] {
        assert!(text.contains(name), "the dashboard shows {name}");
    }
}
