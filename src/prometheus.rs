//! The optional Prometheus endpoint (`[metrics] listen`): the metric
//! names, what each says, and the HTTP listener that serves them
//! ([`listener`], with its limits).
//!
//! The code records through the `metrics` facade ([`crate::stats`] for
//! counters and latencies, the router for gauges). Without a listener no
//! recorder is installed and every record is a no-op.

use std::net::SocketAddr;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

pub mod listener;

pub use listener::Limits;

pub const ACCEPTED: &str = "redeliver_messages_accepted_total";
pub const RELAYED: &str = "redeliver_messages_relayed_total";
pub const REPLAYED: &str = "redeliver_messages_replayed_total";
pub const CONFIRMED: &str = "redeliver_messages_confirmed_total";
pub const REFUSED: &str = "redeliver_messages_refused_total";
pub const EXPIRED: &str = "redeliver_messages_expired_total";
pub const BOUNCED: &str = "redeliver_messages_bounced_total";
pub const REJECTED: &str = "redeliver_messages_rejected_total";
pub const PURGED: &str = "redeliver_messages_purged_total";
pub const LATE_BOUNCES: &str = "redeliver_late_bounces_total";
pub const NOTICES: &str = "redeliver_notices_total";
pub const HANDED_OVER: &str = "redeliver_stanzas_handed_over_total";
pub const STORE_FAILURES: &str = "redeliver_store_failures_total";
pub const HANDOFFS: &str = "redeliver_handoffs_total";
pub const HANDOFF_REPLAYS: &str = "redeliver_handoff_replays_total";

pub const PENDING_MESSAGES: &str = "redeliver_pending_messages";
pub const PENDING_BYTES: &str = "redeliver_pending_bytes";
pub const PENDING_RECIPIENTS: &str = "redeliver_pending_recipients";
pub const KEPT_MESSAGES: &str = "redeliver_kept_messages";
pub const KEPT_BYTES: &str = "redeliver_kept_bytes";
pub const OLDEST_PENDING_AGE: &str = "redeliver_oldest_pending_age_seconds";
pub const RECIPIENTS_ONLINE: &str = "redeliver_recipients_online";
pub const IN_FLIGHT: &str = "redeliver_in_flight_messages";
pub const LINK_UP: &str = "redeliver_link_up";
pub const LEADER: &str = "redeliver_leader";

pub const ACCEPT_TO_RELAY: &str = "redeliver_accept_to_relay_seconds";
pub const ACCEPT_TO_CONFIRM: &str = "redeliver_accept_to_confirm_seconds";

/// From a millisecond to 30 days: a message may wait for days for an
/// offline recipient (the default TTL is 7), or be relayed within the
/// millisecond.
const LATENCY_BUCKETS: [f64; 19] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0, 1800.0, 7200.0,
    86400.0, 259200.0, 604800.0, 2592000.0,
];

/// Serve the metrics on `listen` (HTTP, any path) from now on, within
/// the limits it returns (sized from the file descriptor limit). Call
/// it once, inside the runtime.
pub fn serve(listen: SocketAddr) -> anyhow::Result<Limits> {
    let socket = std::net::TcpListener::bind(listen)
        .and_then(|l| {
            l.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(l)
        })
        .map_err(|e| anyhow::anyhow!("metrics listener on {listen}: {e}"))?;
    let mut builder = PrometheusBuilder::new();
    for name in [ACCEPT_TO_RELAY, ACCEPT_TO_CONFIRM] {
        builder = builder.set_buckets_for_metric(Matcher::Full(name.into()), &LATENCY_BUCKETS)?;
    }
    let handle = builder
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("metrics recorder: {e}"))?;
    describe();
    // Until the router says otherwise (a standby has neither).
    metrics::gauge!(LINK_UP).set(0.0);
    metrics::gauge!(LEADER).set(0.0);
    let limits = Limits::for_nofile(listener::nofile());
    tokio::spawn(listener::MetricsListener::new(socket, handle, limits).run());
    Ok(limits)
}

fn describe() {
    let counters = [
        (ACCEPTED, "Messages accepted and stored."),
        (
            RELAYED,
            "Stored messages sent to their recipient for the first time by this process.",
        ),
        (
            REPLAYED,
            "Sends of a stored message after its first (after a bounce or a receipt timeout).",
        ),
        (
            CONFIRMED,
            "Messages removed from their queue as delivered, by how: receipt, marker (chat \
             marker), or no_receipt (sent to a client not known to answer, and no error came \
             back). A message put back by a late bounce counts again when it leaves again.",
        ),
        (
            REFUSED,
            "Messages refused with an error to their sender, by stanza error condition.",
        ),
        (
            EXPIRED,
            "Messages removed unconfirmed after message_ttl_s; their senders were told.",
        ),
        (
            BOUNCED,
            "Errors from the server for a message in flight (the recipient went away).",
        ),
        (
            REJECTED,
            "Messages the recipient's side refused for good; removed, senders told.",
        ),
        (PURGED, "Messages removed by an administrator's purge."),
        (
            LATE_BOUNCES,
            "Messages counted delivered without a receipt and put back by a late bounce.",
        ),
        (
            NOTICES,
            "Notices kept for senders (expiry, final refusals).",
        ),
        (
            HANDED_OVER,
            "Stanzas this instance handed to the leader (all-active instances).",
        ),
        (
            STORE_FAILURES,
            "Store writes, reads or flushes that failed (the log names the operation).",
        ),
        (
            HANDOFFS,
            "Transparent mode: hand-offs from a server module, by outcome: taken (held, \
             new or already), refused (not the component's to take: forged, malformed, a \
             sender it cannot send as, a conflicting id) or given_back (left with the server \
             for now: a full queue or store, a store failure, no message permission).",
        ),
        (
            HANDOFF_REPLAYS,
            "Transparent mode: sends of a handed-off message as its sender (XEP-0356).",
        ),
    ];
    for (name, help) in counters {
        describe_counter!(name, Unit::Count, help);
    }
    let gauges = [
        (
            PENDING_MESSAGES,
            Unit::Count,
            "Messages stored and not yet confirmed (leader's view of the store).",
        ),
        (
            PENDING_BYTES,
            Unit::Bytes,
            "Bytes of the pending messages' stanzas.",
        ),
        (
            PENDING_RECIPIENTS,
            Unit::Count,
            "Recipients with at least one pending message.",
        ),
        (
            KEPT_MESSAGES,
            Unit::Count,
            "Messages counted delivered without a receipt, kept for a late bounce.",
        ),
        (
            KEPT_BYTES,
            Unit::Bytes,
            "Bytes of those kept messages; limits.max_store_bytes applies to pending and kept \
             bytes together.",
        ),
        (
            OLDEST_PENDING_AGE,
            Unit::Seconds,
            "Age of the oldest pending message, 0 when none is pending.",
        ),
        (
            RECIPIENTS_ONLINE,
            Unit::Count,
            "Recipients whose presence this instance last saw available.",
        ),
        (
            IN_FLIGHT,
            Unit::Count,
            "Messages sent and waiting for their receipt.",
        ),
        (
            LINK_UP,
            Unit::Count,
            "1 while the component link to the server is up, else 0.",
        ),
        (
            LEADER,
            Unit::Count,
            "1 while this instance delivers (leads its store), else 0.",
        ),
    ];
    for (name, unit, help) in gauges {
        describe_gauge!(name, unit, help);
    }
    describe_histogram!(
        ACCEPT_TO_RELAY,
        Unit::Seconds,
        "From a message's acceptance to its first send to the recipient."
    );
    describe_histogram!(
        ACCEPT_TO_CONFIRM,
        Unit::Seconds,
        "From a message's acceptance to its confirmation (receipt, marker or no_receipt)."
    );
}
