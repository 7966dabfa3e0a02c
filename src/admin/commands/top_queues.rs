//! `top-queues`: the largest queues by message count.

use tokio_xmpp::parsers::data_forms::{DataForm, DataFormType, Field, FieldType};
use tokio_xmpp::parsers::stanza_error::StanzaError;

use super::{PAGE_BYTES, columns, row_cost, store_failed};
use crate::admin::{Input, Ops, Step, age_seconds, field, form, input};
use crate::xep0050::Table;

const DEFAULT_MAX: u64 = 20;
/// JIDs are at most ~3 KiB, so 100 rows stay far below the server's
/// 512 KiB stanza limit.
const MAX_MAX: u64 = 100;

pub(crate) fn input_form() -> DataForm {
    form(
        DataFormType::Form,
        "Largest queues",
        None,
        vec![input(
            "max",
            FieldType::TextSingle,
            "How many queues (1-100, default 20)",
            false,
        )],
    )
}

pub(crate) fn run<O: Ops>(ops: &O, input: &Input<'_>) -> Result<Step, StanzaError> {
    let max = input.number("max", 1, MAX_MAX)?.unwrap_or(DEFAULT_MAX) as usize;
    let queues = ops.store().top_queues(max).map_err(store_failed)?;
    let now = ops.now_ms();
    let mut bytes = 0;
    let rows: Vec<Vec<Field>> = queues
        .iter()
        .map(|q| {
            vec![
                Field::text_single("jid", &q.recipient),
                Field::text_single("count", &q.pending.to_string()),
                Field::text_single("bytes", &q.bytes.to_string()),
                Field::text_single(
                    "oldest-age-seconds",
                    &q.oldest_ms
                        .map(|t| age_seconds(now, t).to_string())
                        .unwrap_or_default(),
                ),
            ]
        })
        // Kept under the page budget (JIDs of up to 3 KiB each).
        .take_while(|row| {
            bytes += row_cost(row);
            bytes <= PAGE_BYTES
        })
        .collect();
    let columns = columns(&[
        ("jid", "Recipient"),
        ("count", "Pending"),
        ("bytes", "Bytes"),
        ("oldest-age-seconds", "Oldest (s)"),
    ]);
    let result = form(
        DataFormType::Result_,
        "Largest queues",
        None,
        vec![field("listed", "Queues listed", rows.len())],
    );
    Ok(Step::done(Table { columns, rows }.attach(result)))
}
