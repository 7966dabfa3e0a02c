//! The config's unit tests: parsing, defaults, validation, changes.

use super::*;

const MINIMAL: &str = r#"
[component]
domain = "relay.example.com"
server = "127.0.0.1:5347"
[relay]
default_domain = "example.com"
allowed_sender_domains = ["example.com"]
[store]
path = "/tmp/x"
"#;

#[test]
fn minimal_gets_defaults() {
    let c: Config = toml::from_str(MINIMAL).unwrap();
    c.validate().unwrap();
    assert_eq!(c.store.durability, Durability::Fsync);
    assert_eq!(c.delivery.window, 64);
    assert_eq!(c.limits.max_stanza_bytes, 262_144);
}

#[test]
fn compression_is_off_by_default_and_for_sled_only() {
    let c: Config = toml::from_str(MINIMAL).unwrap();
    assert!(!c.store.compression);
    let text = format!("{MINIMAL}compression = true\n");
    let c: Config = toml::from_str(&text).unwrap();
    c.validate().unwrap();
    assert!(c.store.compression);
    let text = text.replace(
        "path = \"/tmp/x\"",
        "backend = \"postgres\"\nurl = \"postgresql://redeliver@127.0.0.1:5432/relay\"",
    );
    let c: Config = toml::from_str(&text).unwrap();
    let err = c.validate().unwrap_err().to_string();
    assert!(
        err.contains("store.compression is for the sled backend"),
        "{err}"
    );
}

#[test]
fn all_active_instances_need_a_shared_store() {
    let text = format!("{MINIMAL}instances = \"all-active\"\n");
    let c: Config = toml::from_str(&text).unwrap();
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("needs backend = \"postgres\""), "{err}");
    let text = text.replace(
        "path = \"/tmp/x\"",
        "backend = \"postgres\"\nurl = \"postgresql://redeliver@127.0.0.1:5432/relay\"",
    );
    let c: Config = toml::from_str(&text).unwrap();
    c.validate().unwrap();
    assert_eq!(c.store.instances, Instances::AllActive);
    let c: Config = toml::from_str(MINIMAL).unwrap();
    assert_eq!(c.store.instances, Instances::OneActive, "the default");
}

#[test]
fn metrics_listen_is_off_by_default_and_a_literal_address() {
    let c: Config = toml::from_str(MINIMAL).unwrap();
    assert_eq!(c.metrics_addr(), None);
    let c: Config = toml::from_str(&format!(
        "{MINIMAL}[metrics]\nlisten = \"127.0.0.1:9464\"\n"
    ))
    .unwrap();
    c.validate().unwrap();
    assert_eq!(c.metrics_addr(), Some("127.0.0.1:9464".parse().unwrap()));
    let c: Config = toml::from_str(&format!(
        "{MINIMAL}[metrics]\nlisten = \"localhost:9464\"\n"
    ))
    .unwrap();
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("metrics.listen"), "{err}");
    // Turning it on, or moving it, needs a restart.
    let off: Config = toml::from_str(MINIMAL).unwrap();
    let mut on = off.clone();
    on.metrics.listen = Some("127.0.0.1:9465".into());
    let ch = off.changes(&on);
    assert_eq!(ch.len(), 1, "{ch:?}");
    assert!(ch[0].needs_restart(), "{ch:?}");
    let mut moved = on.clone();
    moved.metrics.listen = Some("127.0.0.1:9466".into());
    let ch = on.changes(&moved);
    assert_eq!(ch.len(), 1, "{ch:?}");
    assert!(ch[0].needs_restart(), "{ch:?}");
}

#[test]
fn unknown_keys_rejected() {
    let text = format!("{MINIMAL}\n[limits]\nmax_pending = 3\n");
    let err = toml::from_str::<Config>(&text).unwrap_err().to_string();
    assert!(err.contains("unknown field"), "{err}");
}

#[test]
fn changes_name_each_setting_and_what_needs_a_restart() {
    let a: Config = toml::from_str(MINIMAL).unwrap();
    assert!(a.changes(&a).is_empty());
    let mut b = a.clone();
    b.limits.max_pending_per_recipient = 3;
    b.admin.jids = vec!["root@example.com".into()];
    let ch = b.changes(&a);
    let keys: Vec<_> = ch.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(keys, ["admin.jids", "limits.max_pending_per_recipient"]);
    assert!(ch.iter().all(|c| !c.needs_restart()));
    assert_eq!(
        a.changes(&b)[1].to_string(),
        "limits.max_pending_per_recipient: 10000 -> 3"
    );
    let mut c = a.clone();
    c.component.domain = "other.example.com".into();
    c.component.secret_file = Some("/etc/secret".into());
    let ch = a.changes(&c);
    assert_eq!(ch.len(), 2);
    assert!(ch.iter().all(Change::needs_restart));
    assert_eq!(ch[1].old, None, "{ch:?}");
}

#[test]
fn invalid_values_rejected() {
    for (from, to, what) in [
        ("127.0.0.1:5347", "localhost:5347", "literal ip:port"),
        ("[\"example.com\"]", "[]", "at least one domain"),
        ("relay.example.com", "exa mple", "not a valid domain"),
    ] {
        let text = MINIMAL.replacen(from, to, 1);
        let c: Config = toml::from_str(&text).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains(what), "{what}: {err}");
    }
}

/// Issue 11, defect 8: a default domain whose users may not send
/// could never confirm anything, and a duration past tokio's timer
/// range killed the router at its first use.
#[test]
fn configuration_that_cannot_work_is_refused() {
    let text = MINIMAL.replacen(
        "allowed_sender_domains = [\"example.com\"]",
        "allowed_sender_domains = [\"other.org\"]",
        1,
    );
    let c: Config = toml::from_str(&text).unwrap();
    assert_eq!(
        c.validate().unwrap_err().to_string(),
        "relay.allowed_sender_domains must contain \
         relay.default_domain \"example.com\": recipients there send the receipts that \
         confirm messages"
    );
    for (section, key, value, ms) in [
        (
            "limits",
            "message_ttl_s",
            100_000_000u64,
            100_000_000_000u64,
        ),
        ("delivery", "retry_max_ms", 40_000_000_000, 40_000_000_000),
        ("admin", "session_timeout_s", 40_000_000, 40_000_000_000),
    ] {
        let text = format!("{MINIMAL}\n[{section}]\n{key} = {value}\n");
        let c: Config = toml::from_str(&text).unwrap();
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            format!(
                "{section}.{key} is {ms} ms; durations may be at most 365 days \
                 (31536000000 ms)"
            )
        );
    }
    let text = format!("{MINIMAL}\n[delivery]\nunanswered_wait_ms = 0\n");
    let c: Config = toml::from_str(&text).unwrap();
    assert_eq!(
        c.validate().unwrap_err().to_string(),
        "delivery.unanswered_wait_ms must be at least 1"
    );
    let text = format!("{MINIMAL}\n[delivery]\ncontact_wait_ms = 600001\n");
    let c: Config = toml::from_str(&text).unwrap();
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .starts_with("delivery.contact_wait_ms is 600001 ms; it may be at most 10 minutes")
    );
    // The ceiling itself is fine.
    let text = format!("{MINIMAL}\n[limits]\nmessage_ttl_s = 31536000\n");
    toml::from_str::<Config>(&text).unwrap().validate().unwrap();
}

#[test]
fn shipped_configs_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("component-config");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 1);
}
