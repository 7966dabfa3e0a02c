//! The demo behind `scripts/demo`: a throwaway Prosody on loopback with the
//! component registered, redeliver in front of it, and one message to an
//! offline user that arrives exactly once when the user logs in.
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
        "1. starting Prosody on 127.0.0.1 (offline storage off, component {COMPONENT} registered)"
    );
    let prosody = Server::start(Kind::Prosody, ServerOpts::default());
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

    println!("3. bob logs in once to approve the relay's presence subscription, then logs out");
    {
        let mut bob = Client::connect(prosody.c2s_port, "bob", ClientOpts::default()).await;
        let alice = Client::connect(prosody.c2s_port, "alice", ClientOpts::default()).await;
        alice.message(
            "bob@relay.localhost",
            "hello-0",
            "hello while you are online",
        );
        let got = bob.body_ids(1, Duration::from_secs(10)).await;
        println!("   bob received {got:?}");
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
    let mut bob = Client::connect(prosody.c2s_port, "bob", ClientOpts::default()).await;
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
    println!("OK: the message arrived exactly once after bob came back. Stopping everything.");
}
