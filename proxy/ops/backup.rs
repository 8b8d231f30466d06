//! Scheduled backups: `pg_dump --format=custom` of each configured database
//! into `[backup] dir`, preferably from a replica, verified with
//! `pg_restore --list`, then old ones removed by `keep_last` / `keep_days`.
//!
//! A dump is written to a temporary file, fsynced, renamed to
//! `NAME-YYYYMMDDTHHMMSSZ.dump` and verified; one that fails or cannot be
//! verified is deleted and reported, never counted as a backup. Instances
//! sharing a cluster take turns through an advisory lock on the primary
//! (or, with no primary, a lock file in `dir`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::backend::conn::{ConnectSpec, ServerConn, UpstreamError};
use crate::config::{BackupConfig, Config, Database, Schedule};
use crate::events::{At, Events, Kind, Level};
use crate::ops::manifest::{self, Manifest, RestoreCheckOutcome};

/// Why a backup was not taken.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("no node is reachable")]
    NoNode,
    #[error("another instance is taking this backup")]
    Busy,
    #[error("pg_dump not found (set [backup] pg_dump, or install the PostgreSQL client)")]
    NoPgDump,
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pg_dump failed: {0}")]
    Dump(String),
    #[error("the dump does not verify (pg_restore --list): {0}")]
    Verify(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Server(#[from] UpstreamError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackupError {
    let what = what.into();
    move |source| BackupError::Io { what, source }
}

/// Runs blocking file-system work off the runtime's worker threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, BackupError> + Send + 'static,
) -> Result<T, BackupError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

const LOCK_KEY: i64 = 0x0070_6768_6561_6c62;

/// One backup file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    pub database: String,
    pub path: PathBuf,
    pub taken_at: String,
    pub size: u64,
    /// The last restore drill of this dump, from its manifest.
    pub restore_check: Option<RestoreCheckOutcome>,
}

/// What one database's run produced.
#[derive(Debug)]
pub struct Outcome {
    pub database: String,
    pub result: Result<Backup, BackupError>,
    pub source: Option<String>,
    pub removed: Vec<PathBuf>,
}

/// Runs a backup of every configured database now.
pub async fn run_all(config: &Config, b: &BackupConfig) -> Vec<Outcome> {
    let mut out = Vec::new();
    for db in config.named_databases() {
        out.push(run_one(config, b, db).await);
    }
    out
}

async fn run_one(config: &Config, b: &BackupConfig, db: &Database) -> Outcome {
    let mut outcome = Outcome {
        database: db.name.clone(),
        result: Err(BackupError::NoNode),
        source: None,
        removed: Vec::new(),
    };
    let nodes = classify(config, db).await;
    let primary = nodes
        .iter()
        .find(|(_, replica)| !replica)
        .map(|(a, _)| a.clone());
    let replica = nodes
        .iter()
        .find(|(_, replica)| *replica)
        .map(|(a, _)| a.clone());
    let source = match b.from_replica {
        true => replica.or_else(|| primary.clone()),
        false => primary.clone().or(replica),
    };
    let Some(source) = source else {
        return outcome;
    };
    // Take turns with other instances.
    let _guard = match Guard::take(config, db, primary.as_deref(), &b.dir).await {
        Ok(Some(g)) => g,
        Ok(None) => {
            outcome.result = Err(BackupError::Busy);
            return outcome;
        }
        Err(e) => {
            outcome.result = Err(e);
            return outcome;
        }
    };
    outcome.source = Some(source.clone());
    outcome.result = dump(config, b, db, &source).await;
    if outcome.result.is_ok() {
        let (b, name) = (b.clone(), db.name.clone());
        outcome.removed = blocking(move || Ok(retain(&b, &name)))
            .await
            .unwrap_or_default();
    }
    outcome
}

/// Each reachable node and whether it is in recovery.
pub(crate) async fn classify(config: &Config, db: &Database) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for addr in &db.nodes {
        if let Ok(mut conn) = ServerConn::connect(&spec(config, db, addr)).await {
            if let Ok(rows) = conn.query_rows("SELECT pg_is_in_recovery()").await {
                let replica =
                    rows.first().and_then(|r| r.first()).cloned().flatten() == Some("t".into());
                out.push((addr.clone(), replica));
            }
            conn.terminate().await;
        }
    }
    out
}

fn spec(config: &Config, db: &Database, addr: &str) -> ConnectSpec {
    let mut spec = ConnectSpec::direct(config, db, addr, "pgheal backup");
    if let Some(b) = &config.backup {
        (spec.user, spec.password) = credentials(config, b, db);
    }
    spec
}

/// Who dumps and restores: `[backup] user`/`password`, else the
/// database's own user. A `[backup] user` without a password takes the
/// password of the `[[users]]` entry of that name, if any.
pub fn credentials(config: &Config, b: &BackupConfig, db: &Database) -> (String, Option<String>) {
    let Some(user) = b.user.clone() else {
        return crate::backend::conn::direct_credentials(config, db);
    };
    let password = b
        .password
        .clone()
        .or_else(|| config.user(&user).and_then(|u| u.password.clone()));
    (user, password)
}

/// Held while a backup runs: an advisory lock on the primary, else a lock
/// file in the backup directory.
enum Guard {
    // Held for their Drop: closing releases the lock.
    #[allow(dead_code)]
    Primary(ServerConn),
    #[allow(dead_code)]
    File(nix::fcntl::Flock<File>),
}

impl Guard {
    async fn take(
        config: &Config,
        db: &Database,
        primary: Option<&str>,
        dir: &Path,
    ) -> Result<Option<Guard>, BackupError> {
        if let Some(addr) = primary {
            let mut conn = ServerConn::connect(&spec(config, db, addr)).await?;
            let rows = conn
                .query_rows(&format!("SELECT pg_try_advisory_lock({LOCK_KEY})"))
                .await?;
            let got = rows.first().and_then(|r| r.first()).cloned().flatten() == Some("t".into());
            return Ok(got.then_some(Guard::Primary(conn)));
        }
        let (dir, name) = (dir.to_path_buf(), db.name.clone());
        blocking(move || {
            std::fs::create_dir_all(&dir)
                .map_err(io(format!("cannot create {}", dir.display())))?;
            let file = File::create(dir.join(format!(".pgheal-backup-{name}.lock")))
                .map_err(io("cannot create the lock file"))?;
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(locked) => Ok(Some(Guard::File(locked))),
                Err(_) => Ok(None),
            }
        })
        .await
    }
}

/// UTC `YYYYMMDDTHHMMSSZ` for a time.
pub fn stamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil(days as i64);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rest / 3600,
        (rest % 3600) / 60,
        rest % 60
    )
}

/// Days since 1970-01-01 to a (year, month, day) date.
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

async fn dump(
    config: &Config,
    b: &BackupConfig,
    db: &Database,
    source: &str,
) -> Result<Backup, BackupError> {
    let (dir, name) = (b.dir.clone(), db.name.clone());
    blocking(move || {
        std::fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
        remove_stale(&dir, &name);
        Ok(())
    })
    .await?;
    let taken_at = stamp(SystemTime::now());
    let tmp = b.dir.join(format!(".{}-{taken_at}.dump.tmp", db.name));
    let done = b.dir.join(format!("{}-{taken_at}.dump", db.name));
    let result = dump_to(config, b, db, source, &taken_at, &tmp, &done).await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
        let _ = tokio::fs::remove_file(&done).await;
        let _ = tokio::fs::remove_file(manifest::path_of(&done)).await;
    }
    let size = result?;
    Ok(Backup {
        database: db.name.clone(),
        path: done,
        taken_at,
        size,
        restore_check: None,
    })
}

/// Temporary files of runs that never finished (pgheal killed mid-dump):
/// this run holds the lock, so nobody else is writing them.
fn remove_stale(dir: &Path, database: &str) {
    let prefix = format!(".{database}-");
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let unfinished = name.ends_with(".dump.tmp") || name.ends_with(".dump.json.tmp");
        if name.starts_with(&prefix) && unfinished {
            tracing::warn!(file = %name, "removing an unfinished backup");
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// pg_dump as configured, else found on PATH or under /usr/lib/postgresql.
fn pg_dump(b: &BackupConfig) -> Result<PathBuf, BackupError> {
    b.pg_dump
        .clone()
        .or_else(|| super::find_program("pg_dump"))
        .ok_or(BackupError::NoPgDump)
}

async fn dump_to(
    config: &Config,
    b: &BackupConfig,
    db: &Database,
    source: &str,
    taken_at: &str,
    tmp: &Path,
    done: &Path,
) -> Result<u64, BackupError> {
    let program = pg_dump(b)?;
    // The rows are counted under the snapshot pg_dump dumps, exported by a
    // transaction that stays open until pg_dump is done.
    let mut snapshot = ServerConn::connect(&spec(config, db, source)).await?;
    let exported = snapshot
        .query_rows("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SELECT pg_export_snapshot()")
        .await?;
    let id = exported.first().and_then(|r| r.first()).cloned().flatten();
    let id = id.ok_or_else(|| BackupError::Dump("no snapshot was exported".into()))?;
    let (dumped, counted) = tokio::join!(
        run_pg_dump(config, b, db, source, &program, &id, tmp),
        manifest::count_rows(&mut snapshot)
    );
    let facts = describe(&mut snapshot).await;
    snapshot.terminate().await;
    dumped?;
    let tables = counted?;
    let (server_version, encoding) = facts?;
    verify(&program.with_file_name("pg_restore"), tmp).await?;
    let manifest = Manifest {
        database: db.name.clone(),
        dbname: db.dbname.clone(),
        taken_at: taken_at.to_string(),
        source: source.to_string(),
        server_version,
        encoding,
        tables,
        restore_check: None,
    };
    // The manifest first: a dump under its final name always has one.
    let (tmp_path, done_path, dir) = (tmp.to_path_buf(), done.to_path_buf(), b.dir.clone());
    let written = manifest.clone();
    blocking(move || {
        File::open(&tmp_path)
            .and_then(|f| f.sync_all())
            .map_err(io("fsync"))?;
        written
            .write(&done_path)
            .map_err(io("cannot write the manifest"))?;
        std::fs::rename(&tmp_path, &done_path).map_err(io("rename"))?;
        if let Ok(dir) = File::open(&dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    })
    .await?;
    let size = tokio::fs::metadata(done).await.map_err(io("stat"))?.len();
    Ok(size)
}

/// The server's version and the database's encoding.
async fn describe(conn: &mut ServerConn) -> Result<(String, String), BackupError> {
    let rows = conn
        .query_rows(
            "SELECT current_setting('server_version'), pg_encoding_to_char(encoding) \
               FROM pg_database WHERE datname = current_database()",
        )
        .await?;
    match rows.first().map(Vec::as_slice) {
        Some([Some(version), Some(encoding)]) => Ok((version.clone(), encoding.clone())),
        _ => Err(BackupError::Dump(
            "cannot read the database's encoding".into(),
        )),
    }
}

async fn run_pg_dump(
    config: &Config,
    b: &BackupConfig,
    db: &Database,
    source: &str,
    program: &Path,
    snapshot: &str,
    tmp: &Path,
) -> Result<(), BackupError> {
    let (host, port) = source.rsplit_once(':').unwrap_or((source, "5432"));
    let (user, password) = credentials(config, b, db);
    let out = tokio::process::Command::new(program)
        .args(["--format=custom", "--no-password", "-h", host, "-p", port])
        .args(["-U", &user, "-d", &db.dbname])
        .arg(format!("--snapshot={snapshot}"))
        .arg("-f")
        .arg(tmp)
        .env("PGPASSWORD", password.unwrap_or_default())
        .env("PGAPPNAME", "pgheal backup")
        .envs(db.tls.libpq_env())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| BackupError::Spawn {
            program: program.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(BackupError::Dump(stderr));
    }
    Ok(())
}

/// `pg_restore --list`: the file is a readable custom-format dump.
async fn verify(pg_restore: &Path, dump: &Path) -> Result<(), BackupError> {
    use crate::ops::restore::RestoreError;
    match crate::ops::restore::list(pg_restore, dump).await {
        Ok(_) => Ok(()),
        Err(RestoreError::Spawn { program, source }) => Err(BackupError::Spawn { program, source }),
        Err(RestoreError::Unreadable { message, .. }) => Err(BackupError::Verify(message)),
        Err(other) => Err(BackupError::Verify(other.to_string())),
    }
}

/// The database's backups in `dir`, oldest first.
pub fn list(dir: &Path, database: &str) -> Vec<Backup> {
    let prefix = format!("{database}-");
    let mut out: Vec<Backup> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let taken_at = name
                .strip_prefix(&prefix)?
                .strip_suffix(".dump")?
                .to_string();
            let well_formed =
                taken_at.len() == 16 && taken_at.as_bytes()[8] == b'T' && taken_at.ends_with('Z');
            well_formed.then(|| Backup {
                database: database.to_string(),
                size: e.metadata().map_or(0, |m| m.len()),
                restore_check: Manifest::read(&e.path()).and_then(|m| m.restore_check),
                path: e.path(),
                taken_at,
            })
        })
        .collect();
    out.sort_by(|a, b| a.taken_at.cmp(&b.taken_at));
    out
}

/// The last restore drill of a backup, as `SHOW BACKUPS` and `pgheal
/// backup list` show it: "-" when none ran.
pub fn restore_checked(backup: &Backup) -> String {
    match &backup.restore_check {
        None => "-".to_string(),
        Some(c) => match &c.error {
            None => format!("ok at {} on {}", c.at, c.target),
            Some(e) => format!("failed at {} on {}: {e}", c.at, c.target),
        },
    }
}

/// Removes the oldest beyond `keep_last` and those older than `keep_days`,
/// never the newest.
fn retain(b: &BackupConfig, database: &str) -> Vec<PathBuf> {
    let all = list(&b.dir, database);
    let cutoff = (b.keep_days > 0)
        .then(|| stamp(SystemTime::now() - Duration::from_secs(86_400 * u64::from(b.keep_days))));
    let keep_from = all.len().saturating_sub(b.keep_last.max(1));
    let mut removed = Vec::new();
    for (i, backup) in all.iter().enumerate() {
        let newest = i + 1 == all.len();
        let too_many = i < keep_from;
        let too_old = cutoff.as_ref().is_some_and(|c| backup.taken_at < *c);
        if !newest && (too_many || too_old) && std::fs::remove_file(&backup.path).is_ok() {
            let _ = std::fs::remove_file(manifest::path_of(&backup.path));
            removed.push(backup.path.clone());
        }
    }
    removed
}

/// How long until the next scheduled run.
pub fn until_next(schedule: &Schedule, now: SystemTime) -> Duration {
    match schedule {
        Schedule::Every(d) => *d,
        Schedule::DailyAt { hour, minute } => {
            let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let target = u64::from(*hour) * 3600 + u64::from(*minute) * 60;
            let today = secs % 86_400;
            let wait = if target > today {
                target - today
            } else {
                86_400 - today + target
            };
            Duration::from_secs(wait)
        }
    }
}

/// The backups of every configured database, off the worker threads.
pub async fn list_all(config: &Config, dir: &Path) -> Vec<Backup> {
    let (dir, names): (PathBuf, Vec<String>) = (
        dir.to_path_buf(),
        config.named_databases().map(|d| d.name.clone()).collect(),
    );
    blocking(move || Ok(names.iter().flat_map(|n| list(&dir, n)).collect()))
        .await
        .unwrap_or_default()
}

/// Runs backups on schedule until pgheal shuts down.
pub async fn schedule(app: std::sync::Arc<crate::frontend::App>) {
    loop {
        let config = app.config();
        let Some(b) = config.backup.clone() else {
            return;
        };
        let wait = until_next(&b.schedule, SystemTime::now());
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = app.shutdown.cancelled() => return,
        }
        for o in run_all(&config, &b).await {
            let size = o.result.as_ref().ok().map(|b| b.size);
            app.metrics.backup_done(&o.database, size);
            record_events(&app.events, &o);
        }
    }
}

/// A scheduled backup's outcome, in the event timeline (and the log).
fn record_events(events: &Events, o: &Outcome) {
    let at = At::database(&o.database);
    match &o.result {
        Ok(done) => {
            let details = format!(
                "{} ({} bytes, from {:?})",
                done.path.display(),
                done.size,
                o.source
            );
            events.record(Level::Info, Kind::BackupTaken, at, details);
        }
        Err(e) => events.record(Level::Error, Kind::BackupFailed, at, e.to_string()),
    }
    for path in &o.removed {
        let details = format!("{} (retention)", path.display());
        events.record(Level::Info, Kind::BackupPruned, at, details);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_and_schedules() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        assert_eq!(stamp(t), "20261118T110640Z");
        assert_eq!(stamp(UNIX_EPOCH), "19700101T000000Z");
        assert_eq!(
            stamp(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "20000229T000000Z"
        );
        let at = Schedule::DailyAt {
            hour: 1,
            minute: 30,
        };
        assert_eq!(until_next(&at, UNIX_EPOCH), Duration::from_secs(5400));
        assert_eq!(
            until_next(&at, UNIX_EPOCH + Duration::from_secs(5400)),
            Duration::from_secs(86_400)
        );
        assert_eq!(
            until_next(&Schedule::Every(Duration::from_secs(7)), UNIX_EPOCH),
            Duration::from_secs(7)
        );
    }

    #[test]
    fn unfinished_files_of_the_database_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().expect("dir");
        let names = [
            ".app-20261201T000000Z.dump.tmp",
            ".app-20261201T000000Z.dump.json.tmp",
            "app-20261130T000000Z.dump",
            "app-20261130T000000Z.dump.json",
            ".other-20261201T000000Z.dump.tmp",
        ];
        for name in names {
            std::fs::write(dir.path().join(name), b"x").expect("write");
        }
        remove_stale(dir.path(), "app");
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .expect("list")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".other-20261201T000000Z.dump.tmp",
                "app-20261130T000000Z.dump",
                "app-20261130T000000Z.dump.json",
            ]
        );
    }
}
