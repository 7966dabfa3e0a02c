//! The relay's counters since start, kept by the router, read by the admin
//! commands (its own module, so that neither imports the other) and
//! exported to Prometheus when a metrics listener is configured.

use std::time::Duration;

use metrics::{counter, histogram};
use tokio_xmpp::parsers::stanza_error::DefinedCondition;

use crate::handoff::Outcome;
use crate::prometheus as m;

/// How a message came to be removed as delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmation {
    /// An XEP-0184 receipt.
    Receipt,
    /// An XEP-0333 chat marker.
    Marker,
    /// Sent to a client not known to answer receipts, and no error came
    /// back in time: counted delivered, kept for a late bounce.
    NoReceipt,
}

impl Confirmation {
    const ALL: [Confirmation; 3] = [
        Confirmation::Receipt,
        Confirmation::Marker,
        Confirmation::NoReceipt,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Confirmation::Receipt => "receipt",
            Confirmation::Marker => "marker",
            Confirmation::NoReceipt => "no_receipt",
        }
    }
}

/// Counters for logs and the admin commands.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub accepted_total: u64,
    pub confirmed_total: u64,
    pub replays_total: u64,
    pub bounces_total: u64,
    pub refused_total: u64,
    pub purged_total: u64,
    pub expired_total: u64,
    /// Messages the recipient's side refused for good (a final error
    /// bounce): removed, their senders told.
    pub rejected_total: u64,
    /// Notices kept for senders (expiry, final refusals).
    pub notices_total: u64,
    /// Messages counted delivered without a receipt: sent to clients not
    /// known to answer their sender, and no error came back in time.
    pub assumed_total: u64,
    /// Of those, put back in their queue by a late bounce.
    pub late_bounces_total: u64,
    /// Stanzas this instance handed to the leader (all-active instances).
    pub forwarded_total: u64,
    /// Transparent mode: hand-offs taken (new or held already), refused
    /// (not ours to take) and given back (left with the server for now).
    pub handoffs_taken_total: u64,
    pub handoffs_refused_total: u64,
    pub handoffs_given_back_total: u64,
    /// Sends of handed-off messages as their sender (XEP-0356).
    pub handoff_replays_total: u64,
}

/// The stanza error conditions redeliver refuses messages with.
const REFUSALS: [DefinedCondition; 8] = [
    DefinedCondition::BadRequest,
    DefinedCondition::Conflict,
    DefinedCondition::JidMalformed,
    DefinedCondition::NotAcceptable,
    DefinedCondition::NotAllowed,
    DefinedCondition::PolicyViolation,
    DefinedCondition::ResourceConstraint,
    DefinedCondition::ServiceUnavailable,
];

/// Every counter series without a label that depends on traffic, at
/// zero: a dashboard's `rate()` then sees the first increment.
pub fn start_counters_at_zero() {
    for name in [
        m::ACCEPTED,
        m::RELAYED,
        m::REPLAYED,
        m::EXPIRED,
        m::BOUNCED,
        m::REJECTED,
        m::PURGED,
        m::LATE_BOUNCES,
        m::NOTICES,
        m::HANDED_OVER,
        m::STORE_FAILURES,
        m::HANDOFF_REPLAYS,
    ] {
        counter!(name).increment(0);
    }
    // The conditions a message can be refused with, so that the first
    // refusal of each is an increase too.
    for condition in &REFUSALS {
        counter!(m::REFUSED, "condition" => condition_name(condition)).increment(0);
    }
    for how in Confirmation::ALL {
        counter!(m::CONFIRMED, "how" => how.as_str()).increment(0);
    }
    for outcome in Outcome::ALL {
        counter!(m::HANDOFFS, "outcome" => outcome.as_str()).increment(0);
    }
}

/// A stanza error condition's element name (`resource-constraint`), from
/// its variant's name: the label of a refusal.
fn condition_name(c: &DefinedCondition) -> String {
    let variant = format!("{c:?}");
    let mut name = String::new();
    for ch in variant.chars().take_while(char::is_ascii_alphanumeric) {
        if ch.is_ascii_uppercase() && !name.is_empty() {
            name.push('-');
        }
        name.push(ch.to_ascii_lowercase());
    }
    name
}

/// Milliseconds as the seconds a latency histogram takes (0 for a clock
/// that went back).
fn seconds(ms: i64) -> f64 {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0)).as_secs_f64()
}

impl Stats {
    pub fn accepted(&mut self) {
        self.accepted_total += 1;
        counter!(m::ACCEPTED).increment(1);
    }

    /// A stored message sent: by this process for the `first` time
    /// (`waited_ms` since it was accepted), or again.
    pub fn sent(&mut self, first: bool, waited_ms: i64) {
        if first {
            counter!(m::RELAYED).increment(1);
            histogram!(m::ACCEPT_TO_RELAY).record(seconds(waited_ms));
        } else {
            self.replays_total += 1;
            counter!(m::REPLAYED).increment(1);
        }
    }

    /// Messages removed as delivered, each `waited_ms` after its
    /// acceptance.
    pub fn confirmed(&mut self, how: Confirmation, waited_ms: impl IntoIterator<Item = i64>) {
        let mut n = 0;
        for ms in waited_ms {
            n += 1;
            histogram!(m::ACCEPT_TO_CONFIRM).record(seconds(ms));
        }
        match how {
            Confirmation::NoReceipt => self.assumed_total += n,
            _ => self.confirmed_total += n,
        }
        counter!(m::CONFIRMED, "how" => how.as_str()).increment(n);
    }

    /// A message refused with `condition`.
    pub fn refused(&mut self, condition: &DefinedCondition) {
        self.refused_total += 1;
        counter!(m::REFUSED, "condition" => condition_name(condition)).increment(1);
    }

    pub fn expired(&mut self) {
        self.expired_total += 1;
        counter!(m::EXPIRED).increment(1);
    }

    pub fn bounced(&mut self) {
        self.bounces_total += 1;
        counter!(m::BOUNCED).increment(1);
    }

    pub fn rejected(&mut self) {
        self.rejected_total += 1;
        counter!(m::REJECTED).increment(1);
    }

    pub fn purged(&mut self, n: u64) {
        self.purged_total += n;
        counter!(m::PURGED).increment(n);
    }

    pub fn late_bounce(&mut self) {
        self.late_bounces_total += 1;
        counter!(m::LATE_BOUNCES).increment(1);
    }

    pub fn notice(&mut self) {
        self.notices_total += 1;
        counter!(m::NOTICES).increment(1);
    }

    pub fn handed_over(&mut self) {
        self.forwarded_total += 1;
        counter!(m::HANDED_OVER).increment(1);
    }

    /// A hand-off from a server module answered with `outcome`.
    pub fn handoff(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Taken => self.handoffs_taken_total += 1,
            Outcome::Refused => self.handoffs_refused_total += 1,
            Outcome::GivenBack => self.handoffs_given_back_total += 1,
        }
        counter!(m::HANDOFFS, "outcome" => outcome.as_str()).increment(1);
    }

    /// A handed-off message sent as its sender.
    pub fn handoff_replayed(&mut self) {
        self.handoff_replays_total += 1;
        counter!(m::HANDOFF_REPLAYS).increment(1);
    }

    /// A store operation (`what`: commit, confirm, fsync, …; the log
    /// names it) failed.
    pub fn store_failed(&mut self, _what: &'static str) {
        counter!(m::STORE_FAILURES).increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_names_are_the_element_names() {
        assert_eq!(
            condition_name(&DefinedCondition::ResourceConstraint),
            "resource-constraint"
        );
        assert_eq!(
            condition_name(&DefinedCondition::Gone { new_address: None }),
            "gone"
        );
        assert_eq!(
            condition_name(&DefinedCondition::PolicyViolation),
            "policy-violation"
        );
    }
}
