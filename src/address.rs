//! Relay addresses: `bob@relay.example.com` stands for `bob@example.com`,
//! and `bob\40other.org@relay.example.com` (XEP-0106) for `bob@other.org`.
//!
//! Pure functions; the router calls them for every stanza in both
//! directions.

use xmpp_parsers::jid::{BareJid, DomainPart, Jid, NodePart};

/// The resource of the full JID that relayed stanzas come from.
pub const RELAY_RESOURCE: &str = "redeliver";

/// A relay address as the full JID relayed stanzas come from.
pub fn with_relay_resource(relay_address: &BareJid) -> Option<Jid> {
    relay_address
        .with_resource_str(RELAY_RESOURCE)
        .ok()
        .map(Jid::from)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("the address has no localpart")]
    NoLocalpart,
    #[error("{0:?} is not a valid JID")]
    Malformed(String),
    #[error("domain {0} is not served by this relay")]
    DomainNotAllowed(String),
}

/// XEP-0106 escape table: (character, escape).
const ESCAPES: [(char, &str); 10] = [
    (' ', "\\20"),
    ('"', "\\22"),
    ('&', "\\26"),
    ('\'', "\\27"),
    ('/', "\\2f"),
    (':', "\\3a"),
    ('<', "\\3c"),
    ('>', "\\3e"),
    ('@', "\\40"),
    ('\\', "\\5c"),
];

fn escape_of(s: &str) -> Option<char> {
    ESCAPES
        .iter()
        .find(|(_, e)| e.eq_ignore_ascii_case(s))
        .map(|(c, _)| *c)
}

/// XEP-0106 §4.2: escape a string into a JID localpart. A backslash is
/// escaped only where it would otherwise start a valid escape sequence.
pub fn escape_node(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for (i, c) in s.char_indices() {
        if c == '\\' {
            let next = s.get(i..i + 3).filter(|t| t.len() == 3);
            if next.and_then(escape_of).is_some() {
                out.push_str("\\5c");
            } else {
                out.push('\\');
            }
        } else if let Some((_, e)) = ESCAPES.iter().find(|(k, _)| *k == c) {
            out.push_str(e);
        } else {
            out.push(c);
        }
    }
    out
}

/// XEP-0106 §4.3: unescape a localpart.
pub fn unescape_node(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('\\') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        match tail.get(..3).and_then(escape_of) {
            Some(c) => {
                out.push(c);
                rest = &tail[3..];
            }
            None => {
                out.push('\\');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Maps between user JIDs and relay addresses for one component.
#[derive(Debug, Clone)]
pub struct AddressBook {
    component: DomainPart,
    default_domain: String,
    allowed: Vec<String>,
}

impl AddressBook {
    pub fn new(component: &str, default_domain: &str, allowed: &[String]) -> Self {
        AddressBook {
            component: DomainPart::new(component)
                .expect("validated component domain")
                .into_owned(),
            default_domain: default_domain.to_owned(),
            allowed: allowed.to_vec(),
        }
    }

    pub fn component(&self) -> &DomainPart {
        &self.component
    }

    /// The component's bare domain as a JID.
    pub fn component_jid(&self) -> BareJid {
        BareJid::from_parts(None, &self.component)
    }

    /// May a user of `domain` send through the relay?
    pub fn sender_allowed(&self, domain: &str) -> bool {
        self.allowed.iter().any(|d| d == domain)
    }

    /// Does the relay serve `domain`'s users: reachable through the relay
    /// (and, in transparent mode, whose server's hand-offs it takes)?
    pub fn serves(&self, domain: &str) -> bool {
        domain == self.default_domain || self.sender_allowed(domain)
    }

    /// The user JID behind a relay localpart.
    pub fn user_for(&self, relay_node: Option<&str>) -> Result<BareJid, AddressError> {
        let node = relay_node.ok_or(AddressError::NoLocalpart)?;
        let raw = unescape_node(node);
        let text = if raw.contains('@') {
            raw
        } else {
            format!("{raw}@{}", self.default_domain)
        };
        let jid: BareJid = text
            .parse()
            .map_err(|_| AddressError::Malformed(text.clone()))?;
        if jid.node().is_none() {
            return Err(AddressError::Malformed(text));
        }
        if !self.serves(jid.domain().as_str()) {
            return Err(AddressError::DomainNotAllowed(jid.domain().to_string()));
        }
        Ok(jid)
    }

    /// The full JID relayed stanzas come from: the relay address with the
    /// fixed resource [`RELAY_RESOURCE`]. Clients that answer receipts to
    /// the sender's full JID only (Profanity 0.13) need one; receipts and
    /// markers to the bare address or any resource of it count alike.
    pub fn relay_full(&self, user: &BareJid) -> Result<Jid, AddressError> {
        let bare = self.relay_for(user)?;
        with_relay_resource(&bare).ok_or_else(|| AddressError::Malformed(bare.to_string()))
    }

    /// The relay address standing for `user`, whose domain must be one the
    /// relay serves (so that [`Self::user_for`] maps it back).
    pub fn relay_for(&self, user: &BareJid) -> Result<BareJid, AddressError> {
        let node = user.node().ok_or(AddressError::NoLocalpart)?;
        if !self.serves(user.domain().as_str()) {
            return Err(AddressError::DomainNotAllowed(user.domain().to_string()));
        }
        let local = if user.domain().as_str() == self.default_domain {
            // Escaped too: a localpart holding `\40` must not come back
            // as `@` (found by the `address` fuzzer).
            escape_node(node.as_str())
        } else {
            escape_node(&format!("{node}@{}", user.domain()))
        };
        let node = NodePart::new(&local).map_err(|_| AddressError::Malformed(local.clone()))?;
        Ok(BareJid::from_parts(Some(&node), &self.component))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book() -> AddressBook {
        AddressBook::new(
            "relay.example.com",
            "example.com",
            &["example.com".into(), "other.org".into()],
        )
    }

    fn jid(s: &str) -> BareJid {
        s.parse().unwrap()
    }

    #[test]
    fn xep0106_examples() {
        // From XEP-0106 §5 (examples of transformation).
        let cases = [
            ("space cadet@example.com", r"space\20cadet\40example.com"),
            (r#"call me "ishmael""#, r"call\20me\20\22ishmael\22"),
            ("at&t guy", r"at\26t\20guy"),
            ("d'artagnan", r"d\27artagnan"),
            ("/.fanboy", r"\2f.fanboy"),
            ("::foo::", r"\3a\3afoo\3a\3a"),
            ("<foo>", r"\3cfoo\3e"),
            ("user@host", r"user\40host"),
            (r"c:\net", r"c\3a\net"),
            (r"c:\\net", r"c\3a\\net"),
            (r"c:\cool stuff", r"c\3a\cool\20stuff"),
            (r"c:\5commas", r"c\3a\5c5commas"),
        ];
        for (raw, escaped) in cases {
            assert_eq!(escape_node(raw), escaped, "escape {raw}");
            assert_eq!(unescape_node(escaped), raw, "unescape {escaped}");
        }
    }

    #[test]
    fn escaping_round_trips() {
        for raw in [
            "",
            "a",
            r"\",
            r"\\",
            r"\40",
            "a b@c/d:e",
            r"\5c\5c",
            "ü@é.org",
        ] {
            assert_eq!(unescape_node(&escape_node(raw)), raw, "{raw:?}");
        }
    }

    #[test]
    fn default_domain_both_ways() {
        let b = book();
        let relay = b.relay_for(&jid("bob@example.com")).unwrap();
        assert_eq!(relay, jid("bob@relay.example.com"));
        assert_eq!(
            b.user_for(relay.node().map(|n| n.as_str())).unwrap(),
            jid("bob@example.com")
        );
    }

    #[test]
    fn other_domain_both_ways() {
        let b = book();
        let relay = b.relay_for(&jid("carol@other.org")).unwrap();
        assert_eq!(relay.node().unwrap().as_str(), r"carol\40other.org");
        assert_eq!(
            b.user_for(relay.node().map(|n| n.as_str())).unwrap(),
            jid("carol@other.org")
        );
    }

    #[test]
    fn refusals() {
        let b = book();
        assert_eq!(b.user_for(None), Err(AddressError::NoLocalpart));
        let evil = jid(r"eve\40evil.net@relay.example.com");
        assert!(matches!(
            b.user_for(evil.node().map(|n| n.as_str())),
            Err(AddressError::DomainNotAllowed(_))
        ));
        let broken = jid(r"a\40b\40c@relay.example.com");
        assert!(matches!(
            b.user_for(broken.node().map(|n| n.as_str())),
            Err(AddressError::Malformed(_))
        ));
        let nodeless = jid(r"\40other.org@relay.example.com");
        assert!(matches!(
            b.user_for(nodeless.node().map(|n| n.as_str())),
            Err(AddressError::Malformed(_))
        ));
    }

    /// Found by the `address` fuzzer: an address for a domain the relay
    /// does not serve would not map back to its user.
    #[test]
    fn relay_for_refuses_domains_it_does_not_serve() {
        let b = book();
        assert!(matches!(
            b.relay_for(&jid("bob@elsewhere.example")),
            Err(AddressError::DomainNotAllowed(_))
        ));
    }

    #[test]
    fn a_backslash_sequence_in_a_localpart_survives_the_round_trip() {
        let b = book();
        let user = jid("a\\40b@example.com");
        let relay = b.relay_for(&user).unwrap();
        assert_eq!(relay.node().unwrap().as_str(), "a\\5c40b");
        assert_eq!(b.user_for(relay.node().map(|n| n.as_str())).unwrap(), user);
    }
}
