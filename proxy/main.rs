use std::io::IsTerminal;
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
    /// Print a SCRAM-SHA-256 secret (for `scram_secret`) for the password
    /// read from standard input, so the password need not be in the file.
    HashPassword,
    /// Apply pending schema migrations ([migrations]) and exit; `status`
    /// only lists what is applied and pending.
    Migrate {
        #[arg(value_parser = ["status"])]
        action: Option<String>,
    },
    /// Take a backup of every database now ([backup]), list them, or
    /// restore one.
    Backup {
        #[command(subcommand)]
        action: BackupAction,
    },
    /// Start a throwaway local PostgreSQL with pgheal in front of it.
    #[cfg(feature = "testkit")]
    Demo {
        /// Where pgheal listens.
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: std::net::SocketAddr,
    },
}

#[derive(Subcommand)]
enum BackupAction {
    /// Take a backup of every database now.
    Now,
    /// List the backups: database, size, last restore check, file.
    List,
    /// Restore a dump into a new database on the current primary, and
    /// compare its rows with the counts recorded when it was taken.
    Restore(RestoreArgs),
}

#[derive(clap::Args)]
struct RestoreArgs {
    /// The dump file (NAME-YYYYMMDDTHHMMSSZ.dump).
    #[arg(required_unless_present = "latest", conflicts_with = "latest")]
    file: Option<PathBuf>,
    /// Restore the newest dump of this configured database instead.
    #[arg(long, value_name = "DB")]
    latest: Option<String>,
    /// The database to create (it must not exist, unless --replace).
    #[arg(long, value_name = "NAME")]
    database: String,
    /// Drop an existing database of that name first (asks on a terminal).
    #[arg(long)]
    replace: bool,
    /// Replace without asking (needed when not on a terminal).
    #[arg(long)]
    yes: bool,
    /// Keep the database when the restore fails, to look at it.
    #[arg(long)]
    keep_failed: bool,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: files, journald and Kubernetes logs get
    // plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
        Some(Command::HashPassword) => hash_password(),
        Some(Command::Backup { action }) => {
            let path = cli.config.clone();
            match load(cli.config) {
                Ok(config) => {
                    runtime.block_on(backup_command(config.relative_to(path.as_deref()), &action))
                }
                Err(code) => code,
            }
        }
        Some(Command::Migrate { action }) => {
            let path = cli.config.clone();
            match load(cli.config) {
                Ok(config) => runtime.block_on(migrate_command(config, path, action.is_none())),
                Err(code) => code,
            }
        }
        #[cfg(feature = "testkit")]
        Some(Command::Demo { listen }) => {
            match runtime.block_on(pgheal::testkit::demo::run(listen)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("demo failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        None => {
            let path = cli.config.clone();
            let config = match load(cli.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            return_freed_memory();
            runtime.block_on(pgheal::server::run::serve(config, path))
        }
    }
}

/// glibc's malloc keeps what a burst freed (a flood of connections, the
/// clients of a failover all waiting at once) in its arenas wherever a
/// longer-lived allocation sits above it, so RSS stays at the largest
/// burst so far. Every 10 s, whole free pages go back to the system and
/// RSS follows what is in use. Other allocators return memory themselves.
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    let _ = std::thread::Builder::new()
        .name("pgheal-trim".into())
        .stack_size(64 * 1024)
        .spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_secs(10));
            // SAFETY: malloc_trim has no preconditions; it only gives free
            // pages of the heap back to the system.
            unsafe {
                libc::malloc_trim(0);
            }
        });
}

async fn backup_command(config: Config, action: &BackupAction) -> ExitCode {
    let Some(b) = config.backup.clone() else {
        eprintln!("no [backup] section in the configuration");
        return ExitCode::from(2);
    };
    match action {
        BackupAction::Now => backup_now(&config, &b).await,
        BackupAction::Restore(args) => restore(&config, &b, args).await,
        BackupAction::List => {
            for name in config.named_databases().map(|d| &d.name) {
                for backup in pgheal::ops::backup::list(&b.dir, name) {
                    println!(
                        "{}\t{}\t{}\t{}",
                        backup.database,
                        backup.size,
                        pgheal::ops::backup::restore_checked(&backup),
                        backup.path.display()
                    );
                }
            }
            ExitCode::SUCCESS
        }
    }
}

async fn restore(
    config: &Config,
    b: &pgheal::config::BackupConfig,
    args: &RestoreArgs,
) -> ExitCode {
    let asked = pgheal::ops::recover::Asked {
        file: args.file.clone(),
        latest: args.latest.clone(),
        database: args.database.clone(),
        replace: args.replace,
        yes: args.yes,
        keep_failed: args.keep_failed,
    };
    match pgheal::ops::recover::command(config, b, &asked).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("restore failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn backup_now(config: &Config, b: &pgheal::config::BackupConfig) -> ExitCode {
    let mut failed = false;
    let started = std::time::Instant::now();
    let progress = std::io::stdout()
        .is_terminal()
        .then(|| pgheal::ops::progress::BackupProgress::start(b.dir.clone()));
    let outcomes = pgheal::ops::backup::run_all(config, b).await;
    drop(progress);
    for o in outcomes {
        match &o.result {
            Ok(done) => println!(
                "backup {} from {}: {} ({} bytes); removed {}",
                o.database,
                o.source.as_deref().unwrap_or("?"),
                done.path.display(),
                done.size,
                o.removed.len()
            ),
            Err(e) => {
                failed = true;
                eprintln!("backup {} failed: {e}", o.database);
            }
        }
    }
    if std::io::stdout().is_terminal() {
        println!("took {:.1} s", started.elapsed().as_secs_f64());
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

async fn migrate_command(config: Config, path: Option<PathBuf>, apply: bool) -> ExitCode {
    let config = config.relative_to(path.as_deref());
    let Some(m) = config.migrations.clone() else {
        eprintln!("no [migrations] section in the configuration");
        return ExitCode::from(2);
    };
    // On a terminal each file is shown as it runs, with its duration.
    let terminal = std::io::stdout().is_terminal();
    let show = |p: pgheal::ops::migrate::Progress<'_>| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = match p {
            pgheal::ops::migrate::Progress::Applying(f) => write!(out, "applying {f} ... "),
            pgheal::ops::migrate::Progress::Applied(_, took) => {
                writeln!(out, "done in {:.3} s", took.as_secs_f64())
            }
        };
        let _ = out.flush();
    };
    let quiet = |_: pgheal::ops::migrate::Progress<'_>| {};
    let progress: &(dyn Fn(pgheal::ops::migrate::Progress<'_>) + Sync) =
        if terminal && apply { &show } else { &quiet };
    match pgheal::ops::migrate::run_with(&config, &m, apply, progress).await {
        Ok(report) => {
            for f in report.applied.iter().filter(|_| !terminal) {
                println!("applied  {f}");
            }
            for f in &report.pending {
                println!("pending  {f}");
            }
            println!("{} already applied", report.already);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("migrations: {e}");
            ExitCode::FAILURE
        }
    }
}

fn hash_password() -> ExitCode {
    let mut line = String::new();
    if std::io::stdin().read_line(&mut line).is_err() {
        eprintln!("cannot read a password from standard input");
        return ExitCode::FAILURE;
    }
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        eprintln!(
            "empty password: type it on standard input, e.g. `pgheal hash-password <<< 'secret'`"
        );
        return ExitCode::FAILURE;
    }
    println!(
        "{}",
        postgres_protocol::password::scram_sha_256(password.as_bytes())
    );
    ExitCode::SUCCESS
}
