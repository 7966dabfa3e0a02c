//! The fuzz targets' bodies, shared by the cargo-fuzz binaries and by the
//! corpus replay in redeliver's test suite (tests/fuzz_replay.rs).
//!
//! A real router with a real (temporary) store and a fake link, driven the
//! way the link drives it: bytes go through the depth filter and the XML
//! parser, stanzas to the router, and what it sends is checked.

#![allow(dead_code)] // each target uses part of it

use std::str::FromStr;
use std::sync::{Arc, Mutex};

use redeliver::address::{AddressBook, escape_node, unescape_node};
use redeliver::admin::Node;
use tokio_xmpp::parsers::jid::BareJid;

use redeliver::config::Config;
use redeliver::depthlimit::Scanner;
use redeliver::link::{LinkEvent, Outbound};
use redeliver::router::Router;
use redeliver::store::SledStore;
use redeliver::xmltree;
use tokio::sync::mpsc;
use tokio_xmpp::Stanza;
use tokio_xmpp::minidom::Element;

pub const NS: &str = "jabber:component:accept";
const COMPONENT: &str = "relay.localhost";

pub struct Harness {
    rt: tokio::runtime::Runtime,
    router: Router,
    outbox: mpsc::Receiver<Outbound>,
    _flush: mpsc::UnboundedReceiver<u64>,
    _dir: tempfile::TempDir,
    pub runs: u64,
}

impl Harness {
    pub fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            r#"[component]
domain = "{COMPONENT}"
server = "127.0.0.1:5347"
[relay]
default_domain = "localhost"
allowed_sender_domains = ["localhost"]
[store]
path = "{}"
durability = "batched"
[limits]
max_pending_per_recipient = 20
max_stanza_bytes = 65536
sender_rate_per_s = 0
[admin]
jids = ["admin@localhost"]
"#,
            dir.path().join("store").display()
        );
        let path = dir.path().join("redeliver.toml");
        std::fs::write(&path, text).unwrap();
        let config = Config::load(&path).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = Arc::new(
            SledStore::open(&config.store.path, config.store.durability, 5, 1 << 20).unwrap(),
        );
        let (out_tx, outbox) = mpsc::channel(4096);
        let (flush_tx, flush) = mpsc::unbounded_channel();
        let mut router = Router::new(Arc::new(config), None, store, out_tx, flush_tx).unwrap();
        rt.block_on(router.handle(LinkEvent::Up { epoch: 1 }));
        Harness {
            rt,
            router,
            outbox,
            _flush: flush,
            _dir: dir,
            runs: 0,
        }
    }

    /// Feed raw bytes as the server would send them; returns what the
    /// router sent, each checked to come from its own domain.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Stanza> {
        self.runs += 1;
        let mut filtered = Vec::new();
        let mut scanner = Scanner::new(xmltree::MAX_DEPTH + 3);
        let mut doc = format!("<stream xmlns='{NS}'>").into_bytes();
        doc.extend_from_slice(bytes);
        doc.extend_from_slice(b"</stream>");
        scanner.filter(&doc, &mut filtered);
        let Ok(text) = std::str::from_utf8(&filtered) else {
            return vec![];
        };
        let Ok(mut root) = Element::from_str(text) else {
            return vec![];
        };
        let children: Vec<Element> = root
            .take_nodes()
            .into_iter()
            .filter_map(|n| n.as_element().cloned())
            .collect();
        for el in children {
            let event = match Stanza::try_from(el.clone()) {
                Ok(st) if xmltree::too_deep(&st) => {
                    xmltree::dismantle_stanza(st);
                    continue;
                }
                Ok(st) => LinkEvent::Stanza(Box::new(st), 0),
                Err(e) => LinkEvent::Invalid {
                    kind: match el.name() {
                        "message" => "message",
                        "presence" => "presence",
                        _ => "iq",
                    },
                    from: el.attr("from").map(String::from),
                    to: el.attr("to").map(String::from),
                    id: el.attr("id").map(String::from),
                    type_: el.attr("type").map(String::from),
                    error: e.to_string(),
                },
            };
            xmltree::dismantle(el);
            self.rt.block_on(self.router.handle(event));
        }
        let mut out = Vec::new();
        while let Ok(o) = self.outbox.try_recv() {
            let from = match &o.stanza {
                Stanza::Message(m) => m.from.clone(),
                Stanza::Presence(p) => p.from.clone(),
                Stanza::Iq(iq) => match iq {
                    tokio_xmpp::parsers::iq::Iq::Get { from, .. }
                    | tokio_xmpp::parsers::iq::Iq::Set { from, .. }
                    | tokio_xmpp::parsers::iq::Iq::Result { from, .. }
                    | tokio_xmpp::parsers::iq::Iq::Error { from, .. } => from.clone(),
                },
            };
            let from = from.expect("everything it sends has a from");
            assert_eq!(
                from.domain().as_str(),
                COMPONENT,
                "sent from outside its domain"
            );
            out.push(o.stanza);
        }
        out
    }
}

static STANZA: Mutex<Option<Harness>> = Mutex::new(None);

/// Target `stanza`: any bytes from the server side of the link.
pub fn stanza(data: &[u8]) {
    let mut h = STANZA.lock().unwrap_or_else(|e| e.into_inner());
    // A fresh router and store now and then, so that state stays small.
    if h.as_ref().is_none_or(|h| h.runs >= 5000) {
        *h = Some(Harness::new());
    }
    if let Some(h) = h.as_mut() {
        h.feed(data);
    }
}

/// Every command, and one that does not exist.
fn nodes() -> Vec<&'static str> {
    let mut v: Vec<&str> = Node::ALL.iter().map(|n| n.name()).collect();
    v.push("nope");
    v
}
const ACTIONS: [&str; 6] = ["execute", "next", "prev", "complete", "cancel", "bogus"];

static ADHOC: Mutex<Option<(Harness, String)>> = Mutex::new(None);

/// Target `adhoc`: arbitrary form content in a `<command/>` from an admin
/// (first byte: node, action, and whether to continue the last session),
/// through the router.
pub fn adhoc(data: &[u8]) {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let Ok(body) = std::str::from_utf8(body) else {
        return;
    };
    let mut state = ADHOC.lock().unwrap_or_else(|e| e.into_inner());
    if state.as_ref().is_none_or(|(h, _)| h.runs >= 5000) {
        *state = Some((Harness::new(), String::new()));
    }
    let Some((h, sid)) = state.as_mut() else {
        return;
    };
    let nodes = nodes();
    let node = nodes[usize::from(sel) % nodes.len()];
    let action = ACTIONS[usize::from(sel / 8) % ACTIONS.len()];
    let session = if sel & 0x80 != 0 && !sid.is_empty() {
        format!(" sessionid='{sid}'")
    } else {
        String::new()
    };
    let iq = format!(
        "<iq type='set' id='f' from='admin@localhost/r' to='relay.localhost'>\
         <command xmlns='http://jabber.org/protocol/commands' node='{node}' action='{action}'{session}>\
         <x xmlns='jabber:x:data' type='submit'>{body}</x></command></iq>"
    );
    let out = h.feed(iq.as_bytes());
    let mut answered = false;
    for st in out {
        if let Stanza::Iq(iq) = st {
            answered = true;
            if let tokio_xmpp::parsers::iq::Iq::Result {
                payload: Some(p), ..
            } = iq
                && let Some(s) = p.attr("sessionid")
            {
                *sid = s.to_owned();
            }
        }
    }
    // Every command request that parses as XML gets an answer.
    let parses = Element::from_str(&format!("<w xmlns='{NS}'>{iq}</w>")).is_ok();
    assert!(answered || !parses, "a command went unanswered: {iq}");
}

/// Target `address`: XEP-0106 escaping round trips, and relay addresses
/// map back to the users they stand for.
pub fn address(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    assert_eq!(unescape_node(&escape_node(s)), s);
    let book = AddressBook::new(
        "relay.localhost",
        "localhost",
        &["localhost".to_owned(), "other.example".to_owned()],
    );
    if let Ok(user) = book.user_for(Some(s))
        && let Ok(relay) = book.relay_for(&user)
    {
        let back = book.user_for(relay.node().map(|n| n.as_str()));
        assert_eq!(back.ok(), Some(user));
    }
    if let Ok(user) = BareJid::from_str(s)
        && let Ok(relay) = book.relay_for(&user)
    {
        let back = book.user_for(relay.node().map(|n| n.as_str()));
        assert_eq!(back.ok(), Some(user));
    }
}
