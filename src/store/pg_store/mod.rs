//! The PostgreSQL store: the same promises as the sled store, in tables
//! that several instances share, one leading at a time (`schema` has the
//! layout, `view` the reads the admin commands use, `ops` the router's
//! operations, `rows` what they share, `check` and `transfer` the `store`
//! subcommands).
//!
//! **The connection.** tokio-postgres's connection task runs on a thread
//! of its own, with its own small runtime, so that the store's calls can
//! be synchronous like sled's (the router waits for its store either way:
//! nothing leaves before the write it depends on). A call sends its
//! queries to that task and waits for the answers; the futures that do
//! so need no runtime, so they run on the caller's thread.
//!
//! **Bursts** are transactions: the first call after `begin` opens one,
//! `commit` commits it. Outside a burst each
//! call is a transaction of its own. Changes to the whole-store counters
//! are summed in memory and written by one `UPDATE` just before the
//! commit (reads add the sums not yet written); the count of recipients
//! with pending messages moves with each flush of the batch, so the
//! counters row is locked from the burst's first flush to its commit
//! (only the leader writes it).
//!
//! **Round trips.** The router's hot operations decide from what the
//! leader knows already (`known`: the burst's look-ahead, and the tails
//! of queues) and leave their writes in the burst's `batch`, which goes
//! out as one statement per kind of write, pipelined with the commit (or
//! with the first statement of an operation that reads the tables). A
//! steady burst of accepts, deliveries and receipts then costs two round
//! trips: its look-ahead, and its commit.
//!
//! **Durability.** Every session runs with `synchronous_commit = on`, so a
//! commit returns once the database has the transaction in its WAL on
//! disk (and, if the server has a synchronous standby, on the standby's
//! too). Flushing is then nothing to do.
//!
//! **Failure.** Any error ends the transaction (rolled back) and leaves
//! the store failed, as a failed sled write does: every later call fails
//! until the process opens the store again.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use futures::executor::block_on;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, NoTls, Row, Statement};
use tracing::{error, warn};

use super::StoreError;

mod batch;
mod batched;
mod check;
mod inbox;
mod known;
mod ops;
mod rows;
mod schema;
mod transfer;
mod view;

pub use schema::SCHEMA_VERSION;

/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct PgStore {
    client: Client,
    /// Prepared statements, by their text.
    statements: Mutex<HashMap<&'static str, Statement>>,
    burst: Mutex<Burst>,
    /// Ends the connection task.
    stop: Option<futures::channel::oneshot::Sender<()>>,
    /// To try a new connection after a failure.
    config: Config,
    /// The database, as logs name it (no password).
    name: String,
    /// Wakes the leader when a stanza was forwarded (`inbox`).
    wakeup: std::sync::OnceLock<std::sync::Arc<tokio::sync::Notify>>,
}

/// The open transaction, if any.
#[derive(Debug, Default)]
pub(super) struct Burst {
    /// Between begin and commit.
    deferred: bool,
    /// A transaction is open on the connection.
    open: bool,
    /// Rows written in it.
    writes: usize,
    /// Changes to the whole-store counters, written at its commit.
    pub(super) delta: Delta,
    /// An earlier call failed: nothing more is tried.
    failed: Option<String>,
    /// Messages written in the open transaction, by (recipient, seq):
    /// after a failure they stay readable (`get`), so that their senders
    /// can be told, as the sled store's overlay keeps them.
    pub(super) written: HashMap<(String, u64), super::Record>,
    /// Queue writes not sent yet.
    batch: batch::Batch,
    /// What this burst knows without asking.
    known: known::Known,
    /// Queues known from some seq on, across bursts.
    tails: known::Tails,
    /// Tests: the next commit fails.
    #[cfg(test)]
    fail_next_commit: bool,
}

impl Burst {
    /// An operation changed recipient's queue in SQL of its own: `seqs`
    /// left it, and the rows `known` holds may be stale.
    pub(super) fn queues_changed(&mut self, recipient: &str, seqs: impl IntoIterator<Item = u64>) {
        self.tails.removed(recipient, seqs);
        self.known.forget_rows();
    }
}

/// Changes to `redeliver_totals` not yet written.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Delta {
    pub pending: i64,
    pub bytes: i64,
    pub recipients: i64,
    pub assumed: i64,
    pub assumed_bytes: i64,
}

/// The unique key of a row whose key parts a sender may make long:
/// SHA-256 over the parts, each preceded by its length.
pub(super) fn key_digest(parts: &[&str]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    h.finalize().to_vec()
}

/// A database error as a store error, with the server's message when
/// there is one (tokio-postgres's own text is only "db error").
pub(super) fn db_error(e: tokio_postgres::Error) -> StoreError {
    StoreError::Database(match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    })
}

impl PgStore {
    /// Connect to `url` (with `password`, if one is needed), check the
    /// schema (creating or migrating it) and the server's settings.
    /// Blocking; call it off the async runtime.
    pub fn open(url: &str, password: Option<&str>) -> Result<PgStore, StoreError> {
        let mut config: Config = url
            .parse()
            .map_err(|e| StoreError::Database(format!("store.url: {e}")))?;
        if let Some(p) = password {
            config.password(p);
        }
        config.connect_timeout(CONNECT_TIMEOUT);
        // A database that stops answering (a dead host, a cut link) fails
        // the store within seconds instead of holding the router forever.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(10));
        config.tcp_user_timeout(Duration::from_secs(20));
        config.application_name("redeliver");
        let name = describe(&config);
        let (client, stop) = connect(&config)?;
        let store = PgStore {
            client,
            statements: Mutex::default(),
            burst: Mutex::default(),
            stop: Some(stop),
            config,
            name,
            wakeup: Default::default(),
        };
        store.prepare_schema()?;
        Ok(store)
    }

    /// The database, as logs name it.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn burst(&self) -> MutexGuard<'_, Burst> {
        self.burst.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection as the operations see it.
    fn db(&self) -> Db<'_> {
        Db {
            client: &self.client,
            statements: &self.statements,
            writes: 0.into(),
        }
    }

    /// Run `body` inside the current transaction (opening one if needed;
    /// outside a burst, committing it after), after the batch's writes,
    /// which go in the same round trip as its first statement. Any error
    /// fails the store.
    pub(super) fn run<T>(
        &self,
        body: impl AsyncFnOnce(&Db<'_>, &mut Burst) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, StoreError> {
        self.run_with(true, body)
    }

    /// As [`PgStore::run`], leaving the batch's writes in the batch: for
    /// the operations that read only what those writes do not change, or
    /// what `known` accounts them in.
    pub(super) fn run_batched<T>(
        &self,
        body: impl AsyncFnOnce(&Db<'_>, &mut Burst) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, StoreError> {
        self.run_with(false, body)
    }

    fn run_with<T>(
        &self,
        flush: bool,
        body: impl AsyncFnOnce(&Db<'_>, &mut Burst) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, StoreError> {
        let mut guard = self.burst();
        let b: &mut Burst = &mut guard;
        if let Some(e) = &b.failed {
            return Err(StoreError::Failed(e.clone()));
        }
        let client = &self.client;
        let db = self.db();
        let out = block_on(async {
            let begin = !b.open;
            b.open = true;
            let mut batch = if flush {
                std::mem::take(&mut b.batch)
            } else {
                batch::Batch::default()
            };
            // Prepared first: a statement prepared inside the pipeline
            // would let the body's statements overtake it.
            let prepared = match batch.is_empty() {
                true => None,
                false => Some(batch::prepare(&db).await?),
            };
            let (_, flushed, v) = futures::try_join!(
                async {
                    match begin {
                        true => client.batch_execute("BEGIN").await,
                        false => Ok(()),
                    }
                },
                async {
                    match &prepared {
                        Some(p) => batch.flush(&db, p).await,
                        None => Ok(0),
                    }
                },
                body(&db, b),
            )?;
            b.writes += db.writes.get() + flushed as usize;
            if !b.deferred {
                finish(&db, b).await?;
            }
            Ok(v)
        });
        out.map_err(|e| self.fail(b, e))
    }

    /// A read: as [`PgStore::run`], but after a failure it still reads
    /// what is committed (outside any transaction), as the sled store
    /// still reads after a failed write.
    pub(super) fn read<T>(
        &self,
        body: impl AsyncFnOnce(&Db<'_>, &mut Burst) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, StoreError> {
        let mut guard = self.burst();
        if guard.failed.is_none() {
            drop(guard);
            return self.run(body);
        }
        let db = self.db();
        let mut scratch = Burst::default();
        let out = block_on(body(&db, &mut scratch)).map_err(db_error);
        guard.written.extend(scratch.written);
        out
    }

    /// The store failed: roll back what is open, refuse what follows.
    fn fail(&self, b: &mut Burst, e: tokio_postgres::Error) -> StoreError {
        let err = db_error(e);
        error!(database = %self.name, error = %err, "store failed; rolling back");
        if b.open {
            let _ = block_on(self.client.batch_execute("ROLLBACK"));
            b.open = false;
        }
        b.delta = Delta::default();
        b.writes = 0;
        b.batch = Default::default();
        b.known = Default::default();
        b.tails.clear();
        b.failed = Some(err.to_string());
        err
    }

    /// After a failure: a message the failed transaction wrote.
    pub(super) fn written(&self, recipient: &str, seq: u64) -> Option<super::Record> {
        self.burst()
            .written
            .get(&(recipient.to_owned(), seq))
            .cloned()
    }

    pub(super) fn failed(&self) -> bool {
        self.burst().failed.is_some()
    }

    /// Create the schema if the database has none, check its version and
    /// that the server keeps text as UTF-8; set the session to commit
    /// durably (`synchronous_commit`; the server's own `fsync` is the
    /// operator's).
    fn prepare_schema(&self) -> Result<(), StoreError> {
        let c = &self.client;
        let found: Option<String> = block_on(async {
            let encoding = c.query_one("SHOW server_encoding", &[]).await?;
            let encoding: String = encoding.get(0);
            if encoding != "UTF8" {
                return Ok(Some(format!("!encoding {encoding}")));
            }
            c.batch_execute("SET synchronous_commit = on").await?;
            // The leader's advisory lock goes with its session: a dead
            // host's session must end within seconds, not hours.
            c.batch_execute(
                "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; \
                 SET tcp_keepalives_count = 3; SET tcp_user_timeout = 20000; \
                 SET statement_timeout = 60000",
            )
            .await?;
            c.batch_execute("BEGIN").await?;
            c.execute(
                "SELECT pg_advisory_xact_lock($1)",
                &[&schema::MIGRATION_LOCK],
            )
            .await?;
            c.batch_execute(schema::META).await?;
            let row = c
                .query_opt(
                    "SELECT value FROM redeliver_meta WHERE name = 'schema'",
                    &[],
                )
                .await?;
            let found = row.map(|r| r.get::<_, String>(0));
            if found.is_none() {
                c.batch_execute(schema::V1).await?;
            }
            if matches!(found.as_deref(), None | Some("1")) {
                c.batch_execute(schema::V2).await?;
            }
            c.batch_execute("COMMIT").await?;
            Ok(found)
        })
        .map_err(db_error)?;
        match found.as_deref() {
            None => Ok(()),
            Some(e) if e.starts_with("!encoding ") => Err(StoreError::Database(format!(
                "{}: the database's encoding is {}; redeliver needs UTF8 \
                 (CREATE DATABASE … ENCODING 'UTF8')",
                self.name,
                &e["!encoding ".len()..]
            ))),
            Some(v) => {
                let version: u32 = v
                    .parse()
                    .map_err(|_| StoreError::Corrupt(format!("schema version {v:?}")))?;
                if version > SCHEMA_VERSION {
                    return Err(StoreError::NewerSchema {
                        path: self.name.clone(),
                        found: version,
                        reads: SCHEMA_VERSION,
                    });
                }
                // Older versions were migrated above, in the transaction
                // that read the version.
                Ok(())
            }
        }
    }

    pub(super) fn begin_burst(&self) {
        self.burst().deferred = true;
    }

    pub(super) fn commit_burst(&self) -> Result<usize, StoreError> {
        let mut guard = self.burst();
        let b: &mut Burst = &mut guard;
        b.deferred = false;
        if let Some(e) = &b.failed {
            return Err(StoreError::Failed(e.clone()));
        }
        #[cfg(test)]
        if std::mem::take(&mut b.fail_next_commit) {
            if b.open {
                let _ = block_on(self.client.batch_execute("ROLLBACK"));
            }
            b.open = false;
            b.batch = Default::default();
            b.known = Default::default();
            b.tails.clear();
            b.failed = Some("injected failure".into());
            return Err(StoreError::Failed("injected failure".into()));
        }
        if !b.open {
            return Ok(0);
        }
        let db = self.db();
        let n = b.writes;
        match block_on(finish(&db, b)) {
            Ok(flushed) => Ok(n + flushed),
            Err(e) => Err(self.fail(b, e)),
        }
    }

    /// Make the next commit fail, as a database gone away would.
    #[cfg(test)]
    pub(super) fn fail_now(&self) {
        self.burst().fail_next_commit = true;
    }

    /// Whether a new connection works (after a failure).
    pub(super) fn reachable(&self) -> bool {
        let mut config = self.config.clone();
        config.connect_timeout(Duration::from_secs(2));
        match connect(&config) {
            Ok((client, stop)) => {
                let ok = block_on(client.simple_query("SELECT 1")).is_ok();
                let _ = stop.send(());
                ok
            }
            Err(e) => {
                warn!(database = %self.name, error = %e, "database still unreachable");
                false
            }
        }
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The connection as the operations see it: statements are prepared
/// once and reused, and rows written are counted.
pub(super) struct Db<'a> {
    client: &'a Client,
    statements: &'a Mutex<HashMap<&'static str, Statement>>,
    writes: std::cell::Cell<usize>,
}

type Params<'p> = [&'p (dyn ToSql + Sync)];

impl Db<'_> {
    pub(super) async fn statement(
        &self,
        sql: &'static str,
    ) -> Result<Statement, tokio_postgres::Error> {
        let cached = self
            .statements
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(sql)
            .cloned();
        if let Some(s) = cached {
            return Ok(s);
        }
        let s = self.client.prepare(sql).await?;
        self.statements
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sql, s.clone());
        Ok(s)
    }

    pub(super) async fn query(
        &self,
        sql: &'static str,
        params: &Params<'_>,
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let s = self.statement(sql).await?;
        self.client.query(&s, params).await
    }

    pub(super) async fn query_opt(
        &self,
        sql: &'static str,
        params: &Params<'_>,
    ) -> Result<Option<Row>, tokio_postgres::Error> {
        let s = self.statement(sql).await?;
        self.client.query_opt(&s, params).await
    }

    pub(super) async fn query_one(
        &self,
        sql: &'static str,
        params: &Params<'_>,
    ) -> Result<Row, tokio_postgres::Error> {
        let s = self.statement(sql).await?;
        self.client.query_one(&s, params).await
    }

    /// A write without `RETURNING`; the rows it changed.
    pub(super) async fn exec(
        &self,
        sql: &'static str,
        params: &Params<'_>,
    ) -> Result<u64, tokio_postgres::Error> {
        let s = self.statement(sql).await?;
        let n = self.client.execute(&s, params).await?;
        self.writes.set(self.writes.get() + n as usize);
        Ok(n)
    }

    /// A prepared write, sent only if `send`; the rows it changed.
    pub(super) async fn exec_if(
        &self,
        send: bool,
        s: &Statement,
        params: &Params<'_>,
    ) -> Result<u64, tokio_postgres::Error> {
        if !send {
            return Ok(0);
        }
        self.client.execute(s, params).await
    }

    /// A write with `RETURNING`: its rows.
    pub(super) async fn write(
        &self,
        sql: &'static str,
        params: &Params<'_>,
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let rows = self.query(sql, params).await?;
        self.writes.set(self.writes.get() + rows.len());
        Ok(rows)
    }
}

const ADD_TO_TOTALS: &str = "UPDATE redeliver_totals SET pending = pending + $1, \
     bytes = bytes + $2, recipients = recipients + $3, assumed = assumed + $4, \
     assumed_bytes = assumed_bytes + $5";

/// Send the batch's writes and the counters' changes, and commit, in one
/// round trip; rows the batch wrote. What the burst knew goes with it.
async fn finish(db: &Db<'_>, b: &mut Burst) -> Result<usize, tokio_postgres::Error> {
    b.known = Default::default();
    let mut batch = std::mem::take(&mut b.batch);
    let prepared = match batch.is_empty() {
        true => None,
        false => Some(batch::prepare(db).await?),
    };
    let d = std::mem::take(&mut b.delta);
    let totals = match d == Delta::default() {
        true => None,
        false => Some(db.statement(ADD_TO_TOTALS).await?),
    };
    let (flushed, _, _) = futures::try_join!(
        async {
            match &prepared {
                Some(p) => batch.flush(db, p).await,
                None => Ok(0),
            }
        },
        async {
            let Some(s) = &totals else { return Ok(0) };
            db.client
                .execute(
                    s,
                    &[
                        &d.pending,
                        &d.bytes,
                        &d.recipients,
                        &d.assumed,
                        &d.assumed_bytes,
                    ],
                )
                .await
        },
        db.client.batch_execute("COMMIT"),
    )?;
    b.open = false;
    b.writes = 0;
    b.written.clear();
    Ok(flushed as usize)
}

/// Open a connection; its task runs on a thread of its own until the
/// returned sender fires (or is dropped).
fn connect(config: &Config) -> Result<(Client, futures::channel::oneshot::Sender<()>), StoreError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = futures::channel::oneshot::channel::<()>();
    let config = config.clone();
    let name = describe(&config);
    std::thread::Builder::new()
        .name("redeliver-db".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(StoreError::Database(e.to_string())));
                    return;
                }
            };
            rt.block_on(async move {
                match config.connect(NoTls).await {
                    Err(e) => {
                        let _ = tx.send(Err(db_error(e)));
                    }
                    Ok((client, connection)) => {
                        let _ = tx.send(Ok(client));
                        tokio::select! {
                            r = connection => if let Err(e) = r {
                                error!(database = %name, error = %e, "database connection lost");
                            },
                            _ = stop_rx => {}
                        }
                    }
                }
            });
        })
        .map_err(|e| StoreError::Database(e.to_string()))?;
    let client = rx
        .recv()
        .map_err(|_| StoreError::Database("the database thread ended".into()))??;
    Ok((client, stop_tx))
}

/// `user@host:port/dbname`, for logs.
fn describe(config: &Config) -> String {
    use tokio_postgres::config::Host;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgresql://{}@{host}:{port}/{}",
        config.get_user().unwrap_or(""),
        config.get_dbname().unwrap_or("")
    )
}
