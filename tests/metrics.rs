//! The Prometheus endpoint (`[metrics] listen`), scraped over HTTP as
//! Prometheus does and parsed by a Prometheus text-format parser, after
//! known traffic through a real server.

#[macro_use]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use prometheus_parse::{Scrape, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
    let relay = Relay::start(
        &server,
        RelayOpts {
            metrics: true,
            ..Default::default()
        },
    );
    let port = relay.metrics_port.unwrap();
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

/// The relay's file descriptor limit in the flood test: the flood is
/// more connections than that, as in the issue (371 against 256).
const NOFILE: u64 = 128;
/// Connections the flood keeps open, each with an unfinished GET.
const FLOOD: usize = 200;

/// An attacker on the metrics port: `n` connections, each sending a
/// request line and one header and never the blank line that ends the
/// headers; each opened again half a second after the server closes it.
struct Flood {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Connections the server answered with a 503.
    refused: Arc<AtomicU64>,
}

impl Flood {
    fn start(port: u16, n: usize) -> Flood {
        let refused = Arc::new(AtomicU64::new(0));
        let tasks = (0..n)
            .map(|_| {
                let refused = refused.clone();
                tokio::spawn(async move {
                    loop {
                        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await {
                            let _ = s
                                .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                                .await;
                            let mut got = Vec::new();
                            let _ = s.read_to_end(&mut got).await;
                            if got.starts_with(b"HTTP/1.1 503") {
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                })
            })
            .collect();
        Flood { tasks, refused }
    }

    /// The attacker lets go: every connection closed.
    async fn stop(self) -> u64 {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        self.refused.load(Ordering::Relaxed)
    }
}

/// A client that sends its headers a line a second and never ends them:
/// how long the server keeps it (None: still open after 15 s).
async fn slow_headers(port: u16) -> Option<Duration> {
    let start = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\n").await.ok()?;
    let mut buf = [0u8; 512];
    for n in 0..15 {
        tokio::select! {
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => return Some(start.elapsed()),
                // Whatever it says (a 408), it must also close.
                Ok(_) => {}
            },
            _ = tokio::time::sleep(SECS(1)) => {
                let line = format!("X-Slow-{n}: {n}\r\n");
                if s.write_all(line.as_bytes()).await.is_err() {
                    return Some(start.elapsed());
                }
            }
        }
    }
    None
}

/// One whole request to `port`: what came back before the server closed
/// the connection, or None if it did not close it within `wait`.
async fn request(port: u16, wait: Duration) -> Option<String> {
    tokio::time::timeout(wait, async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .ok()?;
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got).await;
        Some(String::from_utf8_lossy(&got).into_owned())
    })
    .await
    .ok()
    .flatten()
}

/// The lines a log file gains from an offset on, read as they come (a
/// flooded log can reach gigabytes: it is read once, never again).
struct Tail {
    file: std::fs::File,
    rest: Vec<u8>,
}

impl Tail {
    fn at_end(path: &std::path::Path) -> Tail {
        use std::io::Seek;
        let mut file = std::fs::File::open(path).unwrap();
        file.seek(std::io::SeekFrom::End(0)).unwrap();
        Tail {
            file,
            rest: Vec::new(),
        }
    }

    /// The whole lines written since the last call.
    fn lines(&mut self) -> Vec<String> {
        use std::io::Read;
        let _ = self.file.read_to_end(&mut self.rest);
        let end = self
            .rest
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let whole: Vec<u8> = self.rest.drain(..end).collect();
        String::from_utf8_lossy(&whole)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Whether a line with `needle` comes within `wait`; the lines read
    /// on the way go to `seen`.
    async fn wait_for(&mut self, needle: &str, wait: Duration, seen: &mut Vec<String>) -> bool {
        let end = Instant::now() + wait;
        loop {
            let lines = self.lines();
            let found = lines.iter().any(|l| l.contains(needle));
            seen.extend(lines);
            if found {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// CPU time the process `pid` has used so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which ends with the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

/// What the metrics port receives leaves the relay what it needs: with
/// a tight file descriptor limit and a flood of connections that never
/// finish their headers, a slow client is closed within seconds, a
/// request past the cap is refused at once (503), the server's restart
/// is followed by a reconnect and a relayed message, the refusals are
/// logged in a few lines (not one per attempt), the flood costs little
/// CPU, and once it goes a scrape is answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_metrics_port_leaves_the_link_its_file_descriptors() {
    let mut server = Server::start(Kind::Prosody, ServerOpts::default());
    let relay = Relay::start(
        &server,
        RelayOpts {
            metrics: true,
            nofile: Some(NOFILE),
            ..Default::default()
        },
    );
    let port = relay.metrics_port.unwrap();
    let (status, _, _) = scrape(port).await;
    assert!(status.contains(" 200"), "{status}");
    let pid = relay.pid().unwrap();
    let mut problems: Vec<String> = Vec::new();
    let mut log = Tail::at_end(&relay.log);
    let mut seen = Vec::new();
    let log_before = std::fs::metadata(&relay.log).unwrap().len();
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();

    // The slow client first: it holds a slot, the flood the others.
    let slow = tokio::spawn(slow_headers(port));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let flood = Flood::start(port, FLOOD);
    tokio::time::sleep(SECS(1)).await;

    let asked = Instant::now();
    match request(port, SECS(3)).await {
        Some(r) if r.starts_with("HTTP/1.1 503") => {
            if asked.elapsed() > SECS(1) {
                problems.push(format!("the 503 took {:?}", asked.elapsed()));
            }
        }
        Some(r) => problems.push(format!("a request past the cap got {:?}", r.lines().next())),
        None => problems.push("a request past the cap: no answer within 3 s".into()),
    }

    // The server drops the link; the relay reconnects through the flood.
    let restarted = Instant::now();
    tokio::task::block_in_place(|| server.restart());
    if log.wait_for(READY, SECS(15), &mut seen).await {
        let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
        let alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
        alice.message(BOB, "f1", "through the flood");
        let got = bob.body_ids(1, SECS(10)).await;
        if got != ["f1"] {
            problems.push(format!("after the reconnect bob got {got:?}"));
        }
    } else {
        problems.push(format!(
            "no reconnect within 15 s of the server's restart ({:?} ago)",
            restarted.elapsed()
        ));
    }

    match slow.await.unwrap() {
        Some(lived) if lived <= SECS(8) => {}
        Some(lived) => problems.push(format!("the slow client was kept {lived:?}")),
        None => problems.push("the slow client still open after 15 s".into()),
    }

    let elapsed = started.elapsed().as_secs_f64();
    let cpu = (cpu_seconds(pid) - cpu_before) / elapsed;
    let grown = std::fs::metadata(&relay.log).unwrap().len() - log_before;
    seen.extend(log.lines());
    let refusal_lines = seen
        .iter()
        .filter(|l| l.contains("metrics listener refused"))
        .count();
    let emfile_lines = seen
        .iter()
        .filter(|l| l.contains("Too many open files"))
        .count();
    let refused = flood.stop().await;
    eprintln!(
        "flood of {FLOOD} at NOFILE {NOFILE} for {elapsed:.1} s: {refused} refused with 503, \
         relay CPU {:.0}% of a core, log +{grown} bytes, {refusal_lines} refusal lines, \
         {emfile_lines} 'Too many open files' lines",
        cpu * 100.0
    );
    if grown > 256 << 10 {
        problems.push(format!("the log grew by {grown} bytes during the flood"));
    }
    if cpu > 0.5 {
        problems.push(format!("the flood cost {:.0}% of a core", cpu * 100.0));
    }
    // Logged, once and then at most once per 10 s.
    let most = 2 + (elapsed / 10.0) as usize;
    if !(1..=most).contains(&refusal_lines) {
        problems.push(format!(
            "{refusal_lines} refusal lines in {elapsed:.1} s (want 1 to {most})"
        ));
    }

    // The attacker lets go: a scrape is answered at once.
    match request(port, SECS(3)).await {
        Some(r) if r.lines().next().is_some_and(|l| l.contains(" 200 ")) => {}
        other => problems.push(format!(
            "after the flood a scrape got {:?}",
            other.as_deref().map(|r| r.lines().next())
        )),
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

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
