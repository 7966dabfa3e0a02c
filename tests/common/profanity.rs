//! Profanity (Debian's `profanity` 0.13) driven headless in tmux, with a
//! throwaway home, for the checks that a real client sees what redeliver
//! sends (`scripts/profanity-admin`, `scripts/profanity-recipient`).

use std::process::Command;
use std::time::{Duration, Instant};

use super::PASSWORD;

/// A tmux session running Profanity with a throwaway home; killed on drop.
pub struct Profanity {
    session: String,
    _home: tempfile::TempDir,
}

impl Profanity {
    pub fn start(c2s_port: u16, user: &str) -> Profanity {
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

    pub fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-J", "-t", &self.session])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn type_line(&self, line: &str) {
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
    pub fn wait_for(&self, needles: &[&str]) -> String {
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
    pub fn step(&self, heading: &str, line: &str, needles: &[&str]) -> String {
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
pub fn tidy(screen: &str) -> String {
    screen
        .lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n")
        .trim_end()
        .to_owned()
}
