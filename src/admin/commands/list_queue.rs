//! `list-queue`: one recipient's pending messages in delivery order,
//! paged (`max`, `after`) and kept well below the server's stanza limit.

use std::str::FromStr;

use tokio_xmpp::minidom::Element;
use tokio_xmpp::parsers::data_forms::{DataForm, DataFormType, Field, FieldType};
use tokio_xmpp::parsers::stanza_error::StanzaError;

use super::{PAGE_BYTES, cell, columns, row_cost, store_failed};
use crate::admin::{Input, Ops, Step, age_seconds, field, form, input};
use crate::xep0050::Table;

const DEFAULT_PAGE: u64 = 50;
const MAX_PAGE: u64 = 500;
/// Characters of body shown per message.
const PREVIEW_CHARS: usize = 80;

pub(crate) fn input_form() -> DataForm {
    form(
        DataFormType::Form,
        "List a recipient's pending messages",
        Some("Name the recipient. Pages follow each other with 'after' set to the previous page's next-after.".into()),
        vec![
            input("jid", FieldType::JidSingle, "Recipient (bare JID)", true),
            input(
                "max",
                FieldType::TextSingle,
                "Messages per page (1-500, default 50)",
                false,
            ),
            input(
                "after",
                FieldType::TextSingle,
                "List messages after this seq",
                false,
            ),
        ],
    )
}

pub(crate) fn run<O: Ops>(ops: &O, input: &Input<'_>) -> Result<Step, StanzaError> {
    let recipient = input.recipient(ops)?;
    let max = input.number("max", 1, MAX_PAGE)?.unwrap_or(DEFAULT_PAGE) as usize;
    let start = input
        .number("after", 0, u64::MAX)?
        .map_or(0, |a| a.saturating_add(1));
    let store = ops.store();
    let state = store.recipient(&recipient).map_err(store_failed)?;
    // One more than asked, to know whether another page follows.
    let page = store
        .pending_from(&recipient, start, max + 1)
        .map_err(store_failed)?;
    let now = ops.now_ms();
    let mut rows = Vec::new();
    let mut bytes = 0;
    let mut last = None;
    for (seq, rec) in page.iter().take(max) {
        let row = vec![
            Field::text_single("seq", &seq.to_string()),
            Field::text_single("from", &cell(&rec.sender)),
            Field::text_single("id", &cell(&rec.id)),
            Field::text_single(
                "age-seconds",
                &age_seconds(now, rec.accepted_at_ms).to_string(),
            ),
            Field::text_single("attempts", &ops.attempts(&recipient, *seq).to_string()),
            Field::text_single("preview", &preview(&rec.stanza)),
        ];
        let cost = row_cost(&row);
        if !rows.is_empty() && bytes + cost > PAGE_BYTES {
            break;
        }
        bytes += cost;
        rows.push(row);
        last = Some(*seq);
    }
    let more = page.len() > rows.len();
    let mut fields = vec![
        field("jid", "Recipient", &recipient),
        field("pending", "Pending messages", state.pending),
        field("listed", "Listed on this page", rows.len()),
    ];
    if more && let Some(last) = last {
        fields.push(field("next-after", "Next page: after", last));
    }
    let columns = columns(&[
        ("seq", "Seq"),
        ("from", "From"),
        ("id", "Id"),
        ("age-seconds", "Age (s)"),
        ("attempts", "Attempts since start"),
        ("preview", "Body"),
    ]);
    let result = form(DataFormType::Result_, "Pending messages", None, fields);
    Ok(Step::done(Table { columns, rows }.attach(result)))
}

/// The start of the message body, on one line.
fn preview(stanza: &str) -> String {
    let Ok(el) = Element::from_str(stanza) else {
        return "(unreadable)".into();
    };
    let Some(body) = el.children().find(|c| c.name() == "body") else {
        return "(no body)".into();
    };
    let text: String = body
        .text()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut out: String = text.chars().take(PREVIEW_CHARS).collect();
    if text.chars().count() > PREVIEW_CHARS {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::preview;

    #[test]
    fn preview_is_short_and_on_one_line() {
        assert_eq!(
            preview("<message xmlns='jabber:component:accept'><body>hi\nthere</body></message>"),
            "hi there"
        );
        let long = format!(
            "<message xmlns='jabber:component:accept'><body>{}</body></message>",
            "é".repeat(100)
        );
        assert_eq!(preview(&long).chars().count(), 81);
        assert_eq!(
            preview("<message xmlns='jabber:component:accept'/>"),
            "(no body)"
        );
        assert_eq!(preview("<message"), "(unreadable)");
    }
}
