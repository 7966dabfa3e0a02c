//! XEP-0356 (privileged entity): what the server lets the component do
//! for its users, as it announces at connect, and the roster set that
//! puts a relay contact into a user's roster without a prompt.
//!
//! xmpp-parsers 0.23 has no privilege elements, so they are read here by
//! hand. Both namespaces are understood: `urn:xmpp:privilege:2` (Prosody's
//! `mod_privilege` from prosody-modules) and `urn:xmpp:privilege:1`
//! (ejabberd 23.01's built-in `mod_privilege`).

use tokio_xmpp::minidom::Element;
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::jid::{BareJid, Jid};
use tokio_xmpp::parsers::roster::{Ask, Item, Roster, Subscription};

pub const NS_V1: &str = "urn:xmpp:privilege:1";
pub const NS_V2: &str = "urn:xmpp:privilege:2";

/// What a server granted the component for its users.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Grants {
    /// It may set items in its users' rosters (`roster` `set` or `both`).
    pub roster_set: bool,
    /// It gets its users' presence without a subscription (`presence`
    /// `managed_entity` or `roster`).
    pub presence: bool,
    /// It may send messages as its users (`message` `outgoing`): the
    /// namespace the grant came in, which a message sent so must use.
    pub message: Option<&'static str>,
}

/// The grants a message announces: from a server (a bare domain) to the
/// component's own domain, with a `<privilege/>`. Which server may grant
/// is the caller's to check.
pub fn announced(m: &tokio_xmpp::parsers::message::Message) -> Option<Grants> {
    let (from, to) = (m.from.as_ref()?, m.to.as_ref()?);
    if to.node().is_some() || from.node().is_some() || from.resource().is_some() {
        return None;
    }
    m.payloads.iter().find_map(grants)
}

/// The grants a `<privilege/>` element announces, or `None` when `el` is
/// not one. Permissions not understood grant nothing.
pub fn grants(el: &Element) -> Option<Grants> {
    let ns = [NS_V1, NS_V2]
        .into_iter()
        .find(|ns| el.is("privilege", *ns))?;
    let mut g = Grants::default();
    for perm in el.children().filter(|c| c.is("perm", ns)) {
        match (perm.attr("access"), perm.attr("type")) {
            (Some("roster"), Some("set" | "both")) => g.roster_set = true,
            (Some("presence"), Some("managed_entity" | "roster")) => g.presence = true,
            (Some("message"), Some("outgoing")) => g.message = Some(ns),
            _ => {}
        }
    }
    Some(g)
}

/// A roster set, from the component to `user`, that puts `contact` into
/// the user's roster with subscription `both`, named `name`.
pub fn roster_item(id: String, from: Jid, user: &BareJid, contact: BareJid, name: &str) -> Iq {
    let roster = Roster {
        ver: None,
        items: vec![Item {
            jid: contact,
            name: Some(name.to_owned()),
            subscription: Subscription::Both,
            ask: Ask::None,
            groups: Vec::new(),
            approved: None,
        }],
    };
    Iq::from_set(id, roster)
        .with_from(from)
        .with_to(Jid::from(user.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn both_namespaces_are_read_and_unknown_permissions_grant_nothing() {
        let v2 = Element::from_str(
            "<privilege xmlns='urn:xmpp:privilege:2'><perm access='roster' type='both'/>\
             <perm access='message' type='outgoing'/>\
             <perm access='presence' type='managed_entity'/></privilege>",
        )
        .unwrap();
        assert_eq!(
            grants(&v2),
            Some(Grants {
                roster_set: true,
                presence: true,
                message: Some(NS_V2),
            })
        );
        let v1 = Element::from_str(
            "<privilege xmlns='urn:xmpp:privilege:1'><perm access='roster' type='get'/>\
             <perm access='presence' type='roster'/></privilege>",
        )
        .unwrap();
        assert_eq!(
            grants(&v1),
            Some(Grants {
                roster_set: false,
                presence: true,
                message: None,
            })
        );
        let odd = Element::from_str(
            "<privilege xmlns='urn:xmpp:privilege:2'><perm access='roster' type='everything'/>\
             <perm xmlns='other' access='presence' type='managed_entity'/></privilege>",
        )
        .unwrap();
        assert_eq!(grants(&odd), Some(Grants::default()));
        let other = Element::from_str("<privilege xmlns='urn:xmpp:privilege:3'/>").unwrap();
        assert_eq!(grants(&other), None);
    }

    #[test]
    fn the_roster_set_names_the_contact_with_subscription_both() {
        let iq = roster_item(
            "r1".into(),
            Jid::from_str("relay.x").unwrap(),
            &BareJid::from_str("bob@x").unwrap(),
            BareJid::from_str("alice@relay.x").unwrap(),
            "alice@x (relay)",
        );
        let el = Element::from(iq);
        assert_eq!(el.attr("type"), Some("set"));
        assert_eq!(el.attr("to"), Some("bob@x"));
        let item = el
            .get_child("query", "jabber:iq:roster")
            .and_then(|q| q.get_child("item", "jabber:iq:roster"))
            .unwrap();
        assert_eq!(item.attr("jid"), Some("alice@relay.x"));
        assert_eq!(item.attr("subscription"), Some("both"));
        assert_eq!(item.attr("name"), Some("alice@x (relay)"));
    }
}
