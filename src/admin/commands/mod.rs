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
