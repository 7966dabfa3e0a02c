//! The demo behind `scripts/demo`: transparent mode. A throwaway Prosody
//! on loopback runs redeliver's server module
//! (component-config/prosody/mod_redeliver.lua) and grants the component
//! XEP-0356's message permission; alice writes to bob@localhost (his real
//! address, no relay address) while bob is offline; Prosody hands the
//! message to redeliver, which replays it as alice when bob logs in. Bob
//! sees it once, with the time alice sent it, and alice gets his receipt.
//!
//! It reuses the integration-test harness, so the demo and the tests run
//! the same code.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;

fn fail(why: &str, relay: &Relay) -> ! {
    eprintln!("FAILED: {why}; redeliver's log: {}", relay.log.display());
    std::process::exit(1);
}

#[tokio::main]
async fn main() {
    println!(
        "1. starting Prosody on 127.0.0.1 with redeliver's module (transparent mode), offline \
         storage on, component {COMPONENT} registered and allowed to send as its users"
    );
    let prosody = Server::start(Kind::Prosody, ServerOpts::transparent());
    println!(
        "   c2s port {}, component port {}, data in {}",
        prosody.c2s_port,
        prosody.component_port,
        prosody.dir.path().display()
    );

    println!("2. starting redeliver");
    let relay = Relay::start(&prosody, RelayOpts::default());
    wait_log(&relay, "transparent mode hand-offs are taken").await;
    println!(
        "   ready, hand-offs taken; config {}, log {}",
        relay.config.display(),
        relay.log.display()
    );

    println!("3. bob is offline; alice writes to bob@localhost (his own address)");
    let mut alice = Client::connect(prosody.c2s_port, "alice", ClientOpts::default()).await;
    let sent_at = chrono::Utc::now();
    alice.message(
        "bob@localhost",
        "survivor-1",
        "this message survives bob being offline",
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    match relay
        .log_text()
        .lines()
        .find(|l| l.contains("hand-off accepted"))
    {
        Some(l) => println!(
            "   Prosody handed it to redeliver: {}",
            l.split("redeliver::router::transparent: ")
                .last()
                .unwrap_or(l)
        ),
        None => fail("Prosody did not hand the message off", &relay),
    }

    println!("4. bob logs in");
    let mut bob = Client::connect(prosody.c2s_port, "bob", ClientOpts::default()).await;
    let Some(m) = bob.next_body_message(Duration::from_secs(15)).await else {
        fail("bob received nothing", &relay);
    };
    println!("   bob received: {}", String::from(&m));
    let stamp = m
        .children()
        .find(|c| c.is("delay", "urn:xmpp:delay"))
        .and_then(|d| d.attr("stamp"))
        .unwrap_or("none")
        .to_owned();
    let again = bob.body_ids(1, Duration::from_secs(3)).await;
    let receipts = alice.receipt_ids(1, Duration::from_secs(5)).await;
    println!(
        "   from {}, shown as sent at {stamp} (alice sent it at {})",
        m.attr("from").unwrap_or("?"),
        sent_at.format("%Y-%m-%dT%H:%M:%S%.3fZ")
    );
    println!("   duplicates in the next 3 s: {}", again.len());
    println!("   alice's receipt from bob: {receipts:?}");
    if m.attr("id") != Some("survivor-1")
        || m.attr("from") != Some("alice@localhost")
        || !again.is_empty()
        || receipts != ["survivor-1"]
    {
        fail("not exactly once, from alice, with her receipt", &relay);
    }
    println!(
        "OK: alice wrote to bob's real address, the message arrived exactly once after bob came \
         back, from alice, with her time, and she has his receipt. Stopping everything."
    );
}
