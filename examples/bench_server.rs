//! Benchmarks 1 and 2 of issue 5, through a real server (Prosody, and
//! ejabberd if asked): redeliver's replay against the server's own
//! offline delivery, and both against the raw ceiling of the path.
//!
//! For each N (1,000 and 10,000 by default), in one run, each case on a
//! fresh throwaway server, repeated `BENCH_REPS` times:
//! - **native**: offline storage on, no redeliver. alice sends N messages
//!   (about 100 bytes of body, unique ids, receipt requests) to offline
//!   bob; "stored" is when the server answers a ping alice sent after
//!   them. Then bob logs in: "replay" is from its initial presence to
//!   the last message received.
//! - **redeliver**: offline storage off, redeliver (fsync mode) as the
//!   component. bob has approved redeliver's subscription and is offline.
//!   alice sends the same N to bob's relay address; "stored" is when
//!   redeliver answers a ping alice sent after them (redeliver handles
//!   the link's stanzas in order and answers after the burst's commit;
//!   its fsync follows within one fsync time). Then bob logs in.
//! - **ceiling**: a bare component (raw XML on a socket, nothing else)
//!   sends N messages to bob, online: from its first byte to bob's last
//!   message.
//!
//! - **transparent**: offline storage on and redeliver's server module
//!   (transparent mode): alice sends the same N to bob@localhost, the
//!   server hands them to redeliver, which replays them as alice.
//!
//! The same client code receives in all four. `bash scripts/bench`
//! runs it against the release build. Not a test.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "floor/mod.rs"]
mod floor;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_xmpp::minidom::Element;

const BODY: &str =
    "a benchmark message with about a hundred bytes of body text, to look like a short chat line";

fn message(to: &str, id: &str) -> Element {
    xml(&format!(
        "<message xmlns='{CLIENT_NS}' to='{to}' id='{id}' type='chat'><body>{BODY}</body><request xmlns='urn:xmpp:receipts'/></message>"
    ))
}

async fn ping(client: &mut Client, to: &str, id: &str) {
    let reply = client
        .iq_within(
            xml(&format!(
                "<iq xmlns='{CLIENT_NS}' type='get' to='{to}' id='{id}'><ping xmlns='urn:xmpp:ping'/></iq>"
            )),
            Duration::from_secs(300),
        )
        .await;
    assert_eq!(reply.attr("type"), Some("result"), "ping {to}: {reply:?}");
}

/// Wait until `bob` has received `n` body messages; when the last came.
async fn receive(bob: &mut Client, n: usize) -> Instant {
    let mut got = 0;
    let mut last = Instant::now();
    while got < n {
        let el = tokio::time::timeout(Duration::from_secs(120), bob.inbox.recv())
            .await
            .unwrap_or_else(|_| panic!("stalled at {got} of {n}"))
            .expect("bob's stream ended");
        if el.get_child("body", CLIENT_NS).is_some() {
            got += 1;
            last = Instant::now();
        }
    }
    last
}

/// What one case measured.
#[derive(Default)]
struct Case {
    /// Seconds until the backlog was stored (not for the ceiling).
    stored: f64,
    /// Seconds from presence (or first byte) to the last message.
    delivered: f64,
    /// CPU seconds the server used while delivering.
    server_cpu: f64,
    /// CPU seconds redeliver used while delivering.
    relay_cpu: f64,
}

fn quiet() -> ServerOpts {
    ServerOpts {
        quiet: true,
        ..Default::default()
    }
}

fn offline_bob() -> ClientOpts {
    ClientOpts {
        resource: "bench".into(),
        ..Default::default()
    }
}

/// Through the server's own offline storage.
async fn native(kind: Kind, n: usize) -> Case {
    let server = Server::start(
        kind,
        ServerOpts {
            offline_storage: true,
            quiet: true,
            ..Default::default()
        },
    );
    let mut alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    let t0 = Instant::now();
    for i in 0..n {
        alice.send(message("bob@localhost", &format!("n{i}")));
    }
    ping(&mut alice, "localhost", "after").await;
    let stored = t0.elapsed().as_secs_f64();
    let cpu0 = floor::cpu_s(server.pid());
    let mut bob = Client::connect(server.c2s_port, "bob", offline_bob()).await;
    let presence = Instant::now();
    let last = receive(&mut bob, n).await;
    let server_cpu = floor::cpu_s(server.pid()) - cpu0;
    bob.close().await;
    alice.close().await;
    Case {
        stored,
        delivered: last.duration_since(presence).as_secs_f64(),
        server_cpu,
        relay_cpu: 0.0,
    }
}

/// redeliver as the benchmarks run it: fsync mode, room for the whole
/// backlog, replay at once, a window of `window`.
fn bench_relay(server: &Server, window: usize, metrics: bool) -> Relay {
    Relay::start(
        server,
        RelayOpts {
            durability: "fsync",
            max_pending: 1_000_000,
            replay_grace_ms: 0,
            receipt_timeout_ms: 30_000,
            window,
            metrics,
            ..Default::default()
        },
    )
}

/// Through redeliver.
async fn relayed(kind: Kind, n: usize, window: usize) -> Case {
    let server = Server::start(kind, quiet());
    let relay = bench_relay(&server, window, false);
    let to = "bob@relay.localhost";
    let mut alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    // bob approves redeliver's subscription, takes one message, goes.
    let mut bob = Client::connect(server.c2s_port, "bob", offline_bob()).await;
    alice.send(message(to, "warm"));
    receive(&mut bob, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    bob.close().await;
    // Its unavailable presence reaches redeliver well within this.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    for i in 0..n {
        alice.send(message(to, &format!("r{i}")));
    }
    ping(&mut alice, "relay.localhost", "after").await;
    let stored = t0.elapsed().as_secs_f64();
    let case = bob_logs_in(&server, &relay, n, stored).await;
    alice.close().await;
    case
}

/// Transparent mode: offline storage on, redeliver's server module hands
/// the messages to redeliver (fsync mode), which replays them as alice.
/// "stored" is when the server answers alice's ping after them, as for
/// `native`: the hand-off adds no wait to her stream. bob logs in once
/// redeliver holds them all.
async fn transparent(kind: Kind, n: usize, window: usize) -> Case {
    let server = Server::start(
        kind,
        ServerOpts {
            quiet: true,
            ..ServerOpts::transparent()
        },
    );
    let relay = bench_relay(&server, window, true);
    // The benchmark logs warnings only: give the server a moment to
    // announce its grants, and count hand-offs on the metrics.
    let port = relay.metrics_port.expect("metrics on");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    let t0 = Instant::now();
    for i in 0..n {
        alice.send(message("bob@localhost", &format!("t{i}")));
    }
    ping(&mut alice, "localhost", "after").await;
    let stored = t0.elapsed().as_secs_f64();
    let end = Instant::now() + Duration::from_secs(600);
    while handoffs_taken(port).await < n as u64 {
        assert!(
            Instant::now() < end,
            "redeliver never took all {n} hand-offs"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The module removes the server's copies after the answers, in
    // batches: the replay is measured once the server is idle again.
    loop {
        let before = floor::cpu_s(server.pid());
        tokio::time::sleep(Duration::from_millis(500)).await;
        if floor::cpu_s(server.pid()) - before < 0.02 || Instant::now() > end {
            break;
        }
    }
    let case = bob_logs_in(&server, &relay, n, stored).await;
    alice.close().await;
    case
}

/// `redeliver_handoffs_total{outcome="taken"}` from the metrics on `port`.
async fn handoffs_taken(port: u16) -> u64 {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return 0;
    };
    let _ = s
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await;
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw).await;
    raw.lines()
        .find(|l| l.starts_with("redeliver_handoffs_total{outcome=\"taken\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// bob logs in and receives the `n` messages redeliver holds: how long
/// that took, and what it cost the server and redeliver.
async fn bob_logs_in(server: &Server, relay: &Relay, n: usize, stored: f64) -> Case {
    let (cpu0, rcpu0) = (floor::cpu_s(server.pid()), floor::cpu_s(relay.pid()));
    let mut bob = Client::connect(server.c2s_port, "bob", offline_bob()).await;
    let presence = Instant::now();
    let last = receive(&mut bob, n).await;
    let (server_cpu, relay_cpu) = (
        floor::cpu_s(server.pid()) - cpu0,
        floor::cpu_s(relay.pid()) - rcpu0,
    );
    bob.close().await;
    Case {
        stored,
        delivered: last.duration_since(presence).as_secs_f64(),
        server_cpu,
        relay_cpu,
    }
}

/// A bare component gets `n` messages to online bob.
async fn ceiling(kind: Kind, n: usize) -> Case {
    let server = Server::start(kind, quiet());
    let mut bob = Client::connect(server.c2s_port, "bob", offline_bob()).await;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", server.component_port))
        .await
        .unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.write_all(
        format!(
            "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' \
             xmlns:stream='http://etherx.jabber.org/streams' to='{COMPONENT}'>"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    let stream_id = loop {
        let mut buf = [0u8; 4096];
        let k = tcp.read(&mut buf).await.unwrap();
        assert!(k > 0, "server closed the component stream");
        seen.extend_from_slice(&buf[..k]);
        let text = String::from_utf8_lossy(&seen);
        if let Some(header) = text.find("<stream:stream").map(|i| &text[i..])
            && let Some(end) = header.find('>')
        {
            let header = &header[..end];
            let id = header
                .split_once(" id=")
                .map(|(_, rest)| {
                    let q = &rest[..1];
                    rest[1..].split(q).next().unwrap_or("").to_owned()
                })
                .expect("stream id");
            break id;
        }
    };
    let handshake =
        tokio_xmpp::parsers::component::Handshake::from_stream_id_and_password(stream_id, SECRET);
    tcp.write_all(String::from(&Element::from(handshake)).as_bytes())
        .await
        .unwrap();
    seen.clear();
    while !String::from_utf8_lossy(&seen).contains("<handshake") {
        let mut buf = [0u8; 4096];
        let k = tcp.read(&mut buf).await.unwrap();
        assert!(k > 0, "handshake refused");
        seen.extend_from_slice(&buf[..k]);
    }
    let mut wire = Vec::with_capacity(n * 300);
    for i in 0..n {
        wire.extend_from_slice(
            format!(
                "<message xmlns='jabber:component:accept' from='raw@{COMPONENT}' to='bob@localhost/bench' id='c{i}' type='chat'><body>{BODY}</body><request xmlns='urn:xmpp:receipts'/></message>"
            )
            .as_bytes(),
        );
    }
    // Keep reading (receipts come back) so the server never blocks on us.
    let (mut rd, mut wr) = tcp.into_split();
    let drain = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while rd.read(&mut buf).await.is_ok_and(|k| k > 0) {}
    });
    let cpu0 = floor::cpu_s(server.pid());
    let t0 = Instant::now();
    wr.write_all(&wire).await.unwrap();
    let last = receive(&mut bob, n).await;
    let server_cpu = floor::cpu_s(server.pid()) - cpu0;
    drain.abort();
    bob.close().await;
    Case {
        stored: 0.0,
        delivered: last.duration_since(t0).as_secs_f64(),
        server_cpu,
        relay_cpu: 0.0,
    }
}

struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

fn stat(mut v: Vec<f64>) -> Stat {
    v.sort_by(f64::total_cmp);
    Stat {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
    }
}

fn show(s: &Stat) -> String {
    format!("{:.3} ({:.3}..{:.3})", s.median, s.min, s.max)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let reps: usize = env_or("BENCH_REPS", 3);
    let window: usize = env_or("BENCH_WINDOW", 64);
    let sizes: Vec<usize> = env_list("BENCH_N", "1000,10000")
        .iter()
        .map(|s| s.parse().expect("BENCH_N: numbers"))
        .collect();
    let cases = env_list("BENCH_CASES", "native,redeliver,ceiling,transparent");
    let f = floor::Floor::measure();
    println!("{}", f.describe());
    let kinds: Vec<Kind> = env_list("BENCH_SERVERS", "prosody")
        .iter()
        .map(|s| match s.as_str() {
            "prosody" => Kind::Prosody,
            "ejabberd" => Kind::Ejabberd,
            other => panic!("BENCH_SERVERS: unknown server {other}"),
        })
        .collect();
    println!(
        "through the server: seconds, median of {reps} (min..max); redeliver in fsync mode, window {window}, replay_grace_ms 0"
    );
    println!(
        "| server | N | native store (b) | redeliver store (a) | store b/a | native replay (b) | redeliver replay (a) | replay a/b | ceiling | replay a/ceiling |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut cpu_rows = Vec::new();
    let mut transparent_rows = Vec::new();
    for kind in kinds {
        for &n in &sizes {
            let (mut nat, mut rel, mut cei, mut tra) = (vec![], vec![], vec![], vec![]);
            for _ in 0..reps {
                if cases.iter().any(|c| c == "transparent") {
                    tra.push(transparent(kind, n, window).await);
                }
                if cases.iter().any(|c| c == "native") {
                    nat.push(native(kind, n).await);
                }
                if cases.iter().any(|c| c == "redeliver") {
                    rel.push(relayed(kind, n, window).await);
                }
                if cases.iter().any(|c| c == "ceiling") {
                    cei.push(ceiling(kind, n).await);
                }
            }
            // A case left out counts as zero.
            for v in [&mut nat, &mut rel, &mut cei, &mut tra] {
                if v.is_empty() {
                    v.push(Case::default());
                }
            }
            let ns = stat(nat.iter().map(|c| c.stored).collect());
            let nr = stat(nat.iter().map(|c| c.delivered).collect());
            let rs = stat(rel.iter().map(|c| c.stored).collect());
            let rr = stat(rel.iter().map(|c| c.delivered).collect());
            let c = stat(cei.iter().map(|c| c.delivered).collect());
            println!(
                "| {kind:?} | {n} | {} | {} | {:.1}× | {} | {} | {:.2} | {} | {:.2} |",
                show(&ns),
                show(&rs),
                ns.median / rs.median,
                show(&nr),
                show(&rr),
                rr.median / nr.median,
                show(&c),
                rr.median / c.median,
            );
            let per_msg = |v: &[Case], f: fn(&Case) -> f64| {
                stat(v.iter().map(f).collect()).median * 1e6 / n as f64
            };
            let (native_cpu, via_cpu) = (
                per_msg(&nat, |c| c.server_cpu),
                per_msg(&rel, |c| c.server_cpu),
            );
            let relay_cpu = per_msg(&rel, |c| c.relay_cpu);
            let ts = stat(tra.iter().map(|c| c.stored).collect());
            let tr = stat(tra.iter().map(|c| c.delivered).collect());
            let tra_cpu = per_msg(&tra, |c| c.server_cpu);
            transparent_rows.push(format!(
                "| {kind:?} | {n} | {} | {} | {:.2} | {} | {} | {native_cpu:.0} | {tra_cpu:.0} | {:.2} | {:.0} |",
                show(&ns),
                show(&ts),
                ts.median / ns.median,
                show(&nr),
                show(&tr),
                tra_cpu / native_cpu,
                per_msg(&tra, |c| c.relay_cpu),
            ));
            cpu_rows.push(format!(
                "| {kind:?} | {n} | {native_cpu:.0} | {via_cpu:.0} | {:.2} | {relay_cpu:.0} | {:.1}× | {:.0} |",
                via_cpu / native_cpu,
                relay_cpu / f.per_message_us(),
                per_msg(&cei, |c| c.server_cpu),
            ));
        }
    }
    println!();
    println!("CPU per delivered message while delivering, µs (median):");
    println!(
        "| server | N | server, native | server, via redeliver | via ÷ native | redeliver | redeliver ÷ floor | server, ceiling |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for row in cpu_rows {
        println!("{row}");
    }
    println!();
    println!(
        "Transparent mode against the server's own offline storage: seconds, median (min..max); \
         CPU per message while delivering, µs (median). Targets: store c/b ≤ 1.25, replay \
         server CPU c/b ≤ 1.6."
    );
    println!(
        "| server | N | native store (b) | transparent store (c) | store c/b | native replay | transparent replay | server CPU, native | server CPU, transparent | CPU c/b | redeliver CPU |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for row in transparent_rows {
        println!("{row}");
    }
}
