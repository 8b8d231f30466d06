//! Schema migrations, applied to the primary before pgheal serves.
//!
//! Files `NNNN_name.sql` in `[migrations] dir` run in version order, each
//! in its own transaction (or outside one when its first line is
//! `-- pgheal:no-transaction`), and are recorded in
//! `pgheal_schema_migrations`. A session advisory lock makes concurrent
//! pgheal instances wait for each other; the second finds nothing to do.
//! An applied file that changed or disappeared stops everything.

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::backend::conn::{ConnectSpec, ServerConn, UpstreamError};
use crate::config::{Config, Database, MigrationsConfig};

/// `pg_advisory_lock` key: "pgheal" in ASCII.
const LOCK_KEY: i64 = 0x7067_6865_616c;
const NO_TRANSACTION: &str = "-- pgheal:no-transaction";

/// One migration file.
#[derive(Debug, Clone)]
pub struct Migration {
    pub version: i64,
    pub name: String,
    pub file: String,
    pub sql: String,
    pub checksum: String,
    pub transactional: bool,
}

/// What a run did, or found.
#[derive(Debug, Default)]
pub struct Report {
    pub applied: Vec<String>,
    pub already: usize,
    /// Status only: files not applied yet.
    pub pending: Vec<String>,
    /// The primary's WAL position once the migrations are in (applied by
    /// this instance or found applied): replicas serve reads of the new
    /// schema only past it.
    pub lsn: Option<u64>,
}

#[derive(Debug)]
pub enum MigrateError {
    Files(String),
    NoPrimary(Duration),
    Edited {
        file: String,
    },
    Missing {
        file: String,
    },
    Failed {
        file: String,
        line: Option<usize>,
        error: String,
        /// It ran in a transaction, which was rolled back; a
        /// no-transaction file keeps the statements before the failing one.
        rolled_back: bool,
    },
    Server(UpstreamError),
}

impl fmt::Display for MigrateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrateError::Files(e) => write!(f, "{e}"),
            MigrateError::NoPrimary(w) => write!(f, "no primary became reachable within {w:?}"),
            MigrateError::Edited { file } => {
                write!(f, "{file} was changed after it was applied (checksum differs); restore it or add a new migration")
            }
            MigrateError::Missing { file } => {
                write!(
                    f,
                    "{file} was applied but is missing from the migrations directory"
                )
            }
            MigrateError::Failed {
                file,
                line,
                error,
                rolled_back,
            } => {
                write!(f, "{file} failed")?;
                if let Some(l) = line {
                    write!(f, " at line {l}")?;
                }
                if *rolled_back {
                    write!(f, " and was rolled back")?;
                } else {
                    write!(
                        f,
                        " (no transaction: the statements before it stay applied)"
                    )?;
                }
                write!(f, ": {error}")
            }
            MigrateError::Server(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for MigrateError {}

impl From<UpstreamError> for MigrateError {
    fn from(e: UpstreamError) -> Self {
        MigrateError::Server(e)
    }
}

/// Reads and orders the migration files.
pub fn read_dir(dir: &Path) -> Result<Vec<Migration>, MigrateError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| MigrateError::Files(format!("cannot read {}: {e}", dir.display())))?;
    let mut out: Vec<Migration> = Vec::new();
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = file.strip_suffix(".sql") else {
            continue;
        };
        let Some((digits, name)) = stem.split_once('_') else {
            return Err(MigrateError::Files(format!(
                "{file}: expected NNNN_name.sql"
            )));
        };
        let version: i64 = digits
            .parse()
            .map_err(|_| MigrateError::Files(format!("{file}: expected NNNN_name.sql")))?;
        let sql = std::fs::read_to_string(entry.path())
            .map_err(|e| MigrateError::Files(format!("cannot read {file}: {e}")))?;
        if let Some(other) = out.iter().find(|m| m.version == version) {
            return Err(MigrateError::Files(format!(
                "{file} and {} have the same version",
                other.file
            )));
        }
        out.push(Migration {
            version,
            name: name.to_string(),
            checksum: hex(&Sha256::digest(sql.as_bytes())),
            transactional: sql.lines().next().map(str::trim) != Some(NO_TRANSACTION),
            file,
            sql,
        });
    }
    out.sort_by_key(|m| m.version);
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Which database migrations run on, per `[migrations] database`.
pub fn database<'c>(config: &'c Config, m: &MigrationsConfig) -> Option<&'c Database> {
    match &m.database {
        Some(name) => config.databases.get(name),
        None => config.named_databases().next(),
    }
}

fn spec(config: &Config, db: &Database, addr: &str) -> ConnectSpec {
    crate::backend::conn::ConnectSpec::direct(config, db, addr, "pgheal migrate")
}

/// A connection to the node that is not in recovery, waiting up to `wait`.
async fn primary(
    config: &Config,
    db: &Database,
    wait: Duration,
) -> Result<ServerConn, MigrateError> {
    let deadline = Instant::now() + wait;
    loop {
        for addr in &db.nodes {
            if let Ok(mut conn) = ServerConn::connect(&spec(config, db, addr)).await {
                let rows = conn.query_rows("SELECT pg_is_in_recovery()").await;
                if matches!(rows.as_deref(), Ok([row]) if row.first() == Some(&Some("f".to_string())))
                {
                    return Ok(conn);
                }
                conn.terminate().await;
            }
        }
        if Instant::now() >= deadline {
            return Err(MigrateError::NoPrimary(wait));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

const TABLE: &str = "CREATE TABLE IF NOT EXISTS pgheal_schema_migrations (\
    version bigint PRIMARY KEY, name text NOT NULL, checksum text NOT NULL, \
    applied_at timestamptz NOT NULL DEFAULT now(), duration_ms bigint NOT NULL)";

/// Applies what is pending (or, with `apply` false, only reports).
/// A migration file starting or done (for a terminal's progress).
#[derive(Debug, Clone, Copy)]
pub enum Progress<'a> {
    Applying(&'a str),
    Applied(&'a str, std::time::Duration),
}

pub async fn run(
    config: &Config,
    m: &MigrationsConfig,
    apply: bool,
) -> Result<Report, MigrateError> {
    run_with(config, m, apply, &|_| {}).await
}

/// [`run`], telling `progress` about each file as it is applied.
pub async fn run_with(
    config: &Config,
    m: &MigrationsConfig,
    apply: bool,
    progress: &(dyn Fn(Progress<'_>) + Sync),
) -> Result<Report, MigrateError> {
    let files = read_dir(&m.dir)?;
    let db = database(config, m)
        .ok_or_else(|| MigrateError::Files("[migrations] names no configured database".into()))?;
    let mut conn = primary(config, db, m.wait).await?;
    take_lock(&mut conn).await?;
    let result = locked(&mut conn, &files, apply, progress).await;
    let _ = conn
        .run_quietly(&format!("SELECT pg_advisory_unlock({LOCK_KEY})"))
        .await;
    conn.terminate().await;
    result
}

/// Takes the migrations lock, trying again until another instance lets it
/// go. Never by waiting inside `pg_advisory_lock`: that statement holds a
/// snapshot while it waits, which the other instance's `CREATE INDEX
/// CONCURRENTLY` must wait out in turn (a deadlock PostgreSQL breaks by
/// failing one of them).
async fn take_lock(conn: &mut ServerConn) -> Result<(), UpstreamError> {
    let mut told = false;
    loop {
        let rows = conn
            .query_rows(&format!("SELECT pg_try_advisory_lock({LOCK_KEY})"))
            .await?;
        if rows
            .first()
            .and_then(|r| r.first())
            .and_then(|v| v.as_deref())
            == Some("t")
        {
            return Ok(());
        }
        if !std::mem::replace(&mut told, true) {
            tracing::info!("another pgheal instance is migrating; waiting for it");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn locked(
    conn: &mut ServerConn,
    files: &[Migration],
    apply: bool,
    progress: &(dyn Fn(Progress<'_>) + Sync),
) -> Result<Report, MigrateError> {
    if let Some(e) = conn.run_quietly(TABLE).await? {
        return Err(e.into());
    }
    let applied = conn
        .query_rows("SELECT version, checksum, name FROM pgheal_schema_migrations ORDER BY version")
        .await?;
    let mut report = Report::default();
    for row in &applied {
        let version: i64 = row
            .first()
            .cloned()
            .flatten()
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1);
        let checksum = row.get(1).cloned().flatten().unwrap_or_default();
        match files.iter().find(|f| f.version == version) {
            None => {
                let name = row.get(2).cloned().flatten().unwrap_or_default();
                return Err(MigrateError::Missing {
                    file: format!("migration {version} ({name})"),
                });
            }
            Some(f) if f.checksum != checksum => {
                return Err(MigrateError::Edited {
                    file: f.file.clone(),
                })
            }
            Some(_) => report.already += 1,
        }
    }
    let done: Vec<i64> = files
        .iter()
        .filter(|f| {
            applied
                .iter()
                .any(|r| r.first().cloned().flatten() == Some(f.version.to_string()))
        })
        .map(|f| f.version)
        .collect();
    for f in files.iter().filter(|f| !done.contains(&f.version)) {
        if !apply {
            report.pending.push(f.file.clone());
            continue;
        }
        let started = Instant::now();
        progress(Progress::Applying(&f.file));
        apply_one(conn, f).await?;
        let took = started.elapsed();
        progress(Progress::Applied(&f.file, took));
        tracing::info!(file = %f.file, ?took, "migration applied");
        report.applied.push(f.file.clone());
    }
    let lsn = conn.query_rows("SELECT pg_current_wal_lsn()").await?;
    report.lsn = lsn
        .first()
        .and_then(|r| r.first())
        .and_then(|v| v.as_deref())
        .and_then(crate::backend::health::parse_lsn);
    Ok(report)
}

async fn apply_one(conn: &mut ServerConn, f: &Migration) -> Result<(), MigrateError> {
    let started = Instant::now();
    let failed = |e: UpstreamError| MigrateError::Failed {
        file: f.file.clone(),
        line: e.position().map(|p| line_of(&f.sql, p)),
        error: e.to_string(),
        rolled_back: f.transactional,
    };
    if f.transactional {
        conn.run_quietly("BEGIN").await?;
        if let Some(e) = conn.run_quietly(&f.sql).await? {
            conn.run_quietly("ROLLBACK").await?;
            return Err(failed(e));
        }
    } else {
        // Statement by statement: CREATE INDEX CONCURRENTLY and friends
        // refuse a multi-statement string (an implicit transaction).
        for span in pgheal_protocol::effects::statements(f.sql.as_bytes()) {
            let statement = &f.sql[span.clone()];
            if let Some(mut e) = conn.run_quietly(statement).await? {
                e.shift_position(span.start);
                return Err(failed(e));
            }
        }
    }
    let record = format!(
        "INSERT INTO pgheal_schema_migrations (version, name, checksum, duration_ms) VALUES ({}, {}, '{}', {})",
        f.version,
        crate::backend::params::quote_literal(&f.name),
        f.checksum,
        started.elapsed().as_millis()
    );
    if let Some(e) = conn.run_quietly(&record).await? {
        if f.transactional {
            conn.run_quietly("ROLLBACK").await?;
        }
        return Err(failed(e));
    }
    if f.transactional {
        if let Some(e) = conn.run_quietly("COMMIT").await? {
            return Err(failed(e));
        }
    }
    Ok(())
}

/// The 1-based line of a 1-based character position in `sql`.
fn line_of(sql: &str, position: usize) -> usize {
    sql.chars()
        .take(position.saturating_sub(1))
        .filter(|&c| c == '\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_names() {
        assert_eq!(line_of("a\nbb\nccc", 1), 1);
        assert_eq!(line_of("a\nbb\nccc", 4), 2);
        assert_eq!(line_of("a\nbb\nccc", 6), 3);
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("0002_b.sql"), "select 2").expect("write");
        std::fs::write(
            dir.path().join("0001_a.sql"),
            "-- pgheal:no-transaction\nselect 1",
        )
        .expect("write");
        std::fs::write(dir.path().join("README"), "not a migration").expect("write");
        let files = read_dir(dir.path()).expect("read");
        assert_eq!(files.iter().map(|f| f.version).collect::<Vec<_>>(), [1, 2]);
        assert!(!files[0].transactional && files[1].transactional);
        assert_eq!(files[0].checksum.len(), 64);
        std::fs::write(dir.path().join("1_dup.sql"), "x").expect("write");
        assert!(matches!(read_dir(dir.path()), Err(MigrateError::Files(_))));
        std::fs::write(dir.path().join("bad.sql"), "x").expect("write");
        assert!(read_dir(dir.path()).is_err());
    }
}
