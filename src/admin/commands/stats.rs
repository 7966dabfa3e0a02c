//! `stats`: counters of the store and of this process.

use tokio_xmpp::parsers::data_forms::DataFormType;
use tokio_xmpp::parsers::stanza_error::StanzaError;

use super::store_failed;
use crate::admin::{Ops, Step, age_seconds, field, form};

pub(crate) fn run<O: Ops>(ops: &O) -> Result<Step, StanzaError> {
    let snap = ops.snapshot();
    let store = ops.store();
    let totals = store.totals().map_err(store_failed)?;
    let oldest = store.oldest().map_err(store_failed)?;
    let oldest_age = oldest
        .map(|(_, _, rec)| age_seconds(ops.now_ms(), rec.accepted_at_ms))
        .unwrap_or(0);
    let s = &snap.stats;
    let (answer_all, answer_contacts) = store.habit_counts().map_err(store_failed)?;
    let kept_assumed = store.assumed_totals().map_err(store_failed)?.messages;
    let fields = vec![
        field("pending-messages", "Pending messages", totals.pending),
        field(
            "pending-recipients",
            "Recipients with pending messages",
            totals.recipients,
        ),
        field("pending-bytes", "Bytes of pending stanzas", totals.bytes),
        field(
            "oldest-pending-age-seconds",
            "Age of the oldest pending message (s)",
            oldest_age,
        ),
        field("in-flight", "Sent, awaiting a receipt", snap.in_flight),
        field("accepted-total", "Accepted since start", s.accepted_total),
        field(
            "confirmed-total",
            "Confirmed since start",
            s.confirmed_total,
        ),
        field(
            "assumed-total",
            "Counted delivered without a receipt since start (clients not known to answer)",
            s.assumed_total,
        ),
        field(
            "late-bounces-total",
            "Of those, put back by a late bounce since start",
            s.late_bounces_total,
        ),
        field(
            "assumed-kept",
            "Counted delivered without a receipt, kept for a late bounce",
            kept_assumed,
        ),
        field(
            "clients-answering-all",
            "Clients known to answer receipts from everyone",
            answer_all,
        ),
        field(
            "clients-answering-contacts",
            "Clients known to answer receipts from approved contacts only",
            answer_contacts,
        ),
        field(
            "replays-total",
            "Replayed sends since start",
            s.replays_total,
        ),
        field("bounces-total", "Bounces since start", s.bounces_total),
        field(
            "handoffs-taken-total",
            "Hand-offs taken from the server since start (transparent mode)",
            s.handoffs_taken_total,
        ),
        field(
            "handoffs-refused-total",
            "Hand-offs refused since start (not ours to take)",
            s.handoffs_refused_total,
        ),
        field(
            "handoffs-given-back-total",
            "Hand-offs left with the server since start (full, no permission)",
            s.handoffs_given_back_total,
        ),
        field(
            "handoff-replays-total",
            "Sends as the original sender since start (transparent mode)",
            s.handoff_replays_total,
        ),
        field("refused-total", "Refused since start", s.refused_total),
        field(
            "rejected-total",
            "Refused for good by the receiving side since start",
            s.rejected_total,
        ),
        field(
            "notices-total",
            "Notices kept for senders since start",
            s.notices_total,
        ),
        field("purged-total", "Purged since start", s.purged_total),
        field("expired-total", "Expired since start", s.expired_total),
        field("uptime-seconds", "Uptime (s)", snap.uptime.as_secs()),
        field("store-bytes", "Store size on disk", store.size_on_disk()),
    ];
    Ok(Step::done(form(
        DataFormType::Result_,
        "redeliver statistics",
        None,
        fields,
    )))
}
