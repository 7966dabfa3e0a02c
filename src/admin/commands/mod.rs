//! One module per command: its input form (if any) and what it does.

pub mod list_queue;
pub mod purge;
pub mod reload_config;
pub mod replay;
pub mod stats;
pub mod status;
pub mod top_queues;

use tokio_xmpp::parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};

use crate::store::StoreError;

/// A store read that failed while answering a command.
pub(crate) fn store_failed(e: StoreError) -> StanzaError {
    tracing::error!(error = %e, "admin command: store read failed");
    StanzaError::new(
        ErrorType::Wait,
        DefinedCondition::InternalServerError,
        "en",
        format!("the store could not be read: {e}"),
    )
}
