//! A fake server side of XEP-0114 on loopback: it accepts redeliver's
//! component connections (any number, one after another), plays the users
//! behind it, and lets a test write anything, valid or not, into the
//! stream. No XMPP server is involved, so a test controls every byte and
//! the server is never the bottleneck.
//!
//! Users are online unless [`FakeServer::set_users_online`] says otherwise:
//! a subscription request is approved at once with an available presence
//! (no presence when offline), probes are answered with an available (or
//! unavailable) presence, disco#info says the client sends receipts, and
//! keepalive pings are answered.
//! Messages, and everything else, go to the test.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_xmpp::minidom::Element;

use super::{COMPONENT, esc};

const NS: &str = "jabber:component:accept";

/// Something that happened on a component connection.
#[derive(Debug)]
pub enum Event {
    Connected(u64),
    /// A stanza from redeliver, with a global arrival number and time.
    Stanza(u64, u64, std::time::Instant, Element),
    /// The connection ended (EOF, reset, or bad XML from redeliver).
    Closed(u64),
}

type Writer = mpsc::UnboundedSender<Vec<u8>>;

pub struct FakeServer {
    pub port: u16,
    pub events: mpsc::UnboundedReceiver<Event>,
    current: Arc<Mutex<Option<(u64, Writer)>>>,
    users: Arc<Users>,
    task: tokio::task::JoinHandle<()>,
}

/// How the users behind the fake server behave, and what they did.
#[derive(Default)]
struct Users {
    offline: AtomicBool,
    answered: AtomicU64,
}

impl FakeServer {
    pub async fn start() -> FakeServer {
        let std = super::ports::reserve(1).into_listeners().remove(0);
        std.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(std).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, events) = mpsc::unbounded_channel();
        let current: Arc<Mutex<Option<(u64, Writer)>>> = Arc::default();
        let cur = current.clone();
        let users = Arc::new(Users::default());
        let u = users.clone();
        let task = tokio::spawn(async move {
            let order = Arc::new(AtomicU64::new(0));
            let mut n = 0;
            while let Ok((tcp, _)) = listener.accept().await {
                n += 1;
                tcp.set_nodelay(true).unwrap();
                let (w_tx, w_rx) = mpsc::unbounded_channel();
                *cur.lock().unwrap() = Some((n, w_tx.clone()));
                tokio::spawn(serve(
                    n,
                    tcp,
                    w_tx,
                    w_rx,
                    tx.clone(),
                    order.clone(),
                    u.clone(),
                ));
            }
        });
        FakeServer {
            port,
            events,
            current,
            users,
            task,
        }
    }

    /// How many stanzas the users and the server answered by themselves.
    pub fn auto_answered(&self) -> u64 {
        self.users.answered.load(Ordering::SeqCst)
    }

    /// Whether the users answer subscriptions and probes as online.
    pub fn set_users_online(&self, online: bool) {
        self.users.offline.store(!online, Ordering::SeqCst);
    }

    /// A handle that writes to the current connection, for other tasks.
    pub fn handle(&self) -> FakeHandle {
        FakeHandle {
            current: self.current.clone(),
        }
    }

    /// Write raw bytes to the current connection; false if there is none.
    pub fn send_raw(&self, bytes: impl Into<Vec<u8>>) -> bool {
        self.handle().send_raw(bytes)
    }

    pub fn send(&self, xml: &str) -> bool {
        self.send_raw(xml.as_bytes().to_vec())
    }

    /// The next event within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Event> {
        tokio::time::timeout(wait, self.events.recv()).await.ok()?
    }

    /// The next stanza within `wait`, skipping connection events.
    pub async fn next_stanza(&mut self, wait: Duration) -> Option<Element> {
        let end = tokio::time::Instant::now() + wait;
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await? {
                Event::Stanza(_, _, _, el) => return Some(el),
                _ => continue,
            }
        }
    }

    /// Wait for a (new) connection.
    pub async fn connected(&mut self, wait: Duration) -> Option<u64> {
        let end = tokio::time::Instant::now() + wait;
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            if let Event::Connected(n) = self.next(left).await? {
                return Some(n);
            }
        }
    }
}

/// Writes to whichever connection is current.
#[derive(Clone)]
pub struct FakeHandle {
    current: Arc<Mutex<Option<(u64, Writer)>>>,
}

impl FakeHandle {
    /// Write raw bytes to the current connection; false if there is none
    /// (or it has ended).
    pub fn send_raw(&self, bytes: impl Into<Vec<u8>>) -> bool {
        match &*self.current.lock().unwrap() {
            Some((_, w)) => w.send(bytes.into()).is_ok(),
            None => false,
        }
    }

    pub fn send(&self, xml: &str) -> bool {
        self.send_raw(xml.as_bytes().to_vec())
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    id: u64,
    tcp: TcpStream,
    writer: Writer,
    mut outgoing: mpsc::UnboundedReceiver<Vec<u8>>,
    events: mpsc::UnboundedSender<Event>,
    order: Arc<AtomicU64>,
    users: Arc<Users>,
) {
    let (mut rd, mut wr) = tcp.into_split();
    tokio::spawn(async move {
        while let Some(b) = outgoing.recv().await {
            if wr.write_all(&b).await.is_err() {
                return;
            }
        }
    });
    let mut split = Splitter::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut greeted = false;
    let mut authed = false;
    loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        split.push(&buf[..n]);
        if !greeted {
            if !split.take_header() {
                continue;
            }
            greeted = true;
            let _ = writer.send(
                format!(
                    "<?xml version='1.0'?><stream:stream xmlns='{NS}' \
                     xmlns:stream='http://etherx.jabber.org/streams' from='{COMPONENT}' id='fake-{id}'>"
                )
                .into_bytes(),
            );
        }
        loop {
            let (chunk, depth) = match split.next_element() {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(()) => {
                    let _ = events.send(Event::Closed(id));
                    return;
                }
            };
            // minidom recurses on deep trees (and so would this process):
            // keep only the top element's start tag of those.
            let chunk = if depth > MAX_DEPTH {
                shallow(&chunk)
            } else {
                chunk
            };
            let Ok(el) = format!("<w xmlns='{NS}'>{chunk}</w>").parse::<Element>() else {
                let _ = events.send(Event::Closed(id));
                return;
            };
            let Some(el) = el.children().next().cloned() else {
                continue;
            };
            if !authed {
                if el.name() == "handshake" {
                    authed = true;
                    let _ = writer.send(b"<handshake/>".to_vec());
                    let _ = events.send(Event::Connected(id));
                }
                continue;
            }
            if let Some(reply) = auto_reply(&el, !users.offline.load(Ordering::SeqCst)) {
                users.answered.fetch_add(1, Ordering::SeqCst);
                for r in reply {
                    let _ = writer.send(r.into_bytes());
                }
                continue;
            }
            let n = order.fetch_add(1, Ordering::SeqCst);
            let _ = events.send(Event::Stanza(id, n, std::time::Instant::now(), el));
        }
    }
    let _ = events.send(Event::Closed(id));
}

/// What the users and the server answer by themselves.
fn auto_reply(el: &Element, online: bool) -> Option<Vec<String>> {
    let from = esc(el.attr("from").unwrap_or(""));
    let to = el.attr("to").unwrap_or("");
    let id = esc(el.attr("id").unwrap_or(""));
    let bare = esc(to.split('/').next().unwrap_or(""));
    match (el.name(), el.attr("type")) {
        ("presence", Some("subscribe")) => {
            let mut r = vec![format!(
                "<presence xmlns='{NS}' from='{bare}' to='{from}' type='subscribed'/>"
            )];
            if online {
                r.push(format!(
                    "<presence xmlns='{NS}' from='{bare}/res' to='{from}'/>"
                ));
            }
            Some(r)
        }
        ("presence", Some("probe")) if online => Some(vec![format!(
            "<presence xmlns='{NS}' from='{bare}/res' to='{from}'/>"
        )]),
        ("presence", Some("probe")) => Some(vec![format!(
            "<presence xmlns='{NS}' from='{bare}' to='{from}' type='unavailable'/>"
        )]),
        ("presence", _) => Some(vec![]),
        ("iq", Some("get")) if el.has_child("ping", "urn:xmpp:ping") => {
            if to.ends_with(COMPONENT) {
                // Twin probes: a real server would route them back; one
                // instance here, so drop them.
                Some(vec![])
            } else {
                Some(vec![format!(
                    "<iq xmlns='{NS}' type='result' id='{id}' from='{}' to='{from}'/>",
                    esc(to)
                )])
            }
        }
        ("iq", Some("get")) if el.has_child("query", "http://jabber.org/protocol/disco#info") => {
            Some(vec![format!(
                "<iq xmlns='{NS}' type='result' id='{id}' from='{}' to='{from}'>\
                 <query xmlns='http://jabber.org/protocol/disco#info'>\
                 <feature var='urn:xmpp:receipts'/></query></iq>",
                esc(to)
            )])
        }
        _ => None,
    }
}

/// Deeper elements are reduced to their top start tag.
const MAX_DEPTH: usize = 200;

/// The start tag of an element's XML, made self-closing, with a marker.
fn shallow(xml: &str) -> String {
    let end = xml.find('>').unwrap_or(xml.len());
    let tag = xml[..end].trim_end_matches('/');
    format!("{tag} harness-truncated='deep'/>")
}

/// Splits the byte stream from redeliver into top-level elements.
#[derive(Default)]
struct Splitter {
    buf: Vec<u8>,
}

impl Splitter {
    fn push(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    /// Consume the XML declaration and the stream header, if complete.
    fn take_header(&mut self) -> bool {
        let text = String::from_utf8_lossy(&self.buf);
        let Some(start) = text.find("<stream:stream") else {
            return false;
        };
        let Some(end) = text[start..].find('>') else {
            return false;
        };
        let cut = start + end + 1;
        self.buf.drain(..cut);
        true
    }

    /// The next complete top-level element and its depth, `Ok(None)` if
    /// incomplete, `Err` at the stream's end or on garbage.
    fn next_element(&mut self) -> Result<Option<(String, usize)>, ()> {
        let b = &self.buf;
        let mut i = 0;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == b.len() {
            self.buf.clear();
            return Ok(None);
        }
        if b[i] != b'<' {
            return Err(());
        }
        let start = i;
        let mut depth = 0usize;
        let mut max_depth = 0usize;
        while i < b.len() {
            if b[i] != b'<' {
                i += 1;
                continue;
            }
            // A tag: find its end, minding quoted attribute values.
            let closing = b.get(i + 1) == Some(&b'/');
            let mut j = i + 1;
            let mut quote = None;
            while j < b.len() {
                match (quote, b[j]) {
                    (None, b'"') | (None, b'\'') => quote = Some(b[j]),
                    (Some(q), c) if c == q => quote = None,
                    (None, b'>') => break,
                    _ => {}
                }
                j += 1;
            }
            if j == b.len() {
                return Ok(None);
            }
            let self_closing = b[j - 1] == b'/';
            if closing {
                if depth == 0 {
                    return Err(()); // </stream:stream>
                }
                depth -= 1;
            } else if !self_closing {
                depth += 1;
                max_depth = max_depth.max(depth);
            }
            i = j + 1;
            if depth == 0 {
                let el = String::from_utf8_lossy(&b[start..i]).into_owned();
                self.buf.drain(..i);
                return Ok(Some((el, max_depth)));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::Splitter;

    #[test]
    fn splits_elements() {
        let mut s = Splitter::default();
        s.push(b"<?xml version='1.0'?><stream:stream xmlns='a' to='x'><handshake>ab</hand");
        assert!(s.take_header());
        assert_eq!(s.next_element(), Ok(None));
        s.push(b"shake><iq a='>'/> <m><b>t</b><c/></m></stream:stream>");
        assert_eq!(
            s.next_element().unwrap().unwrap(),
            ("<handshake>ab</handshake>".to_owned(), 1)
        );
        assert_eq!(
            s.next_element().unwrap().unwrap(),
            ("<iq a='>'/>".to_owned(), 0)
        );
        assert_eq!(
            s.next_element().unwrap().unwrap(),
            ("<m><b>t</b><c/></m>".to_owned(), 2)
        );
        assert_eq!(s.next_element(), Err(()));
    }
}
