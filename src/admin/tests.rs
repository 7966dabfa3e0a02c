//! The XEP-0050 session protocol against a fake relay with a real
//! (temporary) store.

use std::str::FromStr;

use crate::store::SledStore;

use super::*;
use crate::config::Durability;
use crate::store::{NewMessage, QueueLimits, Record};

struct Fake {
    store: SledStore,
    replays: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Fake {
    fn new() -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), Durability::Batched, 5, 1 << 20).unwrap();
        Fake {
            store,
            replays: vec![],
            _dir: dir,
        }
    }

    fn add(&self, recipient: &str, id: &str) {
        self.store
            .accept(
                NewMessage {
                    recipient,
                    sender_bare: "alice@x",
                    origin_id: None,
                    content_hash: crate::store::content_hash(id.as_bytes()),
                    record: Record {
                        accepted_at_ms: 0,
                        sender: "alice@x/r".into(),
                        id: id.into(),
                        stanza: format!("<message xmlns='jabber:component:accept' id='{id}'><body>text {id}</body></message>"),
                    },
                },
                QueueLimits {
                    max_pending: 100,
                    max_bytes: 1 << 20,
                    max_store_bytes: 1 << 30,
                },
            )
            .unwrap();
    }
}

impl Ops for Fake {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            stats: Stats::default(),
            in_flight: 0,
            uptime: Duration::from_secs(7),
            link_up_since: None,
            server: "127.0.0.1:5347".into(),
            domain: "relay.x".into(),
            durability: "batched",
            config_path: None,
        }
    }
    fn store(&self) -> &dyn StoreView {
        &self.store
    }
    fn resolve(&self, jid: &str) -> Result<String, String> {
        tokio_xmpp::parsers::jid::BareJid::from_str(jid)
            .map(|j| j.to_string())
            .map_err(|e| e.to_string())
    }
    fn attempts(&self, _: &str, _: u64) -> u32 {
        0
    }
    fn now_ms(&self) -> i64 {
        1000
    }
    async fn replay(&mut self, recipient: &str) -> Result<(u64, u64), String> {
        self.replays.push(recipient.to_owned());
        Ok((0, 0))
    }
    async fn purge(&mut self, recipient: &str, scope: PurgeScope) -> Result<u64, String> {
        Ok(self.store.purge(recipient, scope).unwrap().len() as u64)
    }
    fn reload(&mut self) -> Result<Vec<String>, String> {
        Err("no file".into())
    }
}

const T: Duration = Duration::from_secs(60);

fn jid(s: &str) -> Jid {
    Jid::from_str(s).unwrap()
}

fn submit(node: &str, sid: Option<&str>, action: Action, fields: &[(&str, &str)]) -> Command {
    let mut c = Command::execute(node);
    c.sessionid = sid.map(String::from);
    c.action = Some(action);
    let fields = fields
        .iter()
        .map(|(k, v)| Field::text_single(k, v))
        .collect();
    c.with_payload(form(DataFormType::Submit, "x", None, fields))
}

fn app_condition(e: &StanzaError) -> Option<String> {
    e.other.as_ref().map(|o| o.name().to_owned())
}

fn value(c: &Command, var: &str) -> Option<String> {
    let f = c.form()?.ok()?;
    let field = f
        .fields
        .into_iter()
        .find(|f| f.var.as_deref() == Some(var))?;
    field.values.into_iter().next()
}

/// Every field of every form of every command at every stage has an
/// explicit type, and every table has its text rendering: Profanity
/// shows nothing else (issue 15).
#[tokio::test]
async fn every_form_of_every_command_is_readable_by_every_client() {
    fn check(node: &str, stage: usize, c: &Command) {
        for x in c.payloads.iter().filter(|p| p.is("x", ns_forms())) {
            let mut fields: Vec<&Element> = x.children().filter(|f| f.name() == "field").collect();
            for part in x
                .children()
                .filter(|p| p.name() == "reported" || p.name() == "item")
            {
                fields.extend(part.children().filter(|f| f.name() == "field"));
            }
            for f in fields {
                assert!(
                    f.attr("type").is_some(),
                    "{node} stage {stage}: a field without a type: {}",
                    String::from(f)
                );
            }
            if x.get_child("reported", ns_forms()).is_some() {
                let rows = x
                    .children()
                    .find(|f| f.attr("var") == Some(readable::ROWS_VAR))
                    .unwrap_or_else(|| panic!("{node} stage {stage}: a table without text"));
                assert_eq!(rows.attr("type"), Some("text-multi"));
                let items = x.children().filter(|p| p.name() == "item").count();
                let lines = rows.children().count();
                assert_eq!(lines, items.max(1), "{node} stage {stage}: a line per row");
            }
        }
    }
    fn ns_forms() -> &'static str {
        "jabber:x:data"
    }
    let mut a = Admin::default();
    let mut ops = Fake::new();
    for i in 0..3 {
        ops.add("bob@x", &format!("m{i}"));
    }
    let me = jid("root@x/r");
    let mut walked = 0;
    for node in Node::ALL {
        let mut c = a
            .handle(&mut ops, &me, true, T, Command::execute(node.name()))
            .await
            .unwrap_or_else(|e| panic!("{node:?}: {e:?}"));
        let mut stage = 0;
        check(node.name(), stage, &c);
        while c.status == Some(Status::Executing) {
            stage += 1;
            let action = c
                .actions
                .as_ref()
                .and_then(|a| a.execute)
                .unwrap_or(Action::Complete);
            let answers: Vec<(&str, &str)> = c
                .form()
                .and_then(Result::ok)
                .map(|f| {
                    f.fields
                        .iter()
                        .filter_map(|f| match f.var.as_deref() {
                            Some("jid") => Some(("jid", "bob@x")),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            c = a
                .handle(
                    &mut ops,
                    &me,
                    true,
                    T,
                    submit(node.name(), c.sessionid.as_deref(), action, &answers),
                )
                .await
                .unwrap_or_else(|e| panic!("{node:?} stage {stage}: {e:?}"));
            check(node.name(), stage, &c);
        }
        assert_eq!(c.status, Some(Status::Completed), "{node:?}");
        walked += stage + 1;
    }
    assert!(walked > Node::ALL.len(), "multi-stage commands walked");
}

/// A list-queue page stays far below the 512 KiB at which servers drop
/// a component's stream, whatever the ids and senders hold: both
/// renderings of the table (items and text lines) and XML escaping
/// count, and long cells are cut.
#[tokio::test]
async fn a_page_of_huge_ids_stays_small() {
    let mut a = Admin::default();
    let mut ops = Fake::new();
    for i in 0..5 {
        ops.add("bob@x", &format!("{i}{}", "&<".repeat(30_000)));
    }
    let me = jid("root@x/r");
    let c = a
        .handle(
            &mut ops,
            &me,
            true,
            T,
            submit("list-queue", None, Action::Execute, &[("jid", "bob@x")]),
        )
        .await
        .unwrap();
    let size = String::from(&Element::from(c.clone())).len();
    assert!(size < 64 * 1024, "{size} bytes");
    let id = c
        .payloads
        .iter()
        .flat_map(|x| x.children())
        .filter(|i| i.name() == "item")
        .flat_map(|i| i.children())
        .find(|f| f.attr("var") == Some("id"))
        .map(|f| f.children().next().unwrap().text())
        .unwrap();
    assert!(id.ends_with('…') && id.chars().count() == 201, "{id}");
}

#[tokio::test]
async fn non_admins_are_forbidden_everything() {
    let mut a = Admin::default();
    let mut ops = Fake::new();
    ops.add("bob@x", "m1");
    let eve = jid("eve@x/r");
    for node in Node::ALL {
        let e = a
            .handle(&mut ops, &eve, false, T, Command::execute(node.name()))
            .await
            .unwrap_err();
        assert_eq!(e.defined_condition, DefinedCondition::Forbidden, "{node:?}");
        let e = a
            .handle(
                &mut ops,
                &eve,
                false,
                T,
                submit(node.name(), None, Action::Execute, &[("jid", "bob@x")]),
            )
            .await
            .unwrap_err();
        assert_eq!(e.defined_condition, DefinedCondition::Forbidden);
    }
    assert_eq!(a.sessions(), 0);
    assert!(ops.replays.is_empty());
    assert_eq!(ops.store.recipient("bob@x").unwrap().pending, 1);
}

#[tokio::test]
async fn unknown_node_and_missing_session() {
    let mut a = Admin::default();
    let mut ops = Fake::new();
    let me = jid("root@x/r");
    let e = a
        .handle(&mut ops, &me, true, T, Command::execute("reboot"))
        .await
        .unwrap_err();
    assert_eq!(e.defined_condition, DefinedCondition::ItemNotFound);
    let e = a
        .handle(
            &mut ops,
            &me,
            true,
            T,
            submit("list-queue", Some("nope"), Action::Complete, &[]),
        )
        .await
        .unwrap_err();
    assert_eq!(e.defined_condition, DefinedCondition::BadRequest);
    assert_eq!(app_condition(&e).as_deref(), Some("bad-sessionid"));
    // next without a session
    let e = a
        .handle(
            &mut ops,
            &me,
            true,
            T,
            submit("list-queue", None, Action::Next, &[]),
        )
        .await
        .unwrap_err();
    assert_eq!(app_condition(&e).as_deref(), Some("bad-sessionid"));
}

#[tokio::test]
async fn two_stage_session_with_bad_payload_retry() {
    let mut a = Admin::default();
    let mut ops = Fake::new();
    for i in 0..3 {
        ops.add("bob@x", &format!("m{i}"));
    }
    let me = jid("root@x/r");
    let first = a
        .handle(&mut ops, &me, true, T, Command::execute("list-queue"))
        .await
        .unwrap();
    assert_eq!(first.status, Some(Status::Executing));
    let sid = first.sessionid.clone().unwrap();
    let actions = first.actions.clone().unwrap();
    assert_eq!(actions.execute, Some(Action::Complete));
    assert!(actions.complete);
    let input = first.form().unwrap().unwrap();
    assert_eq!(input.type_, DataFormType::Form);
    assert!(
        input
            .fields
            .iter()
            .any(|f| f.var.as_deref() == Some("jid") && f.required)
    );

    // Not a JID: bad-payload, and the session survives.
    let e = a
        .handle(
            &mut ops,
            &me,
            true,
            T,
            submit(
                "list-queue",
                Some(&sid),
                Action::Complete,
                &[("jid", "a@@b")],
            ),
        )
        .await
        .unwrap_err();
    assert_eq!(app_condition(&e).as_deref(), Some("bad-payload"));
    let e = a
        .handle(
            &mut ops,
            &me,
            true,
            T,
            submit(
                "list-queue",
                Some(&sid),
                Action::Complete,
                &[("jid", "bob@x"), ("max", "0")],
            ),
        )
        .await
        .unwrap_err();
    assert_eq!(app_condition(&e).as_deref(), Some("bad-payload"));
    // Someone else cannot continue it.
    let e = a
        .handle(
            &mut ops,
            &jid("root@x/other"),
            true,
            T,
            submit(
                "list-queue",
                Some(&sid),
                Action::Complete,
                &[("jid", "bob@x")],
            ),
        )
        .await
        .unwrap_err();
    assert_eq!(app_condition(&e).as_deref(), Some("bad-sessionid"));
    assert_eq!(a.sessions(), 1);

    let done = a
        .handle(
            &mut ops,
            &me,
            true,
            T,
            submit(
                "list-queue",
                Some(&sid),
                Action::Complete,
                &[("jid", "bob@x"), ("max", "2")],
            ),
        )
        .await
        .unwrap();
    assert_eq!(done.status, Some(Status::Completed));
    assert_eq!(value(&done, "pending").as_deref(), Some("3"));
    assert_eq!(value(&done, "listed").as_deref(), Some("2"));
    assert!(value(&done, "next-after").is_some());
    assert_eq!(a.sessions(), 0);
}

#[tokio::test]
async fn cancel_ends_the_session() {
    let mut a = Admin::default();
    let mut ops = Fake::new();
    let me = jid("root@x/r");
    let first = a
        .handle(&mut ops, &me, true, T, Command::execute("replay"))
        .await
        .unwrap();
    let sid = first.sessionid.unwrap();
    let mut cancel = Command::execute("replay");
    cancel.sessionid = Some(sid.clone());
    cancel.action = Some(Action::Cancel);
    let c = a.handle(&mut ops, &me, true, T, cancel).await.unwrap();
    assert_eq!(c.status, Some(Status::Canceled));
    assert_eq!(a.sessions(), 0);
    let e = a
        .handle(
            &mut ops,
            &me,
            true,
            T,
            submit("replay", Some(&sid), Action::Complete, &[("jid", "bob@x")]),
        )
        .await
        .unwrap_err();
    assert_eq!(app_condition(&e).as_deref(), Some("bad-sessionid"));
    assert!(ops.replays.is_empty());
}

#[tokio::test(start_paused = true)]
async fn sessions_time_out() {
    let mut a = Admin::default();
    let mut ops = Fake::new();
    let me = jid("root@x/r");
    let first = a
        .handle(&mut ops, &me, true, T, Command::execute("replay"))
        .await
        .unwrap();
    let sid = first.sessionid.unwrap();
    tokio::time::advance(T + Duration::from_secs(1)).await;
    let e = a
        .handle(
            &mut ops,
            &me,
            true,
            T,
            submit("replay", Some(&sid), Action::Complete, &[("jid", "bob@x")]),
        )
        .await
        .unwrap_err();
    assert_eq!(e.defined_condition, DefinedCondition::NotAllowed);
    assert_eq!(app_condition(&e).as_deref(), Some("session-expired"));
    assert!(ops.replays.is_empty());
    assert_eq!(a.sessions(), 0);
}

#[tokio::test]
async fn purge_confirms_then_takes_exactly_what_it_showed() {
    let mut a = Admin::default();
    let mut ops = Fake::new();
    for i in 0..3 {
        ops.add("dave@x", &format!("d{i}"));
    }
    let me = jid("root@x/r");
    // A scripted client may submit the input with the execute.
    let ask = a
        .handle(
            &mut ops,
            &me,
            true,
            T,
            submit("purge", None, Action::Execute, &[("jid", "dave@x")]),
        )
        .await
        .unwrap();
    assert_eq!(ask.status, Some(Status::Executing));
    assert_eq!(value(&ask, "would-purge").as_deref(), Some("3"));
    let acts = ask.actions.clone().unwrap();
    assert!(acts.prev && acts.complete && !acts.next);
    let sid = ask.sessionid.unwrap();
    assert_eq!(
        ops.store.recipient("dave@x").unwrap().pending,
        3,
        "nothing yet"
    );

    // next is not an action of this stage.
    let mut next = Command::execute("purge");
    next.sessionid = Some(sid.clone());
    next.action = Some(Action::Next);
    let e = a.handle(&mut ops, &me, true, T, next).await.unwrap_err();
    assert_eq!(app_condition(&e).as_deref(), Some("bad-action"));

    // A message that arrives after the preview stays.
    ops.add("dave@x", "late");
    let mut complete = Command::execute("purge");
    complete.sessionid = Some(sid);
    complete.action = Some(Action::Complete);
    let done = a.handle(&mut ops, &me, true, T, complete).await.unwrap();
    assert_eq!(done.status, Some(Status::Completed));
    assert_eq!(value(&done, "purged").as_deref(), Some("3"));
    let left = ops.store.pending_from("dave@x", 0, 10).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].1.id, "late");
}

#[tokio::test]
async fn refused_reload_is_a_completed_command_with_an_error_note() {
    let mut a = Admin::default();
    let mut ops = Fake::new();
    let c = a
        .handle(
            &mut ops,
            &jid("root@x/r"),
            true,
            T,
            Command::execute("reload-config"),
        )
        .await
        .unwrap();
    assert_eq!(c.status, Some(Status::Completed));
    assert_eq!(c.notes[0].type_, Some(NoteType::Error));
    assert!(c.notes[0].text.contains("no file"));
    assert_eq!(value(&c, "applied").as_deref(), Some("false"));
}
