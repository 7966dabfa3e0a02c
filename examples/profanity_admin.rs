//! Drives Profanity (Debian's `profanity`, in tmux) through every admin
//! command (`stats`, `list-queue`, `top-queues`, `status`,
//! `reload-config`, `replay`, `purge`) against a throwaway Prosody and
//! redeliver, and checks that their figures appear on its screen.
//! Prints each screen, for docs/admin.md. Run it with
//! `bash scripts/profanity-admin` (which installs profanity and tmux);
//! it exits non-zero when a figure is missing.

#[path = "../tests/common/mod.rs"]
mod common;

use common::profanity::Profanity;
use common::*;

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let prosody = Server::start(Kind::Prosody, ServerOpts::default());
    let _relay = Relay::start(&prosody, RelayOpts::default());
    send_all(&prosody, "bob@relay.localhost", &ids("m", 3)).await;
    let prof = tokio::task::block_in_place(|| {
        let prof = Profanity::start(prosody.c2s_port, "admin");
        prof.wait_for(&["logged in successfully"]);
        // Profanity takes input a moment after it says so.
        std::thread::sleep(std::time::Duration::from_secs(1));
        prof.step(
            "The command list",
            &format!("/cmd list {COMPONENT}"),
            &["stats", "list-queue", "purge"],
        );
        prof.step(
            "stats",
            &format!("/cmd exec stats {COMPONENT}"),
            &["Pending messages: 3", "Recipients with pending messages: 1"],
        );
        prof.step(
            "list-queue: the form",
            &format!("/cmd exec list-queue {COMPONENT}"),
            &["Recipient (bare JID)"],
        );
        prof.type_line("/field1 bob@localhost");
        prof.step(
            "list-queue: the result",
            "/form submit",
            &[
                "Pending messages: 3",
                "Id: m1",
                "Id: m2",
                "Id: m3",
                "Body: body of m3",
            ],
        );
        prof.step(
            "top-queues: the form",
            &format!("/cmd exec top-queues {COMPONENT}"),
            &["How many queues"],
        );
        prof.step(
            "top-queues: the result",
            "/form submit",
            &["Queues listed: 1", "Recipient: bob@localhost; Pending: 3"],
        );
        prof.step(
            "status",
            &format!("/cmd exec status {COMPONENT}"),
            &[
                "Component domain: relay.localhost",
                "Store durability: fsync",
            ],
        );
        prof.step(
            "reload-config",
            &format!("/cmd exec reload-config {COMPONENT}"),
            &["Applied: true"],
        );
        prof.step(
            "replay: the form",
            &format!("/cmd exec replay {COMPONENT}"),
            &["Recipient (bare JID)"],
        );
        prof.type_line("/field1 bob@localhost");
        prof.step("replay: the result", "/form submit", &["Pending: 3"]);
        prof.step(
            "purge: the form",
            &format!("/cmd exec purge {COMPONENT}"),
            &["Recipient (bare JID)"],
        );
        prof.type_line("/field1 bob@localhost");
        prof.step(
            "purge: the confirmation",
            "/form submit",
            &["3 of the 3 pending messages for bob@localhost would be purged"],
        );
        prof.step("purge: the result", "/form submit", &["Purged: 3"]);
        prof
    });
    drop(prof);
    println!("every figure appeared on Profanity's screen");
}
