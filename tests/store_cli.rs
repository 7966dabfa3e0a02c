//! The store as an operator sees it: `redeliver store check|export|import`,
//! clear errors and non-zero exits for a locked, newer, inconsistent or
//! damaged store, and a full disk at run time. Against a real Prosody.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use redeliver::config::Durability;
use redeliver::store::SledStore;

const BOB: &str = "bob@relay.localhost";
const CAROL: &str = "carol@relay.localhost";

fn store_cmd(op: &str, config: &Path, file: Option<&Path>) -> (Option<i32>, String) {
    let mut args: Vec<&OsStr> = vec![OsStr::new("store"), OsStr::new(op), OsStr::new("--config")];
    args.push(config.as_os_str());
    if let Some(f) = file {
        args.push(f.as_os_str());
    }
    redeliver(&args)
}

/// A copy of `relay`'s config with the store at `store`.
fn config_with_store(relay: &Relay, store: &Path, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(&relay.config).unwrap();
    let old = relay.dir.path().join("store").display().to_string();
    let path = relay.dir.path().join(name);
    std::fs::write(&path, text.replace(&old, &store.display().to_string())).unwrap();
    path
}

#[tokio::test]
async fn export_import_and_delivery_resumes_on_the_new_store() {
    let server = Server::start(Kind::Prosody, ServerOpts::default());
    let mut relay = Relay::start(&server, RelayOpts::default());
    let sent = ids("x", 5);
    send_all(&server, BOB, &sent).await;
    assert_eq!(relay.terminate(), Some(0));

    let (st, out) = store_cmd("check", &relay.config, None);
    assert_eq!(st, Some(0), "{out}");
    assert!(
        out.contains("5 pending messages") && out.contains("consistent"),
        "{out}"
    );

    let file = relay.dir.path().join("export.jsonl");
    let (st, out) = store_cmd("export", &relay.config, Some(&file));
    assert_eq!(st, Some(0), "{out}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.starts_with(
            "{\"type\":\"header\",\"format\":\"redeliver-store-export\",\"version\":2"
        )
    );

    let new_store = relay.dir.path().join("store-new");
    let new_config = config_with_store(&relay, &new_store, "new.toml");
    let (st, out) = store_cmd("import", &new_config, Some(&file));
    assert_eq!(st, Some(0), "{out}");
    assert!(out.contains("5 pending messages"), "{out}");
    // Not twice.
    let (st, out) = store_cmd("import", &new_config, Some(&file));
    assert_eq!(st, Some(1), "{out}");
    assert!(out.contains("already holds data"), "{out}");
    // A truncated file is refused before anything is written.
    let cut = relay.dir.path().join("cut.jsonl");
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(&cut, lines[..lines.len() - 1].join("\n")).unwrap();
    let other = config_with_store(&relay, &relay.dir.path().join("store-cut"), "cut.toml");
    let (st, out) = store_cmd("import", &other, Some(&cut));
    assert_eq!(st, Some(1), "{out}");
    assert!(out.contains("truncated"), "{out}");
    assert!(!relay.dir.path().join("store-cut").exists());
    let (st, out) = store_cmd("check", &new_config, None);
    assert_eq!(st, Some(0), "{out}");

    // The imported store delivers the same messages, once, in order. (The
    // first relay has stopped; its directory holds the new store.)
    let _moved = Relay::start(
        &server,
        RelayOpts {
            store_path: Some(new_store),
            ..Default::default()
        },
    );
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    expect_exactly(&mut bob, &sent).await;
}

#[tokio::test]
async fn a_compressed_store_delivers_and_refuses_the_other_setting() {
    let server = Server::start(Kind::Prosody, ServerOpts::default());
    let compressed = RelayOpts {
        compression: true,
        ..Default::default()
    };
    let mut relay = Relay::start(&server, compressed);
    let sent = ids("z", 5);
    send_all(&server, BOB, &sent).await;
    assert_eq!(relay.terminate(), Some(0));

    let (st, out) = store_cmd("check", &relay.config, None);
    assert_eq!(st, Some(0), "{out}");
    assert!(out.contains("5 pending messages"), "{out}");
    // The same store with compression off: refused, saying what to set.
    let text = std::fs::read_to_string(&relay.config).unwrap();
    assert!(text.contains("compression = true"));
    let plain = relay.dir.path().join("plain.toml");
    std::fs::write(
        &plain,
        text.replace("compression = true", "compression = false"),
    )
    .unwrap();
    // A configuration error (2), which the shipped unit does not restart.
    let (st, out) = store_cmd("check", &plain, None);
    assert_eq!(st, Some(2), "{out}");
    assert!(
        out.contains("was created with store.compression = true"),
        "{out}"
    );
    let (st, out) = redeliver(&[OsStr::new("run"), OsStr::new("--config"), plain.as_os_str()]);
    assert_eq!(st, Some(2), "{out}");
    assert!(
        out.contains("was created with store.compression = true"),
        "{out}"
    );

    // The way to change it: export, then import into a new store. A
    // refused import leaves no store behind, so the next try may choose
    // either setting.
    let file = relay.dir.path().join("export.jsonl");
    let (st, out) = store_cmd("export", &relay.config, Some(&file));
    assert_eq!(st, Some(0), "{out}");
    let new_store = relay.dir.path().join("store-plain");
    let text = std::fs::read_to_string(&file).unwrap();
    let cut = relay.dir.path().join("cut.jsonl");
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(&cut, lines[..lines.len() - 1].join("\n")).unwrap();
    let compressed_new = config_with_store(&relay, &new_store, "compressed-new.toml");
    let (st, out) = store_cmd("import", &compressed_new, Some(&cut));
    assert_eq!(st, Some(1), "{out}");
    assert!(out.contains("truncated"), "{out}");
    assert!(!new_store.exists(), "a refused import left {new_store:?}");
    // A directory made in advance (systemd's StateDirectory=) stays, empty.
    let made = relay.dir.path().join("store-made");
    std::fs::create_dir(&made).unwrap();
    let made_config = config_with_store(&relay, &made, "made.toml");
    let (st, out) = store_cmd("import", &made_config, Some(&cut));
    assert_eq!(st, Some(1), "{out}");
    assert_eq!(std::fs::read_dir(&made).unwrap().count(), 0, "{out}");
    let plain_new = relay.dir.path().join("plain-new.toml");
    std::fs::write(
        &plain_new,
        std::fs::read_to_string(&compressed_new)
            .unwrap()
            .replace("compression = true", "compression = false"),
    )
    .unwrap();
    let (st, out) = store_cmd("import", &plain_new, Some(&file));
    assert_eq!(st, Some(0), "{out}");
    let (st, out) = store_cmd("check", &plain_new, None);
    assert_eq!(st, Some(0), "{out}");
    assert!(out.contains("5 pending messages"), "{out}");

    // Restarted with it, the relay delivers every message once, in order.
    relay.restart();
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    expect_exactly(&mut bob, &sent).await;
}

/// A copy of `relay`'s (sled) config with the store in PostgreSQL at
/// `url` instead.
fn config_with_database(relay: &Relay, url: &str, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(&relay.config).unwrap();
    let old = format!("path = \"{}\"", relay.dir.path().join("store").display());
    assert!(text.contains(&old), "{text}");
    let path = relay.dir.path().join(name);
    let new = format!("backend = \"postgres\"\nurl = \"{url}\"");
    std::fs::write(&path, text.replace(&old, &new)).unwrap();
    path
}

/// A store moves from sled to PostgreSQL with `store export` and
/// `store import`, delivers from there, and moves back.
#[tokio::test]
async fn a_store_moves_from_sled_to_postgres_and_back() {
    let server = Server::start(Kind::Prosody, ServerOpts::default());
    let mut relay = Relay::start(&server, RelayOpts::default());
    let sent = ids("pg", 4);
    send_all(&server, BOB, &sent).await;
    assert_eq!(relay.terminate(), Some(0));
    let file = relay.dir.path().join("from-sled.jsonl");
    let (st, out) = store_cmd("export", &relay.config, Some(&file));
    assert_eq!(st, Some(0), "{out}");

    let url = pg::new_database();
    let on_pg = config_with_database(&relay, &url, "pg.toml");
    let (st, out) = store_cmd("import", &on_pg, Some(&file));
    assert_eq!(st, Some(0), "{out}");
    assert!(out.contains("4 pending messages"), "{out}");
    let (st, out) = store_cmd("check", &on_pg, None);
    assert_eq!(st, Some(0), "{out}");
    assert!(
        out.contains("4 pending messages") && out.contains("consistent"),
        "{out}"
    );
    let (st, out) = store_cmd("import", &on_pg, Some(&file));
    assert_eq!(st, Some(1), "not twice: {out}");
    assert!(out.contains("already holds data"), "{out}");

    // Back to a new sled store, through an export of the database.
    let back = relay.dir.path().join("from-pg.jsonl");
    let (st, out) = store_cmd("export", &on_pg, Some(&back));
    assert_eq!(st, Some(0), "{out}");
    let entries = |f: &Path| -> Vec<String> {
        std::fs::read_to_string(f)
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"type\":\"entry\""))
            .map(str::to_owned)
            .collect()
    };
    // Seqs too: a relayed message's stanza-id is made of its seq.
    assert_eq!(
        entries(&file),
        entries(&back),
        "the same entries, same seqs"
    );
    let sled_again = config_with_store(&relay, &relay.dir.path().join("store-back"), "back.toml");
    let (st, out) = store_cmd("import", &sled_again, Some(&back));
    assert_eq!(st, Some(0), "{out}");
    let (st, out) = store_cmd("check", &sled_again, None);
    assert_eq!(st, Some(0), "{out}");

    // The database delivers what sled held, once, in order.
    let _moved = Relay::start(
        &server,
        RelayOpts {
            postgres_url: Some(url),
            ..Default::default()
        },
    );
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    expect_exactly(&mut bob, &sent).await;
    // Nothing but the lead keeps a command off a running instance's
    // database, and the command does not get it.
    let (st, out) = store_cmd("check", &on_pg, None);
    assert_eq!(st, Some(1), "{out}");
    assert!(
        out.contains("an instance is running on this database"),
        "{out}"
    );
}

const SID: &str = "urn:xmpp:sid:0";

/// The next `n` messages `client` is shown, each as (id, the relay's
/// XEP-0359 stanza-id).
async fn shown(client: &mut Client, n: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while out.len() < n {
        let m = client
            .next_body_message(SECS(15))
            .await
            .unwrap_or_else(|| panic!("shown only {out:?}"));
        let sid = m
            .children()
            .find(|c| c.is("stanza-id", SID) && c.attr("by") == Some(COMPONENT))
            .and_then(|s| s.attr("id"))
            .unwrap_or_else(|| panic!("no stanza-id by the relay: {m:?}"));
        out.push((m.attr("id").unwrap_or("").to_owned(), sid.to_owned()));
    }
    out
}

/// Where a store moves with `store export` and `store import`.
#[derive(Clone, Copy, Debug)]
enum Move {
    ToSled,
    ToPostgres,
}

/// Issue 23 item 6. Clients may tell copies of a message apart by the
/// relay's stanza-id: every send of a message carries the same one, and
/// no two messages ever get the same one, also when the store moves.
/// Bob is shown two messages and confirms them, then two that he does
/// not confirm (his client does not answer them); the store moves along
/// `moves`, a message is accepted after each move, and at last bob is
/// shown the pending ones again with their stanza-ids, and the new ones
/// with stanza-ids no earlier message had.
async fn stanza_ids_hold_across(moves: &[Move]) {
    let server = Server::start(Kind::Prosody, ServerOpts::default());
    let mut relay = Relay::start(&server, RelayOpts::default());
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    send_all(&server, BOB, &ids("seen", 2)).await;
    let confirmed = shown(&mut bob, 2).await;
    wait_log_line(&relay, &[" confirmed", "id=seen2 "]).await;
    wait_log_line(
        &relay,
        &["this client answers receipts", "resource=\"test\""],
    )
    .await;
    bob.close().await;
    // A restart moves sled's id generator on, as in every store that
    // ever restarted: the seqs have a gap.
    assert_eq!(relay.terminate(), Some(0));
    relay.restart();
    // The same client, now silent: known to answer, its messages wait
    // for a receipt and stay pending.
    let silent = ClientOpts {
        receipts: false,
        ..Default::default()
    };
    let mut mute = Client::connect(server.c2s_port, "bob", silent).await;
    send_all(&server, BOB, &ids("pending", 2)).await;
    let pending = shown(&mut mute, 2).await;
    mute.close().await;
    assert_eq!(relay.terminate(), Some(0));
    let (st, out) = store_cmd("check", &relay.config, None);
    assert!(st == Some(0) && out.contains("2 pending messages"), "{out}");

    let mut config = relay.config.clone();
    let mut moved: Vec<Relay> = Vec::new();
    let mut after = Vec::new();
    for (n, to) in moves.iter().enumerate() {
        let file = relay.dir.path().join(format!("move-{n}.jsonl"));
        let (st, out) = store_cmd("export", &config, Some(&file));
        assert_eq!(st, Some(0), "{out}");
        let (new_config, opts) = match to {
            Move::ToSled => {
                let dir = relay.dir.path().join(format!("store-{n}"));
                let opts = RelayOpts {
                    store_path: Some(dir.clone()),
                    ..Default::default()
                };
                (config_with_store(&relay, &dir, &format!("{n}.toml")), opts)
            }
            Move::ToPostgres => {
                let url = pg::new_database();
                let config = config_with_database(&relay, &url, &format!("{n}.toml"));
                let opts = RelayOpts {
                    postgres_url: Some(url),
                    ..Default::default()
                };
                (config, opts)
            }
        };
        let (st, out) = store_cmd("import", &new_config, Some(&file));
        assert_eq!(st, Some(0), "{to:?}: {out}");
        let mut there = Relay::start(&server, opts);
        let id = format!("after-move-{n}");
        send_all(&server, BOB, std::slice::from_ref(&id)).await;
        wait_log_line(&there, &["accepted", &format!("id={id} ")]).await;
        assert_eq!(there.terminate(), Some(0));
        after.push(id);
        config = new_config;
        moved.push(there);
    }

    let last = moved.last_mut().expect("a move");
    last.restart();
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    let again = shown(&mut bob, pending.len() + after.len()).await;
    let more = bob.body_ids(1, SECS(3)).await;
    assert!(more.is_empty(), "nothing twice, nothing else: {more:?}");
    let (replayed, new) = again.split_at(pending.len());
    assert_eq!(
        replayed, pending,
        "the pending messages again, each with the stanza-id it had"
    );
    assert_eq!(
        new.iter().map(|(id, _)| id).collect::<Vec<_>>(),
        after.iter().collect::<Vec<_>>()
    );
    let earlier: Vec<&(String, String)> = confirmed.iter().chain(&pending).collect();
    for (id, sid) in new {
        let taken: Vec<_> = earlier.iter().filter(|(_, s)| s == sid).collect();
        assert!(
            taken.is_empty(),
            "{id}, accepted after a move, has the stanza-id {sid} of {taken:?}"
        );
    }
    let mut all: Vec<&String> = confirmed.iter().chain(&again).map(|(_, s)| s).collect();
    all.sort();
    all.dedup();
    assert_eq!(
        all.len(),
        confirmed.len() + again.len(),
        "{confirmed:?} {again:?}"
    );
}

#[tokio::test]
async fn stanza_ids_hold_across_a_move_between_sled_stores() {
    stanza_ids_hold_across(&[Move::ToSled]).await;
}

#[tokio::test]
async fn stanza_ids_hold_from_sled_to_postgres_and_back() {
    stanza_ids_hold_across(&[Move::ToPostgres, Move::ToSled]).await;
}

#[tokio::test]
async fn store_errors_are_clear_and_exit_non_zero() {
    let server = Server::start(Kind::Prosody, ServerOpts::default());
    let mut relay = Relay::start(&server, RelayOpts::default());
    send_all(&server, BOB, &ids("e", 3)).await;
    let store_dir = relay.dir.path().join("store");

    // Locked: the running relay holds it.
    let (st, out) = store_cmd("check", &relay.config, None);
    assert_eq!(st, Some(1), "{out}");
    assert!(out.contains("in use by another process"), "{out}");
    assert_eq!(relay.terminate(), Some(0));

    let run = |config: &Path| {
        redeliver(&[
            OsStr::new("run"),
            OsStr::new("--config"),
            config.as_os_str(),
        ])
    };

    // Written by a newer redeliver.
    {
        let s = SledStore::open(&store_dir, Durability::Fsync, 5, 1 << 20).unwrap();
        s.db().insert("mschema", &99u32.to_be_bytes()).unwrap();
        s.flush().unwrap();
        s.write_shutdown_marker().unwrap();
    }
    let (st, out) = run(&relay.config);
    assert_eq!(st, Some(1), "{out}");
    assert!(out.contains("newer redeliver (schema 99"), "{out}");
    {
        let s = SledStore::open(&store_dir, Durability::Fsync, 5, 1 << 20);
        assert!(s.is_err());
    }

    // Inconsistent counters: check names the problem.
    let fresh = relay.dir.path().join("store-2");
    let config2 = config_with_store(&relay, &fresh, "two.toml");
    {
        let s = SledStore::open(&fresh, Durability::Fsync, 5, 1 << 20).unwrap();
        // A recipient state claiming two messages that are not there.
        s.db()
            .insert(b"rghost@localhost", postcard_state(2, 100))
            .unwrap();
        s.flush().unwrap();
    }
    let (st, out) = store_cmd("check", &config2, None);
    assert_eq!(st, Some(1), "{out}");
    assert!(
        out.contains("problem: ghost@localhost: counters say 2 messages"),
        "{out}"
    );

    // Damaged while stopped: sled would silently cut its log; the
    // clean-shutdown marker catches it.
    let third = relay.dir.path().join("store-3");
    let config3 = config_with_store(&relay, &third, "three.toml");
    // A real relay run fills it and stops cleanly (marker written).
    let mut r3 = Relay::start(
        &server,
        RelayOpts {
            store_path: Some(third.clone()),
            ..Default::default()
        },
    );
    send_all(&server, CAROL, &ids("d", 30)).await;
    assert_eq!(r3.terminate(), Some(0));
    // The log loses its second half (a torn copy, a bad disk).
    let db = third.join("db");
    let len = std::fs::metadata(&db).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (st, out) = run(&config3);
    assert_eq!(st, Some(1), "{out}");
    assert!(out.contains("damaged while stopped"), "{out}");
}

/// The postcard encoding of a recipient state (subscription none).
fn postcard_state(pending: u64, bytes: u64) -> Vec<u8> {
    // enum index 0, then two varints.
    let mut v = vec![0u8];
    for mut n in [pending, bytes] {
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                v.push(b);
                break;
            }
            v.push(b | 0x80);
        }
    }
    v
}

/// A tmpfs for the store, unmounted on drop.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(path: PathBuf, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(&path).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk { path })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
    }
}

/// On a full disk new messages are refused with `<resource-constraint/>`,
/// receipts still reach senders, and once there is space again redeliver
/// exits with status 75 so that a supervisor restarts it: then nothing it
/// had accepted is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_refuses_new_messages_then_restarts_to_reopen() {
    let server = Server::start(Kind::Prosody, ServerOpts::default());
    let scratch = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(scratch.path().join("fs"), "3m") else {
        // Mounting needs root (CI runs as root); say so rather than pass.
        panic!("cannot mount a tmpfs: run the suite as root");
    };
    let filler = disk.path.join("filler");
    std::fs::write(&filler, vec![0u8; 1536 * 1024]).unwrap();
    let mut relay = Relay::start(
        &server,
        RelayOpts {
            store_path: Some(disk.path.join("store")),
            max_stanza_bytes: 64 * 1024,
            ..Default::default()
        },
    );
    let mut alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    let body = "y".repeat(16 * 1024);
    let mut accepted = Vec::new();
    let mut refused = None;
    let mut told = Vec::new();
    for i in 0..400 {
        let id = format!("big{i}");
        alice.message(CAROL, &id, &body);
        accepted.push(id);
        // Carol is offline: bounces come and go; errors to alice only
        // when the relay refuses.
        while let Some((rid, cond)) = alice.next_error(Duration::from_millis(150)).await {
            assert_eq!(cond, "resource-constraint", "{rid}");
            told.push(rid);
            refused = Some(());
        }
        if refused.is_some() {
            break;
        }
    }
    assert!(refused.is_some(), "the disk filled up");
    // Everything alice was told about is not pending; the rest is.
    accepted.retain(|id| !told.contains(id));
    assert!(relay.log_text().contains("the store cannot write"));
    // Still refusing, still answering, and what needs no write (a chat
    // state, relayed once) still flows.
    alice.message(BOB, "while-full", "refused too");
    assert_eq!(
        alice.next_error(SECS(5)).await,
        Some(("while-full".into(), "resource-constraint".into())),
        "{}",
        relay.log_text()
    );
    let bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    bob.send(xml(
        "<message xmlns='jabber:client' to='alice@relay.localhost' id='cs1' type='chat'>\
         <composing xmlns='http://jabber.org/protocol/chatstates'/></message>",
    ));
    let got = alice.drain(SECS(3)).await;
    assert!(
        got.iter()
            .any(|m| m.has_child("composing", "http://jabber.org/protocol/chatstates")),
        "{got:?}"
    );

    // Space again: it exits to reopen the store; the supervisor (here the
    // test) starts it again.
    std::fs::remove_file(&filler).unwrap();
    let status = tokio::task::block_in_place(|| relay.wait_exit(SECS(20)));
    assert_eq!(status, Some(75), "{}", relay.log_text());
    tokio::task::block_in_place(|| relay.restart());
    // Everything accepted without an error to its sender is there, in
    // order, once.
    let mut carol = Client::connect(server.c2s_port, "carol", ClientOpts::default()).await;
    expect_exactly(&mut carol, &accepted).await;
    drop(relay);
    drop(disk);
}
