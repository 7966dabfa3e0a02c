//! The `redeliver` binary: parse arguments, load config, start tracing,
//! then hand over to [`redeliver::app::run`].

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use redeliver::config::{Backend, Config};

#[derive(Parser)]
#[command(
    version,
    about = "Reliable message delivery for XMPP servers (XEP-0114 component)"
)]
struct Cli {
    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the component.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a config file (and that a secret is available) and exit.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Inspect, back up or migrate the store (redeliver must not be
    /// running on it).
    Store {
        #[command(subcommand)]
        op: StoreOp,
    },
}

#[derive(Subcommand)]
enum StoreOp {
    /// Verify every invariant of the store; exit 1 if any fails.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Write the store to FILE (a versioned, line-oriented format).
    Export {
        #[arg(long)]
        config: PathBuf,
        file: PathBuf,
    },
    /// Read FILE, written by `store export`, into an empty store.
    Import {
        #[arg(long)]
        config: PathBuf,
        file: PathBuf,
    },
}

/// The store commands: the config names the store; no secret is needed.
fn store_command(op: StoreOp) -> ExitCode {
    let config_path = match &op {
        StoreOp::Check { config }
        | StoreOp::Export { config, .. }
        | StoreOp::Import { config, .. } => config.clone(),
    };
    let config = match Config::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("redeliver: invalid config: {e}");
            return ExitCode::from(2);
        }
    };
    let s = &config.store;
    if s.backend == Backend::Sled && !matches!(op, StoreOp::Import { .. }) && !s.path.exists() {
        eprintln!("redeliver: no store at {}", s.path.display());
        return ExitCode::FAILURE;
    }
    // A sled store that an import starts goes again if the import is
    // refused: its files would hold sled's settings (compression) and
    // stand in the way of the next try.
    let fresh = if s.backend == Backend::Sled && matches!(op, StoreOp::Import { .. }) {
        fresh_store_dir(&s.path)
    } else {
        None
    };
    let store = match redeliver::app::open_store_blocking(&config) {
        Ok(st) => st,
        Err(e) => {
            eprintln!("redeliver: {e}");
            return open_failed(&e);
        }
    };
    // On a shared store nothing enforces "not running" but the lead: a
    // command that cannot take it would race a running instance.
    match store.lead(&config.component.domain) {
        Ok(true) => {}
        Ok(false) => {
            eprintln!(
                "redeliver: an instance is running on this database (it leads {}); stop every \
                 instance first",
                config.component.domain
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("redeliver: {e}");
            return ExitCode::FAILURE;
        }
    }
    let path = redeliver::app::store_name(&config);
    let mut refused = false;
    let status = match op {
        StoreOp::Check { .. } => match store.check() {
            Ok(r) => {
                println!(
                    "{path}: {} recipients, {} pending messages ({} bytes), {} remembered ids",
                    r.recipients, r.messages, r.bytes, r.entries
                );
                for p in &r.problems {
                    println!("problem: {p}");
                }
                if r.ok() {
                    println!("{path}: consistent");
                    ExitCode::SUCCESS
                } else {
                    println!("{path}: {} problem(s)", r.problems.len());
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("redeliver: {e}");
                ExitCode::FAILURE
            }
        },
        StoreOp::Export { file, .. } => {
            let result = std::fs::File::create(&file)
                .map_err(redeliver::store::TransferError::from)
                .and_then(|f| redeliver::store::export(&*store, &mut std::io::BufWriter::new(f)));
            match result {
                Ok(sum) => {
                    println!(
                        "exported {} recipients, {} entries, {} pending messages to {}",
                        sum.recipients,
                        sum.entries,
                        sum.messages,
                        file.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("redeliver: export failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        StoreOp::Import { file, .. } => match redeliver::store::import(&*store, &file) {
            Ok(sum) => {
                println!(
                    "imported {} recipients, {} entries, {} pending messages into {path}",
                    sum.recipients, sum.entries, sum.messages
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("redeliver: import failed: {e}");
                refused = true;
                ExitCode::FAILURE
            }
        },
    };
    // Opening consumed the clean-shutdown marker; these commands leave the
    // store as they found it (or freshly imported), so put it back.
    if let Err(e) = store.flush().and_then(|_| store.write_shutdown_marker()) {
        eprintln!("redeliver: {e}");
        return ExitCode::FAILURE;
    }
    // Only while the store (still locked by this process) holds no data:
    // the data of another import into the same place is never touched.
    if refused
        && let Some(fresh) = fresh
        && store.is_empty_of_data().unwrap_or(false)
    {
        drop(store);
        match fresh.undo() {
            Ok(()) => eprintln!(
                "redeliver: removed the empty store this import had started in {}",
                fresh.dir.display()
            ),
            Err(e) => eprintln!("redeliver: cannot clean {}: {e}", fresh.dir.display()),
        }
    }
    status
}

/// A store directory an import starts in: made by it, or found empty
/// (a directory the service manager makes in advance).
struct FreshDir {
    dir: PathBuf,
    made: bool,
}

impl FreshDir {
    /// Leave it as found: gone if made here, else empty again.
    fn undo(&self) -> std::io::Result<()> {
        if self.made {
            return std::fs::remove_dir_all(&self.dir);
        }
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }
}

/// `dir`, if this process makes it now or finds it empty.
fn fresh_store_dir(dir: &std::path::Path) -> Option<FreshDir> {
    if let Some(parent) = dir.parent() {
        // As sled would; left in place.
        let _ = std::fs::create_dir_all(parent);
    }
    match std::fs::create_dir(dir) {
        Ok(()) => Some(FreshDir {
            dir: dir.to_owned(),
            made: true,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let empty = std::fs::read_dir(dir).ok()?.next().is_none();
            empty.then(|| FreshDir {
                dir: dir.to_owned(),
                made: false,
            })
        }
        // Not allowed and the like: sled's open says what is wrong.
        Err(_) => None,
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: log files and journald get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(path: &std::path::Path) -> Result<(Config, String), String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    let secret = config.secret().map_err(|e| e.to_string())?;
    Ok((config, secret))
}

/// glibc's malloc gives threads arenas of their own, up to eight per
/// core, and memory freed into one is not reused by the others: with a
/// large store the process held several times the memory its
/// recipients' state needed (docs/benchmarks.md, "Memory at scale").
/// Two arenas, unless the operator set the limit (`MALLOC_ARENA_MAX`, or
/// `glibc.malloc.arena_max` in `GLIBC_TUNABLES`). Called before any
/// thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    let set = std::env::var_os("MALLOC_ARENA_MAX").is_some()
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.arena_max"));
    if !set {
        // SAFETY: sets a malloc tunable, before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

/// Raise the soft file descriptor limit to the hard one (systemd gives
/// services 1024 and 524288): the link, the store and the metrics
/// listener share it, and the listener takes at most a quarter of it
/// (src/prometheus/listener.rs).
fn raise_nofile_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || limit.rlim_cur >= limit.rlim_max
        {
            return;
        }
        let was = limit.rlim_cur;
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
            info!(
                from = was,
                to = limit.rlim_cur,
                "raised the file descriptor limit"
            );
        } else {
            let e = std::io::Error::last_os_error();
            warn!(limit = was, error = %e, "cannot raise the file descriptor limit");
        }
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Store { op } => store_command(op),
        Command::CheckConfig { config } => match load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("redeliver: invalid config: {e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            let (cfg, secret) = match load(&config) {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("redeliver: invalid config: {e}");
                    return ExitCode::from(2);
                }
            };
            raise_nofile_limit();
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("redeliver: cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            rt.block_on(async {
                let shutdown = CancellationToken::new();
                let s = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    info!("signal received; shutting down");
                    s.cancel();
                });
                // Absolute, so that status shows where it is and a reload
                // reads the same file.
                let path = std::path::absolute(&config).unwrap_or(config);
                match redeliver::app::run(cfg, Some(path), secret, shutdown).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        error!(error = %e, "redeliver failed");
                        eprintln!("redeliver: {e:#}");
                        match e.downcast_ref::<redeliver::router::Stop>() {
                            // 3: another instance serves the domain (do not
                            // restart); 75: restart to reopen the store.
                            Some(stop) => ExitCode::from(stop.exit_status()),
                            None => open_failed(&e),
                        }
                    }
                }
            })
        }
    }
}

/// The exit status when the store could not be opened: 2 (invalid
/// configuration, not restarted) when `store.compression` is not what
/// the store was created with, since a restart cannot mend that; 1
/// otherwise.
fn open_failed(e: &anyhow::Error) -> ExitCode {
    match e.downcast_ref::<redeliver::store::StoreError>() {
        Some(redeliver::store::StoreError::Compression { .. }) => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
