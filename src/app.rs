//! Wiring: open the store, start the link, the router and the flusher, and
//! stop them in order.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_xmpp::parsers::jid::Jid;
use tracing::info;

use crate::config::{Backend, Config, Instances};
use crate::gate::run_flusher;
use crate::link::{CHANNEL_CAPACITY, Link, LinkSettings};
use crate::router::{LEAD_POLL, Router, Stop};
use crate::store::{PgStore, QueueStore, SledStore};

/// Open the store the config names. Blocking: call it off the runtime.
pub fn open_store_blocking(config: &Config) -> anyhow::Result<Arc<dyn QueueStore>> {
    let c = &config.store;
    let store: Arc<dyn QueueStore> = match c.backend {
        Backend::Sled => Arc::new(SledStore::open_with(
            &c.path,
            c.durability,
            c.flush_interval_ms,
            c.cache_bytes,
            c.compression,
        )?),
        Backend::Postgres => {
            let url = c
                .url
                .as_deref()
                .ok_or_else(|| anyhow::anyhow!("store.url is required with postgres"))?;
            let password = config.db_password()?;
            Arc::new(PgStore::open(url, password.as_deref())?)
        }
    };
    // sled's open reads its whole snapshot, tens of MiB on a large store,
    // and frees it.
    crate::memory::release_freed();
    Ok(store)
}

/// Where the store is, for logs: the sled directory or the database.
pub fn store_name(config: &Config) -> String {
    match config.store.backend {
        Backend::Sled => config.store.path.display().to_string(),
        Backend::Postgres => config.store.url.clone().unwrap_or_default(),
    }
}

/// Open the store off the runtime (opening blocks).
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn QueueStore>> {
    let c = config.clone();
    tokio::task::spawn_blocking(move || open_store_blocking(&c)).await?
}

/// Wait until this instance leads its domain among those sharing the
/// store (at once with sled). False if `shutdown` came first.
async fn wait_for_lead(
    store: &Arc<dyn QueueStore>,
    domain: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    let mut waited = false;
    loop {
        let (s, d) = (store.clone(), domain.to_owned());
        if tokio::task::spawn_blocking(move || s.lead(&d)).await?? {
            if waited {
                info!(domain, "took the lead: the instance that led is gone");
            }
            return Ok(true);
        }
        if !waited {
            info!(
                domain,
                "standby: another instance on this store leads; taking over when it goes"
            );
            waited = true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(LEAD_POLL) => {}
        }
    }
}

/// Run the component until `shutdown` is cancelled.
pub async fn run(
    config: Config,
    config_path: Option<std::path::PathBuf>,
    secret: String,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    if let Some(listen) = config.metrics_addr() {
        let limits = crate::prometheus::serve(listen)?;
        crate::stats::start_counters_at_zero();
        info!(
            %listen,
            max_connections = limits.connections,
            header_timeout_s = limits.header_timeout.as_secs(),
            "serving Prometheus metrics over HTTP"
        );
    }
    let store = open_store(&config).await?;
    info!(
        backend = config.store.backend.as_str(),
        store = %store_name(&config),
        durability = config.store.durability.as_str(),
        "store open"
    );
    match config.store.instances {
        Instances::OneActive => {
            if !wait_for_lead(&store, &config.component.domain, &shutdown).await? {
                info!("stopped while standing by");
                return Ok(());
            }
        }
        // Connected at once; the router takes the lead when it is free.
        // Not before the store is known to be this domain's: what this
        // instance hands over would reach another domain's leader.
        Instances::AllActive => {
            let (s, d) = (store.clone(), config.component.domain.clone());
            tokio::task::spawn_blocking(move || s.check_domain(&d)).await??;
            info!(
                domain = %config.component.domain,
                "all-active: connecting; the instance that leads delivers, the others hand \
                 it what they receive"
            );
        }
    }

    let (out_tx, out_rx) = mpsc::channel(CHANNEL_CAPACITY);
    let (ev_tx, ev_rx) = mpsc::channel(CHANNEL_CAPACITY);
    let (flush_tx, flush_rx) = mpsc::unbounded_channel();
    let (done_tx, done_rx) = mpsc::channel(16);

    // The link stops only once the router has: what the router's last
    // round queues (a receipt whose commit waited, say) still leaves.
    let link_stop = CancellationToken::new();
    let link = Link::new(
        LinkSettings {
            domain: config.component.domain.clone(),
            server: config.server_addr(),
            secret,
            keepalive: std::time::Duration::from_secs(config.component.keepalive_s),
            ping_to: Jid::new(&config.relay.default_domain)?,
            reconnect_max: std::time::Duration::from_millis(config.component.reconnect_max_ms),
        },
        out_rx,
        ev_tx,
        link_stop.clone(),
        shutdown.clone(),
    );
    let router = Router::new(config.clone(), config_path, store.clone(), out_tx, flush_tx)?;
    let flusher = tokio::spawn(run_flusher(store.clone(), flush_rx, done_tx));
    let link = tokio::spawn(link.run());
    let outcome = router.run(ev_rx, done_rx, shutdown.clone()).await;
    if let Err(stop @ (Stop::ReopenStore | Stop::LostLead(_))) = &outcome {
        // sled does not recover from a failed write within the process,
        // and its drop would try to flush again (and can hang doing so):
        // leave at once. What reached the disk is what the next start
        // recovers, and nothing that was not durable was relayed.
        shutdown.cancel();
        eprintln!("redeliver: {stop}");
        std::process::exit(i32::from(stop.exit_status()));
    }
    // The router is gone: the link writes what it queued, then closes.
    shutdown.cancel();
    link_stop.cancel();
    let _ = link.await;
    flusher.abort();
    Router::flush_store(store).await;
    info!("redeliver stopped");
    outcome.map_err(anyhow::Error::from)
}
