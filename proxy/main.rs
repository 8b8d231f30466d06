use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use pgheal::config::Config;

/// A PostgreSQL proxy that pools connections and heals around failed nodes.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short, env = "PGHEAL_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value = "human", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration file and print every error.
    Check,
    /// Start a throwaway local PostgreSQL with pgheal in front of it.
    Demo {
        /// Where pgheal listens.
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: SocketAddr,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(path: Option<PathBuf>) -> Result<Config, ExitCode> {
    let Some(path) = path else {
        eprintln!(
            "no configuration: pass --config FILE or set PGHEAL_CONFIG (or try `pgheal demo`)"
        );
        return Err(ExitCode::from(2));
    };
    Config::load(&path).map_err(|errors| {
        eprintln!("{}: {} error(s)", path.display(), errors.0.len());
        for e in &errors.0 {
            eprintln!("  {e}");
        }
        ExitCode::from(1)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = std::env::var("PGHEAL_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Some(Command::Check) => match load(cli.config) {
            Ok(_) => {
                println!("configuration is valid");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Some(Command::Demo { listen }) => match runtime.block_on(pgheal::demo::run(listen)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("demo failed: {e}");
                ExitCode::FAILURE
            }
        },
        None => {
            let config = match load(cli.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            runtime.block_on(serve(config))
        }
    }
}

async fn serve(config: Config) -> ExitCode {
    let listen = config.proxy.listen;
    let running = match pgheal::listener::start(config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = running.wait() => {}
        _ = pgheal::shutdown_signal() => tracing::info!("signalled; exiting"),
    }
    ExitCode::SUCCESS
}
