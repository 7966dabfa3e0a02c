//! Hostile and malformed input from the server side of the link, through
//! the fake XEP-0114 server: redeliver must not panic, must not drop the
//! link for anything that is a well-formed stanza, must answer every iq,
//! and everything it emits must come from its own domain.

mod common;

use std::time::Duration;

use common::fake::FakeServer;
use common::*;
use tokio_xmpp::minidom::Element;

const NS: &str = "jabber:component:accept";

async fn start() -> (FakeServer, Relay) {
    let mut fake = FakeServer::start().await;
    let port = fake.port;
    let relay = relay_on_fake(
        port,
        RelayOpts {
            max_stanza_bytes: 64 * 1024,
            ..Default::default()
        },
    )
    .await;
    fake.connected(SECS(5)).await.expect("redeliver connects");
    (fake, relay)
}

/// Everything redeliver sends within `wait`.
async fn collect(fake: &mut FakeServer, wait: Duration) -> Vec<Element> {
    let mut out = Vec::new();
    let end = tokio::time::Instant::now() + wait;
    loop {
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        match fake.next_stanza(left).await {
            Some(el) => out.push(el),
            None => return out,
        }
    }
}

/// The relay still works: a ping is answered and a message relayed.
async fn still_serving(fake: &mut FakeServer, tag: &str) {
    fake.send(&format!(
        "<iq xmlns='{NS}' type='get' id='alive-{tag}' from='alice@localhost/r' to='{COMPONENT}'>\
         <ping xmlns='urn:xmpp:ping'/></iq>"
    ));
    let end = tokio::time::Instant::now() + SECS(10);
    loop {
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        let el = fake.next_stanza(left).await.expect("ping answered");
        if el.attr("id") == Some(&format!("alive-{tag}")) {
            assert_eq!(el.attr("type"), Some("result"));
            return;
        }
    }
}

fn assert_own_domain(out: &[Element]) {
    for el in out {
        let from = el.attr("from").unwrap_or("");
        let domain = from.split('/').next().unwrap_or("");
        let domain = domain.rsplit('@').next().unwrap_or("");
        assert_eq!(domain, COMPONENT, "emitted from outside its domain: {el:?}");
    }
}

fn error_condition(el: &Element) -> Option<String> {
    el.get_child("error", NS)?
        .children()
        .find(|c| c.ns() == "urn:ietf:params:xml:ns:xmpp-stanzas" && c.name() != "text")
        .map(|c| c.name().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_hostile_stanzas() {
    let (mut fake, relay) = start().await;
    let nested = 50_000;
    let deep = format!(
        "<message xmlns='{NS}' from='alice@localhost/r' to='bob@relay.localhost' id='deep'>\
         <body>x</body>{}{}</message>",
        "<a xmlns='urn:example:deep'>".repeat(nested),
        "</a>".repeat(nested)
    );
    let huge = format!(
        "<message xmlns='{NS}' from='alice@localhost/r' to='bob@relay.localhost' id='huge'>\
         <body>{}</body></message>",
        "x".repeat(300 * 1024)
    );
    let cases: Vec<String> = vec![
        // No from, no to, foreign to, foreign from domain.
        format!(
            "<message xmlns='{NS}' to='bob@relay.localhost' id='nofrom'><body>x</body></message>"
        ),
        format!(
            "<message xmlns='{NS}' from='alice@localhost/r' id='noto'><body>x</body></message>"
        ),
        format!(
            "<message xmlns='{NS}' from='alice@localhost/r' to='bob@elsewhere.example' id='foreignto'><body>x</body></message>"
        ),
        format!(
            "<message xmlns='{NS}' from='mallory@evil.example/r' to='bob@relay.localhost' id='evil'><body>x</body></message>"
        ),
        // Unknown namespaces and odd payloads are relayed as they are.
        format!(
            "<message xmlns='{NS}' from='alice@localhost/r' to='bob@relay.localhost' id='unknown-ns'><body>x</body><thing xmlns='urn:example:unknown'><deeper/></thing></message>"
        ),
        deep,
        huge,
        // iq of every type.
        format!(
            "<iq xmlns='{NS}' type='get' id='iq-get' from='alice@localhost/r' to='{COMPONENT}'><query xmlns='urn:example:nothing'/></iq>"
        ),
        format!(
            "<iq xmlns='{NS}' type='set' id='iq-set' from='alice@localhost/r' to='{COMPONENT}'><query xmlns='urn:example:nothing'/></iq>"
        ),
        format!(
            "<iq xmlns='{NS}' type='get' id='iq-user' from='alice@localhost/r' to='bob@relay.localhost'><query xmlns='urn:example:nothing'/></iq>"
        ),
        format!(
            "<iq xmlns='{NS}' type='get' id='iq-foreign' from='alice@localhost/r' to='elsewhere.example'><ping xmlns='urn:xmpp:ping'/></iq>"
        ),
        format!(
            "<iq xmlns='{NS}' type='result' id='iq-stray-result' from='alice@localhost/r' to='{COMPONENT}'/>"
        ),
        format!(
            "<iq xmlns='{NS}' type='error' id='iq-stray-error' from='alice@localhost/r' to='{COMPONENT}'><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>"
        ),
        format!(
            "<iq xmlns='{NS}' type='get' id='iq-empty' from='alice@localhost/r' to='{COMPONENT}'/>"
        ),
        format!(
            "<iq xmlns='{NS}' type='bogus' id='iq-bogus' from='alice@localhost/r' to='{COMPONENT}'/>"
        ),
        // Stanzas that do not parse as what they claim to be.
        format!(
            "<message xmlns='{NS}' from='alice@localhost/r' to='bob@relay.localhost' id='two-threads'><thread>a</thread><thread>b</thread></message>"
        ),
        format!("<presence xmlns='{NS}' from='alice@localhost/r' to='{COMPONENT}' type='weird'/>"),
        // Error stanzas about nothing.
        format!(
            "<message xmlns='{NS}' type='error' from='bob@localhost' to='alice@relay.localhost' id='nothing'><error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"
        ),
    ];
    for c in &cases {
        assert!(fake.send(c));
    }
    let out = collect(&mut fake, SECS(4)).await;
    still_serving(&mut fake, "after-cases").await;

    fn by_id<'a>(out: &'a [Element], id: &'a str) -> impl Iterator<Item = &'a Element> {
        out.iter().filter(move |e| e.attr("id") == Some(id))
    }
    let cond = |id: &str| by_id(&out, id).find_map(error_condition);
    // Every iq get/set and the unparseable iq got an answer.
    assert_eq!(cond("iq-get").as_deref(), Some("service-unavailable"));
    assert_eq!(cond("iq-set").as_deref(), Some("service-unavailable"));
    assert_eq!(cond("iq-user").as_deref(), Some("service-unavailable"));
    assert_eq!(cond("iq-empty").as_deref(), Some("bad-request"));
    assert_eq!(cond("iq-bogus").as_deref(), Some("bad-request"));
    // Results and errors are never answered.
    assert_eq!(by_id(&out, "iq-stray-result").count(), 0);
    // Nothing can answer for another domain.
    assert_eq!(by_id(&out, "iq-foreign").count(), 0);
    assert_eq!(by_id(&out, "iq-stray-error").count(), 0);
    assert_eq!(by_id(&out, "nothing").count(), 0);
    // Refusals.
    assert_eq!(cond("evil").as_deref(), Some("not-allowed"));
    assert_eq!(cond("huge").as_deref(), Some("policy-violation"));
    assert_eq!(cond("two-threads").as_deref(), Some("bad-request"));
    // No reply can be addressed for a stanza without from; one without to
    // is not ours.
    assert_eq!(by_id(&out, "nofrom").count(), 0);
    assert_eq!(by_id(&out, "noto").count(), 0);
    assert_eq!(by_id(&out, "foreignto").count(), 0);
    // Relayed: the deep one (the relay keeps payloads it does not know),
    // the unknown namespace.
    let relayed = |id: &str| {
        by_id(&out, id)
            .any(|e| e.attr("type") != Some("error") && e.attr("to") == Some("bob@localhost"))
    };
    assert!(relayed("unknown-ns"));
    assert!(
        relayed("deep") || cond("deep").is_some(),
        "the deep one is relayed or refused, never ignored"
    );
    assert_own_domain(&out);
    let log = relay.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(log.matches(READY).count(), 1, "no reconnect: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_flood_keeps_it_responsive() {
    let (mut fake, relay) = start().await;
    let mut flood = String::new();
    for i in 0..20_000 {
        let t = if i % 2 == 0 {
            ""
        } else {
            " type='unavailable'"
        };
        flood.push_str(&format!(
            "<presence xmlns='{NS}' from='u{}@localhost/r' to='{COMPONENT}'{t}/>",
            i % 500
        ));
    }
    assert!(fake.send(&flood));
    still_serving(&mut fake, "after-flood").await;
    let out = collect(&mut fake, SECS(1)).await;
    assert_own_domain(&out);
    assert_eq!(relay.log_text().matches(READY).count(), 1);
}

/// Bytes that are not XML, or not UTF-8, or an element that is no stanza,
/// break the stream: redeliver reconnects (it cannot do otherwise) and
/// does not panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_xml_from_the_server_means_a_reconnect() {
    let (mut fake, relay) = start().await;
    for (n, bad) in [
        b"<message xmlns='jabber:component:accept'><unclosed></message>".to_vec(),
        vec![b'<', b'm', 0xff, 0xfe, b'>'],
        b"<<<>>>".to_vec(),
        // Not a stanza at all: RFC 6120 makes that a stream error
        // (unsupported-stanza-type), so the stream is gone too.
        format!("<nonsense xmlns='{NS}' from='alice@localhost/r' to='{COMPONENT}'/>").into_bytes(),
    ]
    .into_iter()
    .enumerate()
    {
        assert!(fake.send_raw(bad));
        fake.connected(SECS(10))
            .await
            .unwrap_or_else(|| panic!("reconnected after bad input {n}"));
        still_serving(&mut fake, &format!("after-bad-{n}")).await;
    }
    let log = relay.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(log.matches(READY).count(), 5, "{log}");
}
