//! One module per command: its input form (if any) and what it does.

pub mod list_queue;
pub mod purge;
pub mod reload_config;
pub mod replay;
pub mod stats;
pub mod status;
pub mod top_queues;

use tokio_xmpp::parsers::data_forms::{Field, FieldType};
use tokio_xmpp::parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};

use crate::store::StoreError;

/// The relay could not do what an operator asked.
pub(crate) fn failed(text: String) -> StanzaError {
    StanzaError::new(
        ErrorType::Wait,
        DefinedCondition::InternalServerError,
        "en",
        text,
    )
}

/// A store read that failed while answering a command.
pub(crate) fn store_failed(e: StoreError) -> StanzaError {
    tracing::error!(error = %e, "admin command: store read failed");
    failed(format!("the store could not be read: {e}"))
}

/// Bytes a table page may take, counted as [`row_cost`] does: far below
/// the 512 KiB at which servers drop a component's stream, with room for
/// the rest of the stanza.
pub(crate) const PAGE_BYTES: usize = 128 * 1024;

/// Characters of an id or a JID shown in a table cell; longer ones are
/// cut (with `…`), as is the body preview.
pub(crate) const CELL_CHARS: usize = 200;

/// What a table row costs on the wire: every value twice (the
/// `<item/>` and its text line, see `admin::readable`), as escaped XML,
/// plus the markup around them.
pub(crate) fn row_cost(row: &[Field]) -> usize {
    let escaped: usize = row
        .iter()
        .flat_map(|f| f.values.iter())
        .flat_map(|v| v.chars())
        .map(|c| match c {
            '&' => 5,
            '<' | '>' => 4,
            '"' | '\'' => 6,
            c => c.len_utf8(),
        })
        .sum();
    2 * escaped + 96 * row.len()
}

/// `text` cut to [`CELL_CHARS`] characters.
pub(crate) fn cell(text: &str) -> String {
    let mut out: String = text.chars().take(CELL_CHARS).collect();
    if text.chars().count() > CELL_CHARS {
        out.push('…');
    }
    out
}

/// The `<reported/>` columns of a result table: (var, label).
pub(crate) fn columns(spec: &[(&str, &str)]) -> Vec<Field> {
    spec.iter()
        .map(|(var, label)| {
            let mut f = Field::new(var, FieldType::TextSingle);
            f.label = Some((*label).into());
            f
        })
        .collect()
}
