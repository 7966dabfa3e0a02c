//! `replay`: send a recipient's queue now, whatever its presence says.
//! Messages go out in order up to the delivery window; the rest follow as
//! receipts come back.

use tokio_xmpp::parsers::data_forms::{DataForm, DataFormType, FieldType};
use tokio_xmpp::parsers::stanza_error::StanzaError;

use super::failed;
use crate::admin::{Input, Ops, Step, field, form, input};

pub(crate) fn input_form() -> DataForm {
    form(
        DataFormType::Form,
        "Replay a recipient's queue now",
        None,
        vec![input(
            "jid",
            FieldType::JidSingle,
            "Recipient (bare JID)",
            true,
        )],
    )
}

pub(crate) async fn run<O: Ops>(ops: &mut O, input: &Input<'_>) -> Result<Step, StanzaError> {
    let recipient = input.recipient(ops)?;
    let (sent, pending) = ops.replay(&recipient).await.map_err(failed)?;
    Ok(Step::done(form(
        DataFormType::Result_,
        "Replay",
        None,
        vec![
            field("jid", "Recipient", &recipient),
            field("replayed", "Sent now", sent),
            field("pending", "Pending", pending),
        ],
    )))
}
