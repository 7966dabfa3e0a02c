//! Drives Profanity (Debian's `profanity`, in tmux) through every admin
//! command (`stats`, `list-queue`, `top-queues`, `status`,
//! `reload-config`, `replay`, `purge`) against a throwaway Prosody and
//! redeliver, and checks that their figures appear on its screen.
//! Prints each screen, for docs/admin.md. Run it with
//! `bash scripts/profanity-admin` (which installs profanity and tmux);
//! it exits non-zero when a figure is missing.

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// A tmux session running Profanity with a throwaway home; killed on drop.
struct Profanity {
    session: String,
    _home: tempfile::TempDir,
}

impl Profanity {
    fn start(c2s_port: u16, user: &str) -> Profanity {
        let home = tempfile::tempdir().expect("temp dir");
        let data = home.path().join(".local/share/profanity");
        std::fs::create_dir_all(&data).expect("profanity data dir");
        let jid = format!("{user}@localhost");
        std::fs::write(
            data.join("accounts"),
            format!(
                "[{jid}]\nenabled=true\njid={jid}\nserver=127.0.0.1\nport={c2s_port}\n\
                 resource=profanity\npassword={PASSWORD}\ntls.policy=disable\n"
            ),
        )
        .expect("accounts file");
        let session = format!("redeliver-profanity-{}", std::process::id());
        let status = Command::new("tmux")
            .args(["new-session", "-d", "-s", &session, "-x", "200", "-y", "70"])
            .arg(format!(
                "env HOME={h} XDG_CONFIG_HOME={h}/.config XDG_DATA_HOME={h}/.local/share \
                 profanity -a {jid}",
                h = home.path().display()
            ))
            .status()
            .expect("tmux");
        assert!(status.success(), "tmux new-session failed");
        Profanity {
            session,
            _home: home,
        }
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-J", "-t", &self.session])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn type_line(&self, line: &str) {
        let ok = Command::new("tmux")
            .args(["send-keys", "-t", &self.session, "-l", line])
            .status()
            .is_ok_and(|s| s.success())
            && Command::new("tmux")
                .args(["send-keys", "-t", &self.session, "Enter"])
                .status()
                .is_ok_and(|s| s.success());
        assert!(ok, "tmux send-keys failed");
    }

    /// Wait until the screen shows every one of `needles`; the screen.
    fn wait_for(&self, needles: &[&str]) -> String {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let screen = self.screen();
            if needles.iter().all(|n| screen.contains(n)) {
                return screen;
            }
            if Instant::now() > end {
                panic!("Profanity never showed {needles:?}; its screen:\n{screen}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Type `line`, wait for `needles`, print the screen under a heading.
    fn step(&self, heading: &str, line: &str, needles: &[&str]) -> String {
        self.type_line(line);
        let screen = self.wait_for(needles);
        println!(
            "### {heading}\n\n`{line}`\n\n```text\n{}\n```\n",
            tidy(&screen)
        );
        screen
    }
}

impl Drop for Profanity {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.session])
            .status();
    }
}

/// The screen without trailing blank lines and spaces.
fn tidy(screen: &str) -> String {
    screen
        .lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n")
        .trim_end()
        .to_owned()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let prosody = Server::start(Kind::Prosody, ServerOpts::default());
    let _relay = Relay::start(&prosody, RelayOpts::default());
    send_all(&prosody, "bob@relay.localhost", &ids("m", 3)).await;
    let prof = tokio::task::block_in_place(|| {
        let prof = Profanity::start(prosody.c2s_port, "admin");
        prof.wait_for(&["logged in successfully"]);
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
