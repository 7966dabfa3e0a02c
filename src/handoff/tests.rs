use super::*;
use std::str::FromStr;

fn me() -> Jid {
    Jid::from_str("relay.localhost").unwrap()
}

fn serves(d: &str) -> bool {
    d == "localhost" || d == "other.localhost"
}

fn payload(inner: &str, stamp: Option<&str>) -> Element {
    let delay = stamp.map_or(String::new(), |s| {
        format!("<delay xmlns='urn:xmpp:delay' stamp='{s}'/>")
    });
    Element::from_str(&format!(
        "<handoff xmlns='urn:redeliver:handoff:0'><forwarded xmlns='urn:xmpp:forward:0'>\
         {delay}{inner}</forwarded></handoff>"
    ))
    .unwrap()
}

fn server() -> Jid {
    Jid::from_str("localhost").unwrap()
}

const MSG: &str = "<message xmlns='jabber:client' from='alice@localhost/phone' \
                   to='bob@localhost' id='m1' type='chat'><body>hi</body></message>";

#[test]
fn a_handoff_is_kept_from_the_bare_sender_with_one_delay_of_the_oldest_time() {
    let inner = "<message xmlns='jabber:client' from='alice@localhost/phone' \
                 to='bob@localhost/gone' id='m1' type='chat'><body>hi</body>\
                 <request xmlns='urn:xmpp:receipts'/>\
                 <delay xmlns='urn:xmpp:delay' from='localhost' stamp='2026-12-07T01:00:05Z'/>\
                 <delay xmlns='urn:xmpp:delay' from='localhost' stamp='2026-12-07T01:00:01Z'/>\
                 <replay xmlns='urn:redeliver:handoff:0'/></message>";
    let t = read(
        &server(),
        &payload(inner, Some("2026-12-07T01:00:03.250Z")),
        &serves,
        &me(),
        0,
    )
    .unwrap();
    assert_eq!(t.sender.to_string(), "alice@localhost/phone");
    assert_eq!(t.recipient.to_string(), "bob@localhost");
    assert_eq!(t.id, "m1");
    let m = t.message;
    assert_eq!(m.from.unwrap().to_string(), "alice@localhost");
    assert_eq!(m.to.unwrap().to_string(), "bob@localhost");
    assert_eq!(m.bodies[""], "hi");
    let delays: Vec<_> = m
        .payloads
        .iter()
        .filter(|p| p.is("delay", ns::DELAY))
        .collect();
    assert_eq!(delays.len(), 1, "{delays:?}");
    assert_eq!(delays[0].attr("from"), Some("relay.localhost"));
    assert_eq!(delays[0].attr("stamp"), Some("2026-12-07T01:00:01+00:00"));
    assert!(
        !m.payloads
            .iter()
            .any(|p| p.ns() == NS || p.is("request", ns::RECEIPTS))
    );
}

#[test]
fn the_forwarded_time_counts_when_the_message_carries_none() {
    let t = read(
        &server(),
        &payload(MSG, Some("2026-12-07T01:00:03.250Z")),
        &serves,
        &me(),
        0,
    )
    .unwrap();
    let d = t
        .message
        .payloads
        .iter()
        .find(|p| p.is("delay", ns::DELAY))
        .unwrap();
    assert_eq!(d.attr("stamp"), Some("2026-12-07T01:00:03.250+00:00"));
}

#[test]
fn handoffs_from_users_other_servers_or_about_other_domains_are_forbidden() {
    for from in [
        "bob@localhost",
        "localhost/x",
        "example.org",
        "alice@localhost/phone",
    ] {
        let e = read(
            &Jid::from_str(from).unwrap(),
            &payload(MSG, None),
            &serves,
            &me(),
            0,
        )
        .unwrap_err();
        assert_eq!(e.defined_condition, DefinedCondition::Forbidden, "{from}");
    }
    // other.localhost may not hand off a message to a user of localhost.
    let e = read(
        &Jid::from_str("other.localhost").unwrap(),
        &payload(MSG, None),
        &serves,
        &me(),
        0,
    )
    .unwrap_err();
    assert_eq!(e.defined_condition, DefinedCondition::Forbidden);
}

#[test]
fn what_cannot_be_replayed_is_refused() {
    let cases = [
        (
            "<message xmlns='jabber:client' from='x@example.org/r' to='bob@localhost' id='m'/>",
            DefinedCondition::NotAcceptable,
        ),
        // Another served domain's user: the server vouches for its own.
        (
            "<message xmlns='jabber:client' from='eve@other.localhost/r' to='bob@localhost' \
             id='m'/>",
            DefinedCondition::NotAcceptable,
        ),
        (
            "<message xmlns='jabber:client' from='alice@localhost/r' to='bob@localhost' id='m' \
             type='groupchat'/>",
            DefinedCondition::NotAcceptable,
        ),
        (
            "<message xmlns='jabber:client' from='alice@localhost/r' to='bob@localhost'/>",
            DefinedCondition::BadRequest,
        ),
        (
            "<message xmlns='jabber:component:accept' from='alice@localhost/r' \
             to='bob@localhost' id='m'/>",
            DefinedCondition::BadRequest,
        ),
    ];
    for (inner, want) in cases {
        let e = read(&server(), &payload(inner, None), &serves, &me(), 0).unwrap_err();
        assert_eq!(e.defined_condition, want, "{inner}");
    }
}

#[test]
fn stored_hand_offs_are_told_from_relayed_messages_by_their_from() {
    let t = read(&server(), &payload(MSG, None), &serves, &me(), 0).unwrap();
    let xml = String::from(&Element::from(t.message));
    assert!(is_handed_off(&xml, "relay.localhost"), "{xml}");
    assert!(!is_handed_off(
        "<message xmlns='jabber:component:accept' from='alice@relay.localhost' to='bob@localhost'/>",
        "relay.localhost"
    ));
    assert!(!is_handed_off(
        "<message xmlns=\"jabber:component:accept\" from=\"bob@relay.localhost/r\"/>",
        "relay.localhost"
    ));
    assert!(!is_handed_off("<message/>", "relay.localhost"));
}

#[test]
fn a_replay_is_wrapped_for_the_senders_server_in_its_namespace() {
    let mut h = Handoff::new(me());
    let t = read(&server(), &payload(MSG, None), &serves, &me(), 0).unwrap();
    let outer = h.envelope("bob@localhost", crate::privilege::NS_V1, t.message);
    let el = Element::from(outer);
    assert_eq!(el.attr("to"), Some("localhost"));
    assert_eq!(el.attr("from"), Some("relay.localhost"));
    let outer_id = el.attr("id").unwrap().to_owned();
    assert_ne!(outer_id, "m1", "an id of its own");
    let inner = el
        .get_child("privilege", crate::privilege::NS_V1)
        .and_then(|p| p.get_child("forwarded", ns::FORWARD))
        .and_then(|f| f.get_child("message", ns::JABBER_CLIENT))
        .expect("privilege/forwarded/message in jabber:client");
    assert_eq!(inner.attr("from"), Some("alice@localhost"));
    assert!(inner.get_child("body", ns::JABBER_CLIENT).is_some());
    assert!(inner.get_child("replay", NS).is_some());
    assert_eq!(inner.attr("id"), Some("m1"));
    assert_eq!(h.refused(&outer_id).as_deref(), Some("bob@localhost"));
    assert_eq!(h.refused(&outer_id), None);
}

#[test]
fn confirmation_copies_are_believed_from_a_served_domain_about_its_users_only() {
    let copy = |from: &str, inner_from: &str| {
        Message::try_from(
            Element::from_str(&format!(
                "<message xmlns='jabber:component:accept' from='{from}' to='relay.localhost'>\
                 <confirmation xmlns='urn:redeliver:handoff:0'>\
                 <forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client' \
                 from='{inner_from}' to='alice@localhost' id='r1'>\
                 <received xmlns='urn:xmpp:receipts' id='m1'/></message></forwarded>\
                 </confirmation></message>"
            ))
            .unwrap(),
        )
        .unwrap()
    };
    let ok = read_confirmation(&copy("localhost", "bob@localhost/phone"), &serves).unwrap();
    assert_eq!(ok.from.unwrap().to_string(), "bob@localhost/phone");
    assert!(ok.payloads.iter().any(|p| p.is("received", ns::RECEIPTS)));
    assert!(read_confirmation(&copy("bob@localhost/x", "bob@localhost/phone"), &serves).is_none());
    assert!(read_confirmation(&copy("other.localhost", "bob@localhost/phone"), &serves).is_none());
    assert!(read_confirmation(&copy("example.org", "bob@example.org/p"), &serves).is_none());
}

#[test]
fn a_bounced_replay_names_its_sender() {
    let m = Message::try_from(
        Element::from_str(
            "<message xmlns='jabber:component:accept' type='error' from='bob@localhost' \
             to='relay.localhost' id='m1'><replay xmlns='urn:redeliver:handoff:0' \
             from='alice@localhost'/><error type='wait'><recipient-unavailable \
             xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>",
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        bounced_replay_sender(&m).unwrap().to_string(),
        "alice@localhost"
    );
}
