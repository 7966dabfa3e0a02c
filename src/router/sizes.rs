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
