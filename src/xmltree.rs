//! Guards against element trees deep enough to exhaust the stack.
//!
//! minidom builds trees without recursion, but dropping, cloning and
//! serialising an `Element` recurse once per level: a stanza nested 50,000
//! levels deep (350 KB, within what servers forward) overflows any thread
//! stack. The link measures each stanza's depth without recursion, and a
//! stanza deeper than [`MAX_DEPTH`] is refused and taken apart without
//! recursion before anything else touches it.

use tokio_xmpp::Stanza;
use tokio_xmpp::minidom::{Element, Node};

/// Deepest payload nesting accepted. Real XMPP payloads stay within ten.
pub const MAX_DEPTH: usize = 64;

/// Nesting depth of `el` (1 for a leaf), counted without recursion.
pub fn depth(el: &Element) -> usize {
    let mut max = 0;
    let mut stack = vec![(el, 1)];
    while let Some((e, d)) = stack.pop() {
        max = max.max(d);
        stack.extend(e.children().map(|c| (c, d + 1)));
    }
    max
}

/// Drop a tree without recursion.
pub fn dismantle(el: Element) {
    let mut stack = vec![el];
    while let Some(mut e) = stack.pop() {
        for n in e.take_nodes() {
            if let Node::Element(c) = n {
                stack.push(c);
            }
        }
    }
}

fn payloads(st: &Stanza) -> Box<dyn Iterator<Item = &Element> + '_> {
    match st {
        Stanza::Message(m) => Box::new(m.payloads.iter()),
        Stanza::Presence(p) => Box::new(p.payloads.iter()),
        Stanza::Iq(iq) => match iq {
            tokio_xmpp::parsers::iq::Iq::Get { payload, .. }
            | tokio_xmpp::parsers::iq::Iq::Set { payload, .. } => {
                Box::new(std::iter::once(payload))
            }
            tokio_xmpp::parsers::iq::Iq::Result { payload, .. } => Box::new(payload.iter()),
            tokio_xmpp::parsers::iq::Iq::Error { payload, error, .. } => {
                Box::new(payload.iter().chain(error.other.iter()))
            }
        },
    }
}

/// Whether a payload of `st` nests deeper than [`MAX_DEPTH`].
pub fn too_deep(st: &Stanza) -> bool {
    payloads(st).any(|p| depth(p) > MAX_DEPTH)
}

/// Drop a stanza's payloads without recursion.
pub fn dismantle_stanza(st: Stanza) {
    let taken: Vec<Element> = match st {
        Stanza::Message(m) => m.payloads,
        Stanza::Presence(p) => p.payloads,
        Stanza::Iq(iq) => match iq {
            tokio_xmpp::parsers::iq::Iq::Get { payload, .. }
            | tokio_xmpp::parsers::iq::Iq::Set { payload, .. } => vec![payload],
            tokio_xmpp::parsers::iq::Iq::Result { payload, .. } => payload.into_iter().collect(),
            tokio_xmpp::parsers::iq::Iq::Error { payload, error, .. } => {
                payload.into_iter().chain(error.other).collect()
            }
        },
    };
    taken.into_iter().for_each(dismantle);
}

/// `el` with every element in namespace `from` moved to `to`, attributes
/// and text kept: a message between the stream's namespace
/// (`jabber:component:accept`, which the parsers read) and `jabber:client`
/// (a message forwarded inside another, as XEP-0356 and XEP-0297 carry
/// it). Recursive: only for trees the link measured ([`MAX_DEPTH`]).
pub fn renamespaced(el: &Element, from: &str, to: &str) -> Element {
    let ns = el.ns();
    let mut out = Element::bare(el.name(), if ns == from { to.to_owned() } else { ns });
    *out.attrs_mut() = el.attrs().clone();
    for node in el.nodes() {
        match node {
            Node::Element(c) => {
                out.append_child(renamespaced(c, from, to));
            }
            Node::Text(t) => out.append_text_node(t.clone()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(n: usize) -> Element {
        format!("{}{}", "<a xmlns='urn:x'>".repeat(n), "</a>".repeat(n))
            .parse()
            .unwrap()
    }

    #[test]
    fn measures_and_drops_deep_trees_without_recursion() {
        assert_eq!(depth(&nested(1)), 1);
        assert_eq!(
            depth(&"<a xmlns='urn:x'><b/><c><d/></c></a>".parse().unwrap()),
            3
        );
        // Far deeper than any stack allows recursively.
        let deep = nested(200_000);
        assert_eq!(depth(&deep), 200_000);
        dismantle(deep);
    }
}
