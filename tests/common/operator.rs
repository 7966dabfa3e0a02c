//! An operator: a c2s client that runs the relay's XEP-0050 admin
//! commands.

use tokio_xmpp::minidom::Element;

use super::{COMPONENT, Client, ClientOpts, Server, esc, xml};

pub const COMMANDS: &str = "http://jabber.org/protocol/commands";
pub const DATA: &str = "jabber:x:data";

/// A c2s client that runs commands on the relay's bare domain.
pub struct Operator {
    pub client: Client,
    next: u64,
}

impl Operator {
    pub async fn connect(server: &Server, user: &str) -> Operator {
        Operator {
            client: Client::connect(server.c2s_port, user, ClientOpts::default()).await,
            next: 0,
        }
    }

    pub fn id(&mut self) -> String {
        self.next += 1;
        format!("op-{}", self.next)
    }

    /// Send `<command/>` with `action` (and a submitted form when `fields`
    /// is not empty); returns the iq reply.
    pub async fn command(
        &mut self,
        node: &str,
        sid: Option<&str>,
        action: &str,
        fields: &[(&str, &str)],
    ) -> Element {
        let sid = sid.map_or(String::new(), |s| format!(" sessionid='{}'", esc(s)));
        let form = if fields.is_empty() {
            String::new()
        } else {
            let fields: String = fields
                .iter()
                .map(|(k, v)| format!("<field var='{}'><value>{}</value></field>", esc(k), esc(v)))
                .collect();
            format!("<x xmlns='{DATA}' type='submit'>{fields}</x>")
        };
        let id = self.id();
        self.client
            .iq(xml(&format!(
                "<iq xmlns='jabber:client' type='set' to='{COMPONENT}' id='{id}'>\
                 <command xmlns='{COMMANDS}' node='{node}' action='{action}'{sid}>{form}</command></iq>"
            )))
            .await
    }

    /// Run a command in one request (input submitted with the execute)
    /// and expect it to complete.
    pub async fn run(&mut self, node: &str, fields: &[(&str, &str)]) -> Element {
        let iq = self.command(node, None, "execute", fields).await;
        let c = command(&iq);
        assert_eq!(c.attr("status"), Some("completed"), "{node}: {iq:?}");
        c.clone()
    }

    pub async fn disco(&mut self, kind: &str, node: Option<&str>) -> Element {
        let node = node.map_or(String::new(), |n| format!(" node='{n}'"));
        let id = self.id();
        self.client
            .iq(xml(&format!(
                "<iq xmlns='jabber:client' type='get' to='{COMPONENT}' id='{id}'>\
                 <query xmlns='http://jabber.org/protocol/disco#{kind}'{node}/></iq>"
            )))
            .await
    }
}

pub fn command(iq: &Element) -> &Element {
    assert_eq!(iq.attr("type"), Some("result"), "{iq:?}");
    iq.get_child("command", COMMANDS).expect("command element")
}

/// A field's first value in the command's form.
pub fn value(cmd: &Element, var: &str) -> Option<String> {
    cmd.get_child("x", DATA)?
        .children()
        .find(|f| f.name() == "field" && f.attr("var") == Some(var))
        .and_then(|f| f.get_child("value", DATA))
        .map(|v| v.text())
}

pub fn number(cmd: &Element, var: &str) -> u64 {
    value(cmd, var)
        .unwrap_or_else(|| panic!("no field {var}: {cmd:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("{var} is not a number: {cmd:?}"))
}
