//! PostgreSQL for the integration tests: a new database per store on the
//! throwaway cluster that `scripts/test` starts (`scripts/pg-cluster`).
//! `REDELIVER_TEST_BACKEND=postgres` makes every [`super::Relay`] use
//! one instead of a sled directory.

/// The cluster's URL (its `postgres` database) and password.
pub const URL_ENV: &str = "REDELIVER_TEST_PG_URL";
pub const PASSWORD_ENV: &str = "REDELIVER_TEST_PG_PASSWORD";
pub const BACKEND_ENV: &str = "REDELIVER_TEST_BACKEND";

/// Whether the relays of this run keep their messages in PostgreSQL.
pub fn relays_use_postgres() -> bool {
    std::env::var(BACKEND_ENV).as_deref() == Ok("postgres")
}

pub fn password() -> Option<String> {
    std::env::var(PASSWORD_ENV).ok()
}

/// The URL of a new, empty database on the test cluster.
pub fn new_database() -> String {
    let url = std::env::var(URL_ENV).unwrap_or_else(|_| {
        panic!(
            "{URL_ENV} is not set: the PostgreSQL tests need the cluster that scripts/test \
             starts (eval \"$(bash scripts/pg-cluster start DIR)\" for a run of your own)"
        )
    });
    new_database_on(&url, password())
}

pub use super::pg_admin::new_database_on;

/// End the database sessions that hold an advisory lock in the database
/// at `url` (the leader's); how many.
pub fn end_lock_holders(url: &str) -> u64 {
    let ended = super::pg_admin::query_first_column(
        url,
        password(),
        "SELECT pg_terminate_backend(l.pid) FROM pg_locks l \
         JOIN pg_database d ON d.oid = l.database \
         WHERE l.locktype = 'advisory' AND l.granted AND d.datname = current_database()"
            .into(),
    );
    ended.iter().filter(|t| *t == "t").count() as u64
}

/// A cluster of a test's own (`scripts/pg-cluster`), for a test that
/// stops and starts it; stopped and removed on drop.
pub struct OwnCluster {
    dir: tempfile::TempDir,
    pub url: String,
    pub password: String,
}

fn pg_cluster(op: &str, dir: &std::path::Path) -> String {
    let out = std::process::Command::new("bash")
        .arg(super::root().join("scripts/pg-cluster"))
        .arg(op)
        .arg(dir)
        .output()
        .expect("run scripts/pg-cluster");
    assert!(
        out.status.success(),
        "pg-cluster {op}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl OwnCluster {
    pub fn start() -> OwnCluster {
        let dir = tempfile::tempdir().unwrap();
        // The cluster runs as the postgres user when the tests run as root.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let out = pg_cluster("start", &dir.path().join("pg"));
        let value = |key: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("no {key} in {out}"))
                .to_owned()
        };
        let url = value(URL_ENV);
        // pg-cluster chose it; keep it for the cluster while it is stopped.
        let port = url.rsplit(':').next().and_then(|p| p.split('/').next());
        super::ports::claim(
            port.and_then(|p| p.parse().ok())
                .expect("a port in the URL"),
        );
        OwnCluster {
            url,
            password: value(PASSWORD_ENV),
            dir,
        }
    }

    pub fn stop(&self) {
        pg_cluster("stop", &self.dir.path().join("pg"));
    }

    pub fn resume(&self) {
        pg_cluster("resume", &self.dir.path().join("pg"));
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `[store]` lines naming database `url`.
pub fn store_section_for(url: &str, durability: &str, cache_bytes: u64) -> String {
    format!(
        "[store]\nbackend = \"postgres\"\nurl = \"{url}\"\ndurability = \"{durability}\"\ncache_bytes = {cache_bytes}\n"
    )
}
