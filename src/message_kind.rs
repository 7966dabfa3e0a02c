//! Which messages are relayed reliably (stored, sent with a receipt
//! request, replayed until confirmed) and which are relayed once.
//!
//! Clients answer receipt requests for messages with content, and most
//! never for the rest (measured in their sources, 2026-11: Conversations,
//! Monal, Dino and Profanity 0.13 send no receipt for a message without a
//! body or an encrypted payload; Gajim 1.7 and Psi answer nearly
//! anything). A body-less payload stored with a receipt request would time
//! out, hold its queue and come back days later (a call ringing a week
//! late). So only content is relayed reliably; the list is in
//! docs/architecture.md, "What is relayed reliably".

use tokio_xmpp::minidom::Element;
use tokio_xmpp::parsers::message::Message;
use tokio_xmpp::parsers::ns;

pub const CHAT_MARKERS: &str = "urn:xmpp:chat-markers:0";
const HINTS: &str = "urn:xmpp:hints";
const OMEMO_LEGACY: &str = "eu.siacs.conversations.axolotl";
const OMEMO_2: &str = "urn:xmpp:omemo:2";
const OX: &str = "urn:xmpp:openpgp:0";
const LEGACY_PGP: &str = "jabber:x:encrypted";
const OOB: &str = "jabber:x:oob";
const JINGLE_MESSAGE: [&str; 2] = ["urn:xmpp:jingle-message:0", "urn:xmpp:jingle-message:1"];

/// How the relay treats a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Stored, sent with a receipt request, replayed until confirmed.
    Reliable,
    /// Relayed at once as it came, not stored, no receipt requested.
    Once,
}

/// Whether `m` is relayed reliably or once:
/// - a XEP-0353 call message (propose, retract, accept, proceed, reject)
///   goes once whatever else it holds: it means something only now;
/// - a XEP-0334 `<no-store/>` hint: the sender asks for no storage;
/// - otherwise content (a body, a subject, an encrypted payload of OMEMO,
///   OpenPGP for XMPP or legacy PGP, an out-of-band file) is reliable,
///   and everything else (receipts, markers, chat states, reactions,
///   retractions without a fallback body, OMEMO key transport, …) goes
///   once.
pub fn kind(m: &Message) -> Kind {
    let call = m
        .payloads
        .iter()
        .any(|p| JINGLE_MESSAGE.iter().any(|n| p.ns() == *n));
    let no_store = m.payloads.iter().any(|p| p.is("no-store", HINTS));
    if call || no_store {
        return Kind::Once;
    }
    let content =
        !m.bodies.is_empty() || !m.subjects.is_empty() || m.payloads.iter().any(is_content);
    if content { Kind::Reliable } else { Kind::Once }
}

fn is_content(p: &Element) -> bool {
    ((p.is("encrypted", OMEMO_LEGACY) || p.is("encrypted", OMEMO_2))
        && p.children().any(|c| c.name() == "payload"))
        || p.is("openpgp", OX)
        || p.is("x", LEGACY_PGP)
        || p.is("x", OOB)
}

/// Whether `m` holds only receipts, markers and processing hints: the
/// bookkeeping that is never refused for the sender's rate.
pub fn only_bookkeeping(m: &Message) -> bool {
    m.bodies.is_empty()
        && m.subjects.is_empty()
        && m.payloads.iter().all(|p| {
            let n = p.ns();
            n == ns::RECEIPTS || n == CHAT_MARKERS || n == HINTS
        })
}

/// The XEP-0359 origin-id a sender gave `m`, if any.
pub fn origin_id(m: &Message) -> Option<String> {
    m.payloads
        .iter()
        .find(|p| p.is("origin-id", ns::SID))
        .and_then(|p| p.attr("id"))
        .map(str::to_owned)
}

/// A XEP-0184 receipt or a XEP-0333 marker that confirms a message: the
/// id it names, and whether it is a marker (which confirms every earlier
/// message of the same sender too).
pub fn confirmation(p: &Element) -> Option<(&str, bool)> {
    let id = p.attr("id")?;
    if p.is("received", ns::RECEIPTS) {
        return Some((id, false));
    }
    let marker =
        p.ns() == CHAT_MARKERS && matches!(p.name(), "received" | "displayed" | "acknowledged");
    marker.then_some((id, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn parse(inner: &str) -> Message {
        let xml = format!(
            "<message xmlns='jabber:component:accept' from='a@x/r' to='b@relay.x' id='1' type='chat'>{inner}</message>"
        );
        Message::try_from(Element::from_str(&xml).unwrap()).unwrap()
    }

    #[test]
    fn content_is_reliable_and_the_rest_goes_once() {
        for (inner, want) in [
            ("<body>hi</body>", Kind::Reliable),
            ("<subject>s</subject>", Kind::Reliable),
            (
                "<encrypted xmlns='eu.siacs.conversations.axolotl'><header sid='1'/><payload>x</payload></encrypted>",
                Kind::Reliable,
            ),
            (
                "<encrypted xmlns='eu.siacs.conversations.axolotl'><header sid='1'/></encrypted>",
                Kind::Once,
            ),
            (
                "<x xmlns='jabber:x:oob'><url>https://e/f</url></x>",
                Kind::Reliable,
            ),
            (
                "<reactions xmlns='urn:xmpp:reactions:0' id='m1'><reaction>👍</reaction></reactions><store xmlns='urn:xmpp:hints'/>",
                Kind::Once,
            ),
            (
                "<propose xmlns='urn:xmpp:jingle-message:0' id='c1'><description xmlns='urn:xmpp:jingle:apps:rtp:1' media='audio'/></propose><store xmlns='urn:xmpp:hints'/>",
                Kind::Once,
            ),
            (
                "<body>call</body><propose xmlns='urn:xmpp:jingle-message:0' id='c1'/>",
                Kind::Once,
            ),
            (
                "<body>hi</body><no-store xmlns='urn:xmpp:hints'/>",
                Kind::Once,
            ),
            (
                "<composing xmlns='http://jabber.org/protocol/chatstates'/>",
                Kind::Once,
            ),
            (
                "<retract xmlns='urn:xmpp:message-retract:1' id='m1'/>",
                Kind::Once,
            ),
        ] {
            assert_eq!(kind(&parse(inner)), want, "{inner}");
        }
    }

    #[test]
    fn receipts_and_markers_confirm() {
        let m = parse(
            "<received xmlns='urn:xmpp:receipts' id='a'/><displayed xmlns='urn:xmpp:chat-markers:0' id='b'/><markable xmlns='urn:xmpp:chat-markers:0'/><received xmlns='urn:xmpp:receipts'/>",
        );
        let c: Vec<_> = m.payloads.iter().filter_map(confirmation).collect();
        assert_eq!(c, [("a", false), ("b", true)]);
    }
}
