//! The relay's counters since start, kept by the router and read by the
//! admin commands (its own module, so that neither imports the other).

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
}
