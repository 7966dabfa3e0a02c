//! The TOML configuration: schema, defaults and validation.
//!
//! Unknown keys are rejected everywhere so that a typo never silently falls
//! back to a default. The shared secret is never part of the TOML: it comes
//! from `REDELIVER_SECRET` or from the file named by `component.secret_file`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use xmpp_parsers::jid::{BareJid, DomainPart};

/// Environment variable that carries the component's shared secret.
pub const SECRET_ENV: &str = "REDELIVER_SECRET";
/// Environment variable that carries the PostgreSQL password.
pub const DB_PASSWORD_ENV: &str = "REDELIVER_DB_PASSWORD";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{0}")]
    Invalid(String),
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub component: ComponentConfig,
    pub relay: RelayConfig,
    pub store: StoreConfig,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// How to reach the server and under which name.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ComponentConfig {
    /// The component's own domain, e.g. `relay.example.com`.
    pub domain: String,
    /// The server's component listener, a literal `ip:port`.
    pub server: String,
    /// A file holding the shared secret (first line, trimmed). Used when
    /// `REDELIVER_SECRET` is not set.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Seconds of silence on the link before a keepalive ping is sent.
    #[serde(default = "default_keepalive_s")]
    pub keepalive_s: u64,
    /// Cap of the jittered reconnect backoff.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
}

/// Who may relay and where relayed messages go.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Domain of `bob` in `bob@relay.example.com`.
    pub default_domain: String,
    /// Domains whose users may send through the relay (and be reached
    /// through it with an XEP-0106 escaped localpart).
    pub allowed_sender_domains: Vec<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Every accepted message is fsynced before it is relayed; concurrent
    /// messages share one fsync (group commit).
    Fsync,
    /// Messages are relayed at once and fsynced every `flush_interval_ms`.
    Batched,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Sled,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sled => "sled",
            Backend::Postgres => "postgres",
        }
    }
}

impl Durability {
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Fsync => "fsync",
            Durability::Batched => "batched",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Where messages are kept: sled (embedded, one instance) or
    /// PostgreSQL (shared by several instances).
    #[serde(default)]
    pub backend: Backend,
    /// Directory of the sled database (sled only).
    #[serde(default)]
    pub path: PathBuf,
    /// `postgresql://user@host:port/dbname` (PostgreSQL only). No
    /// password here: it comes from `REDELIVER_DB_PASSWORD` or
    /// `password_file`.
    #[serde(default)]
    pub url: Option<String>,
    /// A file holding the PostgreSQL password (first line, trimmed).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default = "default_durability")]
    pub durability: Durability,
    #[serde(default = "default_flush_interval_ms")]
    pub flush_interval_ms: u64,
    /// sled's page cache, in bytes.
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: u64,
    /// zstd compression of sled's pages (sled only): about a third of
    /// the disk, at about twice the CPU per message. Chosen when the
    /// store is created; sled refuses to open it with the other setting.
    #[serde(default)]
    pub compression: bool,
    /// How instances sharing a PostgreSQL store run: one connected at a
    /// time (the others stand by), or all connected at once (ejabberd).
    #[serde(default)]
    pub instances: Instances,
}

/// How the instances that share a store run.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Instances {
    /// One instance leads and is connected; the others wait, unconnected,
    /// to take over (any server).
    #[default]
    OneActive,
    /// Every instance is connected, the server spreading stanzas over
    /// them (ejabberd); the leader delivers, the others hand what they
    /// receive to it through the database.
    AllActive,
}

impl Instances {
    pub fn as_str(self) -> &'static str {
        match self {
            Instances::OneActive => "one-active",
            Instances::AllActive => "all-active",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// A sent message unconfirmed after this long marks the recipient offline.
    #[serde(default = "default_receipt_timeout_ms")]
    pub receipt_timeout_ms: u64,
    /// Wait after a recipient comes online before replaying, so that the
    /// server's own offline copies and their receipts arrive first.
    #[serde(default = "default_replay_grace_ms")]
    pub replay_grace_ms: u64,
    /// How long the first messages from a sender wait for the recipient
    /// to answer that sender's relay contact request (then they go
    /// anyway); 0 sends at once.
    #[serde(default = "default_contact_wait_ms")]
    pub contact_wait_ms: u64,
    /// A message sent to clients that have never answered a receipt
    /// counts delivered when no error came back within this long (at
    /// most `receipt_timeout_ms`).
    #[serde(default = "default_unanswered_wait_ms")]
    pub unanswered_wait_ms: u64,
    /// Such a message is kept this long after (at most the time to live),
    /// so that a late bounce (a stream-management session timing out)
    /// puts it back in its queue.
    #[serde(default = "default_late_bounce_window_s")]
    pub late_bounce_window_s: u64,
    /// Unconfirmed messages in flight per recipient.
    #[serde(default = "default_window")]
    pub window: usize,
    /// First retry delay while a recipient's presence is unknown.
    #[serde(default = "default_retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// Cap of that retry delay.
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default = "default_max_pending")]
    pub max_pending_per_recipient: u64,
    #[serde(default = "default_max_bytes")]
    pub max_bytes_per_recipient: u64,
    #[serde(default = "default_max_stanza_bytes")]
    pub max_stanza_bytes: usize,
    /// Messages unconfirmed after this long are removed; also how long
    /// ids are remembered for duplicate detection.
    #[serde(default = "default_ttl")]
    pub message_ttl_s: u64,
    /// Tell the sender (an error with `<recipient-unavailable/>`) when a
    /// message expires undelivered.
    #[serde(default = "default_true")]
    pub expiry_notice: bool,
    /// Bytes of pending stanzas over all queues; new messages beyond it
    /// are refused with `<resource-constraint/>`.
    #[serde(default = "default_max_store_bytes")]
    pub max_store_bytes: u64,
    /// Messages per second a sender (bare JID) may submit on average;
    /// 0 turns the limit off.
    #[serde(default = "default_sender_rate")]
    pub sender_rate_per_s: u32,
    /// Messages a sender may submit at once before the rate applies.
    #[serde(default = "default_sender_burst")]
    pub sender_burst: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Bare JIDs that may run the ad-hoc commands.
    #[serde(default)]
    pub jids: Vec<String>,
    /// An unfinished command session is dropped after this long.
    #[serde(default = "default_session_timeout_s")]
    pub session_timeout_s: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            jids: vec![],
            session_timeout_s: default_session_timeout_s(),
        }
    }
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A literal `ip:port` to serve metrics on over HTTP; off when unset.
    #[serde(default)]
    pub listen: Option<String>,
}

fn default_session_timeout_s() -> u64 {
    600
}

fn default_keepalive_s() -> u64 {
    30
}
fn default_reconnect_max_ms() -> u64 {
    30_000
}
fn default_durability() -> Durability {
    Durability::Fsync
}
fn default_flush_interval_ms() -> u64 {
    5
}
fn default_cache_bytes() -> u64 {
    32 * 1024 * 1024
}
fn default_contact_wait_ms() -> u64 {
    10_000
}
fn default_unanswered_wait_ms() -> u64 {
    5_000
}
fn default_late_bounce_window_s() -> u64 {
    3_600
}

fn default_receipt_timeout_ms() -> u64 {
    30_000
}
fn default_replay_grace_ms() -> u64 {
    2_000
}
fn default_window() -> usize {
    64
}
fn default_retry_initial_ms() -> u64 {
    5_000
}
fn default_retry_max_ms() -> u64 {
    600_000
}
fn default_max_pending() -> u64 {
    10_000
}
fn default_max_bytes() -> u64 {
    10 * 1024 * 1024
}
fn default_max_stanza_bytes() -> usize {
    256 * 1024
}
fn default_ttl() -> u64 {
    7 * 24 * 3600
}
fn default_true() -> bool {
    true
}
fn default_max_store_bytes() -> u64 {
    1024 * 1024 * 1024
}
fn default_sender_rate() -> u32 {
    20
}
fn default_sender_burst() -> u32 {
    200
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            receipt_timeout_ms: default_receipt_timeout_ms(),
            replay_grace_ms: default_replay_grace_ms(),
            contact_wait_ms: default_contact_wait_ms(),
            unanswered_wait_ms: default_unanswered_wait_ms(),
            late_bounce_window_s: default_late_bounce_window_s(),
            window: default_window(),
            retry_initial_ms: default_retry_initial_ms(),
            retry_max_ms: default_retry_max_ms(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_pending_per_recipient: default_max_pending(),
            max_bytes_per_recipient: default_max_bytes(),
            max_stanza_bytes: default_max_stanza_bytes(),
            message_ttl_s: default_ttl(),
            expiry_notice: true,
            max_store_bytes: default_max_store_bytes(),
            sender_rate_per_s: default_sender_rate(),
            sender_burst: default_sender_burst(),
        }
    }
}

/// One setting that differs between two configurations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// `section.key`.
    pub key: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

impl Change {
    /// The link, the store and the metrics listener are set up once at
    /// start: their settings
    /// only change with a restart.
    pub fn needs_restart(&self) -> bool {
        ["component.", "store.", "metrics."]
            .iter()
            .any(|p| self.key.starts_with(p))
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(unset)".into());
        write!(
            f,
            "{}: {} -> {}",
            self.key,
            show(&self.old),
            show(&self.new)
        )
    }
}

/// Every leaf of a TOML table as `a.b` = value.
fn flatten(prefix: &str, v: &toml::Value, out: &mut std::collections::BTreeMap<String, String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_owned(), other.to_string());
        }
    }
}

/// Prosody drops a component link on a stanza over 512 KiB (524,288
/// bytes). `max_stanza_bytes` counts a message as it will be sent to the
/// bare JID, with what sending adds (an origin-id copying the id, the
/// receipt request, a stanza-id, a delay: under 1 KB plus the escaped
/// id), and every other stanza the relay writes as written. The 12 KiB
/// this ceiling keeps below the server's limit take the device's resource
/// (up to about 6 KB written) added when a message goes to one device by
/// its full JID.
const MAX_STANZA_CEILING: usize = 500 * 1024;
/// The longest wait for a relay contact's answer: 10 minutes.
const MAX_CONTACT_WAIT_MS: u64 = 10 * 60 * 1000;
/// The longest duration any setting may name: 365 days.
const MAX_DURATION_MS: u64 = 365 * 24 * 3600 * 1000;

impl Config {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The settings that differ from `new`, in key order.
    pub fn changes(&self, new: &Config) -> Vec<Change> {
        let leaves = |c: &Config| {
            let mut out = std::collections::BTreeMap::new();
            if let Ok(v) = toml::Value::try_from(c) {
                flatten("", &v, &mut out);
            }
            out
        };
        let (a, b) = (leaves(self), leaves(new));
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        keys.into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| Change {
                key: k.clone(),
                old: a.get(k).cloned(),
                new: b.get(k).cloned(),
            })
            .collect()
    }

    /// Checks that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if DomainPart::new(&self.component.domain).is_err() || self.component.domain.is_empty() {
            return bad(format!(
                "component.domain {:?} is not a valid domain",
                self.component.domain
            ));
        }
        if self.component.server.parse::<SocketAddr>().is_err() {
            return bad(format!(
                "component.server {:?} must be a literal ip:port, e.g. \"127.0.0.1:5347\"",
                self.component.server
            ));
        }
        if let Some(listen) = &self.metrics.listen
            && listen.parse::<SocketAddr>().is_err()
        {
            return bad(format!(
                "metrics.listen {listen:?} must be a literal ip:port, e.g. \"127.0.0.1:9464\""
            ));
        }
        if DomainPart::new(&self.relay.default_domain).is_err() {
            return bad(format!(
                "relay.default_domain {:?} is not a valid domain",
                self.relay.default_domain
            ));
        }
        if self.relay.default_domain == self.component.domain {
            return bad("relay.default_domain must differ from component.domain".into());
        }
        if self.relay.allowed_sender_domains.is_empty() {
            return bad("relay.allowed_sender_domains must name at least one domain".into());
        }
        if !self
            .relay
            .allowed_sender_domains
            .contains(&self.relay.default_domain)
        {
            // Receipts come from recipients on the default domain and are
            // relayed like messages: refused senders never confirm.
            return bad(format!(
                "relay.allowed_sender_domains must contain relay.default_domain {:?}: \
                 recipients there send the receipts that confirm messages",
                self.relay.default_domain
            ));
        }
        for d in &self.relay.allowed_sender_domains {
            if DomainPart::new(d).is_err() {
                return bad(format!(
                    "relay.allowed_sender_domains: {d:?} is not a valid domain"
                ));
            }
            if d == &self.component.domain {
                return bad(
                    "relay.allowed_sender_domains must not contain component.domain".into(),
                );
            }
        }
        match self.store.backend {
            Backend::Sled if self.store.path.as_os_str().is_empty() => {
                return bad("store.path is required with the sled backend".into());
            }
            Backend::Sled if self.store.url.is_some() || self.store.password_file.is_some() => {
                return bad(
                    "store.url and store.password_file are for backend = \"postgres\"".into(),
                );
            }
            Backend::Postgres if self.store.compression => {
                return bad("store.compression is for the sled backend".into());
            }
            Backend::Postgres => match &self.store.url {
                None => return bad("store.url is required with the postgres backend".into()),
                Some(url) => {
                    let parsed: tokio_postgres::Config = url
                        .parse()
                        .map_err(|e| ConfigError::Invalid(format!("store.url: {e}")))?;
                    if parsed.get_password().is_some() {
                        return bad(format!(
                            "store.url must not hold a password: set {DB_PASSWORD_ENV} or \
                             store.password_file"
                        ));
                    }
                }
            },
            Backend::Sled => {}
        }
        if self.store.instances == Instances::AllActive && self.store.backend != Backend::Postgres {
            return bad(
                "store.instances = \"all-active\" needs backend = \"postgres\": instances \
                 connected at once share their store"
                    .into(),
            );
        }
        if self.store.durability == Durability::Batched && self.store.flush_interval_ms == 0 {
            return bad("store.flush_interval_ms must be at least 1 in batched mode".into());
        }
        let d = &self.delivery;
        if d.window == 0 {
            return bad("delivery.window must be at least 1".into());
        }
        if d.receipt_timeout_ms == 0 {
            return bad("delivery.receipt_timeout_ms must be at least 1".into());
        }
        if d.unanswered_wait_ms == 0 {
            return bad("delivery.unanswered_wait_ms must be at least 1".into());
        }
        if d.retry_initial_ms == 0 || d.retry_max_ms < d.retry_initial_ms {
            return bad("delivery.retry_initial_ms must be >= 1 and <= retry_max_ms".into());
        }
        let l = &self.limits;
        if l.max_stanza_bytes == 0 || l.max_stanza_bytes > MAX_STANZA_CEILING {
            return bad(format!(
                "limits.max_stanza_bytes must be between 1 and {MAX_STANZA_CEILING} \
                 (servers drop a component link on a stanza over 512 KiB)"
            ));
        }
        if l.message_ttl_s == 0 || l.max_store_bytes == 0 || l.sender_burst == 0 {
            return bad(
                "limits.message_ttl_s, max_store_bytes and sender_burst must be at least 1".into(),
            );
        }
        if l.max_pending_per_recipient == 0 || l.max_bytes_per_recipient == 0 {
            return bad(
                "limits.max_pending_per_recipient and max_bytes_per_recipient must be at least 1"
                    .into(),
            );
        }
        if l.message_ttl_s == 0 {
            return bad("limits.message_ttl_s must be at least 1".into());
        }
        if self.admin.session_timeout_s == 0 {
            return bad("admin.session_timeout_s must be at least 1".into());
        }
        for j in &self.admin.jids {
            if j.parse::<BareJid>().is_err() {
                return bad(format!("admin.jids: {j:?} is not a bare JID"));
            }
        }
        if self.component.keepalive_s == 0 {
            return bad("component.keepalive_s must be at least 1".into());
        }
        if self.delivery.contact_wait_ms > MAX_CONTACT_WAIT_MS {
            return bad(format!(
                "delivery.contact_wait_ms is {} ms; it may be at most 10 minutes ({MAX_CONTACT_WAIT_MS} ms): \
                 a recipient's messages wait that long for each new correspondent's answer",
                self.delivery.contact_wait_ms
            ));
        }
        for (key, ms) in self.durations_ms() {
            if ms > MAX_DURATION_MS {
                return bad(format!(
                    "{key} is {ms} ms; durations may be at most 365 days ({MAX_DURATION_MS} ms)"
                ));
            }
        }
        Ok(())
    }

    /// Every duration setting in milliseconds, by key: the timers they
    /// arm cannot reach past about two years (tokio's `DelayQueue`
    /// panics there), so each is bounded at validation.
    fn durations_ms(&self) -> [(&'static str, u64); 12] {
        let s = |v: u64| v.saturating_mul(1000);
        [
            ("component.keepalive_s", s(self.component.keepalive_s)),
            (
                "component.reconnect_max_ms",
                self.component.reconnect_max_ms,
            ),
            ("store.flush_interval_ms", self.store.flush_interval_ms),
            (
                "delivery.receipt_timeout_ms",
                self.delivery.receipt_timeout_ms,
            ),
            ("delivery.replay_grace_ms", self.delivery.replay_grace_ms),
            ("delivery.contact_wait_ms", self.delivery.contact_wait_ms),
            (
                "delivery.unanswered_wait_ms",
                self.delivery.unanswered_wait_ms,
            ),
            (
                "delivery.late_bounce_window_s",
                s(self.delivery.late_bounce_window_s),
            ),
            ("delivery.retry_initial_ms", self.delivery.retry_initial_ms),
            ("delivery.retry_max_ms", self.delivery.retry_max_ms),
            ("limits.message_ttl_s", s(self.limits.message_ttl_s)),
            ("admin.session_timeout_s", s(self.admin.session_timeout_s)),
        ]
    }

    pub fn server_addr(&self) -> SocketAddr {
        // validate() guarantees this parses.
        self.component
            .server
            .parse()
            .expect("validated component.server")
    }

    /// Where to serve metrics, if anywhere.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        // validate() guarantees this parses.
        self.metrics.listen.as_ref().and_then(|l| l.parse().ok())
    }

    pub fn receipt_timeout(&self) -> Duration {
        Duration::from_millis(self.delivery.receipt_timeout_ms)
    }

    /// At most the receipt timeout.
    pub fn unanswered_wait(&self) -> Duration {
        Duration::from_millis(
            self.delivery
                .unanswered_wait_ms
                .min(self.delivery.receipt_timeout_ms),
        )
    }

    /// At most the messages' time to live: what expired is not put back.
    pub fn late_bounce_window(&self) -> Duration {
        Duration::from_secs(
            self.delivery
                .late_bounce_window_s
                .min(self.limits.message_ttl_s),
        )
    }

    pub fn retry_initial(&self) -> Duration {
        Duration::from_millis(self.delivery.retry_initial_ms)
    }

    pub fn retry_max(&self) -> Duration {
        Duration::from_millis(self.delivery.retry_max_ms)
    }

    pub fn message_ttl(&self) -> Duration {
        Duration::from_secs(self.limits.message_ttl_s)
    }

    pub fn replay_grace(&self) -> Duration {
        Duration::from_millis(self.delivery.replay_grace_ms)
    }

    /// The PostgreSQL password, if one is set: `REDELIVER_DB_PASSWORD`
    /// first, then `store.password_file`.
    pub fn db_password(&self) -> Result<Option<String>, ConfigError> {
        if let Ok(s) = std::env::var(DB_PASSWORD_ENV)
            && !s.is_empty()
        {
            return Ok(Some(s));
        }
        let Some(path) = &self.store.password_file else {
            return Ok(None);
        };
        first_line(path).map(Some)
    }

    /// The shared secret: `REDELIVER_SECRET` first, then `secret_file`.
    pub fn secret(&self) -> Result<String, ConfigError> {
        if let Ok(s) = std::env::var(SECRET_ENV)
            && !s.is_empty()
        {
            return Ok(s);
        }
        let Some(path) = &self.component.secret_file else {
            return Err(ConfigError::Invalid(format!(
                "no secret: set {SECRET_ENV} or component.secret_file"
            )));
        };
        first_line(path)
    }
}

/// The first line of a secret's file, trimmed; an empty one is an error.
fn first_line(path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let secret = text.lines().next().unwrap_or("").trim().to_owned();
    if secret.is_empty() {
        return Err(ConfigError::Invalid(format!(
            "secret file {} is empty",
            path.display()
        )));
    }
    Ok(secret)
}

#[cfg(test)]
mod tests;
