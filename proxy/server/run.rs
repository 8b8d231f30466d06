//! The serving process from start to exit: startup migrations, the
//! listener, SIGHUP and config-file watching (both do what RELOAD does),
//! scheduled backups, and graceful shutdown on SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::events::{At, Kind, Level};
use crate::frontend::App;

/// Runs pgheal until SIGTERM/SIGINT, then drains and exits.
pub async fn serve(config: Config, path: Option<PathBuf>) -> ExitCode {
    let config = config.relative_to(path.as_deref());
    let migrated = match startup_migrations(&config).await {
        Ok(outcome) => outcome,
        Err(code) => return code,
    };
    let listen = config.proxy.listen;
    let watch = config.proxy.watch_config;
    let running = match super::start(config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let app = running.app.clone();
    let at = At {
        database: migrated.database.as_deref(),
        node: None,
    };
    if let Some(applied) = migrated.applied {
        app.events
            .record(Level::Info, Kind::MigrationsApplied, at, applied);
    }
    if let Some(failure) = migrated.failure {
        let details = format!("{failure} (serving anyway: on_error = \"serve\")");
        app.events
            .record(Level::Error, Kind::MigrationsFailed, at, details);
        app.set_migration_failure(failure);
    }
    if let (Some(database), Some(lsn)) = (migrated.database, migrated.lsn) {
        // Replicas serve reads only once they have the new schema.
        if let Some(target) = app.target(&database) {
            target.cluster.set_floor(lsn);
        }
    }
    if let Some(path) = path {
        app.set_config_path(path.clone());
        if watch {
            tokio::spawn(watch_config(app.clone(), path, WATCH_INTERVAL));
        }
    }
    tokio::spawn(reload_on_hangup(app.clone()));
    tokio::spawn(crate::ops::backup::schedule(app.clone()));
    tokio::spawn(crate::ops::drill::schedule(app.clone()));
    tokio::select! {
        _ = running.wait() => return ExitCode::SUCCESS,
        _ = shutdown_signal() => {}
    }
    shut_down(&app).await;
    ExitCode::SUCCESS
}

/// Stops accepting, lets running transactions finish within
/// `shutdown_timeout` (a second signal cuts it short), closes idle servers.
async fn shut_down(app: &App) {
    let timeout = app.config().proxy.shutdown_timeout;
    let details = format!("running transactions get up to {timeout:?}");
    app.events
        .record(Level::Warn, Kind::ShutdownStarted, At::default(), details);
    tracing::info!(
        ?timeout,
        "shutting down: idle clients are told 57P01, running transactions may finish"
    );
    app.shutdown.cancel();
    app.clients.wake_resting();
    tokio::select! {
        drained = tokio::time::timeout(timeout, drain(app)) => {
            if drained.is_err() {
                tracing::warn!("shutdown_timeout passed with transactions still running; closing them");
            }
        }
        _ = shutdown_signal() => tracing::warn!("second signal: exiting at once"),
    }
    for pool in app.pools() {
        pool.close_idle().await;
    }
    tracing::info!("pgheal stopped");
}

/// Until every client connection is gone.
async fn drain(app: &App) {
    use std::sync::atomic::Ordering;
    while app.counters.client_connections.load(Ordering::Acquire) > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What startup migrations leave for the running pgheal: why they failed
/// (on_error = "serve", for /readyz and the console), what they applied
/// (for the events), and the database with the primary's WAL position once
/// they were in (the replicas' read fence).
#[derive(Default)]
struct Migrated {
    /// Why they failed (on_error = "serve").
    failure: Option<String>,
    /// What they applied.
    applied: Option<String>,
    /// The database they ran on, and the primary's LSN after them.
    database: Option<String>,
    lsn: Option<u64>,
}

/// Startup migrations: `Err` stops pgheal (on_error = "exit").
async fn startup_migrations(config: &Config) -> Result<Migrated, ExitCode> {
    let Some(m) = config.migrations.clone() else {
        return Ok(Migrated::default());
    };
    let database = crate::ops::migrate::database(config, &m).map(|d| d.name.clone());
    match crate::ops::migrate::run(config, &m, true).await {
        Ok(report) => {
            let applied = format!(
                "{} applied ({}), {} already applied",
                report.applied.len(),
                report.applied.join(", "),
                report.already
            );
            Ok(Migrated {
                applied: Some(applied),
                database,
                lsn: report.lsn,
                ..Migrated::default()
            })
        }
        Err(e) if m.serve_on_error => Ok(Migrated {
            failure: Some(e.to_string()),
            database,
            ..Migrated::default()
        }),
        Err(e) => {
            tracing::error!(error = %e, "migrations failed; not serving");
            eprintln!("migrations: {e}");
            Err(ExitCode::FAILURE)
        }
    }
}

/// SIGHUP does what the console's RELOAD does: re-reads the configuration
/// file and applies it, or refuses it whole and logs every error.
async fn reload_on_hangup(app: Arc<App>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hangup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the configuration");
        let _ = crate::admin::reload::reload(&app).await;
    }
}

/// How often `watch_config` looks at the file.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// `[proxy] watch_config`: reloads when the file's content changes, as
/// Kubernetes updates a mounted ConfigMap (an atomic symlink swap, no
/// signal). The path is read anew each time, so a swapped symlink is
/// followed. A change is applied once it has stayed the same for one
/// interval (an editor's half-written file is not taken), and a content
/// that failed is not tried again until it changes.
pub async fn watch_config(app: Arc<App>, path: PathBuf, every: Duration) {
    let mut applied = tokio::fs::read(&path).await.ok();
    let mut seen = applied.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = app.shutdown.cancelled() => return,
        }
        let Ok(now) = tokio::fs::read(&path).await else {
            continue;
        };
        let stable = seen.as_ref() == Some(&now);
        let changed = applied.as_ref() != Some(&now);
        seen = Some(now.clone());
        if stable && changed {
            tracing::info!(file = %path.display(), "configuration file changed: reloading");
            let _ = crate::admin::reload::reload(&app).await;
            applied = Some(now);
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
