//! The `redeliver` binary: parse arguments, load config, start tracing,
//! then hand over to [`redeliver::app::run`].

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

use redeliver::config::Config;

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
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
                        if e.is::<redeliver::twin::AnotherInstance>() {
                            // Not a crash: a supervisor should not restart it.
                            ExitCode::from(redeliver::twin::EXIT_STATUS)
                        } else {
                            ExitCode::FAILURE
                        }
                    }
                }
            })
        }
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
