//! Administration through XEP-0050 ad-hoc commands with XEP-0004 forms.
//!
//! [`Admin`] owns the command sessions and the XEP-0050 protocol (actions,
//! stages, errors); each command lives in [`commands`] and reaches the
//! relay only through [`Ops`], which the router implements. Who may run a
//! command is the router's decision (`[admin] jids`), passed in as
//! `is_admin`.

// Refusals are stanza errors, built on the cold path of an operator's
// request; boxing them everywhere would buy nothing.
#![allow(clippy::result_large_err)]

pub mod commands;
pub mod readable;

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;
use tokio_xmpp::minidom::Element;
use tokio_xmpp::parsers::data_forms::{DataForm, DataFormType, Field, FieldType};
use tokio_xmpp::parsers::jid::Jid;
use tokio_xmpp::parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};

use crate::stats::Stats;
use crate::store::{PurgeScope, StoreView};
use crate::xep0050::{Action, Actions, Command, CommandError, NoteType, Status};

/// Open sessions at most; a new one beyond that is refused.
const MAX_SESSIONS: usize = 256;

/// The relay as the commands see it.
pub(crate) struct Snapshot {
    pub stats: Stats,
    pub in_flight: u64,
    pub uptime: Duration,
    pub link_up_since: Option<chrono::DateTime<chrono::Utc>>,
    pub server: String,
    pub domain: String,
    pub durability: &'static str,
    pub config_path: Option<String>,
}

/// What the commands need from the relay.
pub(crate) trait Ops {
    fn snapshot(&self) -> Snapshot;
    fn store(&self) -> &dyn StoreView;
    /// The store key of the recipient an operator named: a bare JID, or
    /// the recipient's relay address.
    fn resolve(&self, jid: &str) -> Result<String, String>;
    /// Send attempts of a pending message since start.
    fn attempts(&self, recipient: &str, seq: u64) -> u32;
    fn now_ms(&self) -> i64;
    /// Send the recipient's queue now; `(sent now, pending)`.
    async fn replay(&mut self, recipient: &str) -> Result<(u64, u64), String>;
    /// Remove messages from a queue; how many went.
    async fn purge(&mut self, recipient: &str, scope: PurgeScope) -> Result<u64, String>;
    /// Re-read the config file; the changes applied, or why nothing was.
    fn reload(&mut self) -> Result<Vec<String>, String>;
}

/// The commands, by their stable node names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    Stats,
    ListQueue,
    TopQueues,
    Replay,
    Purge,
    Status,
    ReloadConfig,
}

impl Node {
    pub const ALL: [Node; 7] = [
        Node::Stats,
        Node::ListQueue,
        Node::TopQueues,
        Node::Replay,
        Node::Purge,
        Node::Status,
        Node::ReloadConfig,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Node::Stats => "stats",
            Node::ListQueue => "list-queue",
            Node::TopQueues => "top-queues",
            Node::Replay => "replay",
            Node::Purge => "purge",
            Node::Status => "status",
            Node::ReloadConfig => "reload-config",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Node::Stats => "Delivery statistics",
            Node::ListQueue => "List a recipient's pending messages",
            Node::TopQueues => "Largest queues",
            Node::Replay => "Replay a recipient's queue now",
            Node::Purge => "Purge a recipient's queue",
            Node::Status => "Component status",
            Node::ReloadConfig => "Reload the configuration file",
        }
    }

    pub fn from_name(name: &str) -> Option<Node> {
        Node::ALL.into_iter().find(|n| n.name() == name)
    }

    /// The input form, for commands that take input.
    fn input_form(self) -> Option<DataForm> {
        match self {
            Node::ListQueue => Some(commands::list_queue::input_form()),
            Node::TopQueues => Some(commands::top_queues::input_form()),
            Node::Replay => Some(commands::replay::input_form()),
            Node::Purge => Some(commands::purge::input_form()),
            Node::Stats | Node::Status | Node::ReloadConfig => None,
        }
    }
}

/// Where a session stands.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Stage {
    /// The input form was sent; its submission is expected.
    Input,
    /// Purge: the count was shown; `complete` removes exactly this scope.
    ConfirmPurge {
        recipient: String,
        scope: PurgeScope,
    },
}

/// What a command stage produced.
pub(crate) enum Step {
    /// Show a form and keep the session open at `stage`.
    Ask {
        form: DataForm,
        stage: Stage,
        actions: Actions,
    },
    /// Finished: an optional result form and notes.
    Done {
        payload: Option<Element>,
        notes: Vec<(NoteType, String)>,
    },
}

impl Step {
    fn done(payload: impl Into<Element>) -> Step {
        Step::Done {
            payload: Some(payload.into()),
            notes: vec![],
        }
    }
}

struct Session {
    node: Node,
    /// The full JID that opened it; nobody else may continue it.
    owner: Jid,
    expires: Instant,
    stage: Stage,
}

/// Command sessions.
#[derive(Default)]
pub struct Admin {
    sessions: HashMap<String, Session>,
}

pub(crate) fn bad_request(cond: CommandError, text: &str) -> StanzaError {
    let mut e = StanzaError::new(ErrorType::Modify, DefinedCondition::BadRequest, "en", text);
    e.other = Some(cond.into());
    e
}

/// The submitted data is wrong: `<bad-request/>` with `<bad-payload/>`.
pub(crate) fn bad_payload(text: &str) -> StanzaError {
    bad_request(CommandError::BadPayload, text)
}

fn error(type_: ErrorType, cond: DefinedCondition, text: &str) -> StanzaError {
    StanzaError::new(type_, cond, "en", text)
}

impl Admin {
    /// Open sessions (for tests and logs).
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Answer one `<command/>` request as it came: a malformed one gets
    /// `bad-request` (with `malformed-action` for an unknown action).
    pub(crate) async fn handle_element<O: Ops>(
        &mut self,
        ops: &mut O,
        from: &Jid,
        is_admin: bool,
        timeout: Duration,
        payload: Element,
    ) -> Result<Command, StanzaError> {
        let req = match Command::try_from(payload.clone()) {
            Ok(c) => c,
            Err(e) => {
                let cond = if payload
                    .attr("action")
                    .is_some_and(|a| a.parse::<Action>().is_err())
                {
                    CommandError::MalformedAction
                } else {
                    CommandError::BadPayload
                };
                tracing::warn!(%from, error = %e, "malformed command request");
                return Err(bad_request(cond, "the command element is malformed"));
            }
        };
        self.handle(ops, from, is_admin, timeout, req).await
    }

    /// Answer one `<command/>` request.
    pub(crate) async fn handle<O: Ops>(
        &mut self,
        ops: &mut O,
        from: &Jid,
        is_admin: bool,
        timeout: Duration,
        req: Command,
    ) -> Result<Command, StanzaError> {
        if !is_admin {
            return Err(error(
                ErrorType::Auth,
                DefinedCondition::Forbidden,
                "only the relay's administrators may run commands",
            ));
        }
        let Some(node) = Node::from_name(&req.node) else {
            return Err(error(
                ErrorType::Cancel,
                DefinedCondition::ItemNotFound,
                "no such command",
            ));
        };
        let now = Instant::now();
        match req.sessionid.clone() {
            None => {
                if req.action() != Action::Execute {
                    return Err(bad_request(
                        CommandError::BadSessionid,
                        "this action needs a sessionid",
                    ));
                }
                self.start(ops, node, from, now + timeout, &req).await
            }
            Some(sid) => {
                let Some(session) = self.sessions.remove(&sid) else {
                    return Err(bad_request(
                        CommandError::BadSessionid,
                        "no such session (finished, cancelled or timed out)",
                    ));
                };
                if session.owner != *from || session.node != node {
                    // Not theirs: leave it untouched.
                    self.sessions.insert(sid, session);
                    return Err(bad_request(
                        CommandError::BadSessionid,
                        "no such session for this command and JID",
                    ));
                }
                if session.expires <= now {
                    let mut e = error(
                        ErrorType::Cancel,
                        DefinedCondition::NotAllowed,
                        "the session timed out",
                    );
                    e.other = Some(CommandError::SessionExpired.into());
                    return Err(e);
                }
                self.continue_session(ops, node, sid, session, now + timeout, &req)
                    .await
            }
        }
    }

    async fn start<O: Ops>(
        &mut self,
        ops: &mut O,
        node: Node,
        from: &Jid,
        expires: Instant,
        req: &Command,
    ) -> Result<Command, StanzaError> {
        let step = match (node.input_form(), submitted(req)?) {
            // No input needed: run at once.
            (None, _) => run(ops, node, Stage::Input, None).await?,
            // A scripted client may submit the input with the execute.
            (Some(_), Some(form)) => run(ops, node, Stage::Input, Some(&form)).await?,
            (Some(form), None) => Step::Ask {
                form,
                stage: Stage::Input,
                actions: first_actions(node),
            },
        };
        self.respond(node, None, from, expires, step)
    }

    async fn continue_session<O: Ops>(
        &mut self,
        ops: &mut O,
        node: Node,
        sid: String,
        session: Session,
        expires: Instant,
        req: &Command,
    ) -> Result<Command, StanzaError> {
        let owner = session.owner.clone();
        let action = req.action();
        if action == Action::Cancel {
            return Ok(Command::response(node.name(), Some(sid), Status::Canceled));
        }
        let step = match (&session.stage, action) {
            (Stage::Input, Action::Execute | Action::Next | Action::Complete) => {
                let Some(form) = submitted(req)? else {
                    self.sessions.insert(sid, session);
                    return Err(bad_payload("submit the command's form"));
                };
                run(ops, node, Stage::Input, Some(&form)).await
            }
            (Stage::ConfirmPurge { .. }, Action::Execute | Action::Complete) => {
                run(ops, node, session.stage.clone(), None).await
            }
            (Stage::ConfirmPurge { .. }, Action::Prev) => Ok(Step::Ask {
                form: commands::purge::input_form(),
                stage: Stage::Input,
                actions: first_actions(node),
            }),
            _ => Err(bad_request(
                CommandError::BadAction,
                "that action is not allowed at this stage",
            )),
        };
        match step {
            Ok(step) => self.respond(node, Some(sid), &owner, expires, step),
            Err(e) => {
                // A wrong submission leaves the session where it was.
                self.sessions.insert(sid, session);
                Err(e)
            }
        }
    }

    /// Turn a step into the response, opening or closing the session.
    fn respond(
        &mut self,
        node: Node,
        sid: Option<String>,
        owner: &Jid,
        expires: Instant,
        step: Step,
    ) -> Result<Command, StanzaError> {
        match step {
            Step::Done { payload, notes } => {
                let mut c = Command::response(node.name(), sid, Status::Completed);
                c.notes = notes
                    .into_iter()
                    .map(|(t, text)| crate::xep0050::Note {
                        type_: Some(t),
                        text,
                    })
                    .collect();
                c.payloads.extend(payload);
                Ok(readable(c))
            }
            Step::Ask {
                form,
                stage,
                actions,
            } => {
                let sid = match sid {
                    Some(s) => s,
                    None => {
                        let now = Instant::now();
                        self.sessions.retain(|_, s| s.expires > now);
                        if self.sessions.len() >= MAX_SESSIONS {
                            return Err(error(
                                ErrorType::Wait,
                                DefinedCondition::ResourceConstraint,
                                "too many open command sessions",
                            ));
                        }
                        format!("{}-{:016x}", node.name(), rand::random::<u64>())
                    }
                };
                self.sessions.insert(
                    sid.clone(),
                    Session {
                        node,
                        owner: owner.clone(),
                        expires,
                        stage,
                    },
                );
                let mut c =
                    Command::response(node.name(), Some(sid), Status::Executing).with_payload(form);
                c.actions = Some(actions);
                Ok(readable(c))
            }
        }
    }
}

/// The actions offered with a command's input form.
fn first_actions(node: Node) -> Actions {
    if node == Node::Purge {
        Actions {
            execute: Some(Action::Next),
            next: true,
            ..Actions::default()
        }
    } else {
        Actions {
            execute: Some(Action::Complete),
            complete: true,
            ..Actions::default()
        }
    }
}

/// The submitted form, if the request carries one.
fn submitted(req: &Command) -> Result<Option<DataForm>, StanzaError> {
    match req.form() {
        None => Ok(None),
        Some(Err(e)) => Err(bad_payload(&format!("the form does not parse: {e}"))),
        Some(Ok(f)) if f.type_ == DataFormType::Submit => Ok(Some(f)),
        Some(Ok(_)) => Err(bad_payload("a submitted form must have type='submit'")),
    }
}

async fn run<O: Ops>(
    ops: &mut O,
    node: Node,
    stage: Stage,
    form: Option<&DataForm>,
) -> Result<Step, StanzaError> {
    let form = Input(form);
    match node {
        Node::Stats => commands::stats::run(ops),
        Node::Status => commands::status::run(ops),
        Node::ReloadConfig => commands::reload_config::run(ops),
        Node::ListQueue => commands::list_queue::run(ops, &form),
        Node::TopQueues => commands::top_queues::run(ops, &form),
        Node::Replay => commands::replay::run(ops, &form).await,
        Node::Purge => commands::purge::run(ops, stage, &form).await,
    }
}

/// A submitted form's values, read leniently where XEP-0004 allows
/// (missing optional fields) and strictly where it matters.
pub(crate) struct Input<'a>(Option<&'a DataForm>);

impl Input<'_> {
    /// The first value of a field, trimmed; `None` when absent or empty.
    pub fn value(&self, var: &str) -> Option<&str> {
        self.0?
            .fields
            .iter()
            .find(|f| f.var.as_deref() == Some(var))
            .and_then(|f| f.values.first())
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    pub fn required(&self, var: &str) -> Result<&str, StanzaError> {
        self.value(var)
            .ok_or_else(|| bad_payload(&format!("the field '{var}' is required")))
    }

    /// An optional whole number within `min..=max`.
    pub fn number(&self, var: &str, min: u64, max: u64) -> Result<Option<u64>, StanzaError> {
        let Some(v) = self.value(var) else {
            return Ok(None);
        };
        match v.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(bad_payload(&format!(
                "the field '{var}' must be a whole number from {min} to {max}"
            ))),
        }
    }

    /// The recipient named in field `jid`, as a store key.
    pub fn recipient<O: Ops>(&self, ops: &O) -> Result<String, StanzaError> {
        let jid = self.required("jid")?;
        ops.resolve(jid).map_err(|e| bad_payload(&e))
    }
}

/// A labelled single-value field of a result form.
pub(crate) fn field(var: &str, label: &str, value: impl ToString) -> Field {
    let mut f = Field::text_single(var, &value.to_string());
    f.label = Some(label.to_owned());
    f
}

/// An input field.
pub(crate) fn input(var: &str, type_: FieldType, label: &str, required: bool) -> Field {
    let mut f = Field::new(var, type_);
    f.label = Some(label.to_owned());
    f.required = required;
    f
}

/// A form with no FORM_TYPE.
pub(crate) fn form(
    type_: DataFormType,
    title: &str,
    instructions: Option<String>,
    fields: Vec<Field>,
) -> DataForm {
    DataForm {
        type_,
        title: Some(title.to_owned()),
        instructions,
        fields,
    }
}

/// The response with every form in it made readable by every client
/// (see [`readable`]).
fn readable(mut c: Command) -> Command {
    for p in &mut c.payloads {
        readable::for_every_client(p);
    }
    c
}

/// Whole seconds from `then_ms` to `now_ms`, never negative.
pub(crate) fn age_seconds(now_ms: i64, then_ms: i64) -> u64 {
    (now_ms.saturating_sub(then_ms).max(0) / 1000) as u64
}

#[cfg(test)]
mod tests;
