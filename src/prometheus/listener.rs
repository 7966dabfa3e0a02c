//! The HTTP listener that serves the metrics, with limits: whatever the
//! metrics port receives, it holds at most a quarter of the process's
//! file descriptors (the link and the store keep the rest), a client
//! that does not finish its request within seconds is closed, an accept
//! that fails waits before the next try, and refusals are logged in a
//! summary line at most every 10 s, never one line per connection.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{trace, warn};

/// Connections served at once, at most.
pub const MAX_CONNECTIONS: usize = 64;
/// From a connection's accept to the end of its request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// From a connection's accept to the end of its response.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// The refusal and accept-error lines, at most one of each this often.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// The wait after a failed accept, doubled at each failure in a row.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// The histograms' upkeep (what the exporter's own listener did).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The answer to a connection past the cap, written without waiting
/// (a fresh socket's send buffer takes it) before the close.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\
Connection: close\r\nRetry-After: 1\r\n\r\n";

/// What the listener allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; the next ones get a 503 and are
    /// closed.
    pub connections: usize,
    pub header_timeout: Duration,
    pub connection_timeout: Duration,
}

impl Limits {
    /// The limits for a process allowed `nofile` file descriptors
    /// (unknown: [`MAX_CONNECTIONS`]): at most a quarter of them for
    /// connections, at most [`MAX_CONNECTIONS`].
    pub fn for_nofile(nofile: Option<u64>) -> Limits {
        let quarter = nofile.map_or(MAX_CONNECTIONS as u64, |n| n / 4);
        Limits {
            connections: quarter.clamp(1, MAX_CONNECTIONS as u64) as usize,
            header_timeout: HEADER_TIMEOUT,
            connection_timeout: CONNECTION_TIMEOUT,
        }
    }
}

/// The soft `RLIMIT_NOFILE` of this process, if it has one.
pub fn nofile() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    (ok && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// Refusals and failed accepts since the start (the listener's loop
/// logs the difference since its last line).
#[derive(Debug, Default)]
struct Tally {
    over_cap: AtomicU64,
    too_slow: AtomicU64,
    malformed: AtomicU64,
    accept_errors: AtomicU64,
}

impl Tally {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn counts(&self) -> Counts {
        Counts {
            over_cap: self.over_cap.load(Ordering::Relaxed),
            too_slow: self.too_slow.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
            accept_errors: self.accept_errors.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    over_cap: u64,
    too_slow: u64,
    malformed: u64,
    accept_errors: u64,
}

impl Counts {
    fn since(self, before: Counts) -> Counts {
        Counts {
            over_cap: self.over_cap - before.over_cap,
            too_slow: self.too_slow - before.too_slow,
            malformed: self.malformed - before.malformed,
            accept_errors: self.accept_errors - before.accept_errors,
        }
    }

    fn refused(&self) -> u64 {
        self.over_cap + self.too_slow + self.malformed
    }
}

/// When to log what: a line as soon as something happened after a quiet
/// time, then at most one every [`LOG_EVERY`], with the counts since
/// the last.
#[derive(Debug)]
struct Report {
    logged: Counts,
    last: Option<Instant>,
}

impl Report {
    fn new() -> Report {
        Report {
            logged: Counts::default(),
            last: None,
        }
    }

    /// The counts to log at `now`, if a line is due.
    fn due(&mut self, now: Counts, at: Instant) -> Option<Counts> {
        if self.last.is_some_and(|last| at < last + LOG_EVERY) {
            return None;
        }
        let new = now.since(self.logged);
        if new == Counts::default() {
            return None;
        }
        self.logged = now;
        self.last = Some(at);
        Some(new)
    }
}

/// The wait before the next accept after failed ones: [`BACKOFF_FIRST`],
/// doubled at each failure in a row up to [`BACKOFF_MAX`].
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next: BACKOFF_FIRST,
        }
    }

    fn failed(&mut self) -> Duration {
        let wait = self.next;
        self.next = (wait * 2).min(BACKOFF_MAX);
        wait
    }

    fn succeeded(&mut self) {
        self.next = BACKOFF_FIRST;
    }
}

/// An accept error that concerns one connection only (it went before it
/// was accepted), not the listener or the process.
fn concerns_one_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

/// The metrics listener: its socket, the slots for connections and the
/// tally of what it refused.
pub struct MetricsListener {
    listener: TcpListener,
    handle: PrometheusHandle,
    limits: Limits,
    slots: Arc<Semaphore>,
    tally: Arc<Tally>,
}

impl MetricsListener {
    pub fn new(listener: TcpListener, handle: PrometheusHandle, limits: Limits) -> MetricsListener {
        MetricsListener {
            listener,
            handle,
            slots: Arc::new(Semaphore::new(limits.connections)),
            limits,
            tally: Arc::default(),
        }
    }

    /// Accept and serve connections, for ever.
    pub async fn run(self) {
        let mut backoff = Backoff::new();
        let mut report = Report::new();
        let mut accept_error: Option<io::Error> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut upkeep = tokio::time::interval(UPKEEP_EVERY);
        upkeep.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        backoff.succeeded();
                        self.admit(stream);
                    }
                    Err(e) if concerns_one_connection(&e) => {
                        trace!(error = %e, "metrics connection gone before its accept");
                    }
                    Err(e) => {
                        // Out of file descriptors (EMFILE, ENFILE) or
                        // memory: the connection stays queued and the
                        // next accept would fail at once too.
                        Tally::add(&self.tally.accept_errors);
                        accept_error = Some(e);
                        tokio::time::sleep(backoff.failed()).await;
                    }
                },
                _ = tick.tick() => {
                    if let Some(new) = report.due(self.tally.counts(), Instant::now()) {
                        self.log(new, accept_error.take());
                    }
                }
                _ = upkeep.tick() => self.handle.run_upkeep(),
            }
        }
    }

    fn log(&self, new: Counts, accept_error: Option<io::Error>) {
        if new.refused() > 0 {
            warn!(
                over_cap = new.over_cap,
                too_slow = new.too_slow,
                malformed = new.malformed,
                cap = self.limits.connections,
                header_timeout_s = self.limits.header_timeout.as_secs(),
                "metrics listener refused connections (over_cap: answered 503, cap \
                 connections open already; too_slow: request not complete in time; malformed: \
                 not HTTP); counts since the last such line, one at most every 10 s"
            );
        }
        if new.accept_errors > 0 {
            let error = accept_error.map(|e| e.to_string()).unwrap_or_default();
            warn!(
                failures = new.accept_errors,
                %error,
                "metrics listener cannot accept connections; trying again after 100 ms \
                 doubling to 1 s; failures since the last such line, one at most every 10 s"
            );
        }
    }

    /// Serve `stream` in a slot of its own, or refuse it at once.
    fn admit(&self, stream: TcpStream) {
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            let _ = stream.try_write(BUSY);
            Tally::add(&self.tally.over_cap);
            return;
        };
        let (handle, tally, limits) = (self.handle.clone(), self.tally.clone(), self.limits);
        tokio::spawn(async move {
            let service = service_fn(move |_request| {
                let body = handle.render();
                async move { Ok::<_, Infallible>(metrics_response(body)) }
            });
            let mut http = http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(false);
            let connection = http.serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(limits.connection_timeout, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) if e.is_timeout() => Tally::add(&tally.too_slow),
                Ok(Err(e)) if e.is_parse() => Tally::add(&tally.malformed),
                // The client went (or reset) before its answer.
                Ok(Err(e)) => trace!(error = %e, "metrics connection ended"),
                Err(_) => Tally::add(&tally.too_slow),
            }
            drop(slot);
        });
    }
}

fn metrics_response(body: String) -> hyper::Response<Full<Bytes>> {
    let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use metrics_exporter_prometheus::PrometheusBuilder;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn connections_take_at_most_a_quarter_of_the_file_descriptors() {
        let cap = |n| Limits::for_nofile(n).connections;
        assert_eq!(cap(Some(128)), 32);
        assert_eq!(cap(Some(256)), 64);
        assert_eq!(cap(Some(1024)), MAX_CONNECTIONS);
        assert_eq!(cap(Some(524_288)), MAX_CONNECTIONS);
        assert_eq!(cap(Some(20)), 5);
        assert_eq!(cap(Some(3)), 1);
        assert_eq!(cap(None), MAX_CONNECTIONS);
    }

    #[test]
    fn the_wait_after_failed_accepts_doubles_to_a_second() {
        let mut b = Backoff::new();
        let waits: Vec<u64> = (0..6).map(|_| b.failed().as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.failed(), BACKOFF_FIRST);
    }

    #[test]
    fn refusals_are_logged_at_once_then_at_most_every_ten_seconds() {
        let mut r = Report::new();
        let t0 = Instant::now();
        let n = |over_cap| Counts {
            over_cap,
            ..Counts::default()
        };
        assert_eq!(r.due(n(0), t0), None, "nothing to say");
        assert_eq!(r.due(n(1), t0), Some(n(1)), "the first at once");
        assert_eq!(r.due(n(500), t0 + Duration::from_secs(9)), None);
        assert_eq!(
            r.due(n(900), t0 + Duration::from_secs(10)),
            Some(n(899)),
            "then the ones since"
        );
        assert_eq!(r.due(n(900), t0 + Duration::from_secs(30)), None);
        assert_eq!(r.due(n(901), t0 + Duration::from_secs(31)), Some(n(1)));
    }

    fn limits(connections: usize) -> Limits {
        Limits {
            connections,
            header_timeout: Duration::from_millis(300),
            connection_timeout: Duration::from_secs(2),
        }
    }

    async fn start(limits: Limits) -> (std::net::SocketAddr, Arc<Tally>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = PrometheusBuilder::new().build_recorder().handle();
        let server = MetricsListener::new(listener, handle, limits);
        let tally = server.tally.clone();
        tokio::spawn(server.run());
        (addr, tally)
    }

    /// What the server answers a whole request, and when it closes.
    async fn ask(addr: std::net::SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut got))
            .await
            .expect("answered and closed within 2 s");
        String::from_utf8_lossy(&got).into_owned()
    }

    /// Whether the server closes `s` within `wait`.
    async fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
        let mut buf = [0u8; 256];
        let end = Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(end, s.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0) | Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    #[tokio::test]
    async fn slow_clients_are_closed_and_the_ones_past_the_cap_refused() {
        let (addr, tally) = start(limits(2)).await;
        assert!(ask(addr).await.starts_with("HTTP/1.0 200 OK"));
        let mut slow = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
            slow.push(s);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let refused = ask(addr).await;
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
        for s in &mut slow {
            assert!(closed_within(s, Duration::from_secs(1)).await);
        }
        let answer = ask(addr).await;
        assert!(answer.starts_with("HTTP/1.0 200 OK"), "{answer}");
        assert!(answer.contains("content-type: text/plain"), "{answer}");
        let c = tally.counts();
        assert_eq!((c.over_cap, c.too_slow, c.malformed), (1, 2, 0));

        let mut junk = TcpStream::connect(addr).await.unwrap();
        junk.write_all(b"\x16\x03\x01 not http\r\n\r\n")
            .await
            .unwrap();
        assert!(closed_within(&mut junk, Duration::from_secs(1)).await);
        assert_eq!(tally.counts().malformed, 1);
    }

    #[tokio::test]
    async fn a_failing_accept_is_retried_after_a_wait_not_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Queued, never accepted: the listener has one ready and its
        // accept fails at once (EINVAL), as EMFILE does.
        let _queued = TcpStream::connect(addr).await.unwrap();
        // SAFETY: shuts down a socket this test owns.
        assert_eq!(
            unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) },
            0
        );
        let handle = PrometheusBuilder::new().build_recorder().handle();
        let server = MetricsListener::new(listener, handle, limits(2));
        let tally = server.tally.clone();
        let task = tokio::spawn(server.run());
        tokio::time::sleep(Duration::from_millis(1600)).await;
        task.abort();
        // 100 + 200 + 400 + 800 ms: five tries, six at most.
        let tries = tally.counts().accept_errors;
        assert!((4..=6).contains(&tries), "{tries} accepts in 1.6 s");
    }
}
