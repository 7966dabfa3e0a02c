//! Profanity (Debian's `profanity` 0.13, in tmux) as the recipient:
//! Profanity answers receipt requests, but addresses its receipts to the
//! sender's full JID only, so relayed messages must come from one
//! (`alice@relay.localhost/redeliver`). Alice sends three messages to bob
//! through the relay while bob is Profanity; the check fails unless
//! Profanity shows all three, Alice gets a receipt for each, and nothing
//! stays pending.
//!
//! Then transparent mode (docs/transparent.md): alice writes to
//! bob@localhost while bob is offline, Prosody's module hands the
//! messages to redeliver, and bob logs in with Profanity: it must show
//! each once, from alice, and redeliver must end with nothing pending
//! (confirmed by Profanity's receipts, copied by the module, or counted
//! delivered when they do not come: replays come from alice's bare JID,
//! and Profanity answers a full JID only). Run it with
//! `bash scripts/profanity-recipient`.

#[path = "../tests/common/mod.rs"]
mod common;

use common::profanity::Profanity;
use common::*;

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let prosody = Server::start(Kind::Prosody, ServerOpts::default());
    let relay = Relay::start(&prosody, RelayOpts::default());
    let bob = tokio::task::block_in_place(|| {
        let bob = Profanity::start(prosody.c2s_port, "bob");
        bob.wait_for(&["logged in successfully"]);
        std::thread::sleep(std::time::Duration::from_secs(1));
        bob
    });
    let mut alice = Client::connect(prosody.c2s_port, "alice", ClientOpts::default()).await;
    let sent = ids("p", 3);
    for id in &sent {
        alice.message(
            "bob@relay.localhost",
            id,
            &format!("hello from alice, {id}"),
        );
    }
    tokio::task::block_in_place(|| {
        bob.wait_for(&["alice@relay.localhost"]);
        bob.step(
            "Bob's chat window",
            "/win alice@relay.localhost",
            &[
                "hello from alice, p1",
                "hello from alice, p2",
                "hello from alice, p3",
            ],
        );
    });
    let mut receipts = alice.receipt_ids(3, SECS(20)).await;
    receipts.sort();
    println!("receipts to alice: {receipts:?}");
    let confirmed = relay
        .log_text()
        .lines()
        .filter(|l| l.contains(" confirmed") && l.contains("id=p"))
        .count();
    println!("confirmed by Profanity's receipts: {confirmed}");
    assert_eq!(
        receipts, sent,
        "a receipt for each message, relayed to alice"
    );
    assert_eq!(confirmed, 3, "{}", relay.log_text());
    drop(bob);
    println!("Profanity confirmed every message it was sent");
    transparent().await;
}

/// Transparent mode, Profanity as bob.
async fn transparent() {
    let prosody = Server::start(Kind::Prosody, ServerOpts::transparent());
    let relay = Relay::start(&prosody, RelayOpts::default());
    wait_log(&relay, "transparent mode hand-offs are taken").await;
    let alice = Client::connect(prosody.c2s_port, "alice", ClientOpts::default()).await;
    let sent = ids("t", 3);
    for id in &sent {
        alice.message("bob@localhost", id, &format!("transparent hello, {id}"));
    }
    let ids: Vec<&str> = sent.iter().map(String::as_str).collect();
    wait_stored(&relay, &ids).await;
    let screen = tokio::task::block_in_place(|| {
        let bob = Profanity::start(prosody.c2s_port, "bob");
        bob.wait_for(&["logged in successfully"]);
        bob.wait_for(&["alice@localhost"]);
        bob.step(
            "Bob's chat window (transparent mode)",
            "/win alice@localhost",
            &[
                "transparent hello, t1",
                "transparent hello, t2",
                "transparent hello, t3",
            ],
        );
        // Past the receipt wait and the unanswered wait: a duplicate
        // would be on screen by then.
        std::thread::sleep(std::time::Duration::from_secs(8));
        bob.screen()
    });
    for id in &sent {
        let shown = screen.matches(&format!("transparent hello, {id}")).count();
        assert_eq!(shown, 1, "{id} shown once:\n{screen}");
    }
    let log = relay.log_text();
    let confirmed = log
        .lines()
        .filter(|l| l.contains(" confirmed") && l.contains("id=t"))
        .count();
    println!("confirmed by Profanity's copied receipts: {confirmed} of 3");
    let assumed = log.matches("no error came back").count();
    println!("counted delivered without a receipt: {assumed} of 3");
    assert_eq!(confirmed + assumed, 3, "each message done with:\n{log}");
    println!("Profanity showed each handed-off message once, from alice@localhost");
}
