//! `reload-config`: re-read the configuration file and apply what can
//! change at run time (relay addressing, delivery timings, limits,
//! admins). A file that does not validate, or that changes what needs a
//! restart, is refused as a whole.

use tokio_xmpp::parsers::data_forms::{DataFormType, Field, FieldType};
use tokio_xmpp::parsers::stanza_error::StanzaError;

use crate::admin::{Ops, Step, field, form};
use crate::xep0050::NoteType;

pub(crate) fn run<O: Ops>(ops: &mut O) -> Result<Step, StanzaError> {
    let (applied, lines, note) = match ops.reload() {
        Ok(changes) if changes.is_empty() => {
            (true, vec![], (NoteType::Info, "nothing changed".to_owned()))
        }
        Ok(changes) => {
            let n = changes.len();
            (
                true,
                changes,
                (NoteType::Info, format!("{n} setting(s) applied")),
            )
        }
        Err(reason) => (
            false,
            vec![],
            (
                NoteType::Error,
                format!("refused, nothing applied: {reason}"),
            ),
        ),
    };
    let mut changes = Field::new("changes", FieldType::TextMulti);
    changes.label = Some("Changes applied".into());
    changes.values = lines;
    let result = form(
        DataFormType::Result_,
        "Configuration reload",
        None,
        vec![
            field("applied", "Applied", if applied { "true" } else { "false" }),
            changes,
        ],
    );
    Ok(Step::Done {
        payload: Some(result.into()),
        notes: vec![note],
    })
}
