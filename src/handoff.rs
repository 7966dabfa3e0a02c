//! Transparent mode (docs/transparent.md): the stanzas a server module and
//! the component exchange, and what the component keeps for them.
//!
//! A module inside the server hands the component each message the server
//! would store offline (a hand-off iq), and copies to it the recipient's
//! receipts and markers. The component replays a handed-off message as its
//! original sender through the server's XEP-0356 message permission.
//! [`Handoff`] owns what that needs between stanzas: which server granted
//! the permission in which namespace, and which replays are on the wire.
//! The functions here read and build stanzas; the router decides (store,
//! answer, send).

use std::collections::{HashMap, VecDeque};

use chrono::{DateTime as ChronoTime, FixedOffset};
use tokio_xmpp::minidom::Element;
use tokio_xmpp::parsers::date::DateTime;
use tokio_xmpp::parsers::delay::Delay;
use tokio_xmpp::parsers::jid::{BareJid, Jid};
use tokio_xmpp::parsers::message::{Id, Message, MessageType};
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};
use tracing::{info, warn};

use crate::xmltree::renamespaced;

/// The namespace of every element of the hand-off protocol.
pub const NS: &str = "urn:redeliver:handoff:0";

/// Bytes the privilege envelope adds around a replay, at most: the outer
/// message (its `to` a domain, its id the inner one's, counted by the
/// caller), `<privilege/>`, `<forwarded/>`, the inner namespace and
/// `<replay/>`.
pub const ENVELOPE_OVERHEAD: usize = 512;

/// Replays remembered for a server's refusal of the envelope, at most.
const REPLAYS_REMEMBERED: usize = 4096;

/// A message a server handed off, in the form the component keeps it.
#[derive(Debug, Clone)]
pub struct Taken {
    /// The stanza to store: from the sender's bare JID to the recipient's,
    /// its id, no receipt request, no element of [`NS`], and exactly one
    /// `<delay/>`, from the component, stamped with the oldest time the
    /// message carried.
    pub message: Message,
    /// The sender as the server saw it (a full JID, usually).
    pub sender: Jid,
    pub sender_bare: BareJid,
    pub recipient: BareJid,
    pub id: String,
    pub origin_id: Option<String>,
}

/// How an outcome of a hand-off is counted (stats, metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Held by the component (new or a duplicate): the server removes its copy.
    Taken,
    /// Not a hand-off the component may take (forged, malformed, a sender
    /// it cannot send as, too large, a conflicting id).
    Refused,
    /// A valid hand-off left with the server for now: a full queue or
    /// store, a store failure, no message permission.
    GivenBack,
}

impl Outcome {
    pub const ALL: [Outcome; 3] = [Outcome::Taken, Outcome::Refused, Outcome::GivenBack];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Taken => "taken",
            Outcome::Refused => "refused",
            Outcome::GivenBack => "given_back",
        }
    }

    /// The outcome an error answer stands for.
    pub fn of_error(e: &StanzaError) -> Outcome {
        match e.defined_condition {
            DefinedCondition::ResourceConstraint
            | DefinedCondition::InternalServerError
            | DefinedCondition::NotAllowed => Outcome::GivenBack,
            _ => Outcome::Refused,
        }
    }
}

fn refusal(t: ErrorType, c: DefinedCondition, text: &str) -> StanzaError {
    StanzaError::new(t, c, "en", text)
}

/// Is `server` a bare domain the component serves (no user can send from
/// one: only the server itself)?
fn is_served_domain(server: &Jid, serves: &dyn Fn(&str) -> bool) -> bool {
    server.node().is_none() && server.resource().is_none() && serves(server.domain().as_str())
}

/// The `<message/>` inside `<forwarded/>` inside `outer` (in
/// `jabber:client`), and the forwarded delay's stamp.
fn forwarded_message(outer: &Element) -> Option<(&Element, Option<&str>)> {
    let fwd = outer.get_child("forwarded", ns::FORWARD)?;
    let msg = fwd.get_child("message", ns::JABBER_CLIENT)?;
    let stamp = fwd
        .get_child("delay", ns::DELAY)
        .and_then(|d| d.attr("stamp"));
    Some((msg, stamp))
}

/// A forwarded message in the stream's namespace, which the parsers read.
fn from_client(el: &Element) -> Element {
    renamespaced(el, ns::JABBER_CLIENT, ns::DEFAULT_NS)
}

fn parse_stamp(s: &str) -> Option<ChronoTime<FixedOffset>> {
    s.parse::<DateTime>().ok().map(|d| d.0)
}

/// Read a hand-off iq's payload from `server` (docs/transparent.md §1):
/// the message to keep, or the error to answer. `now_ms` stamps a message
/// that carries no time of its own.
#[allow(clippy::result_large_err)] // the error is the answer itself
pub fn read(
    server: &Jid,
    payload: &Element,
    serves: &dyn Fn(&str) -> bool,
    me: &Jid,
    now_ms: i64,
) -> Result<Taken, StanzaError> {
    use DefinedCondition as C;
    if !is_served_domain(server, serves) {
        return Err(refusal(
            ErrorType::Auth,
            C::Forbidden,
            "hand-offs are taken only from the servers of the domains this component serves",
        ));
    }
    let Some((inner, stamp)) = forwarded_message(payload) else {
        return Err(refusal(
            ErrorType::Modify,
            C::BadRequest,
            "a hand-off holds <forwarded/> with a <message/>",
        ));
    };
    let Ok(mut m) = Message::try_from(from_client(inner)) else {
        return Err(refusal(
            ErrorType::Modify,
            C::BadRequest,
            "the handed-off message does not parse",
        ));
    };
    if !matches!(m.type_, MessageType::Chat | MessageType::Normal) {
        return Err(refusal(
            ErrorType::Cancel,
            C::NotAcceptable,
            "only chat and normal messages are handed off",
        ));
    }
    let recipient = match &m.to {
        Some(to) if to.node().is_some() && to.domain() == server.domain() => to.to_bare(),
        _ => {
            return Err(refusal(
                ErrorType::Auth,
                C::Forbidden,
                "a server hands off messages to its own users only",
            ));
        }
    };
    // The sender on the server's own domain: a server vouches for its
    // own users only (another server, even of a served domain, must not
    // have the component send as this one's users).
    let sender = match &m.from {
        Some(f) if f.node().is_some() && f.domain() == server.domain() => f.clone(),
        _ => {
            return Err(refusal(
                ErrorType::Cancel,
                C::NotAcceptable,
                "the component replays only as a user of the handing-off server's own domain",
            ));
        }
    };
    let id = match &m.id {
        Some(id) if !id.0.is_empty() => id.0.clone(),
        _ => {
            return Err(refusal(
                ErrorType::Modify,
                C::BadRequest,
                "a handed-off message needs its id",
            ));
        }
    };
    // The oldest time it carries: when the server took it, or any delay
    // added on the way (mod_smacks' after a hibernation timed out).
    let mut oldest = stamp.and_then(parse_stamp);
    for p in m.payloads.iter().filter(|p| p.is("delay", ns::DELAY)) {
        if let Some(t) = p.attr("stamp").and_then(parse_stamp) {
            oldest = Some(oldest.map_or(t, |o| o.min(t)));
        }
    }
    let oldest = oldest.unwrap_or_else(|| {
        ChronoTime::from_timestamp_millis(now_ms)
            .unwrap_or_default()
            .fixed_offset()
    });
    let origin_id = crate::message_kind::origin_id(&m);
    m.payloads.retain(|p| {
        let ours = p.is("stanza-id", ns::SID) && p.attr("by") == Some(me.as_str());
        !(ours || p.is("delay", ns::DELAY) || p.is("request", ns::RECEIPTS) || p.ns() == NS)
    });
    m.payloads.push(
        Delay {
            from: Some(me.clone()),
            stamp: DateTime(oldest),
            data: None,
        }
        .into(),
    );
    let sender_bare = sender.to_bare();
    m.from = Some(Jid::from(sender_bare.clone()));
    m.to = Some(Jid::from(recipient.clone()));
    Ok(Taken {
        message: m,
        sender,
        sender_bare,
        recipient,
        id,
        origin_id,
    })
}

/// Whether a stored stanza is a hand-off, replayed as its sender: its
/// `from` is a user outside the component's domain (relayed messages come
/// from a relay address, `…@<component>`). Read from the start tag only,
/// as minidom writes it.
pub fn is_handed_off(stanza: &str, component: &str) -> bool {
    let Some(tag) = stanza.split('>').next() else {
        return false;
    };
    let from = [" from=\"", " from='"].iter().find_map(|open| {
        let start = tag.find(open)? + open.len();
        let quote = open.chars().last()?;
        let len = tag[start..].find(quote)?;
        Some(&tag[start..start + len])
    });
    match from {
        Some(f) => {
            let bare = f.split('/').next().unwrap_or(f);
            match bare.rsplit_once('@') {
                Some((_, domain)) => domain != component,
                None => false,
            }
        }
        None => false,
    }
}

/// Whether a message rebuilt from the store goes as its sender (a
/// hand-off): its `from` is outside the component's domain. The parsed
/// twin of [`is_handed_off`].
pub fn goes_as_sender(m: &Message, me: &Jid) -> bool {
    m.from.as_ref().is_some_and(|f| f.domain() != me.domain())
}

/// A copy of a recipient's receipt or marker (docs/transparent.md §3),
/// from a served domain about one of its own users: the receipt as the
/// recipient sent it (from its full JID, to the sender).
pub fn read_confirmation(m: &Message, serves: &dyn Fn(&str) -> bool) -> Option<Message> {
    let server = m.from.as_ref()?;
    if m.type_ == MessageType::Error || !is_served_domain(server, serves) {
        return None;
    }
    let copy = m.payloads.iter().find(|p| p.is("confirmation", NS))?;
    let (inner, _) = forwarded_message(copy)?;
    let inner = Message::try_from(from_client(inner)).ok()?;
    let (from, to) = (inner.from.as_ref()?, inner.to.as_ref()?);
    if from.node().is_none() || from.domain() != server.domain() || to.node().is_none() {
        warn!(%server, "confirmation copy about another domain's user ignored");
        return None;
    }
    Some(inner)
}

/// Whether `m` carries a confirmation copy at all (then it is the copy's
/// to handle, valid or not, never a message to relay).
pub fn is_confirmation_copy(m: &Message) -> bool {
    m.payloads.iter().any(|p| p.is("confirmation", NS))
}

/// The sender of a replay that a server module dropped because its
/// recipient had no session (docs/transparent.md §2): named in the
/// error's `<replay from=…/>`.
pub fn bounced_replay_sender(m: &Message) -> Option<BareJid> {
    if m.type_ != MessageType::Error {
        return None;
    }
    m.payloads
        .iter()
        .find(|p| p.is("replay", NS))?
        .attr("from")?
        .parse()
        .ok()
}

/// The component's state for transparent mode.
#[derive(Debug)]
pub struct Handoff {
    me: Jid,
    /// Per server domain, the XEP-0356 namespace in which it granted the
    /// message permission (`outgoing`) on this connection.
    message_grants: HashMap<String, &'static str>,
    /// A refused hand-off was logged for a missing permission (once per
    /// connection).
    told_no_grant: bool,
    /// Replays on the wire, by their envelope's id: to whom, for a
    /// server's refusal of the envelope. The last [`REPLAYS_REMEMBERED`].
    replays: HashMap<String, String>,
    order: VecDeque<String>,
    /// Envelopes sent on this process, for their ids.
    sent: u64,
}

impl Handoff {
    pub fn new(me: Jid) -> Self {
        Handoff {
            me,
            message_grants: HashMap::new(),
            told_no_grant: false,
            replays: HashMap::new(),
            order: VecDeque::new(),
            sent: 0,
        }
    }

    /// A new connection: the server says again what it grants.
    pub fn link_up(&mut self) {
        self.message_grants.clear();
        self.told_no_grant = false;
    }

    /// `server` announced its grants: `message` is the namespace of a
    /// message permission, if it granted one.
    pub fn granted(&mut self, server: &str, message: Option<&'static str>) {
        match message {
            Some(ns) => {
                info!(
                    server,
                    "the server lets the component send as its users: transparent mode \
                     hand-offs are taken for its domain"
                );
                self.message_grants.insert(server.to_owned(), ns);
            }
            None => {
                self.message_grants.remove(server);
                info!(
                    server,
                    "the server did not grant the message permission (XEP-0356 \
                     message='outgoing'): transparent mode hand-offs from it are refused and \
                     its messages stay with it"
                );
            }
        }
    }

    /// The namespace to replay as a user of `domain` in, if its server
    /// granted the message permission.
    pub fn namespace_for(&self, domain: &str) -> Option<&'static str> {
        self.message_grants.get(domain).copied()
    }

    /// The error for a hand-off whose sender's server did not grant the
    /// message permission; logged once per connection.
    pub fn no_grant(&mut self, domain: &str) -> StanzaError {
        if !self.told_no_grant {
            self.told_no_grant = true;
            warn!(
                domain,
                "hand-off refused: no message permission (XEP-0356) for this domain; \
                 the message stays with the server"
            );
        }
        refusal(
            ErrorType::Cancel,
            DefinedCondition::NotAllowed,
            "the server did not grant this component the message permission (XEP-0356)",
        )
    }

    /// Wrap a replay for its server (docs/transparent.md §2): sent as the
    /// bare sender in `inner`'s `from`, through the privilege `ns`.
    /// Remembers it for a refusal of the envelope.
    pub fn envelope(&mut self, recipient: &str, ns: &'static str, mut inner: Message) -> Message {
        let server = inner
            .from
            .as_ref()
            .map(|f| Jid::from(BareJid::from_parts(None, f.domain())));
        inner.payloads.push(Element::builder("replay", NS).build());
        let inner_el = renamespaced(
            &Element::from(inner.clone()),
            ns::DEFAULT_NS,
            ns::JABBER_CLIENT,
        );
        let forwarded = Element::builder("forwarded", ns::FORWARD)
            .append(inner_el)
            .build();
        let privilege = Element::builder("privilege", ns).append(forwarded).build();
        // An id of its own: two recipients' replays may share the
        // sender's id, and a refusal must name one of them.
        self.sent += 1;
        let id = format!("redeliver-replay-{}", self.sent);
        let mut outer = Message::new(server);
        outer.from = Some(self.me.clone());
        outer.id = Some(Id(id.clone()));
        outer.payloads.push(privilege);
        self.remember(id, recipient.to_owned());
        outer
    }

    fn remember(&mut self, id: String, recipient: String) {
        if self.order.len() >= REPLAYS_REMEMBERED
            && let Some(old) = self.order.pop_front()
        {
            self.replays.remove(&old);
        }
        if self.replays.insert(id.clone(), recipient).is_none() {
            self.order.push_back(id);
        }
    }

    /// A server refused a replay's envelope (`id`): whose it was.
    pub fn refused(&mut self, id: &str) -> Option<String> {
        self.replays.remove(id)
    }
}

#[cfg(test)]
mod tests;
