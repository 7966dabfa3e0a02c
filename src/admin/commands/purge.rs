//! `purge`: remove a recipient's pending messages (all, or those older
//! than a given age). Two stages: the count that would go, then the
//! purge of exactly that scope; messages that arrive in between are not
//! touched.

use tokio_xmpp::parsers::data_forms::{DataForm, DataFormType, FieldType};
use tokio_xmpp::parsers::stanza_error::StanzaError;

use super::{failed, store_failed};
use crate::admin::{Input, Ops, Stage, Step, field, form, input};
use crate::store::PurgeScope;
use crate::xep0050::{Action, Actions};

/// Ten years: any larger age is a typo.
const MAX_AGE_S: u64 = 10 * 366 * 24 * 3600;

pub(crate) fn input_form() -> DataForm {
    form(
        DataFormType::Form,
        "Purge a recipient's queue",
        Some("The next stage shows how many messages would go; nothing is removed before you complete it.".into()),
        vec![
            input("jid", FieldType::JidSingle, "Recipient (bare JID)", true),
            input(
                "older-than-seconds",
                FieldType::TextSingle,
                "Only messages older than this many seconds (empty: all)",
                false,
            ),
        ],
    )
}

pub(crate) async fn run<O: Ops>(
    ops: &mut O,
    stage: Stage,
    input: &Input<'_>,
) -> Result<Step, StanzaError> {
    match stage {
        Stage::Input => preview(ops, input),
        Stage::ConfirmPurge { recipient, scope } => {
            let purged = ops.purge(&recipient, scope).await.map_err(failed)?;
            Ok(Step::done(form(
                DataFormType::Result_,
                "Purge",
                None,
                vec![
                    field("jid", "Recipient", &recipient),
                    field("purged", "Purged", purged),
                ],
            )))
        }
    }
}

fn preview<O: Ops>(ops: &O, input: &Input<'_>) -> Result<Step, StanzaError> {
    let recipient = input.recipient(ops)?;
    let older = input.number("older-than-seconds", 0, MAX_AGE_S)?;
    let store = ops.store();
    let scope = PurgeScope {
        below_seq: store.next_seq().map_err(store_failed)?,
        accepted_before_ms: older.map(|s| ops.now_ms() - (s * 1000) as i64),
    };
    let count = store
        .count_purgeable(&recipient, scope)
        .map_err(store_failed)?;
    let pending = store.recipient(&recipient).map_err(store_failed)?.pending;
    let mut would = field("would-purge", "Messages that would be purged", count);
    would.type_ = FieldType::Fixed;
    Ok(Step::Ask {
        form: form(
            DataFormType::Form,
            "Confirm the purge",
            Some(format!(
                "{count} of the {pending} pending messages for {recipient} would be purged. \
                 Complete to purge them, go back, or cancel."
            )),
            vec![would, {
                let mut f = field("jid", "Recipient", &recipient);
                f.type_ = FieldType::Fixed;
                f
            }],
        ),
        stage: Stage::ConfirmPurge { recipient, scope },
        actions: Actions {
            execute: Some(Action::Complete),
            prev: true,
            complete: true,
            ..Actions::default()
        },
    })
}
