//! XEP-0050 (Ad-Hoc Commands) elements, which xmpp-parsers does not have,
//! written the way xmpp-parsers writes its own: `xso` derives give
//! `TryFrom<Element>` and `Into<Element>`, attribute values are enums with
//! `FromStr`/`Display`.
//!
//! Also the XEP-0004 `<reported>`/`<item>` table, which xmpp-parsers'
//! `DataForm` does not model.

use std::fmt;
use std::str::FromStr;

use tokio_xmpp::minidom::Element;
use tokio_xmpp::parsers::data_forms::{DataForm, Field};
use tokio_xmpp::parsers::ns;
use xso::{AsXml, FromXml};

/// The XEP-0050 namespace, also the disco node that lists commands.
pub const COMMANDS: &str = "http://jabber.org/protocol/commands";

/// An attribute value was none of the values XEP-0050 defines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} value {value:?}")]
pub struct UnknownValue {
    what: &'static str,
    value: String,
}

/// An enum whose variants are the fixed strings of one XML attribute.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident, $what:literal, { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, UnknownValue> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(UnknownValue { what: $what, value: other.to_owned() }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        xso::convert_via_fromstr_and_display!($name);
    };
}

text_enum!(
    /// What the requester asks for (`action` attribute).
    Action, "action", {
        /// Start the command, or proceed with the default action.
        Execute => "execute",
        /// End the session, discarding its state.
        Cancel => "cancel",
        /// Back to the previous stage.
        Prev => "prev",
        /// Submit this stage and go to the next.
        Next => "next",
        /// Submit this stage and finish.
        Complete => "complete",
    }
);

text_enum!(
    /// Where the session stands (`status` attribute).
    Status, "status", {
        /// More stages follow; the session is open.
        Executing => "executing",
        /// Finished; the session is closed.
        Completed => "completed",
        /// Cancelled; the session is closed.
        Canceled => "canceled",
    }
);

text_enum!(
    /// Severity of a note.
    NoteType, "note type", {
        Info => "info",
        Warn => "warn",
        Error => "error",
    }
);

/// The actions allowed at this stage (`<actions/>`), sent by the responder.
#[derive(FromXml, AsXml, Debug, Clone, PartialEq, Default)]
#[xml(namespace = COMMANDS, name = "actions")]
pub struct Actions {
    /// What a bare `execute` means at this stage.
    #[xml(attribute(default))]
    pub execute: Option<Action>,
    /// Whether `prev` is allowed.
    #[xml(flag)]
    pub prev: bool,
    /// Whether `next` is allowed.
    #[xml(flag)]
    pub next: bool,
    /// Whether `complete` is allowed.
    #[xml(flag)]
    pub complete: bool,
}

/// A human-readable note about the stage or the result.
#[derive(FromXml, AsXml, Debug, Clone, PartialEq)]
#[xml(namespace = COMMANDS, name = "note")]
pub struct Note {
    /// Severity; `info` when absent.
    #[xml(attribute(name = "type", default))]
    pub type_: Option<NoteType>,
    /// The text.
    #[xml(text)]
    pub text: String,
}

/// The `<command/>` element, in both directions.
#[derive(FromXml, AsXml, Debug, Clone, PartialEq)]
#[xml(namespace = COMMANDS, name = "command")]
pub struct Command {
    /// The command's node, its stable name.
    #[xml(attribute)]
    pub node: String,
    /// Names the session of a multi-stage command.
    #[xml(attribute(default))]
    pub sessionid: Option<String>,
    /// The requester's action; `execute` when absent.
    #[xml(attribute(default))]
    pub action: Option<Action>,
    /// The responder's status.
    #[xml(attribute(default))]
    pub status: Option<Status>,
    /// Allowed actions at this stage.
    #[xml(child(default))]
    pub actions: Option<Actions>,
    /// Notes, in order.
    #[xml(child(n = ..))]
    pub notes: Vec<Note>,
    /// Everything else: usually one XEP-0004 form.
    #[xml(element(n = ..))]
    pub payloads: Vec<Element>,
}

impl Command {
    /// A request to run `node` (no session yet).
    pub fn execute(node: &str) -> Command {
        Command {
            node: node.to_owned(),
            sessionid: None,
            action: Some(Action::Execute),
            status: None,
            actions: None,
            notes: vec![],
            payloads: vec![],
        }
    }

    /// A response with `status`.
    pub fn response(node: &str, sessionid: Option<String>, status: Status) -> Command {
        Command {
            node: node.to_owned(),
            sessionid,
            action: None,
            status: Some(status),
            actions: None,
            notes: vec![],
            payloads: vec![],
        }
    }

    /// The action, with XEP-0050's default.
    pub fn action(&self) -> Action {
        self.action.unwrap_or(Action::Execute)
    }

    /// The first XEP-0004 form among the payloads, parsed.
    pub fn form(&self) -> Option<Result<DataForm, String>> {
        self.payloads
            .iter()
            .find(|p| p.is("x", ns::DATA_FORMS))
            .map(|p| DataForm::try_from(p.clone()).map_err(|e| e.to_string()))
    }

    pub fn with_note(mut self, type_: NoteType, text: impl Into<String>) -> Command {
        self.notes.push(Note {
            type_: Some(type_),
            text: text.into(),
        });
        self
    }

    pub fn with_payload(mut self, payload: impl Into<Element>) -> Command {
        self.payloads.push(payload.into());
        self
    }
}

text_enum!(
    /// XEP-0050's application-specific error conditions (§4.6), carried
    /// next to a stanza error's defined condition.
    CommandError, "command error", {
        /// The action is not allowed at this stage.
        BadAction => "bad-action",
        /// The locale is not supported.
        BadLocale => "bad-locale",
        /// The submitted data is wrong.
        BadPayload => "bad-payload",
        /// The session is unknown or not the requester's.
        BadSessionid => "bad-sessionid",
        /// The action is not one XEP-0050 defines.
        MalformedAction => "malformed-action",
        /// The session timed out.
        SessionExpired => "session-expired",
    }
);

impl From<CommandError> for Element {
    fn from(e: CommandError) -> Element {
        Element::bare(e.as_str(), COMMANDS)
    }
}

/// A XEP-0004 result table: the columns (`<reported/>`) and one
/// `<item/>` per row. Appended to a result form's element, after its
/// fields.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Table {
    pub columns: Vec<Field>,
    pub rows: Vec<Vec<Field>>,
}

impl Table {
    /// The form as an element, with the table after its fields.
    pub fn attach(self, form: DataForm) -> Element {
        let mut el = Element::from(form);
        el.append_child(
            Element::builder("reported", ns::DATA_FORMS)
                .append_all(self.columns.into_iter().map(Element::from))
                .build(),
        );
        for row in self.rows {
            el.append_child(
                Element::builder("item", ns::DATA_FORMS)
                    .append_all(row.into_iter().map(Element::from))
                    .build(),
            );
        }
        el
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_xmpp::parsers::data_forms::{DataFormType, FieldType};

    fn parse(xml: &str) -> Result<Command, String> {
        let el: Element = xml.parse().map_err(|e| format!("{e}"))?;
        Command::try_from(el).map_err(|e| format!("{e:?}"))
    }

    /// XEP-0050 example 5: execute a command.
    #[test]
    fn parses_execute_request() {
        let c = parse(
            "<command xmlns='http://jabber.org/protocol/commands' node='list' action='execute'/>",
        )
        .unwrap();
        assert_eq!(c.node, "list");
        assert_eq!(c.action(), Action::Execute);
        assert_eq!(c.sessionid, None);
        assert!(c.payloads.is_empty());
        // The action defaults to execute.
        let c =
            parse("<command xmlns='http://jabber.org/protocol/commands' node='list'/>").unwrap();
        assert_eq!(c.action, None);
        assert_eq!(c.action(), Action::Execute);
    }

    /// XEP-0050 example 6: a completed command with a result form.
    #[test]
    fn parses_completed_with_form_and_round_trips() {
        let xml = "<command xmlns='http://jabber.org/protocol/commands' sessionid='list:20020923T213616Z-700' node='list' status='completed'>\
            <x xmlns='jabber:x:data' type='result'><title>Available Services</title>\
            <field var='service'><value>httpd</value></field></x></command>";
        let c = parse(xml).unwrap();
        assert_eq!(c.status, Some(Status::Completed));
        assert_eq!(c.sessionid.as_deref(), Some("list:20020923T213616Z-700"));
        let form = c.form().unwrap().unwrap();
        assert_eq!(form.type_, DataFormType::Result_);
        assert_eq!(form.fields[0].values, vec!["httpd".to_string()]);
        let back = Command::try_from(Element::from(c.clone())).unwrap();
        assert_eq!(back, c);
    }

    /// XEP-0050 example 9: a stage with actions and a form.
    #[test]
    fn parses_actions_and_notes() {
        let xml = "<command xmlns='http://jabber.org/protocol/commands' sessionid='config:20020923T213616Z-700' node='config' status='executing'>\
            <actions execute='next'><next/></actions>\
            <note type='warn'>Service 'httpd' is running.</note><note>plain</note>\
            <x xmlns='jabber:x:data' type='form'><title>Configure Service</title>\
            <field var='mode' type='list-single'><option><value>1</value></option></field></x></command>";
        let c = parse(xml).unwrap();
        let a = c.actions.clone().unwrap();
        assert_eq!(a.execute, Some(Action::Next));
        assert!(a.next && !a.prev && !a.complete);
        assert_eq!(c.notes.len(), 2);
        assert_eq!(c.notes[0].type_, Some(NoteType::Warn));
        assert_eq!(c.notes[0].text, "Service 'httpd' is running.");
        assert_eq!(c.notes[1].type_, None);
        let form = c.form().unwrap().unwrap();
        assert_eq!(form.fields[0].type_, FieldType::ListSingle);
        assert_eq!(Command::try_from(Element::from(c.clone())).unwrap(), c);
    }

    /// XEP-0050 example 14: cancel.
    #[test]
    fn parses_cancel() {
        let c = parse("<command xmlns='http://jabber.org/protocol/commands' sessionid='config:20020923T213616Z-700' node='config' action='cancel'/>").unwrap();
        assert_eq!(c.action(), Action::Cancel);
    }

    #[test]
    fn rejects_malformed() {
        // No node.
        assert!(
            parse("<command xmlns='http://jabber.org/protocol/commands' action='execute'/>")
                .is_err()
        );
        // An action XEP-0050 does not define.
        assert!(
            parse("<command xmlns='http://jabber.org/protocol/commands' node='x' action='jump'/>")
                .is_err()
        );
        // A status XEP-0050 does not define.
        assert!(
            parse("<command xmlns='http://jabber.org/protocol/commands' node='x' status='done'/>")
                .is_err()
        );
        // Wrong namespace.
        assert!(parse("<command xmlns='urn:example' node='x'/>").is_err());
        // A bad note type.
        assert!(parse("<command xmlns='http://jabber.org/protocol/commands' node='x'><note type='loud'>x</note></command>").is_err());
        // A form that is not a valid XEP-0004 form is reported by form().
        let c = parse("<command xmlns='http://jabber.org/protocol/commands' node='x'><x xmlns='jabber:x:data' type='bogus'/></command>").unwrap();
        assert!(c.form().unwrap().is_err());
    }

    #[test]
    fn serialises_response_with_error_condition_and_table() {
        let c = Command::response("stats", Some("s1".into()), Status::Completed)
            .with_note(NoteType::Info, "done");
        let el = Element::from(c);
        assert_eq!(el.attr("status"), Some("completed"));
        assert_eq!(el.attr("sessionid"), Some("s1"));
        assert_eq!(
            el.get_child("note", COMMANDS).unwrap().attr("type"),
            Some("info")
        );

        let e = Element::from(CommandError::BadSessionid);
        assert!(e.is("bad-sessionid", COMMANDS));
        assert_eq!("session-expired".parse(), Ok(CommandError::SessionExpired));

        let table = Table {
            columns: vec![Field::new("seq", FieldType::TextSingle)],
            rows: vec![
                vec![Field::text_single("seq", "1")],
                vec![Field::text_single("seq", "2")],
            ],
        };
        let el = table.attach(DataForm::new(DataFormType::Result_, "urn:example", vec![]));
        let items: Vec<_> = el.children().filter(|c| c.name() == "item").collect();
        assert_eq!(items.len(), 2);
        assert!(el.get_child("reported", ns::DATA_FORMS).is_some());
        assert_eq!(
            items[1]
                .get_child("field", ns::DATA_FORMS)
                .unwrap()
                .get_child("value", ns::DATA_FORMS)
                .unwrap()
                .text(),
            "2"
        );
    }
}
