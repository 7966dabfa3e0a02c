//! Forms every client can show.
//!
//! Profanity 0.13 (`/cmd`) prints a field's value only when the field has
//! an explicit `type` (XEP-0004 makes `text-single` the default, and
//! xmpp-parsers leaves the default out), prints `text-multi` values one
//! per line, and ignores a `<reported/>`/`<item/>` table. So every form
//! redeliver sends goes through [`for_every_client`]: every field gets an
//! explicit type, and every table is also given as a `text-multi` field
//! with one readable line per row, beside the table for the clients that
//! render tables (Gajim, Psi).

use tokio_xmpp::minidom::rxml::{Namespace, NcName};
use tokio_xmpp::minidom::{Element, Node};
use tokio_xmpp::parsers::data_forms::{Field, FieldType};
use tokio_xmpp::parsers::ns;

/// The `var` of the text rendering of a form's table.
pub const ROWS_VAR: &str = "rows";

/// Make `form` (a `jabber:x:data` element) readable by every client.
pub fn for_every_client(form: &mut Element) {
    if !form.is("x", ns::DATA_FORMS) {
        return;
    }
    let rows = text_rows(form);
    if let Some(lines) = rows {
        let title = form
            .get_child("title", ns::DATA_FORMS)
            .map(|t| t.text())
            .unwrap_or_else(|| "Rows".into());
        let mut field = Field::new(ROWS_VAR, FieldType::TextMulti);
        field.label = Some(format!("{title}, one per line"));
        field.values = if lines.is_empty() {
            vec!["(none)".into()]
        } else {
            lines
        };
        insert_before_table(form, Element::from(field));
    }
    for child in form.children_mut() {
        explicit_types(child);
    }
}

/// A field (or the fields of a `<reported/>` or `<item/>`) without a
/// `type` gets the default one written out.
fn explicit_types(el: &mut Element) {
    if el.is("field", ns::DATA_FORMS) {
        if el.attr("type").is_none()
            && let Ok(name) = NcName::try_from("type")
        {
            el.set_attr(Namespace::NONE, name, "text-single");
        }
        return;
    }
    if el.is("reported", ns::DATA_FORMS) || el.is("item", ns::DATA_FORMS) {
        for f in el.children_mut() {
            explicit_types(f);
        }
    }
}

/// One line per `<item/>`: "Label: value; Label: value", in the
/// `<reported/>` order; `None` when the form has no table.
fn text_rows(form: &Element) -> Option<Vec<String>> {
    let reported = form.get_child("reported", ns::DATA_FORMS)?;
    let columns: Vec<(String, String)> = reported
        .children()
        .filter(|f| f.is("field", ns::DATA_FORMS))
        .filter_map(|f| {
            let var = f.attr("var")?.to_owned();
            let label = f.attr("label").unwrap_or(&var).to_owned();
            Some((var, label))
        })
        .collect();
    let lines = form
        .children()
        .filter(|c| c.is("item", ns::DATA_FORMS))
        .map(|item| {
            columns
                .iter()
                .map(|(var, label)| {
                    let value: Vec<String> = item
                        .children()
                        .filter(|f| f.is("field", ns::DATA_FORMS) && f.attr("var") == Some(var))
                        .flat_map(|f| f.children().filter(|v| v.name() == "value"))
                        .map(|v| v.text())
                        .collect();
                    format!("{label}: {}", value.join(", "))
                })
                .collect::<Vec<_>>()
                .join("; ")
        })
        .collect();
    Some(lines)
}

/// Put `field` after the form's fields, before its table (XEP-0004 orders
/// `<reported/>` and `<item/>` last).
fn insert_before_table(form: &mut Element, field: Element) {
    let mut field = Some(field);
    for node in form.take_nodes() {
        if let Node::Element(child) = &node
            && (child.is("reported", ns::DATA_FORMS) || child.is("item", ns::DATA_FORMS))
            && let Some(f) = field.take()
        {
            form.append_child(f);
        }
        form.append_node(node);
    }
    if let Some(f) = field {
        form.append_child(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_get_types_and_tables_a_text_rendering() {
        let mut form: Element = "<x xmlns='jabber:x:data' type='result'><title>Pending messages</title>\
            <field var='pending' label='Pending'><value>2</value></field>\
            <field var='note' type='fixed'><value>n</value></field>\
            <reported><field var='seq' label='Seq'/><field var='id' label='Id'/></reported>\
            <item><field var='seq'><value>1</value></field><field var='id'><value>a</value></field></item>\
            <item><field var='seq'><value>2</value></field><field var='id'><value>b</value></field></item>\
            </x>"
            .parse()
            .unwrap();
        for_every_client(&mut form);
        let fields: Vec<_> = form
            .children()
            .filter(|c| c.name() == "field")
            .map(|f| (f.attr("var").unwrap(), f.attr("type").unwrap()))
            .collect();
        assert_eq!(
            fields,
            [
                ("pending", "text-single"),
                ("note", "fixed"),
                (ROWS_VAR, "text-multi")
            ]
        );
        let rows = form
            .children()
            .find(|c| c.attr("var") == Some(ROWS_VAR))
            .unwrap();
        let lines: Vec<_> = rows.children().map(|v| v.text()).collect();
        assert_eq!(lines, ["Seq: 1; Id: a", "Seq: 2; Id: b"]);
        assert_eq!(rows.attr("label"), Some("Pending messages, one per line"));
        // The table stays, after the fields, with typed columns.
        let names: Vec<_> = form.children().map(|c| c.name()).collect();
        assert_eq!(
            names,
            [
                "title", "field", "field", "field", "reported", "item", "item"
            ]
        );
        let reported = form.get_child("reported", ns::DATA_FORMS).unwrap();
        assert!(
            reported
                .children()
                .all(|f| f.attr("type") == Some("text-single"))
        );
    }

    #[test]
    fn an_empty_table_says_so() {
        let mut form: Element = "<x xmlns='jabber:x:data' type='result'>\
            <reported><field var='seq' label='Seq'/></reported></x>"
            .parse()
            .unwrap();
        for_every_client(&mut form);
        let rows = form
            .children()
            .find(|c| c.attr("var") == Some(ROWS_VAR))
            .unwrap();
        assert_eq!(
            rows.children().map(|v| v.text()).collect::<Vec<_>>(),
            ["(none)"]
        );
    }
}
