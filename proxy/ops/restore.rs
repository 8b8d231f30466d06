//! Restoring a dump into a new database: `pgheal backup restore` and the
//! scheduled restore drills (`ops::drill`) share this.
//!
//! The dump is read first (`pg_restore --list`), so an unreadable file
//! fails before anything is created. The database is created from
//! template0 with the dump's encoding, `pg_restore` fills it, and the rows
//! of every table are counted and compared with the manifest's counts,
//! taken under the dump's snapshot. A restore that fails (or whose counts
//! differ) drops the database it created, unless asked to keep it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use postgres_protocol::escape::{escape_identifier, escape_literal};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::backend::conn::{ConnectSpec, ServerConn, UpstreamError};
use crate::ops::manifest::{self, Manifest, TableRows};

/// Why a restore did not happen, or did not restore what was dumped.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("no primary is reachable for database {0}")]
    NoPrimary(String),
    #[error("no dump of database {0} in the backup directory")]
    NoDump(String),
    #[error("pg_restore not found (set [backup] pg_dump, or install the PostgreSQL client)")]
    NoPgRestore,
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file} is not a readable dump: {message}")]
    Unreadable { file: String, message: String },
    #[error(
        "user {user} cannot create databases (it needs CREATEDB: ALTER ROLE {user} CREATEDB, \
         or set [backup] user to one that may)"
    )]
    NoCreateDb { user: String },
    #[error("database {0} already exists (pass --replace to drop and replace it)")]
    Exists(String),
    #[error("database {database} not replaced: {why}")]
    NotConfirmed { database: String, why: &'static str },
    #[error("restoring {object}: {message}")]
    Restore { object: String, message: String },
    #[error("the restored rows differ from the dump's manifest: {}", .0.join("; "))]
    Mismatch(Vec<String>),
    #[error(transparent)]
    Server(#[from] UpstreamError),
}

/// Where to restore and how.
pub struct Request {
    pub dump: PathBuf,
    /// The database to create.
    pub database: String,
    /// Drop an existing `database` first (the caller has asked).
    pub replace: bool,
    /// Keep the database when the restore fails, to look at it.
    pub keep_failed: bool,
    /// pg_restore options besides the connection ones.
    pub args: Vec<String>,
    /// The server, user and password to restore with; its `database` is
    /// ignored (the maintenance database `postgres`, else `template1`, is
    /// used to create and drop).
    pub server: ConnectSpec,
    pub pg_restore: PathBuf,
    /// Set on the new database (`COMMENT ON DATABASE`), if any.
    pub comment: Option<String>,
}

/// What a restore did.
#[derive(Debug)]
pub struct Summary {
    pub database: String,
    pub server: String,
    /// Each table as restored, with the count the manifest recorded
    /// (`None` without a manifest).
    pub tables: Vec<(TableRows, Option<u64>)>,
    /// Whether the dump had a manifest to compare with.
    pub checked: bool,
    pub objects: usize,
    pub took: Duration,
}

/// Called with each object pg_restore starts on and the count so far.
pub type Progress<'a> = &'a (dyn Fn(usize, &str) + Sync);

/// Restores `req.dump` into the new database `req.database`.
pub async fn restore(req: &Request, progress: Progress<'_>) -> Result<Summary, RestoreError> {
    let started = Instant::now();
    let (entries, listed_encoding) = list(&req.pg_restore, &req.dump).await?;
    let dump = req.dump.clone();
    let manifest = tokio::task::spawn_blocking(move || Manifest::read(&dump))
        .await
        .ok()
        .flatten();
    let encoding = manifest
        .as_ref()
        .map(|m| m.encoding.clone())
        .or(listed_encoding);
    let mut admin = maintenance(&req.server).await?;
    let created = create(&mut admin, req, encoding.as_deref()).await;
    if let Err(e) = created {
        admin.terminate().await;
        return Err(e);
    }
    let result = fill_and_check(req, manifest.as_ref(), progress).await;
    if result.is_err() && !req.keep_failed {
        let _ = drop_database(&mut admin, &req.database).await;
    }
    admin.terminate().await;
    let (objects, tables) = result?;
    tracing::debug!(entries, objects, "restore done");
    Ok(Summary {
        database: req.database.clone(),
        server: req.server.addr.clone(),
        checked: manifest.is_some(),
        tables,
        objects,
        took: started.elapsed(),
    })
}

type Restored = (usize, Vec<(TableRows, Option<u64>)>);

async fn fill_and_check(
    req: &Request,
    manifest: Option<&Manifest>,
    progress: Progress<'_>,
) -> Result<Restored, RestoreError> {
    let objects = run_pg_restore(req, progress).await?;
    let mut spec = req.server.clone();
    spec.database = req.database.clone();
    let mut conn = ServerConn::connect(&spec).await?;
    let counted = manifest::count_rows(&mut conn).await;
    conn.terminate().await;
    let restored = counted?;
    let Some(manifest) = manifest else {
        return Ok((objects, restored.into_iter().map(|t| (t, None)).collect()));
    };
    let differences = manifest::differences(manifest, &restored);
    if !differences.is_empty() {
        return Err(RestoreError::Mismatch(differences));
    }
    let recorded = manifest.counts();
    let tables = restored
        .into_iter()
        .map(|t| {
            let want = recorded.get(&t.qualified()).copied().flatten();
            (t, want)
        })
        .collect();
    Ok((objects, tables))
}

/// `pg_restore --list`: how many entries the dump has and, when the list
/// names it, its encoding. Fails on a file pg_restore cannot read.
pub(crate) async fn list(
    pg_restore: &Path,
    dump: &Path,
) -> Result<(usize, Option<String>), RestoreError> {
    let out = tokio::process::Command::new(pg_restore)
        .arg("--list")
        .arg(dump)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| RestoreError::Spawn {
            program: pg_restore.to_path_buf(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.trim().is_empty() {
        return Err(RestoreError::Unreadable {
            file: dump.display().to_string(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let entries = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .count();
    let encoding = text
        .lines()
        .find_map(|l| l.trim_start_matches(';').trim().strip_prefix("Encoding:"))
        .map(|e| e.trim().to_string());
    Ok((entries, encoding))
}

/// A connection to the server's maintenance database.
pub(crate) async fn maintenance(server: &ConnectSpec) -> Result<ServerConn, RestoreError> {
    let mut spec = server.clone();
    spec.database = "postgres".into();
    match ServerConn::connect(&spec).await {
        Ok(conn) => Ok(conn),
        Err(UpstreamError::Server { code, .. }) if code == "3D000" => {
            spec.database = "template1".into();
            Ok(ServerConn::connect(&spec).await?)
        }
        Err(e) => Err(e.into()),
    }
}

async fn one(conn: &mut ServerConn, sql: &str) -> Result<Option<String>, UpstreamError> {
    let rows = conn.query_rows(sql).await?;
    Ok(rows
        .into_iter()
        .next()
        .and_then(|r| r.into_iter().next().flatten()))
}

/// Checks the user may, drops the old database when replacing, creates it.
async fn create(
    admin: &mut ServerConn,
    req: &Request,
    encoding: Option<&str>,
) -> Result<(), RestoreError> {
    let may = one(
        admin,
        "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user",
    )
    .await?;
    if may.as_deref() != Some("t") {
        return Err(RestoreError::NoCreateDb {
            user: req.server.user.clone(),
        });
    }
    if exists(admin, &req.database).await? {
        if !req.replace {
            return Err(RestoreError::Exists(req.database.clone()));
        }
        drop_database(admin, &req.database).await?;
    }
    let mut sql = format!(
        "CREATE DATABASE {} TEMPLATE template0",
        escape_identifier(&req.database)
    );
    if let Some(encoding) = encoding {
        sql.push_str(&format!(" ENCODING {}", escape_literal(encoding)));
    }
    admin.query_rows(&sql).await?;
    if let Some(comment) = &req.comment {
        let sql = format!(
            "COMMENT ON DATABASE {} IS {}",
            escape_identifier(&req.database),
            escape_literal(comment)
        );
        admin.query_rows(&sql).await?;
    }
    Ok(())
}

/// Whether a database of that name exists.
pub(crate) async fn exists(conn: &mut ServerConn, name: &str) -> Result<bool, UpstreamError> {
    let sql = format!(
        "SELECT count(*) FROM pg_database WHERE datname = {}",
        escape_literal(name)
    );
    Ok(one(conn, &sql).await?.as_deref() == Some("1"))
}

/// `DROP DATABASE … WITH (FORCE)`: sessions still on it are ended.
pub(crate) async fn drop_database(conn: &mut ServerConn, name: &str) -> Result<(), UpstreamError> {
    let sql = format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        escape_identifier(name)
    );
    conn.query_rows(&sql).await.map(drop)
}

/// Runs pg_restore, reporting each object it starts on; on failure, the
/// object it failed on and the server's message.
async fn run_pg_restore(req: &Request, progress: Progress<'_>) -> Result<usize, RestoreError> {
    let s = &req.server;
    let (host, port) = s.addr.rsplit_once(':').unwrap_or((&s.addr, "5432"));
    let mut child = tokio::process::Command::new(&req.pg_restore)
        .args(["--verbose", "--no-password", "-h", host, "-p", port])
        .args(["-U", &s.user, "-d", &req.database])
        .args(&req.args)
        .arg(&req.dump)
        .env("PGPASSWORD", s.password.clone().unwrap_or_default())
        .env("PGAPPNAME", "pgheal restore")
        .envs(s.tls.libpq_env())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| RestoreError::Spawn {
            program: req.pg_restore.clone(),
            source,
        })?;
    let mut log = RestoreLog::default();
    if let Some(stderr) = child.stderr.take() {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            log.read(&line, progress);
        }
    }
    let status = child.wait().await.map_err(|source| RestoreError::Spawn {
        program: req.pg_restore.clone(),
        source,
    })?;
    match (status.success(), log.failure()) {
        (true, None) => Ok(log.objects),
        (_, Some(e)) => Err(e),
        (false, None) => Err(RestoreError::Restore {
            object: req.dump.display().to_string(),
            message: format!("pg_restore exited with {status}"),
        }),
    }
}

/// What pg_restore --verbose said: objects started, and the first error
/// with the TOC entry it belongs to.
#[derive(Default)]
struct RestoreLog {
    objects: usize,
    /// The object last started, for an error that names no TOC entry.
    current: Option<String>,
    entry: Option<String>,
    error: Option<(String, String)>,
    ignored: Option<String>,
}

impl RestoreLog {
    fn read(&mut self, line: &str, progress: Progress<'_>) {
        let Some(said) = line.strip_prefix("pg_restore: ") else {
            return;
        };
        if let Some(object) = said
            .strip_prefix("creating ")
            .or_else(|| said.strip_prefix("processing data for table "))
        {
            self.objects += 1;
            self.current = Some(object.to_string());
            progress(self.objects, object);
        } else if let Some(entry) = said.strip_prefix("from TOC entry ") {
            self.entry = Some(entry.to_string());
        } else if let Some(message) = said.strip_prefix("error: ") {
            if self.error.is_none() {
                let object = match (self.entry.take(), &self.current) {
                    (Some(entry), _) => format!("TOC entry {entry}"),
                    (None, Some(current)) => current.clone(),
                    (None, None) => "the dump".into(),
                };
                self.error = Some((object, message.to_string()));
            }
        } else if said.starts_with("warning: errors ignored on restore") {
            self.ignored = Some(said.trim_start_matches("warning: ").to_string());
        }
    }

    fn failure(&self) -> Option<RestoreError> {
        let (object, mut message) = self.error.clone()?;
        if let Some(ignored) = &self.ignored {
            message = format!("{message} ({ignored})");
        }
        Some(RestoreError::Restore { object, message })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_names_the_failed_object_and_counts_the_others() {
        let seen = std::sync::Mutex::new(Vec::new());
        let progress = |n: usize, what: &str| {
            seen.lock()
                .expect("progress log")
                .push((n, what.to_string()))
        };
        let mut log = RestoreLog::default();
        for line in [
            "pg_restore: connecting to database for restore",
            "pg_restore: creating TABLE \"public.kept\"",
            "pg_restore: processing data for table \"public.kept\"",
            "pg_restore: from TOC entry 215; 1259 16385 TABLE other app",
            "pg_restore: error: could not execute query: ERROR:  permission denied",
            "Command was: CREATE TABLE public.other ();",
            "pg_restore: error: a later one",
        ] {
            log.read(line, &progress);
        }
        assert_eq!(log.objects, 2);
        assert_eq!(seen.lock().expect("progress log")[1].1, "\"public.kept\"");
        let e = log.failure().expect("failed").to_string();
        assert_eq!(
            e,
            "restoring TOC entry 215; 1259 16385 TABLE other app: \
             could not execute query: ERROR:  permission denied"
        );
        assert!(RestoreLog::default().failure().is_none());
        // Data cut short: no TOC entry is named, the object being read is.
        let mut log = RestoreLog::default();
        for line in [
            "pg_restore: processing data for table \"public.kept\"",
            "pg_restore: error: could not read from input file: end of file",
        ] {
            log.read(line, &progress);
        }
        assert_eq!(
            log.failure().expect("failed").to_string(),
            "restoring \"public.kept\": could not read from input file: end of file"
        );
    }
}
