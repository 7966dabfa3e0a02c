//! The demo behind `scripts/demo`: a throwaway Prosody on loopback with the
//! component registered and privileged (XEP-0356, `mod_privilege` from
//! prosody-modules), redeliver in front of it, and one message to an
//! offline user that arrives exactly once when the user logs in. Bob's
//! client answers receipts only to roster contacts, as Gajim does, and his
//! user approves nothing: in privileged mode nobody is asked.
//!
//! It reuses the integration-test harness, so the demo and the tests run
//! the same code.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;

#[tokio::main]
async fn main() {
    println!(
        "1. starting Prosody on 127.0.0.1 (offline storage off, component {COMPONENT} registered \
         and granted roster and presence privileges)"
    );
    let prosody = Server::start(
        Kind::Prosody,
        ServerOpts {
            privilege: true,
            ..Default::default()
        },
    );
    println!(
        "   c2s port {}, component port {}, data in {}",
        prosody.c2s_port,
        prosody.component_port,
        prosody.dir.path().display()
    );

    println!("2. starting redeliver");
    let relay = Relay::start(&prosody, RelayOpts::default());
    println!(
        "   ready; config {}, log {}",
        relay.config.display(),
        relay.log.display()
    );

    // Like Gajim: receipts only to roster contacts; its user approves no
    // subscription request.
    let bob_client = ClientOpts {
        receipts_to_contacts_only: true,
        approve: false,
        ..Default::default()
    };
    println!(
        "3. bob logs in (his client answers receipts only to roster contacts; he approves nothing);\n   \
         alice's first message puts her relay address into his roster, with no prompt"
    );
    {
        let mut bob = Client::connect(prosody.c2s_port, "bob", bob_client.clone()).await;
        let alice = Client::connect(prosody.c2s_port, "alice", ClientOpts::default()).await;
        alice.message(
            "bob@relay.localhost",
            "hello-0",
            "hello while you are online",
        );
        let got = bob.body_ids(1, Duration::from_secs(10)).await;
        println!("   bob received {got:?}");
        let log = relay.log_text();
        for l in log.lines().filter(|l| {
            l.contains("granted privileges")
                || l.contains("to the roster (privileged)")
                || l.contains("relay contact approved")
        }) {
            println!(
                "   redeliver: {}",
                l.split("redeliver::router: ").last().unwrap_or(l)
            );
        }
        if log.contains("asking for a relay contact")
            || log.contains("requesting presence subscription")
        {
            eprintln!("FAILED: the relay asked bob for a subscription");
            std::process::exit(1);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        bob.close().await;
        alice.close().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    println!("4. bob is offline; alice writes to bob@relay.localhost");
    let mut alice = Client::connect(prosody.c2s_port, "alice", ClientOpts::default()).await;
    alice.message(
        "bob@relay.localhost",
        "survivor-1",
        "this message survives bob being offline",
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("   redeliver holds it (Prosody's own offline storage is off)");

    println!("5. bob logs in");
    let mut bob = Client::connect(prosody.c2s_port, "bob", bob_client).await;
    let first = bob.next_body_message(Duration::from_secs(15)).await;
    let Some(m) = first else {
        eprintln!("FAILED: bob received nothing; log: {}", relay.log.display());
        std::process::exit(1);
    };
    println!("   bob received: {}", String::from(&m));
    let again = bob.body_ids(1, Duration::from_secs(3)).await;
    let receipts = alice.receipt_ids(1, Duration::from_secs(5)).await;
    println!("   duplicates in the next 3 s: {}", again.len());
    println!("   alice's end-to-end receipt: {receipts:?}");
    if m.attr("id") != Some("survivor-1") || !again.is_empty() || receipts != ["survivor-1"] {
        eprintln!("FAILED");
        std::process::exit(1);
    }
    println!(
        "OK: the message arrived exactly once after bob came back, and his contacts-only client \
         confirmed it, with no prompt. Stopping everything."
    );
}
