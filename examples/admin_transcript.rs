//! Prints real XEP-0050 exchanges with redeliver, for docs/admin.md:
//! a throwaway Prosody, redeliver, 3 pending messages for bob, and each
//! command run by admin@localhost. `cargo build --bin redeliver && cargo
//! run --example admin_transcript`.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;

const COMMANDS: &str = "http://jabber.org/protocol/commands";

async fn exchange(op: &mut Client, n: &mut u32, body: &str) {
    *n += 1;
    let req = xml(&format!(
        "<iq xmlns='jabber:client' type='set' to='{COMPONENT}' id='ex{n}'>{body}</iq>"
    ));
    println!("--> {}", String::from(&req));
    let reply = op.iq(req).await;
    println!("<-- {}\n", String::from(&reply));
}

#[tokio::main]
async fn main() {
    let prosody = Server::start(Kind::Prosody, ServerOpts::default());
    let _relay = Relay::start(&prosody, RelayOpts::default());
    send_all(&prosody, "bob@relay.localhost", &ids("m", 3)).await;
    let mut op = Client::connect(prosody.c2s_port, "admin", ClientOpts::default()).await;
    let mut n = 0;
    exchange(
        &mut op,
        &mut n,
        &format!("<command xmlns='{COMMANDS}' node='stats' action='execute'/>"),
    )
    .await;
    exchange(
        &mut op,
        &mut n,
        &format!("<command xmlns='{COMMANDS}' node='list-queue' action='execute'/>"),
    )
    .await;
    let form = |fields: &str| format!("<x xmlns='jabber:x:data' type='submit'>{fields}</x>");
    let f = |k: &str, v: &str| format!("<field var='{k}'><value>{v}</value></field>");
    exchange(
        &mut op,
        &mut n,
        &format!(
            "<command xmlns='{COMMANDS}' node='list-queue' action='execute'>{}</command>",
            form(&(f("jid", "bob@localhost") + &f("max", "2")))
        ),
    )
    .await;
    exchange(
        &mut op,
        &mut n,
        &format!(
            "<command xmlns='{COMMANDS}' node='top-queues' action='execute'>{}</command>",
            form(&f("max", "5"))
        ),
    )
    .await;
    exchange(
        &mut op,
        &mut n,
        &format!(
            "<command xmlns='{COMMANDS}' node='replay' action='execute'>{}</command>",
            form(&f("jid", "bob@localhost"))
        ),
    )
    .await;
    exchange(
        &mut op,
        &mut n,
        &format!(
            "<command xmlns='{COMMANDS}' node='purge' action='execute'>{}</command>",
            form(&f("jid", "bob@localhost"))
        ),
    )
    .await;
    exchange(
        &mut op,
        &mut n,
        &format!("<command xmlns='{COMMANDS}' node='status' action='execute'/>"),
    )
    .await;
    exchange(
        &mut op,
        &mut n,
        &format!("<command xmlns='{COMMANDS}' node='reload-config' action='execute'/>"),
    )
    .await;
    let carol = Client::connect(prosody.c2s_port, "carol", ClientOpts::default()).await;
    let mut carol = carol;
    exchange(
        &mut carol,
        &mut n,
        &format!("<command xmlns='{COMMANDS}' node='stats' action='execute'/>"),
    )
    .await;
}
