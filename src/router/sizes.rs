//! What the relay writes must fit the server's stanza limit (Prosody
//! closes a component link on a stanza over 512 KiB, and a stanza that is
//! written again after every reconnect drops the link for good): the
//! bounds on ids, on texts passed on, and on what sending adds to a
//! stored message.

use super::*;

/// The largest stanza a server takes on a component link (Prosody's
/// `component_stanza_size_limit`, 512 KiB).
pub(super) const SERVER_STANZA_LIMIT: usize = 512 * 1024;

/// Message ids and origin-ids longer than this (bytes) are refused: no
/// client needs more, and every copy of one (the origin-id added at
/// send, a receipt, an error) is written up to six times its length.
pub(super) const MAX_ID_BYTES: usize = 1024;

/// Characters of a bounce's text passed on to a sender.
const MAX_PASSED_TEXT_CHARS: usize = 1024;

/// The longest language tag passed on (BCP 47 tags are far shorter).
const MAX_LANG_BYTES: usize = 35;

/// The longest resource a server gives (RFC 7622: 1,023 bytes).
const MAX_RESOURCE_BYTES: usize = 1023;

/// An upper bound of `s`'s length as written in XML: each character that
/// may be escaped counted as its longest escape (`&quot;`, `&#xD;`).
pub(super) fn escaped_len(s: &str) -> usize {
    s.len()
        + s.bytes()
            .filter(|b| matches!(b, b'&' | b'<' | b'>' | b'"' | b'\'' | b'\r' | b'\n' | b'\t'))
            .count()
            * 5
}

/// What sending adds to a stored message of id `id` at most, sent to
/// the recipient's bare JID (see [`Router::outgoing`]): the relay
/// address's resource in `from`, a receipt request, a stanza-id and a
/// delay naming `domain`, and, unless the sender gave one
/// (`has_origin_id`), an origin-id copying the id. What
/// `max_stanza_bytes` is checked against.
pub(super) fn send_overhead(domain: &str, id: &str, has_origin_id: bool) -> usize {
    // The elements' names, namespaces and fixed values (a stamp with
    // milliseconds, a 16-digit stanza-id), generously rounded up.
    const FIXED: usize = 512;
    let origin = if has_origin_id { 0 } else { escaped_len(id) };
    FIXED + 2 * escaped_len(domain) + origin
}

/// What a resource in `to` adds at most (a message goes to one device by
/// its full JID once another went silent): inside the room that the
/// ceiling on `max_stanza_bytes` leaves below the server's limit.
pub(super) const RESOURCE_OVERHEAD: usize = 1 + 6 * MAX_RESOURCE_BYTES;

/// Whether a stored stanza of `stored_len` bytes for message `id` could
/// pass the server's limit once parsed and written again (each character
/// at most five times its length, `>` as `&gt;`, `"` as `&#34;`), with
/// what sending adds: only such a one is measured before it is sent.
pub(super) fn may_pass_limit(stored_len: usize, id: &str, domain: &str) -> bool {
    5 * stored_len + send_overhead(domain, id, false) + RESOURCE_OVERHEAD > SERVER_STANZA_LIMIT
}

/// The size of `stanza` (a message, an iq) as written.
pub(super) fn written_len<T: Clone + Into<Element>>(stanza: &T) -> usize {
    String::from(&stanza.clone().into()).len()
}

/// Whether message `m` as written is longer than `limit` bytes. Only a
/// message whose [`written_bound`] passes the limit is written out to
/// measure: every receipt relayed back to its sender is checked, and
/// writing each one twice (here, then on the link) cost a few percent
/// of a replay's CPU.
pub(super) fn written_over(m: &Message, limit: usize) -> bool {
    written_bound(m) > limit && written_len(m) > limit
}

/// An upper bound of message `m`'s size as written, without writing it:
/// every text at its longest escape, every element's namespace declared,
/// names twice (head and foot), and room to spare for the punctuation.
fn written_bound(m: &Message) -> usize {
    // `<message xmlns='…' type='groupchat' …></message>`.
    const STANZA: usize = 256;
    // A body's or subject's element with its `xml:lang`.
    const TEXT: usize = 64;
    let jid = |j: &Option<Jid>| j.as_ref().map_or(0, |j| 16 + escaped_len(j.as_str()));
    let texts: usize = m
        .bodies
        .iter()
        .chain(&m.subjects)
        .map(|(lang, text)| TEXT + escaped_len(lang) + escaped_len(text))
        .sum();
    let thread = m.thread.as_ref().map_or(0, |t| {
        TEXT + escaped_len(&t.id) + t.parent.as_deref().map_or(0, escaped_len)
    });
    STANZA
        + jid(&m.from)
        + jid(&m.to)
        + m.id.as_ref().map_or(0, |id| 16 + escaped_len(&id.0))
        + texts
        + thread
        + m.payloads.iter().map(element_bound).sum::<usize>()
}

/// An upper bound of `e`'s size as written (see [`written_bound`]).
fn element_bound(e: &Element) -> usize {
    // `<` `>` `</` `>`, ` xmlns='` `'`, and spare.
    const ELEMENT: usize = 32;
    // ` p:` `='` `'`, a prefix's declaration ` xmlns:p='` `'`, and spare.
    const ATTRIBUTE: usize = 48;
    let mut n = ELEMENT + 2 * e.name().len() + escaped_len(&e.ns());
    for (prefix, ns) in e.prefixes.declared_prefixes() {
        n += ATTRIBUTE + prefix.as_deref().map_or(0, str::len) + escaped_len(ns);
    }
    for ((ns, name), value) in e.attrs() {
        n += ATTRIBUTE + 2 * escaped_len(ns) + name.len() + escaped_len(value);
    }
    for node in e.nodes() {
        n += match node {
            minidom::Node::Element(c) => element_bound(c),
            minidom::Node::Text(t) => escaped_len(t),
        };
    }
    n
}

/// A bounce's error as passed on to a sender: its type and condition,
/// and its first text cut to [`MAX_PASSED_TEXT_CHARS`]; what else it
/// carried (another server's elements) stays here.
pub(super) fn bounded_error(e: &StanzaError) -> StanzaError {
    use DefinedCondition as C;
    // `gone` and `redirect` carry an address of the other side's choosing.
    let condition = match &e.defined_condition {
        C::Gone { .. } => C::Gone { new_address: None },
        C::Redirect { .. } => C::Redirect { new_address: None },
        c => c.clone(),
    };
    let mut out = StanzaError::new(e.type_.clone(), condition, "en", "");
    out.texts.clear();
    if let Some((lang, text)) = e.texts.iter().next() {
        let lang = if lang.len() <= MAX_LANG_BYTES {
            lang.clone()
        } else {
            "en".into()
        };
        out.texts
            .insert(lang, text.chars().take(MAX_PASSED_TEXT_CHARS).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngExt;

    /// A message parsed from `xml` (in `jabber:component:accept`).
    fn message(xml: &str) -> Message {
        Message::try_from(Element::from_str(xml).unwrap()).unwrap()
    }

    /// A string of at most `max` characters, escapes and non-ASCII ones
    /// among them.
    fn text(rng: &mut impl RngExt, max: usize) -> String {
        let n = rng.random_range(0..=max);
        const CHARS: &[char] = &[
            'a', 'Z', '0', ' ', '&', '<', '>', '"', '\'', '\r', '\n', '\t', 'ü', '語', '😀',
        ];
        (0..n)
            .map(|_| CHARS[rng.random_range(0..CHARS.len())])
            .collect()
    }

    /// A random element tree of at most `depth` levels, with plain,
    /// namespaced and prefixed attributes, texts and children.
    fn element(rng: &mut impl RngExt, depth: usize) -> Element {
        let ns = format!(
            "urn:x:{}",
            text(rng, 8).replace(['<', '>', '"', '\'', '&', '\r', '\n', '\t', ' '], "-")
        );
        let mut b = Element::builder(["a", "payload", "x-y"][rng.random_range(0..3)], ns.as_str());
        for i in 0..rng.random_range(0..4) {
            b = b.attr(
                minidom::rxml::NcName::try_from(format!("k{i}")).unwrap(),
                text(rng, 100),
            );
        }
        if depth == 3 && rng.random_bool(0.3) {
            // (minidom refuses to write a prefix declared again below.)
            b = b.prefix(Some("p".into()), "urn:prefixed").unwrap();
        }
        let mut e = b.build();
        if rng.random_bool(0.3) {
            e.attrs_mut().insert(
                minidom::rxml::Namespace::XML,
                minidom::rxml::NcName::try_from("lang").unwrap(),
                text(rng, 5),
            );
        }
        for _ in 0..rng.random_range(0..4) {
            if depth > 0 && rng.random_bool(0.5) {
                e.append_child(element(rng, depth - 1));
            } else {
                e.append_text_node(text(rng, 200));
            }
        }
        e
    }

    #[test]
    fn the_written_bound_is_never_below_what_is_written() {
        let receipt = message(
            "<message xmlns='jabber:component:accept' from='bob@x/r' to='alice@relay.x/redeliver' id='rc-1'>\
             <received xmlns='urn:xmpp:receipts' id='m&amp;1'/></message>",
        );
        assert!(written_bound(&receipt) >= written_len(&receipt));
        let mut rng = rand::rng();
        for _ in 0..2_000 {
            let mut m = Message::new(Some(Jid::new("alice@relay.x/redeliver").unwrap()));
            m.from = Some(Jid::new("bob@x/r\u{fc}").unwrap());
            if rng.random_bool(0.8) {
                m.id = Some(Id(text(&mut rng, 30)));
            }
            for i in 0..rng.random_range(0..3) {
                let lang = Lang(if i == 0 {
                    String::new()
                } else {
                    format!("l{i}")
                });
                m.bodies.insert(lang.clone(), text(&mut rng, 400));
                if rng.random_bool(0.3) {
                    m.subjects.insert(lang, text(&mut rng, 10));
                }
            }
            if rng.random_bool(0.2) {
                m.thread = Some(tokio_xmpp::parsers::message::Thread {
                    parent: rng.random_bool(0.5).then_some(text(&mut rng, 8)),
                    id: text(&mut rng, 12),
                });
            }
            for _ in 0..rng.random_range(0..4) {
                let e = element(&mut rng, 3);
                let (bound, len) = (element_bound(&e), String::from(&e).len());
                assert!(
                    bound >= len,
                    "bound {bound} < written {len}: {}",
                    String::from(&e)
                );
                m.payloads.push(e);
            }
            let (bound, len) = (written_bound(&m), written_len(&m));
            assert!(
                bound >= len,
                "bound {bound} < written {len}: {}",
                String::from(&Element::from(m.clone()))
            );
            // So the check gives what measuring would, at every limit.
            for limit in [len.saturating_sub(1), len, len + 1, bound, bound + 1] {
                assert_eq!(
                    written_over(&m, limit),
                    len > limit,
                    "limit {limit}, written {len}"
                );
            }
        }
    }

    #[test]
    fn escaped_len_bounds_what_minidom_writes() {
        let with = |v: &str| {
            let xml = format!(
                "<x xmlns='urn:x' v='{}'/>",
                v.replace('&', "&amp;")
                    .replace('\'', "&apos;")
                    .replace('<', "&lt;")
                    .replace('\r', "&#xD;")
                    .replace('\n', "&#xA;")
                    .replace('\t', "&#x9;")
            );
            String::from(&Element::from_str(&xml).unwrap()).len()
        };
        for s in ["plain", "a\"b'c<d>e&f", "\r\n\t", "", "ünïcödé"] {
            let written = with(s) - with("");
            assert!(
                written <= escaped_len(s),
                "{s:?}: {written} > {}",
                escaped_len(s)
            );
        }
    }

    #[test]
    fn a_bounded_error_keeps_type_condition_and_a_cut_text() {
        let mut e = StanzaError::new(
            ErrorType::Cancel,
            DefinedCondition::ItemNotFound,
            "de",
            "x".repeat(5000),
        );
        e.other = Some(Element::builder("junk", "urn:x").build());
        let b = bounded_error(&e);
        assert_eq!(b.type_, ErrorType::Cancel);
        assert_eq!(b.defined_condition, DefinedCondition::ItemNotFound);
        assert!(b.other.is_none());
        assert_eq!(
            b.texts.get("de").map(|t| t.len()),
            Some(MAX_PASSED_TEXT_CHARS)
        );
    }
}
