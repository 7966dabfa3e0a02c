//! Fresh stores for tests: a sled store in a temporary directory, or a
//! new database on the throwaway PostgreSQL cluster that `scripts/test`
//! starts (`scripts/pg-cluster`), named by `REDELIVER_TEST_PG_URL` and
//! `REDELIVER_TEST_PG_PASSWORD`.

use std::sync::Arc;

use super::{PgStore, QueueStore, SledStore};
use crate::config::Durability;

#[path = "../../tests/common/pg_admin.rs"]
mod pg_admin;

pub const PG_URL_ENV: &str = "REDELIVER_TEST_PG_URL";
pub const PG_PASSWORD_ENV: &str = "REDELIVER_TEST_PG_PASSWORD";
/// `postgres` runs the router's tests (and the integration tests) on
/// PostgreSQL; sled otherwise.
pub const BACKEND_ENV: &str = "REDELIVER_TEST_BACKEND";

/// A sled store in a new temporary directory (kept while the guard is).
pub fn sled() -> (Arc<SledStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path(), Durability::Fsync, 5, 1 << 20).unwrap();
    (Arc::new(s), dir)
}

/// The URL and password of a new, empty database on the test cluster.
pub fn pg_database() -> (String, Option<String>) {
    let url = std::env::var(PG_URL_ENV).unwrap_or_else(|_| {
        panic!(
            "{PG_URL_ENV} is not set: the PostgreSQL tests need the cluster that scripts/test \
             starts; for a run of your own: eval \"$(bash scripts/pg-cluster start DIR)\" and \
             export {PG_URL_ENV} {PG_PASSWORD_ENV}"
        )
    });
    let password = std::env::var(PG_PASSWORD_ENV).ok();
    (pg_admin::new_database_on(&url, password.clone()), password)
}

/// A PostgreSQL store on a new database.
pub fn postgres() -> Arc<PgStore> {
    let (url, password) = pg_database();
    Arc::new(PgStore::open(&url, password.as_deref()).unwrap())
}

/// The store the router's tests use: sled in `dir`, or a new PostgreSQL
/// database when `REDELIVER_TEST_BACKEND=postgres`, led for `domain` (as
/// the app takes the lead before the router starts).
pub fn from_env(
    dir: &std::path::Path,
    durability: Durability,
    domain: &str,
) -> Arc<dyn QueueStore> {
    if std::env::var(BACKEND_ENV).as_deref() == Ok("postgres") {
        let s = postgres();
        assert!(s.lead(domain).unwrap(), "a new database has no leader");
        return s;
    }
    Arc::new(SledStore::open(dir, durability, 5, 1 << 20).unwrap())
}
