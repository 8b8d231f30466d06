//! Restore drills (`[backup] restore_check_every`): the newest dump of each
//! database is restored into a scratch database on `restore_target`, every
//! table of its manifest is checked for its recorded row count, and the
//! scratch database is dropped. The outcome goes into the dump's manifest
//! (`SHOW BACKUPS`' restore_checked column), the metrics and the events.
//!
//! A scratch database is `pgheal_restore_check_<db>`, marked with a
//! comment; one of that name without the mark belongs to someone else and
//! is left alone (the drill takes `…_1`, `…_2`, … instead).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use postgres_protocol::escape::escape_literal;

use crate::backend::conn::{ConnectSpec, ServerConn};
use crate::config::{BackupConfig, Config, Database, RestoreCheck, RestoreTarget};
use crate::events::{At, Kind, Level};
use crate::ops::manifest::{Manifest, RestoreCheckOutcome};
use crate::ops::restore::{self, Request, RestoreError, Summary};
use crate::ops::{backup, recover};

/// The comment that marks a scratch database as a drill's own.
const MARK: &str = "pgheal restore check: scratch database, dropped after the check";

/// How a scratch database is restored: owners and grants may name roles
/// the scratch server lacks, and they are not what the drill checks.
const DRILL_ARGS: &[&str] = &["--no-owner", "--no-privileges", "--exit-on-error"];

/// One database's drill.
#[derive(Debug)]
pub struct Drill {
    pub database: String,
    pub dump: Option<PathBuf>,
    pub target: Option<String>,
    pub result: Result<Summary, RestoreError>,
}

/// Runs a drill for every configured database now.
pub async fn run_all(config: &Config, b: &BackupConfig, check: &RestoreCheck) -> Vec<Drill> {
    let mut out = Vec::new();
    for db in config.named_databases() {
        out.push(run_one(config, b, check, db).await);
    }
    out
}

async fn run_one(config: &Config, b: &BackupConfig, check: &RestoreCheck, db: &Database) -> Drill {
    let mut drill = Drill {
        database: db.name.clone(),
        dump: None,
        target: None,
        result: Err(RestoreError::NoDump(db.name.clone())),
    };
    let Some(newest) = backup::list(&b.dir, &db.name).pop() else {
        return drill;
    };
    drill.dump = Some(newest.path.clone());
    let target = match &check.target {
        RestoreTarget::Server(addr) => Ok(addr.clone()),
        RestoreTarget::Primary => recover::primary(config, db).await,
    };
    let addr = match target {
        Ok(addr) => addr,
        Err(e) => {
            drill.result = Err(e);
            return drill;
        }
    };
    drill.target = Some(addr.clone());
    let server = recover::server_spec(config, b, db, &addr);
    drill.result = restore_and_drop(b, &db.name, newest.path.clone(), server).await;
    drill
}

async fn restore_and_drop(
    b: &BackupConfig,
    database: &str,
    dump: PathBuf,
    server: ConnectSpec,
) -> Result<Summary, RestoreError> {
    let mut admin = restore::maintenance(&server).await?;
    let scratch = scratch_name(&mut admin, database).await;
    let scratch = match scratch {
        Ok(name) => name,
        Err(e) => {
            admin.terminate().await;
            return Err(e);
        }
    };
    let req = Request {
        dump,
        database: scratch.clone(),
        replace: false,
        keep_failed: false,
        args: DRILL_ARGS.iter().map(|a| a.to_string()).collect(),
        server,
        pg_restore: recover::pg_restore(b)?,
        comment: Some(MARK.to_string()),
    };
    let result = restore::restore(&req, &|_, _| {}).await;
    if result.is_ok() {
        if let Err(e) = restore::drop_database(&mut admin, &scratch).await {
            tracing::warn!(database = %scratch, error = %e, "cannot drop the scratch database");
        }
    }
    admin.terminate().await;
    let summary = result?;
    if !summary.checked {
        return Err(RestoreError::Mismatch(vec![
            "the dump has no manifest, so its rows cannot be checked".into(),
        ]));
    }
    Ok(summary)
}

/// A name for the scratch database that no one else's database has: a
/// leftover of an earlier drill (it carries the mark) is dropped and its
/// name reused.
async fn scratch_name(admin: &mut ServerConn, database: &str) -> Result<String, RestoreError> {
    let base: String = format!("pgheal_restore_check_{database}")
        .chars()
        .take(56)
        .collect();
    for n in 0..100 {
        let name = match n {
            0 => base.clone(),
            n => format!("{base}_{n}"),
        };
        let sql = format!(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = {}",
            escape_literal(&name)
        );
        let rows = admin.query_rows(&sql).await?;
        match rows.first() {
            None => return Ok(name),
            Some(row) if row.first().cloned().flatten().as_deref() == Some(MARK) => {
                restore::drop_database(admin, &name).await?;
                return Ok(name);
            }
            Some(_) => continue,
        }
    }
    Err(RestoreError::Exists(format!("{base}_*")))
}

/// Records a drill's outcome in the dump's manifest, the metrics and the
/// event timeline.
pub async fn record(app: &crate::frontend::App, drill: &Drill) {
    let ok = drill.result.is_ok();
    app.metrics.restore_check_done(&drill.database, ok);
    let at = At::database(&drill.database);
    let dump = drill
        .dump
        .as_ref()
        .map_or("-".to_string(), |d| d.display().to_string());
    match &drill.result {
        Ok(s) => {
            let details = format!(
                "{dump}: {} tables with their recorded rows, on {} in {:.1} s",
                s.tables.len(),
                s.server,
                s.took.as_secs_f64()
            );
            app.events
                .record(Level::Info, Kind::RestoreChecked, at, details);
        }
        Err(e) => {
            tracing::error!(database = %drill.database, dump = %dump, error = %e, "restore check failed");
            let details = format!("{dump}: {e}");
            app.events
                .record(Level::Error, Kind::RestoreCheckFailed, at, details);
        }
    }
    write_outcome(drill).await;
}

/// The outcome, in the manifest beside the dump.
async fn write_outcome(drill: &Drill) {
    let Some(dump) = drill.dump.clone() else {
        return;
    };
    let outcome = RestoreCheckOutcome {
        at: backup::stamp(SystemTime::now()),
        target: drill.target.clone().unwrap_or_default(),
        error: drill.result.as_ref().err().map(|e| e.to_string()),
    };
    let written = tokio::task::spawn_blocking(move || {
        let mut manifest = Manifest::read(&dump)?;
        manifest.restore_check = Some(outcome);
        manifest.write(&dump).ok()
    })
    .await;
    if !matches!(written, Ok(Some(()))) {
        tracing::warn!(database = %drill.database, "cannot record the restore check in the manifest");
    }
}

/// Runs drills on schedule until pgheal shuts down.
pub async fn schedule(app: Arc<crate::frontend::App>) {
    loop {
        let config = app.config();
        let Some(b) = config.backup.clone() else {
            return;
        };
        let Some(check) = b.restore_check.clone() else {
            return;
        };
        tokio::select! {
            _ = tokio::time::sleep(check.every) => {}
            _ = app.shutdown.cancelled() => return,
        }
        for drill in run_all(&config, &b, &check).await {
            record(&app, &drill).await;
        }
    }
}
