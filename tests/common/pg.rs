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

/// The URL of a new, empty database.
pub fn new_database() -> String {
    let url = std::env::var(URL_ENV).unwrap_or_else(|_| {
        panic!(
            "{URL_ENV} is not set: the PostgreSQL tests need the cluster that scripts/test \
             starts (eval \"$(bash scripts/pg-cluster start DIR)\" for a run of your own)"
        )
    });
    let name = format!("rd_{:016x}", rand::random::<u64>());
    let (u, n) = (url.clone(), name.clone());
    // On a thread of its own: the caller may be inside a runtime.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut config: tokio_postgres::Config = u.parse().unwrap();
            if let Some(p) = password() {
                config.password(p);
            }
            let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            client
                .batch_execute(&format!("CREATE DATABASE {n} ENCODING 'UTF8'"))
                .await
                .unwrap();
        });
    })
    .join()
    .expect("creating a test database");
    let (base, _) = url.rsplit_once('/').expect("a URL with a database name");
    format!("{base}/{name}")
}

/// The `[store]` lines naming database `url`.
pub fn store_section_for(url: &str, durability: &str, cache_bytes: u64) -> String {
    format!(
        "[store]\nbackend = \"postgres\"\nurl = \"{url}\"\ndurability = \"{durability}\"\ncache_bytes = {cache_bytes}\n"
    )
}
