//! Loopback ports for everything the tests and benchmarks start: Prosody,
//! ejabberd, the fake server, redeliver's metrics listener (and, in the
//! same way in `scripts/pg-cluster`, PostgreSQL).
//!
//! Binding port 0, closing the socket and handing the number on went
//! wrong: the kernel may give the same number to the next bind(0) (about
//! one pair in 10⁴ here; ejabberd then refused c2s and component on one
//! port, "Overlapping listeners"), and it gives those numbers to every
//! connect() meanwhile. So ports come from outside the kernel's ephemeral
//! range, which neither bind(0) nor connect() use, from a random start, so
//! that test processes running at once rarely meet; each is bound while
//! reserved, so no other process takes it and the ports of one server
//! differ; a process never hands a port out twice; and a start that
//! fails because another process took a port in the moment between its
//! release and the server's bind is tried again on new ports
//! ([`start_on`]).

use std::cell::RefCell;
use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::{Mutex, PoisonError};

/// Attempts of [`start_on`] before it gives up.
const ATTEMPTS: usize = 5;

/// Ports bound for one server, until [`Reserved::release`].
pub struct Reserved {
    listeners: Vec<TcpListener>,
}

impl Reserved {
    pub fn ports(&self) -> Vec<u16> {
        self.listeners
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect()
    }

    /// The listeners, for a server in this process (the fake server).
    pub fn into_listeners(self) -> Vec<TcpListener> {
        self.listeners
    }

    /// Free the ports for the server about to start on them.
    pub fn release(self) -> Vec<u16> {
        let ports = self.ports();
        drop(self.listeners);
        if let Some(f) = MEANWHILE.with(|m| m.borrow_mut().take()) {
            f(&ports);
        }
        ports
    }
}

/// The candidates not tried yet: the offsets `next`, `next + 1`, ... (mod
/// `range.len()`), `left` of them.
struct State {
    range: std::ops::Range<u32>,
    next: usize,
    left: usize,
    claimed: HashSet<u16>,
}

impl State {
    fn new() -> State {
        let range = range();
        State {
            next: rand::random_range(0..range.len()),
            left: range.len(),
            range,
            claimed: HashSet::new(),
        }
    }
}

fn with_state<T>(f: impl FnOnce(&mut State) -> T) -> T {
    let mut state = STATE.lock().unwrap_or_else(PoisonError::into_inner);
    f(state.get_or_insert_with(State::new))
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// What [`meanwhile`] asked for.
type Meanwhile = Option<Box<dyn FnOnce(&[u16])>>;

thread_local! {
    static MEANWHILE: RefCell<Meanwhile> = const { RefCell::new(None) };
}

/// The larger of the two stretches outside the kernel's ephemeral range
/// (10000 and up below it, or above it).
fn range() -> std::ops::Range<u32> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .unwrap_or_else(|_| "32768 60999".into());
    let mut n = text.split_whitespace().map(|n| n.parse::<u32>().unwrap());
    let (low, high) = (n.next().unwrap(), n.next().unwrap());
    let below = 10_000..low.max(10_000);
    let above = (high + 1).min(65_536)..65_536;
    let r = if below.len() >= above.len() {
        below
    } else {
        above
    };
    assert!(
        r.len() >= 1000,
        "fewer than 1000 ports outside the ephemeral range {low}-{high}"
    );
    r
}

/// `n` distinct loopback ports, each bound (so free for us and taken for
/// anyone else) until the [`Reserved`] is released or dropped; never one
/// this process handed out or [`claim`]ed before.
pub fn reserve(n: usize) -> Reserved {
    with_state(|s| {
        let mut listeners = Vec::with_capacity(n);
        while listeners.len() < n {
            assert!(s.left > 0, "every port of {:?} handed out", s.range);
            let port = (s.range.start + (s.next % s.range.len()) as u32) as u16;
            s.next += 1;
            s.left -= 1;
            // Taken by another process: the next one.
            if !s.claimed.contains(&port)
                && let Ok(l) = TcpListener::bind(("127.0.0.1", port))
            {
                listeners.push(l);
            }
        }
        Reserved { listeners }
    })
}

/// Never hand out `port`, which something else chose (scripts/pg-cluster).
pub fn claim(port: u16) {
    with_state(|s| s.claimed.insert(port));
}

/// For the tests of the retry: `f` runs on the ports of the next
/// reservation this thread releases, right after their release, where
/// another process could take one.
pub fn meanwhile(f: impl FnOnce(&[u16]) + 'static) {
    MEANWHILE.with(|m| *m.borrow_mut() = Some(Box::new(f)));
}

/// Start something on `n` ports of its own and return it. `start` gets
/// them reserved, writes them where its server reads them, releases them
/// just before it starts the server, and returns `Err(why)` when the
/// server could not listen on one because another process took it
/// meanwhile; then it is tried again on new ports. Any other failure is
/// `start`'s to report (by panicking).
pub fn start_on<T>(n: usize, mut start: impl FnMut(Reserved) -> Result<T, String>) -> T {
    let mut taken = Vec::new();
    while taken.len() < ATTEMPTS {
        match start(reserve(n)) {
            Ok(t) => return t,
            Err(why) => {
                eprintln!("port taken meanwhile, trying new ports: {why}");
                taken.push(why);
            }
        }
    }
    panic!("a port was taken on each of {ATTEMPTS} attempts: {taken:#?}")
}

/// Who listens on TCP `port` (on any address): nobody (`None`), the
/// process `pid` (`Some(true)`), or only other processes (`Some(false)`).
pub fn listener_of(port: u16, pid: u32) -> Option<bool> {
    let mut sockets = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            // sl local_address rem_address st ... inode: the port in hex
            // after the address, st 0A is LISTEN.
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = f.get(1).and_then(|a| a.rsplit(':').next());
            if f.len() > 9
                && f[3] == "0A"
                && local.and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port)
            {
                sockets.push(format!("socket:[{}]", f[9]));
            }
        }
    }
    if sockets.is_empty() {
        return None;
    }
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter();
    Some(
        fds.flatten()
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .any(|target| sockets.iter().any(|s| target.as_os_str() == s.as_str())),
    )
}
