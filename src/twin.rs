//! Noticing a second instance connected under the same component name.
//!
//! Prosody refuses a second XEP-0114 connection for a name (`conflict`),
//! but ejabberd accepts it and spreads the traffic over both. Two
//! instances with two stores would then split one recipient's messages
//! and receipts between them: receipts that reach the instance that did
//! not send the message never confirm it there, so it is sent again. One
//! instance serves one domain.
//!
//! So each instance sends a few pings from its own domain to its own
//! domain, with ids that name the instance, at every connect and every
//! minute after. When a server spreads traffic, some of them reach the
//! other instance. The instance that started later stops (exit status 3,
//! which the shipped systemd unit does not restart); the earlier one logs
//! a warning and answers with its own probes so that the later one learns
//! of it quickly. Probes go from several JIDs so that a server balancing
//! by source still spreads them.

use std::time::Duration;

/// Pings per round: with random balancing over two connections, the
/// chance that none reaches the other is 1/256.
pub const PROBES: usize = 8;
/// Rounds after the one at connect.
pub const INTERVAL: Duration = Duration::from_secs(60);
const PREFIX: &str = "redeliver-twin-";

/// The exit status of an instance that stopped for an earlier one.
pub const EXIT_STATUS: u8 = 3;

/// This process, as its probes name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Instance {
    /// When it started, in ms since the Unix epoch: earlier wins.
    pub started_ms: i64,
    /// Breaks ties and tells our own probes from another's.
    pub nonce: u64,
}

/// What a probe says about who sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// One of our own.
    Mine,
    /// From an instance that started earlier: this one must stop.
    Earlier(Instance),
    /// From an instance that started later: it will stop.
    Later(Instance),
}

/// Another instance serves this domain; this one stopped.
#[derive(Debug, thiserror::Error)]
#[error(
    "another redeliver instance (started at {started}) is connected as {domain}; \
     one instance serves one domain, so this one stopped"
)]
pub struct AnotherInstance {
    pub domain: String,
    pub started: String,
}

impl Instance {
    pub fn new(started_ms: i64) -> Instance {
        Instance {
            started_ms,
            nonce: rand::random(),
        }
    }

    /// The id of probe `n`.
    pub fn probe_id(&self, n: usize) -> String {
        format!("{PREFIX}{}-{:016x}-{n}", self.started_ms, self.nonce)
    }

    /// Its name, as its probes carry it.
    pub fn name(&self) -> String {
        format!("{}-{:016x}", self.started_ms, self.nonce)
    }

    /// The local part of the JID that sends probe `n`.
    pub fn probe_node(n: usize) -> String {
        format!("twin-check-{n}")
    }

    /// Who sent a ping with this id, if it is a probe at all.
    pub fn judge(&self, id: &str) -> Option<Verdict> {
        let rest = id.strip_prefix(PREFIX)?;
        let mut parts = rest.splitn(3, '-');
        let started_ms = parts.next()?.parse().ok()?;
        let nonce = u64::from_str_radix(parts.next()?, 16).ok()?;
        parts.next()?.parse::<usize>().ok()?;
        let other = Instance { started_ms, nonce };
        Some(if other == *self {
            Verdict::Mine
        } else if other < *self {
            Verdict::Earlier(other)
        } else {
            Verdict::Later(other)
        })
    }

    /// The start time for people.
    pub fn started(&self) -> String {
        chrono::DateTime::from_timestamp_millis(self.started_ms)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_else(|| self.started_ms.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_name_their_instance_and_the_earlier_one_wins() {
        let me = Instance {
            started_ms: 2_000,
            nonce: 0xab,
        };
        let id = me.probe_id(5);
        assert_eq!(me.judge(&id), Some(Verdict::Mine));
        let earlier = Instance {
            started_ms: 1_000,
            nonce: 0xff,
        };
        let later = Instance {
            started_ms: 3_000,
            nonce: 0x01,
        };
        assert_eq!(
            me.judge(&earlier.probe_id(0)),
            Some(Verdict::Earlier(earlier))
        );
        assert_eq!(me.judge(&later.probe_id(7)), Some(Verdict::Later(later)));
        // Same start time: the nonce decides, the same way on both sides.
        let twin = Instance {
            started_ms: 2_000,
            nonce: 0x01,
        };
        assert_eq!(me.judge(&twin.probe_id(0)), Some(Verdict::Earlier(twin)));
        assert_eq!(twin.judge(&me.probe_id(0)), Some(Verdict::Later(me)));
    }

    #[test]
    fn other_ids_are_not_probes() {
        let me = Instance::new(1);
        for id in [
            "",
            "disco-1",
            "redeliver-twin-",
            "redeliver-twin-x-00-1",
            "redeliver-twin-1-zz-1",
            "redeliver-twin-1-00",
            "redeliver-twin-1-00-x",
        ] {
            assert_eq!(me.judge(id), None, "{id}");
        }
    }
}
