//! Test harness: throwaway Prosody and ejabberd instances on loopback, the
//! real redeliver binary, and a raw c2s test client.
//!
//! The c2s client speaks XML over tokio-xmpp's low-level `XmlStream` with
//! plain minidom elements: a tokio-xmpp `Client` cannot share a build with
//! the `component` feature (see DESIGN.md).

#![allow(dead_code)]

pub mod fake;
pub mod operator;
pub mod pg;
pub mod pg_admin;
pub mod ports;
pub mod profanity;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use futures::{SinkExt, StreamExt};
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_xmpp::minidom::Element;
use tokio_xmpp::xmlstream::{ReadError, StreamHeader, Timeouts, XmlStream, initiate_stream};

pub const SECRET: &str = "test-secret";
pub const COMPONENT: &str = "relay.localhost";
pub const PASSWORD: &str = "pw";
pub const CLIENT_NS: &str = "jabber:client";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A benchmark setting from the environment, or `default` when unset or
/// not a number.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A comma-separated benchmark setting from the environment.
pub fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(str::to_owned)
        .collect()
}

fn ensure_prosody() {
    let privilege = Path::new("/usr/lib/prosody/modules/mod_privilege/mod_privilege.lua").exists()
        || Path::new("/usr/lib/prosody/modules/mod_privilege.lua").exists();
    if privilege
        && Command::new("prosodyctl")
            .arg("about")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    {
        return;
    }
    install("install-prosody");
}

/// The directory that holds Debian's `ejabberd-<version>` OTP
/// application, for `ERL_LIBS`.
fn ejabberd_libs() -> Option<PathBuf> {
    let lib = std::fs::read_dir("/usr/lib").ok()?;
    lib.flatten().map(|e| e.path()).find(|dir| {
        std::fs::read_dir(dir).is_ok_and(|mut entries| {
            entries.any(|e| {
                e.is_ok_and(|e| {
                    e.file_name().to_string_lossy().starts_with("ejabberd-")
                        && e.path().join("ebin").is_dir()
                })
            })
        })
    })
}

fn ensure_ejabberd() -> PathBuf {
    if let Some(libs) = ejabberd_libs()
        && Path::new("/usr/bin/erl").exists()
    {
        return libs;
    }
    install("install-ejabberd");
    ejabberd_libs().expect("ejabberd installed but its OTP application not found")
}

/// The directory holding mod_redeliver.beam, built once per test process
/// from component-config/ejabberd/ by scripts/build-ejabberd-module.
fn ejabberd_module() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = root()
                .join("target")
                .join(format!("ejabberd-module-{}", std::process::id()));
            let status = Command::new("bash")
                .arg(root().join("scripts/build-ejabberd-module"))
                .arg(&out)
                .status()
                .expect("run scripts/build-ejabberd-module");
            assert!(status.success(), "scripts/build-ejabberd-module failed");
            out
        })
        .clone()
}

/// Run an install script, one at a time in this process: tests start
/// servers in parallel, and apt-get runs one at a time (the scripts also
/// wait for another process's dpkg lock).
fn install(script: &str) {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let status = Command::new("bash")
        .arg(root().join("scripts").join(script))
        .status()
        .unwrap_or_else(|e| panic!("run scripts/{script}: {e}"));
    assert!(status.success(), "scripts/{script} failed");
}

/// Which XMPP server a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Prosody,
    Ejabberd,
}

/// Options for a server instance.
#[derive(Clone)]
pub struct ServerOpts {
    pub offline_storage: bool,
    /// Stream-management hibernation (Prosody) or resume timeout
    /// (ejabberd), seconds.
    pub smacks_hibernation_s: u32,
    /// Log warnings only (Prosody `warn`, ejabberd `warning`) instead of
    /// Prosody's `debug` and ejabberd's `info`: tests read the logs; the
    /// benchmark measures the server, not its log.
    pub quiet: bool,
    /// Grant the component XEP-0356 privileges (roster `set`, presence
    /// `managed_entity`), as component-config/ shows.
    pub privilege: bool,
    /// Archive every user's messages (XEP-0313: Prosody's `mod_mam`,
    /// ejabberd's `mod_mam` with `default: always`).
    pub mam: bool,
    /// Transparent mode (docs/transparent.md): the server module from
    /// component-config/ on, and the message permission granted besides
    /// `privilege`'s. Stream-management timeouts reach offline storage
    /// (ejabberd `resend_on_timeout: if_offline`).
    pub transparent: bool,
}

impl Default for ServerOpts {
    fn default() -> Self {
        ServerOpts {
            offline_storage: false,
            smacks_hibernation_s: 3,
            quiet: false,
            privilege: false,
            mam: false,
            transparent: false,
        }
    }
}

impl ServerOpts {
    /// Transparent mode as component-config/ shows it: the server module
    /// on, and offline storage on (the module keeps its copies there).
    pub fn transparent() -> ServerOpts {
        ServerOpts {
            offline_storage: true,
            transparent: true,
            ..Default::default()
        }
    }
}

/// XEP-0356 grants for the component, as in component-config/.
const PROSODY_PRIVILEGE_HOST: &str = r#"    modules_enabled = { "privilege" }
    privileged_entities = {
        ["@COMPONENT@"] = { roster = "set"; presence = "managed_entity"; };
    }"#;
/// Transparent mode: the module, its one setting, and the message
/// permission (component-config/prosody.cfg.lua).
const PROSODY_TRANSPARENT_HOST: &str = r#"    modules_enabled = { "privilege", "redeliver" }
    privileged_entities = {
        ["@COMPONENT@"] = { roster = "set"; presence = "managed_entity"; message = "outgoing"; };
    }
    redeliver_component = "@COMPONENT@""#;
const EJABBERD_TRANSPARENT_MODULE: &str = r#"  mod_privilege:
    roster:
      set: relay_privileged
    presence:
      managed_entity: relay_privileged
    message:
      outgoing: relay_privileged
  mod_redeliver:
    component: "@COMPONENT@""#;
const EJABBERD_PRIVILEGE_ACCESS: &str = r#"  relay_privileged:
    allow:
      server: "@COMPONENT@""#;
const EJABBERD_PRIVILEGE_MODULE: &str = r#"  mod_privilege:
    roster:
      set: relay_privileged
    presence:
      managed_entity: relay_privileged"#;

/// Accounts on every test server, all with [`PASSWORD`]. `eve` lives on
/// a second domain whose users may not use the relay.
pub const USERS: [(&str, &str); 6] = [
    ("alice", "localhost"),
    ("bob", "localhost"),
    ("carol", "localhost"),
    ("dave", "localhost"),
    ("admin", "localhost"),
    ("eve", "other.localhost"),
];

/// Printed by the ejabberd launcher once the users exist.
const EJABBERD_READY: &str = "redeliver-harness: ejabberd ready";

/// What the servers log when a port of theirs is taken: ejabberd (which
/// then exits) and Prosody (which goes on without it).
const PORT_TAKEN: [&str; 2] = ["eaddrinuse", "Failed to open server port"];

/// A throwaway XMPP server on 127.0.0.1 with its own config and data:
/// Prosody (`prosody -F`) or ejabberd (a non-distributed Erlang node: no
/// epmd, no distribution listener).
pub struct Server {
    pub kind: Kind,
    pub dir: tempfile::TempDir,
    pub c2s_port: u16,
    pub component_port: u16,
    child: Option<Child>,
    /// ejabberd's OTP library directory.
    erl_libs: Option<PathBuf>,
    /// The config, but for the ports.
    config: String,
}

impl Server {
    pub fn start(kind: Kind, opts: ServerOpts) -> Server {
        let erl_libs = match kind {
            Kind::Prosody => {
                ensure_prosody();
                None
            }
            Kind::Ejabberd => Some(ensure_ejabberd()),
        };
        let dir = tempfile::tempdir().unwrap();
        let template = match kind {
            Kind::Prosody => "prosody.cfg.lua.in",
            Kind::Ejabberd => "ejabberd.yml.in",
        };
        let template = std::fs::read_to_string(root().join("scripts").join(template)).unwrap();
        let offline = match (kind, opts.offline_storage) {
            (Kind::Prosody, true) => "",
            (Kind::Prosody, false) => "\"offline\"",
            (Kind::Ejabberd, true) => "mod_offline: {}",
            (Kind::Ejabberd, false) => "",
        };
        let cfg = template
            .replace("@DIR@", dir.path().to_str().unwrap())
            .replace("@MODULES_DISABLED@", offline)
            .replace("@OFFLINE_MODULE@", offline)
            .replace(
                "@SMACKS_HIBERNATION@",
                &opts.smacks_hibernation_s.to_string(),
            )
            .replace(
                "@EXTRA_MODULES@",
                match (kind, opts.mam) {
                    (Kind::Prosody, true) => "\"mam\"",
                    (Kind::Ejabberd, true) => "  mod_mam:\n    default: always",
                    (_, false) => "",
                },
            )
            .replace(
                "@PRIVILEGE_HOST@",
                if opts.transparent {
                    PROSODY_TRANSPARENT_HOST
                } else if opts.privilege {
                    PROSODY_PRIVILEGE_HOST
                } else {
                    ""
                },
            )
            .replace(
                "@PLUGIN_PATHS@",
                &if opts.transparent {
                    format!(
                        "plugin_paths = {{ \"{}\" }}",
                        root().join("component-config/prosody").display()
                    )
                } else {
                    String::new()
                },
            )
            .replace(
                "@STREAM_MGMT_EXTRA@",
                if opts.transparent {
                    "    resend_on_timeout: if_offline"
                } else {
                    ""
                },
            )
            .replace(
                "@PRIVILEGE_COMPONENT@",
                if opts.privilege || opts.transparent {
                    "    modules_enabled = { \"privilege\" }"
                } else {
                    ""
                },
            )
            .replace(
                "@PRIVILEGE_ACCESS@",
                if opts.privilege || opts.transparent {
                    EJABBERD_PRIVILEGE_ACCESS
                } else {
                    ""
                },
            )
            .replace(
                "@PRIVILEGE_MODULE@",
                if opts.transparent {
                    EJABBERD_TRANSPARENT_MODULE
                } else if opts.privilege {
                    EJABBERD_PRIVILEGE_MODULE
                } else {
                    ""
                },
            )
            .replace("@COMPONENT@", COMPONENT)
            .replace("@SECRET@", SECRET)
            .replace(
                "@LOGLEVEL@",
                match (kind, opts.quiet) {
                    (Kind::Prosody, false) => "debug",
                    (Kind::Ejabberd, false) => "info",
                    (Kind::Prosody, true) => "warn",
                    (Kind::Ejabberd, true) => "warning",
                },
            );
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::create_dir_all(dir.path().join("certs")).unwrap();
        let mut server = Server {
            kind,
            dir,
            c2s_port: 0,
            component_port: 0,
            child: None,
            erl_libs,
            config: cfg,
        };
        let mut registered = false;
        ports::start_on(2, |reserved| {
            let [c2s, component] = reserved.ports()[..] else {
                unreachable!("two ports")
            };
            (server.c2s_port, server.component_port) = (c2s, component);
            let cfg = server
                .config
                .replace("@C2S_PORT@", &c2s.to_string())
                .replace("@COMPONENT_PORT@", &component.to_string());
            std::fs::write(server.config_path(), cfg).unwrap();
            if kind == Kind::Prosody && !registered {
                for (user, host) in USERS {
                    server.register(user, host);
                }
                registered = true;
            }
            reserved.release();
            server.launch()
        });
        server
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join(match self.kind {
            Kind::Prosody => "prosody.cfg.lua",
            Kind::Ejabberd => "ejabberd.yml",
        })
    }

    fn register(&self, user: &str, host: &str) {
        let st = Command::new("prosodyctl")
            .arg("--config")
            .arg(self.config_path())
            .args(["register", user, host, PASSWORD])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "prosodyctl register {user}@{host}");
    }

    /// Start the process and wait until it listens on both ports (and
    /// ejabberd has created the users); `Err` when another process took
    /// one of them first.
    fn launch(&mut self) -> Result<(), String> {
        let prosody_log = self.dir.path().join("prosody.log");
        let earlier = std::fs::metadata(&prosody_log).map_or(0, |m| m.len() as usize);
        let out = self.dir.path().join("stdout.log");
        let log = std::fs::File::create(&out).unwrap();
        let mut cmd = match self.kind {
            Kind::Prosody => {
                let mut c = Command::new("prosody");
                c.arg("--config").arg(self.config_path()).arg("-F");
                c
            }
            Kind::Ejabberd => {
                let users: Vec<String> = USERS
                    .iter()
                    .map(|(u, h)| format!("{{<<\"{u}\">>, <<\"{h}\">>}}"))
                    .collect();
                // Start the application, create the users (again after a
                // restart: "exists" is fine), then say so.
                let eval = format!(
                    "{{ok, _}} = application:ensure_all_started(ejabberd), \
                     [ejabberd_auth:try_register(U, H, <<\"{PASSWORD}\">>) || {{U, H}} <- [{}]], \
                     io:format(\"~s~n\", [\"{EJABBERD_READY}\"]).",
                    users.join(", ")
                );
                let dir = self.dir.path();
                let mut c = Command::new("erl");
                if self.config.contains("mod_redeliver:") {
                    c.arg("-pa").arg(ejabberd_module());
                }
                c.env("ERL_LIBS", self.erl_libs.as_ref().unwrap())
                    .env("EJABBERD_CONFIG_PATH", self.config_path())
                    .env("EJABBERD_LOG_PATH", dir.join("ejabberd.log"))
                    .env("HOME", dir)
                    .arg("-noinput")
                    .args(["-mnesia", "dir"])
                    .arg(format!("\"{}\"", dir.join("spool").display()))
                    .args(["-eval", &eval]);
                c
            }
        };
        let child = cmd
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {:?}: {e}", self.kind));
        let pid = child.id();
        self.child = Some(child);
        let ports = [self.c2s_port, self.component_port];
        // Generous for ejabberd: a loaded machine starts the BEAM slowly.
        let end = Instant::now()
            + Duration::from_secs(match self.kind {
                Kind::Prosody => 20,
                Kind::Ejabberd => 90,
            });
        loop {
            // Before the logs: what it logged before it exited is in them.
            let exited = self.child.as_mut().unwrap().try_wait().unwrap().is_some();
            if exited {
                self.child = None; // reaped: its PID is no longer its own
            }
            let stdout = std::fs::read_to_string(&out).unwrap_or_default();
            let log = std::fs::read(&prosody_log).unwrap_or_default();
            let log = stdout + &String::from_utf8_lossy(log.get(earlier..).unwrap_or_default());
            let listening = ports.map(|p| ports::listener_of(p, pid));
            if listening.contains(&Some(false)) || PORT_TAKEN.iter().any(|t| log.contains(t)) {
                self.stop();
                return Err(format!(
                    "{:?} on {ports:?}: listeners {listening:?}, see {}",
                    self.kind,
                    self.dir.path().display()
                ));
            }
            if listening == [Some(true); 2]
                && (self.kind == Kind::Prosody || log.contains(EJABBERD_READY))
            {
                return Ok(());
            }
            assert!(
                !exited && Instant::now() < end,
                "{:?} did not start; see {}",
                self.kind,
                self.dir.path().display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's process, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stop (SIGTERM, by PID) and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe_kill(c.id(), "TERM");
            wait_or_kill(&mut c, Duration::from_secs(10));
        }
    }

    /// Stop and start again on the same ports (which another process
    /// may take meanwhile: then this panics).
    pub fn restart(&mut self) {
        self.stop();
        if let Err(why) = self.launch() {
            panic!("restart on the same ports: {why}");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            // Keep the evidence of a failed test.
            let p = self.dir.path().to_owned();
            eprintln!("{:?} logs kept at {}", self.kind, p.display());
            std::mem::forget(std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().unwrap(),
            ));
        }
    }
}

fn unsafe_kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Settings a test may change in redeliver's config.
#[derive(Clone)]
pub struct RelayOpts {
    pub durability: &'static str,
    pub max_pending: u64,
    pub max_stanza_bytes: usize,
    pub receipt_timeout_ms: u64,
    pub replay_grace_ms: u64,
    pub session_timeout_s: u64,
    pub message_ttl_s: u64,
    pub max_store_bytes: u64,
    /// 0: no rate limit (the default here; the shipped default is 20).
    pub sender_rate_per_s: u32,
    pub sender_burst: u32,
    /// Where the store goes (default: in the relay's throwaway dir).
    pub store_path: Option<PathBuf>,
    /// Messages in flight per recipient.
    pub window: usize,
    /// How long a new correspondent's messages wait for the relay
    /// contact's answer (0 here by default: most scenarios are not about
    /// it, and the test clients approve at once anyway).
    pub contact_wait_ms: u64,
    /// sled's page cache, bytes.
    pub cache_bytes: u64,
    /// `store.compression` (sled only).
    pub compression: bool,
    /// Keep the store in this PostgreSQL database (shared by every relay
    /// given the same URL).
    pub postgres_url: Option<String>,
    /// Wait for the link to come up at start (not for a standby).
    pub wait_ready: bool,
    /// The database password, when not the test cluster's.
    pub db_password: Option<String>,
    /// `store.instances = "all-active"` (with `postgres_url`).
    pub all_active: bool,
    /// Serve Prometheus metrics on a loopback port of its own
    /// ([`Relay::metrics_port`]).
    pub metrics: bool,
    /// Start the process with this file descriptor limit (soft and hard
    /// `RLIMIT_NOFILE`), as a tight `LimitNOFILE=` would.
    pub nofile: Option<u64>,
}

impl Default for RelayOpts {
    fn default() -> Self {
        RelayOpts {
            durability: "fsync",
            max_pending: 10_000,
            max_stanza_bytes: 8192,
            receipt_timeout_ms: 2_000,
            replay_grace_ms: 300,
            session_timeout_s: 600,
            message_ttl_s: 7 * 24 * 3600,
            max_store_bytes: 1 << 30,
            sender_rate_per_s: 0,
            sender_burst: 200,
            store_path: None,
            window: 64,
            contact_wait_ms: 0,
            cache_bytes: 32 << 20,
            compression: false,
            postgres_url: None,
            all_active: false,
            wait_ready: true,
            db_password: None,
            metrics: false,
            nofile: None,
        }
    }
}

/// The binary under test: cargo names it for integration tests; the demo
/// example runs after `cargo build` and finds it in target/debug.
/// redeliver's log filter: debug (tests read the log) unless
/// `REDELIVER_LOG` says otherwise (the benchmark measures without it).
fn relay_log_filter() -> String {
    std::env::var("REDELIVER_LOG").unwrap_or_else(|_| "redeliver=debug,info".into())
}

/// `REDELIVER_BIN` overrides both (the benchmark runs the release build).
fn redeliver_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("REDELIVER_BIN") {
        return PathBuf::from(p);
    }
    match option_env!("CARGO_BIN_EXE_redeliver") {
        Some(p) => PathBuf::from(p),
        None => root().join("target/debug/redeliver"),
    }
}

/// The exit status of `child` if it ends within `wait`; killed otherwise.
fn wait_or_kill(child: &mut Child, wait: Duration) -> Option<i32> {
    let end = Instant::now() + wait;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return st.code();
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// redeliver against a [`fake::FakeServer`], started off the async
/// runtime (startup blocks until the fake has accepted the link).
pub async fn relay_on_fake(port: u16, opts: RelayOpts) -> Relay {
    tokio::task::spawn_blocking(move || Relay::start_at(port, opts))
        .await
        .unwrap()
}

/// Run the redeliver binary to completion (killed after 30 s): (exit
/// status, stdout + stderr).
pub fn redeliver(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("out");
    let file = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(redeliver_bin())
        .args(args)
        .env("REDELIVER_SECRET", SECRET)
        .envs(pg::password().map(|p| ("REDELIVER_DB_PASSWORD", p)))
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("run redeliver");
    let status = wait_or_kill(&mut child, Duration::from_secs(30));
    (status, std::fs::read_to_string(&log).unwrap_or_default())
}

/// The real redeliver binary, run with a throwaway config and store.
pub struct Relay {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    starts: usize,
    db_password: Option<String>,
    nofile: Option<u64>,
    /// Where it serves Prometheus metrics, with `RelayOpts::metrics`.
    pub metrics_port: Option<u16>,
}

pub const READY: &str = "redeliver ready: component link established";

impl Relay {
    pub fn start(server: &Server, opts: RelayOpts) -> Relay {
        Relay::start_at(server.component_port, opts)
    }

    /// Start redeliver against whatever listens on `component_port`
    /// (a [`Server`], or a [`fake::FakeServer`]).
    pub fn start_at(component_port: u16, opts: RelayOpts) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("redeliver.toml");
        let text = format!(
            r#"[component]
domain = "{COMPONENT}"
server = "127.0.0.1:{port}"
keepalive_s = 10
reconnect_max_ms = 1000
[relay]
default_domain = "localhost"
allowed_sender_domains = ["localhost"]
{store_section}[delivery]
receipt_timeout_ms = {rt}
replay_grace_ms = {grace}
window = {window}
contact_wait_ms = {contact_wait}
retry_initial_ms = 500
retry_max_ms = 2000
[limits]
max_pending_per_recipient = {maxp}
max_stanza_bytes = {maxs}
message_ttl_s = {ttl}
max_store_bytes = {maxstore}
sender_rate_per_s = {rate}
sender_burst = {burst}
[admin]
jids = ["admin@localhost"]
session_timeout_s = {sess}
"#,
            port = component_port,
            store_section = match &opts.store_path {
                None if opts.postgres_url.is_some() =>
                    pg::store_section_for(
                        opts.postgres_url.as_deref().unwrap_or_default(),
                        opts.durability,
                        opts.cache_bytes
                    ) + if opts.all_active {
                        "instances = \"all-active\"\n"
                    } else {
                        ""
                    },
                None if pg::relays_use_postgres() =>
                    pg::store_section_for(&pg::new_database(), opts.durability, opts.cache_bytes),
                path => format!(
                    "[store]\npath = \"{}\"\ndurability = \"{}\"\ncache_bytes = {}\ncompression = {}\n",
                    path.clone()
                        .unwrap_or_else(|| dir.path().join("store"))
                        .display(),
                    opts.durability,
                    opts.cache_bytes,
                    opts.compression
                ),
            },
            rt = opts.receipt_timeout_ms,
            grace = opts.replay_grace_ms,
            maxp = opts.max_pending,
            maxs = opts.max_stanza_bytes,
            sess = opts.session_timeout_s,
            ttl = opts.message_ttl_s,
            maxstore = opts.max_store_bytes,
            rate = opts.sender_rate_per_s,
            burst = opts.sender_burst,
            window = opts.window,
            contact_wait = opts.contact_wait_ms,
        );
        std::fs::write(&config, &text).unwrap();
        let log = dir.path().join("redeliver.log");
        let mut r = Relay {
            dir,
            config,
            log,
            child: None,
            starts: 0,
            db_password: opts.db_password.clone().or_else(pg::password),
            nofile: opts.nofile,
            metrics_port: None,
        };
        if opts.metrics {
            ports::start_on(1, |reserved| {
                let port = reserved.ports()[0];
                let metrics = format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
                std::fs::write(&r.config, text.clone() + &metrics).unwrap();
                r.metrics_port = Some(port);
                let earlier = r.log_text().len();
                reserved.release();
                r.spawn();
                r.wait_metrics(earlier)
            });
        } else {
            r.spawn();
        }
        if opts.wait_ready {
            r.wait_ready(r.starts_seen() + 1);
        }
        r
    }

    fn launch(&mut self) {
        self.spawn();
        self.wait_ready(self.starts_seen() + 1);
    }

    /// Wait until the process listens on its metrics port; `Err` when
    /// another process took it first. Its log starts at `earlier`.
    fn wait_metrics(&mut self, earlier: usize) -> Result<(), String> {
        let port = self.metrics_port.expect("metrics on");
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let child = self.child.as_mut().expect("started");
            // Before the log: what it logged before it exited is in it.
            let exited = child.try_wait().unwrap().is_some();
            let listening = ports::listener_of(port, child.id());
            if listening == Some(true) {
                return Ok(());
            }
            let log = self.log_text().split_off(earlier);
            if listening == Some(false) || log.contains("Address already in use") {
                self.sigkill();
                return Err(format!("metrics on {port}: {listening:?}, log:\n{log}"));
            }
            assert!(
                !exited && Instant::now() < end,
                "redeliver did not listen for metrics; log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Start the process; do not wait for its link.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(redeliver_bin());
        cmd.args(["run", "--config"])
            .arg(&self.config)
            .env("REDELIVER_SECRET", SECRET)
            .envs(
                self.db_password
                    .clone()
                    .map(|p| ("REDELIVER_DB_PASSWORD", p)),
            )
            .env("RUST_LOG", relay_log_filter())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit is async-signal-safe; the closure touches
            // nothing else of the parent.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = cmd.spawn().expect("start redeliver");
        self.child = Some(child);
        self.starts += 1;
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn starts_seen(&self) -> usize {
        // Readiness lines already in the log before this launch.
        self.log_text().matches(READY).count().min(self.starts - 1)
    }

    /// Wait until the log holds `n` readiness lines.
    pub fn wait_ready(&self, n: usize) {
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if self.log_text().matches(READY).count() >= n {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redeliver not ready; log:\n{}", self.log_text());
    }

    /// The running process, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        unsafe_kill(c.id(), "TERM");
        wait_or_kill(&mut c, Duration::from_secs(10))
    }

    pub fn restart(&mut self) {
        self.launch();
    }

    /// Wait up to `wait` for the process to exit by itself.
    pub fn wait_exit(&mut self, wait: Duration) -> Option<i32> {
        let end = Instant::now() + wait;
        while Instant::now() < end {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                self.child = None;
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Run a second redeliver process for the same domain on the same
    /// server: with this relay's config (the same store) or with a store
    /// of its own. Returns its exit status if it ends within `wait` (it
    /// is killed otherwise) and its log.
    pub fn run_second(&self, own_store: bool, wait: Duration) -> (Option<i32>, String) {
        let mut config = self.config.clone();
        if own_store {
            let text = std::fs::read_to_string(&self.config).unwrap();
            let text = if pg::relays_use_postgres() {
                let (start, end) = (
                    text.find("url = \"").unwrap() + 7,
                    text.find("\"\ndurability").unwrap(),
                );
                format!("{}{}{}", &text[..start], pg::new_database(), &text[end..])
            } else {
                let store = self.dir.path().join("store");
                let second = self.dir.path().join("store-second");
                text.replace(&store.display().to_string(), &second.display().to_string())
            };
            config = self.dir.path().join("second.toml");
            std::fs::write(&config, text).unwrap();
        }
        let log_path = self.dir.path().join("second.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = Command::new(redeliver_bin())
            .args(["run", "--config"])
            .arg(&config)
            .env("REDELIVER_SECRET", SECRET)
            .envs(pg::password().map(|p| ("REDELIVER_DB_PASSWORD", p)))
            .env("RUST_LOG", "redeliver=debug,info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start a second redeliver");
        let status = wait_or_kill(&mut child, wait);
        (
            status,
            std::fs::read_to_string(&log_path).unwrap_or_default(),
        )
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.sigkill();
        if std::thread::panicking() {
            // The end of it: a log a flood made huge would bury the rest.
            const SHOWN: usize = 1 << 20;
            let log = self.log_text();
            let from = log.len().saturating_sub(SHOWN);
            let from = (from..log.len())
                .find(|&i| log.is_char_boundary(i))
                .unwrap_or(log.len());
            if from > 0 {
                eprintln!("---- redeliver log: its first {from} bytes left out ----");
            }
            eprintln!("---- redeliver log ----\n{}", &log[from..]);
        }
    }
}

// ---------------- c2s test client ----------------

#[derive(Clone)]
pub struct ClientOpts {
    pub resource: String,
    /// Answer receipt requests.
    pub receipts: bool,
    /// Answer them only as Gajim 1.7, Conversations, Monal and Psi do:
    /// when the sender's bare JID is in the roster with subscription
    /// `from` or `both` (Gajim's `_should_answer`), never for a copy from
    /// the archive. The roster is fetched at login and kept by its pushes.
    pub receipts_to_contacts_only: bool,
    /// Advertise receipt support in disco#info (a real client that does
    /// not get to answer still advertises it).
    pub advertise_receipts: bool,
    /// Enable XEP-0198 stream management.
    pub sm: bool,
    /// Approve presence subscription requests.
    pub approve: bool,
    /// Send initial presence.
    pub presence: bool,
}

impl Default for ClientOpts {
    fn default() -> Self {
        ClientOpts {
            resource: "test".into(),
            receipts: true,
            receipts_to_contacts_only: false,
            advertise_receipts: true,
            sm: false,
            approve: true,
            presence: true,
        }
    }
}

enum Cmd {
    Send(Element),
    /// Drop the socket with a TCP reset.
    Reset,
    /// Stop reading and answering, keep TCP open.
    Freeze,
    /// Unavailable presence and stream close.
    Close,
}

/// A logged-in c2s session. Every `<message/>` it receives is queued for
/// the test; receipts and subscription approvals happen by themselves.
pub struct Client {
    pub jid: String,
    cmds: mpsc::UnboundedSender<Cmd>,
    pub inbox: mpsc::UnboundedReceiver<Element>,
    /// iq results and errors addressed to this client.
    iq_replies: mpsc::UnboundedReceiver<Element>,
    task: tokio::task::JoinHandle<()>,
}

type C2s = XmlStream<BufStream<TcpStream>, Element>;

async fn next_el(s: &mut C2s) -> Element {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
            Ok(Some(Ok(el))) => return el,
            Ok(Some(Err(ReadError::SoftTimeout))) => continue,
            other => panic!("c2s stream failed: {other:?}"),
        }
    }
}

async fn open_stream(io: BufStream<TcpStream>, host: &str) -> C2s {
    let pending = initiate_stream(
        io,
        CLIENT_NS,
        StreamHeader {
            to: Some(Cow::Borrowed(host)),
            from: None,
            id: None,
        },
        Timeouts::tight(),
    )
    .await
    .unwrap();
    pending.recv_features::<Element>().await.unwrap().1
}

/// A session logged in as `user` with initial presence, as raw bytes: to
/// write XML a real client may write but minidom would not (such as `"`
/// unescaped in a `'`-quoted value). What the server sends is not read.
pub async fn raw_session(port: u16, user: &str) -> BufStream<TcpStream> {
    let (s, _) = log_in(port, user, &ClientOpts::default()).await;
    s.into_inner()
}

/// Log in as `user` (`name` on localhost, or `name@host`): the stream,
/// and the full JID.
async fn log_in(port: u16, user: &str, opts: &ClientOpts) -> (C2s, String) {
    let (user, host) = user.split_once('@').unwrap_or((user, "localhost"));
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut s = open_stream(BufStream::new(tcp), host).await;
    let creds = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{PASSWORD}"));
    let auth = xml(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{creds}</auth>"
    ));
    s.send(&auth).await.unwrap();
    let reply = next_el(&mut s).await;
    assert_eq!(reply.name(), "success", "auth failed for {user}: {reply:?}");
    let pending = s
        .initiate_reset()
        .send_header(StreamHeader {
            to: Some(Cow::Borrowed(host)),
            from: None,
            id: None,
        })
        .await
        .unwrap();
    let mut s: C2s = pending.recv_features::<Element>().await.unwrap().1;
    let bind = xml(&format!(
        "<iq xmlns='{CLIENT_NS}' type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{}</resource></bind></iq>",
        esc(&opts.resource)
    ));
    s.send(&bind).await.unwrap();
    let reply = next_el(&mut s).await;
    assert_eq!(reply.attr("type"), Some("result"), "bind: {reply:?}");
    if opts.sm {
        s.send(&xml("<enable xmlns='urn:xmpp:sm:3' resume='true'/>"))
            .await
            .unwrap();
        let reply = next_el(&mut s).await;
        assert_eq!(reply.name(), "enabled", "sm: {reply:?}");
    }
    if opts.receipts_to_contacts_only {
        s.send(&xml(&format!(
                "<iq xmlns='{CLIENT_NS}' type='get' id='{ROSTER_GET}'><query xmlns='jabber:iq:roster'/></iq>"
            )))
            .await
            .unwrap();
    }
    if opts.presence {
        s.send(&xml(&format!("<presence xmlns='{CLIENT_NS}'/>")))
            .await
            .unwrap();
    }
    (s, format!("{user}@{host}/{}", opts.resource))
}

impl Client {
    /// Log in as `user` (`name` on localhost, or `name@host`).
    pub async fn connect(port: u16, user: &str, opts: ClientOpts) -> Client {
        let (s, jid) = log_in(port, user, &opts).await;
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        let (iq_tx, iq_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(client_loop(s, opts, cmd_rx, in_tx, iq_tx));
        Client {
            jid,
            cmds: cmd_tx,
            inbox: in_rx,
            iq_replies: iq_rx,
            task,
        }
    }

    pub fn send(&self, el: Element) {
        let _ = self.cmds.send(Cmd::Send(el));
    }

    /// Send an iq (with an `id`) and wait for its result or error.
    pub async fn iq(&mut self, el: Element) -> Element {
        self.iq_within(el, Duration::from_secs(10)).await
    }

    pub async fn iq_within(&mut self, el: Element, wait: Duration) -> Element {
        let id = el.attr("id").expect("iq needs an id").to_owned();
        self.send(el);
        let end = tokio::time::Instant::now() + wait;
        loop {
            let reply = tokio::time::timeout_at(end, self.iq_replies.recv())
                .await
                .unwrap_or_else(|_| panic!("no answer to iq {id}"))
                .expect("client stream ended");
            if reply.attr("id") == Some(id.as_str()) {
                return reply;
            }
        }
    }

    /// A chat message with a body and an id.
    pub fn message(&self, to: &str, id: &str, body: &str) {
        self.send(chat(to, id, body));
    }

    pub fn reset(&self) {
        let _ = self.cmds.send(Cmd::Reset);
    }

    pub fn freeze(&self) {
        let _ = self.cmds.send(Cmd::Freeze);
    }

    pub async fn close(self) {
        let _ = self.cmds.send(Cmd::Close);
        let end = tokio::time::Instant::now() + Duration::from_secs(5);
        while !self.task.is_finished() && tokio::time::Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Next message with a body, within `wait`.
    pub async fn next_body_message(&mut self, wait: Duration) -> Option<Element> {
        let end = tokio::time::Instant::now() + wait;
        loop {
            let el = tokio::time::timeout_at(end, self.inbox.recv())
                .await
                .ok()??;
            if el.get_child("body", CLIENT_NS).is_some() {
                return Some(el);
            }
        }
    }

    /// Ids of body messages received within `wait` (stops early at `n`).
    pub async fn body_ids(&mut self, n: usize, wait: Duration) -> Vec<String> {
        let mut ids = Vec::new();
        let end = tokio::time::Instant::now() + wait;
        while ids.len() < n {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            match self.next_body_message(left).await {
                Some(m) => ids.push(m.attr("id").unwrap_or("").to_owned()),
                None => break,
            }
        }
        ids
    }

    /// This account's archive (XEP-0313, `urn:xmpp:mam:2`): the archived
    /// messages, oldest first, and everything else received meanwhile.
    pub async fn archive(&mut self) -> (Vec<Element>, Vec<Element>) {
        const MAM: &str = "urn:xmpp:mam:2";
        let qid = format!("mam-{:016x}", rand::random::<u64>());
        let reply = self
            .iq(xml(&format!(
                "<iq xmlns='{CLIENT_NS}' type='set' id='{qid}'><query xmlns='{MAM}' queryid='{qid}'/></iq>"
            )))
            .await;
        assert_eq!(reply.attr("type"), Some("result"), "{reply:?}");
        // The results came before the answer, so they are all here.
        let (mut archived, mut other) = (Vec::new(), Vec::new());
        while let Ok(el) = self.inbox.try_recv() {
            let copy = el
                .get_child("result", MAM)
                .filter(|r| r.attr("queryid") == Some(qid.as_str()))
                .and_then(|r| r.get_child("forwarded", "urn:xmpp:forward:0"))
                .and_then(|f| f.get_child("message", CLIENT_NS));
            match copy {
                Some(m) => archived.push(m.clone()),
                None => other.push(el),
            }
        }
        (archived, other)
    }

    /// Everything received within `wait`.
    pub async fn drain(&mut self, wait: Duration) -> Vec<Element> {
        let mut out = Vec::new();
        let end = tokio::time::Instant::now() + wait;
        while let Ok(Some(el)) = tokio::time::timeout_at(end, self.inbox.recv()).await {
            out.push(el);
        }
        out
    }

    /// Ids of XEP-0184 receipts received within `wait` (stops at `n`).
    pub async fn receipt_ids(&mut self, n: usize, wait: Duration) -> Vec<String> {
        let mut ids = Vec::new();
        let end = tokio::time::Instant::now() + wait;
        while ids.len() < n {
            let Ok(Some(el)) = tokio::time::timeout_at(end, self.inbox.recv()).await else {
                break;
            };
            if let Some(r) = el.get_child("received", "urn:xmpp:receipts") {
                ids.push(r.attr("id").unwrap_or("").to_owned());
            }
        }
        ids
    }

    /// The next error message within `wait`, as (id, condition).
    pub async fn next_error(&mut self, wait: Duration) -> Option<(String, String)> {
        let end = tokio::time::Instant::now() + wait;
        loop {
            let el = tokio::time::timeout_at(end, self.inbox.recv())
                .await
                .ok()??;
            if el.attr("type") == Some("error") {
                let err = el.get_child("error", CLIENT_NS)?;
                let cond = err
                    .children()
                    .find(|c| c.ns() == "urn:ietf:params:xml:ns:xmpp-stanzas" && c.name() != "text")
                    .map(|c| c.name().to_owned())
                    .unwrap_or_default();
                return Some((el.attr("id").unwrap_or("").to_owned(), cond));
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn chat(to: &str, id: &str, body: &str) -> Element {
    xml(&format!(
        "<message xmlns='{CLIENT_NS}' to='{}' id='{}' type='chat'><body>{}</body></message>",
        esc(to),
        esc(id),
        esc(body)
    ))
}

/// Escape text for XML content and attribute values.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// Parse literal XML into an element.
pub fn xml(s: &str) -> Element {
    s.parse()
        .unwrap_or_else(|e| panic!("bad test XML {s}: {e}"))
}

async fn client_loop(
    mut s: C2s,
    opts: ClientOpts,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    inbox: mpsc::UnboundedSender<Element>,
    iq_replies: mpsc::UnboundedSender<Element>,
) {
    let mut handled: u32 = 0;
    let mut n: u64 = 0;
    // Bare JID → subscription, for `receipts_to_contacts_only`.
    let mut roster: std::collections::HashMap<String, String> = Default::default();
    loop {
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                Some(Cmd::Send(e)) => { let _ = s.send(&e).await; }
                Some(Cmd::Reset) | None => {
                    #[allow(deprecated)] // blocking on drop is harmless with linger 0
                    let _ = s.get_stream().get_ref().set_linger(Some(Duration::ZERO));
                    return; // dropping the socket with linger 0 sends RST
                }
                Some(Cmd::Freeze) => {
                    // Hold the socket open and never read it again.
                    std::future::pending::<()>().await;
                }
                Some(Cmd::Close) => {
                    let _ = s.send(&xml(&format!("<presence xmlns='{CLIENT_NS}' type='unavailable'/>"))).await;
                    let _ = s.shutdown().await;
                    return;
                }
            },
            item = s.next() => {
                let e = match item {
                    Some(Ok(e)) => e,
                    Some(Err(ReadError::SoftTimeout)) => continue,
                    _ => return,
                };
                if e.ns() == "urn:xmpp:sm:3" {
                    if e.name() == "r" {
                        let a = xml(&format!("<a xmlns='urn:xmpp:sm:3' h='{handled}'/>"));
                        let _ = s.send(&a).await;
                    }
                    continue;
                }
                handled = handled.wrapping_add(1);
                let from = e.attr("from").unwrap_or("").to_owned();
                match e.name() {
                    "message" => {
                        let contact = roster
                            .get(from.split('/').next().unwrap_or(""))
                            .is_some_and(|s| s == "from" || s == "both");
                        if opts.receipts
                            && (!opts.receipts_to_contacts_only || contact)
                            && e.attr("type") != Some("error")
                            && e.has_child("request", "urn:xmpp:receipts")
                            && let Some(id) = e.attr("id")
                        {
                            n += 1;
                            let r = xml(&format!(
                                "<message xmlns='{CLIENT_NS}' to='{}' id='rcpt-{n}'><received xmlns='urn:xmpp:receipts' id='{}'/></message>",
                                esc(&from),
                                esc(id)
                            ));
                            let _ = s.send(&r).await;
                        }
                        let _ = inbox.send(e);
                    }
                    "presence" if opts.approve && e.attr("type") == Some("subscribe") => {
                        let p = xml(&format!(
                            "<presence xmlns='{CLIENT_NS}' to='{}' type='subscribed'/>",
                            esc(&from)
                        ));
                        let _ = s.send(&p).await;
                    }
                    "iq" if e.has_child("query", "jabber:iq:roster") => {
                        // The roster (our request) or a push.
                        let q = e.get_child("query", "jabber:iq:roster").expect("checked");
                        for item in q.children() {
                            if let Some(jid) = item.attr("jid") {
                                let sub = item.attr("subscription").unwrap_or("none");
                                roster.insert(jid.to_owned(), sub.to_owned());
                            }
                        }
                        if e.attr("type") == Some("set") {
                            let id = esc(e.attr("id").unwrap_or(""));
                            let _ = s.send(&xml(&format!("<iq xmlns='{CLIENT_NS}' type='result' id='{id}'/>"))).await;
                        }
                    }
                    "iq" if e.attr("id") == Some(ROSTER_GET) => {}
                    "iq" => {
                        let t = e.attr("type").unwrap_or("");
                        if t == "result" || t == "error" {
                            let _ = iq_replies.send(e);
                        } else if t == "get" || t == "set" {
                            let (id, to) = (esc(e.attr("id").unwrap_or("")), esc(&from));
                            let reply = if e.has_child("query", "http://jabber.org/protocol/disco#info") {
                                let receipts = if opts.advertise_receipts { "<feature var='urn:xmpp:receipts'/>" } else { "" };
                                format!("<iq xmlns='{CLIENT_NS}' type='result' id='{id}' to='{to}'><query xmlns='http://jabber.org/protocol/disco#info'><identity category='client' type='pc'/><feature var='http://jabber.org/protocol/disco#info'/>{receipts}</query></iq>")
                            } else if e.has_child("ping", "urn:xmpp:ping") {
                                format!("<iq xmlns='{CLIENT_NS}' type='result' id='{id}' to='{to}'/>")
                            } else {
                                format!("<iq xmlns='{CLIENT_NS}' type='error' id='{id}' to='{to}'><error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>")
                            };
                            let reply = xml(&reply);
                            let _ = s.send(&reply).await;
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

pub const SECS: fn(u64) -> Duration = Duration::from_secs;

/// The wall clock, ms since the epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Every XEP-0203 delay on `m`: (from, stamp in ms).
pub fn delays(m: &Element) -> Vec<(String, i64)> {
    m.children()
        .filter(|c| c.is("delay", "urn:xmpp:delay"))
        .map(|d| {
            let stamp = chrono::DateTime::parse_from_rfc3339(d.attr("stamp").unwrap_or(""))
                .unwrap_or_else(|e| panic!("bad delay stamp in {m:?}: {e}"));
            (
                d.attr("from").unwrap_or("").to_owned(),
                stamp.timestamp_millis(),
            )
        })
        .collect()
}

/// The id of a client's roster request at login.
const ROSTER_GET: &str = "roster-get";

/// Turn each scenario `async fn name(kind: Kind)` into two tests,
/// `prosody::name` and `ejabberd::name`.
#[allow(unused_macros)]
macro_rules! on_both_servers {
    ($($name:ident),+ $(,)?) => {
        mod prosody {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Kind::Prosody).await
                }
            )+
        }
        mod ejabberd {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Kind::Ejabberd).await
                }
            )+
        }
    };
}

/// `prefix1` .. `prefixN`.
pub fn ids(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}{i}")).collect()
}

/// `client` receives exactly `sent`, in order, and nothing more within
/// three seconds.
pub async fn expect_exactly(client: &mut Client, sent: &[String]) {
    assert_eq!(client.body_ids(sent.len(), SECS(15)).await, sent);
    let more = client.body_ids(1, SECS(3)).await;
    assert!(more.is_empty(), "nothing twice, nothing else: {more:?}");
}

/// Wait until redeliver's log contains `needle`.
pub async fn wait_log(relay: &Relay, needle: &str) {
    if !log_comes_to(relay, |log| log.contains(needle)).await {
        panic!("log never said {needle:?}");
    }
}

/// Whether redeliver's log comes to satisfy `ok` within 10 s.
async fn log_comes_to(relay: &Relay, ok: impl Fn(&str) -> bool) -> bool {
    for _ in 0..200 {
        if ok(&relay.log_text()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The relay learns that `user`'s client at `resource` answers receipts:
/// it answers one message from alice. From then on that client's
/// messages wait for its receipts (the frozen-client guarantee); a client
/// never seen answering gets each message once instead.
pub async fn answers_once(server: &Server, relay: &Relay, user: &str, resource: &str) {
    let mut c = Client::connect(
        server.c2s_port,
        user,
        ClientOpts {
            resource: resource.into(),
            ..Default::default()
        },
    )
    .await;
    let id = format!("hello-{user}-{resource}");
    send_all(
        server,
        &format!("{user}@relay.localhost"),
        std::slice::from_ref(&id),
    )
    .await;
    assert_eq!(c.body_ids(1, SECS(10)).await, [id]);
    let needle = format!("resource=\"{resource}\"");
    wait_log_line(relay, &["this client answers receipts", &needle]).await;
    c.close().await;
}

/// Wait until a line of redeliver's log contains every one of `needles`.
pub async fn wait_log_line(relay: &Relay, needles: &[&str]) {
    let said = |log: &str| log.lines().any(|l| needles.iter().all(|n| l.contains(n)));
    if !log_comes_to(relay, said).await {
        panic!("no log line said all of {needles:?}");
    }
}

/// Wait until the messages with these ids are on the relay's disk (fsync
/// mode): an "accepted" line for each, and after it a "messages on disk"
/// line that covers its seq. Before that, a SIGKILL may lose a message its
/// sender was never told about (the link's gap, not the store's).
pub async fn wait_stored(relay: &Relay, ids: &[&str]) {
    fn field(line: &str, name: &str) -> Option<u64> {
        let at = line.find(&format!(" {name}="))? + name.len() + 2;
        let digits: String = line[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    }
    let stored = |log: &str, id: &str| {
        let needle = format!(" id={id} ");
        let lines: Vec<&str> = log.lines().collect();
        let Some((at, seq)) = lines.iter().enumerate().rev().find_map(|(i, l)| {
            (l.contains("accepted") && l.contains(&needle))
                .then(|| field(l, "seq").map(|s| (i, s)))
                .flatten()
        }) else {
            return false;
        };
        lines[at..].iter().any(|l| {
            l.contains("messages on disk") && field(l, "upto_seq").is_some_and(|u| u >= seq)
        })
    };
    if !log_comes_to(relay, |log| ids.iter().all(|id| stored(log, id))).await {
        panic!("not all of {ids:?} on disk:\n{}", relay.log_text());
    }
}

/// Alice sends `sent` (ids) to `to`, then logs out.
pub async fn send_all(server: &Server, to: &str, sent: &[String]) {
    let alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    for id in sent {
        alice.message(to, id, &format!("body of {id}"));
    }
    // Let the relay take them before alice goes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    alice.close().await;
}

pub fn store_path(relay: &Relay) -> &Path {
    relay.dir.path()
}
