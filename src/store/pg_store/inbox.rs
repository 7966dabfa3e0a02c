//! Stanzas handed to the leader (`store.instances = "all-active"`): an
//! instance that does not lead writes each stanza it receives into
//! `redeliver_inbox` in its burst, and the commit wakes the leader with a
//! `NOTIFY`; the leader takes the oldest rows in a burst of its own, so
//! that handling them and removing them commit together.
//!
//! The leader hears the `NOTIFY` on a connection of its own (a listening
//! session cannot run the store's transactions), on a thread of its own.
//! If that connection drops it is opened again, and every (re)connect
//! wakes the leader once, for what was forwarded while nobody listened.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Config, NoTls};
use tracing::{debug, warn};

use super::PgStore;
use crate::store::StoreError;

/// The channel forwarding instances notify.
const CHANNEL: &str = "redeliver_inbox";
/// How long the listener waits before connecting again after a failure.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);
/// How often an idle listener looks whether its store is gone.
const IDLE_CHECK: Duration = Duration::from_secs(5);

impl PgStore {
    pub(super) fn forward_stanza(&self, stanza: &str, arrived_us: i64) -> Result<(), StoreError> {
        self.run(async |db, _| {
            // One round trip; the notification leaves at the commit (and
            // once per transaction, however many rows it wrote).
            db.write(
                "WITH i AS (INSERT INTO redeliver_inbox (arrived_us, stanza) \
                 VALUES ($1, $2) RETURNING id) \
                 SELECT pg_notify('redeliver_inbox', '') FROM i",
                &[&arrived_us, &stanza],
            )
            .await?;
            Ok(())
        })
    }

    /// The oldest rows (by commit order), in the order their stanzas
    /// arrived (instances hand over at once; their clocks agree).
    pub(super) fn take_from_inbox(
        &self,
        max: usize,
        upto_us: Option<i64>,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        let upto = upto_us.unwrap_or(i64::MAX);
        let mut rows: Vec<(i64, i64, String)> = self.run(async |db, _| {
            let rows = db
                .write(
                    "DELETE FROM redeliver_inbox WHERE id IN \
                     (SELECT id FROM redeliver_inbox WHERE arrived_us <= $2 \
                      ORDER BY id LIMIT $1) \
                     RETURNING arrived_us, id, stanza",
                    &[&max, &upto],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect())
        })?;
        rows.sort_unstable_by_key(|(at, id, _)| (*at, *id));
        Ok(rows.into_iter().map(|(at, _, s)| (at, s)).collect())
    }

    /// Instances that led this store, by their twin probes' name: kept in
    /// `redeliver_meta` as `leader <name>`.
    pub(super) fn remember_instance(&self, name: &str) -> Result<(), StoreError> {
        let key = format!("leader {name}");
        self.run(async |db, _| {
            db.exec(
                "INSERT INTO redeliver_meta VALUES ($1, '') ON CONFLICT DO NOTHING",
                &[&key],
            )
            .await?;
            Ok(())
        })
    }

    pub(super) fn knows_instance(&self, name: &str) -> Result<bool, StoreError> {
        let key = format!("leader {name}");
        self.read(async |db, _| {
            let r = db
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM redeliver_meta WHERE name = $1)",
                    &[&key],
                )
                .await?;
            Ok(r.get::<_, bool>(0))
        })
    }

    /// The leader's wakeup, listening from the first call on.
    pub(super) fn inbox_wakeup(&self) -> Arc<Notify> {
        self.wakeup
            .get_or_init(|| {
                let notify = Arc::new(Notify::new());
                let weak = Arc::downgrade(&notify);
                let config = self.config.clone();
                let name = self.name.clone();
                let started = std::thread::Builder::new()
                    .name("redeliver-listen".into())
                    .spawn(move || listen(config, name, weak));
                if let Err(e) = started {
                    // Not fatal: the leader also looks every second.
                    warn!(error = %e, "cannot start listening for forwarded stanzas");
                }
                notify
            })
            .clone()
    }
}

/// Listen until the store (the last holder of the wakeup) is gone.
fn listen(config: Config, name: String, wake: Weak<Notify>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            warn!(error = %e, "cannot listen for forwarded stanzas");
            return;
        }
    };
    rt.block_on(async move {
        while wake.strong_count() > 0 {
            match listen_once(&config, &wake).await {
                Ok(()) => return,
                Err(e) => {
                    warn!(database = %name, error = %e, "listening for forwarded stanzas failed; again in 1 s");
                    tokio::time::sleep(RECONNECT_AFTER).await;
                }
            }
        }
    });
}

/// One listening session; `Ok` once the store is gone, else why it ended.
async fn listen_once(config: &Config, wake: &Weak<Notify>) -> Result<(), String> {
    let (client, mut connection) = config.connect(NoTls).await.map_err(|e| e.to_string())?;
    let (tx, mut rx) = futures::channel::mpsc::unbounded::<()>();
    let drive = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = messages.next().await {
            if let AsyncMessage::Notification(_) = m? {
                let _ = tx.unbounded_send(());
            }
        }
        Ok::<(), tokio_postgres::Error>(())
    });
    client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .await
        .map_err(|e| e.to_string())?;
    debug!("listening for forwarded stanzas");
    // What was forwarded while nobody listened.
    match wake.upgrade() {
        Some(n) => n.notify_one(),
        None => return Ok(()),
    }
    loop {
        tokio::select! {
            m = rx.next() => match m {
                Some(()) => match wake.upgrade() {
                    Some(n) => n.notify_one(),
                    None => return Ok(()),
                },
                // The connection ended: its error, below.
                None => break,
            },
            _ = tokio::time::sleep(IDLE_CHECK) => {
                if wake.strong_count() == 0 {
                    return Ok(());
                }
            }
        }
    }
    drop(client);
    Err(match drive.await {
        Ok(Err(e)) => e.to_string(),
        _ => "the connection closed".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_databases::pg_database;
    use crate::store::{QueueStore, StoreView};

    /// What one instance forwards, another takes, oldest first, once; a
    /// take whose burst fails leaves the stanzas for the next leader; the
    /// taker is woken by the forwarding commit, not before.
    #[test]
    fn forwarded_stanzas_reach_the_leader_once_and_in_order() {
        let (url, password) = pg_database();
        let open = || PgStore::open(&url, password.as_deref()).unwrap();
        let (forwarder, leader) = (open(), open());
        let wakeup = leader.inbox_wakeup();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // The listener's first wakeup (catching up) comes once it listens.
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), wakeup.notified())
                .await
                .expect("listening")
        });

        forwarder.begin();
        for i in 0..3 {
            forwarder
                .forward(&format!("<message id='{i}'/>"), 100 - i)
                .unwrap();
        }
        let woken = rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(300), wakeup.notified())
                .await
                .is_ok()
        });
        assert!(!woken, "woken before the forwarding commit");
        assert!(
            leader.take_forwarded(10, None).unwrap().is_empty(),
            "not committed yet"
        );
        forwarder.commit().unwrap();
        // Not at rest: an export would leave them behind, check says so,
        // and an import refuses the database.
        let mut out = Vec::new();
        let e = crate::store::transfer::export(&forwarder, &mut out).unwrap_err();
        assert!(e.to_string().contains("3 stanzas handed over"), "{e}");
        let report = forwarder.check().unwrap();
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("3 stanzas handed over")),
            "{:?}",
            report.problems
        );
        assert!(!forwarder.is_empty_of_data().unwrap());
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), wakeup.notified())
                .await
                .expect("woken by the commit")
        });

        // A leader whose burst fails takes nothing away.
        let failing = open();
        failing.begin();
        assert_eq!(failing.take_forwarded(10, None).unwrap().len(), 3);
        failing.fail_commits();
        assert!(failing.commit().is_err());

        leader.begin();
        // Oldest by commit, then by arrival.
        assert_eq!(
            leader.take_forwarded(2, None).unwrap(),
            [
                (99, "<message id='1'/>".into()),
                (100, "<message id='0'/>".into())
            ]
        );
        leader.commit().unwrap();
        assert_eq!(
            leader.take_forwarded(10, None).unwrap(),
            [(98, "<message id='2'/>".to_string())]
        );
        assert!(leader.take_forwarded(10, None).unwrap().is_empty());

        // A bound on arrival leaves the later ones.
        forwarder.forward("<message id='late'/>", 500).unwrap();
        forwarder.forward("<message id='early'/>", 5).unwrap();
        assert_eq!(
            leader.take_forwarded(10, Some(100)).unwrap(),
            [(5, "<message id='early'/>".to_string())]
        );
        assert_eq!(leader.handed_over().unwrap(), 1);
    }
}
