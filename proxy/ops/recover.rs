//! What `pgheal backup restore` needs around a restore: which dump, which
//! configured database's primary, and a running pgheal's pools to the
//! database being replaced paused and closed through its admin console.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use crate::backend::conn::{ConnectSpec, ServerConn};
use crate::config::{BackupConfig, Config, Database, ADMIN_DATABASE};
use crate::ops::backup;
use crate::ops::manifest::Manifest;
use crate::ops::progress;
use crate::ops::restore::{self, Request, RestoreError};

/// The dump to restore and the configured database it belongs to: `file`,
/// or the newest dump of `latest`.
pub fn pick_dump<'c>(
    config: &'c Config,
    b: &BackupConfig,
    file: Option<&Path>,
    latest: Option<&str>,
) -> Result<(PathBuf, &'c Database), RestoreError> {
    let named = |name: &str| config.named_databases().find(|d| d.name == name);
    if let Some(name) = latest {
        let db = named(name).ok_or_else(|| RestoreError::NoDump(name.to_string()))?;
        let newest = backup::list(&b.dir, name).pop();
        let newest = newest.ok_or_else(|| RestoreError::NoDump(name.to_string()))?;
        return Ok((newest.path, db));
    }
    let file = file.ok_or_else(|| RestoreError::NoDump("(no FILE or --latest)".into()))?;
    // The manifest says whose dump it is; else the file name's prefix.
    let owner = Manifest::read(file).map(|m| m.database).or_else(|| {
        let name = file.file_name()?.to_str()?;
        config
            .named_databases()
            .filter(|d| name.starts_with(&format!("{}-", d.name)))
            .max_by_key(|d| d.name.len())
            .map(|d| d.name.clone())
    });
    let db = match owner.as_deref().and_then(named) {
        Some(db) => db,
        None => {
            let mut all = config.named_databases();
            match (all.next(), all.next()) {
                (Some(only), None) => only,
                _ => {
                    return Err(RestoreError::Unreadable {
                        file: file.display().to_string(),
                        message: "cannot tell which configured database it is a dump of \
                                  (no manifest, and its name starts with none of them)"
                            .into(),
                    })
                }
            }
        }
    };
    Ok((file.to_path_buf(), db))
}

/// pg_restore beside the configured pg_dump, else on PATH or under
/// /usr/lib/postgresql.
pub fn pg_restore(b: &BackupConfig) -> Result<PathBuf, RestoreError> {
    match &b.pg_dump {
        Some(dump) => Ok(dump.with_file_name("pg_restore")),
        None => super::find_program("pg_restore").ok_or(RestoreError::NoPgRestore),
    }
}

/// How to reach `addr` as the backup user.
pub fn server_spec(config: &Config, b: &BackupConfig, db: &Database, addr: &str) -> ConnectSpec {
    let mut spec = ConnectSpec::direct(config, db, addr, "pgheal restore");
    (spec.user, spec.password) = backup::credentials(config, b, db);
    spec
}

/// The database's current primary.
pub async fn primary(config: &Config, db: &Database) -> Result<String, RestoreError> {
    backup::classify(config, db)
        .await
        .into_iter()
        .find(|(_, replica)| !replica)
        .map(|(addr, _)| addr)
        .ok_or_else(|| RestoreError::NoPrimary(db.name.clone()))
}

/// Whether `req.database` exists on its server already.
pub async fn target_exists(req: &Request) -> Result<bool, RestoreError> {
    let mut conn = restore::maintenance(&req.server).await?;
    let found = restore::exists(&mut conn, &req.database).await;
    conn.terminate().await;
    Ok(found?)
}

/// A running pgheal's admin console, with the databases paused through it.
pub struct Console {
    conn: ServerConn,
    paused: Vec<String>,
}

impl Console {
    /// Pauses the configured databases whose server database is `dbname`
    /// on the pgheal this configuration runs (new transactions wait) and
    /// closes its connections to it. `Err` says why it could not (no
    /// admin user with a password, pgheal not running, ...).
    pub async fn pause(config: &Config, dbname: &str) -> Result<Option<Console>, String> {
        let served: Vec<String> = config
            .named_databases()
            .filter(|d| d.dbname == dbname)
            .map(|d| d.name.clone())
            .collect();
        if served.is_empty() {
            return Ok(None);
        }
        let admin = config
            .users
            .iter()
            .find(|u| u.admin && u.password.is_some());
        let admin = admin.ok_or("no [[users]] entry with admin = true and a password")?;
        let listen = config.proxy.listen;
        let host = match listen.ip() {
            ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_string(),
            ip if ip.is_unspecified() => "[::1]".to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        let spec = ConnectSpec {
            addr: format!("{host}:{}", listen.port()),
            user: admin.name.clone(),
            password: admin.password.clone(),
            database: ADMIN_DATABASE.to_string(),
            connect_timeout: config.pool.connect_timeout,
            application_name: Some("pgheal restore"),
            tls: Default::default(),
            scram_keys: None,
        };
        let conn = ServerConn::connect(&spec)
            .await
            .map_err(|e| e.to_string())?;
        let mut console = Console {
            conn,
            paused: Vec::new(),
        };
        for name in served {
            let paused = console.conn.query_rows(&format!("PAUSE {name}")).await;
            let closed = match paused {
                Ok(_) => {
                    console.paused.push(name.clone());
                    console.conn.query_rows(&format!("RECONNECT {name}")).await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = closed {
                console.resume().await;
                return Err(e.to_string());
            }
        }
        Ok(Some(console))
    }

    /// The databases it paused.
    pub fn paused(&self) -> &[String] {
        &self.paused
    }

    /// Resumes what it paused and closes.
    pub async fn resume(mut self) {
        for name in std::mem::take(&mut self.paused) {
            if let Err(e) = self.conn.query_rows(&format!("RESUME {name}")).await {
                tracing::warn!(database = %name, error = %e, "cannot resume");
            }
        }
        self.conn.terminate().await;
    }
}

/// What `pgheal backup restore` was asked.
#[derive(Debug, Clone)]
pub struct Asked {
    pub file: Option<PathBuf>,
    pub latest: Option<String>,
    pub database: String,
    pub replace: bool,
    pub yes: bool,
    pub keep_failed: bool,
}

/// `pgheal backup restore`: prints progress on a terminal and a summary.
pub async fn command(config: &Config, b: &BackupConfig, asked: &Asked) -> Result<(), RestoreError> {
    let (dump, db) = pick_dump(config, b, asked.file.as_deref(), asked.latest.as_deref())?;
    let primary = primary(config, db).await?;
    let req = Request {
        dump,
        database: asked.database.clone(),
        replace: asked.replace,
        keep_failed: asked.keep_failed,
        args: b.restore_args.clone(),
        server: server_spec(config, b, db, &primary),
        pg_restore: pg_restore(b)?,
        comment: None,
    };
    println!(
        "restoring {} into database {} on {}",
        req.dump.display(),
        req.database,
        primary
    );
    let replacing = asked.replace && target_exists(&req).await?;
    if replacing {
        confirm(&req, asked.yes)?;
    }
    let console = match replacing {
        true => pause_pgheal(config, &req.database).await,
        false => None,
    };
    let terminal = std::io::stdout().is_terminal();
    let line = progress::RestoreLine::new(terminal);
    let result = restore::restore(&req, &|n, what| line.show(n, what)).await;
    drop(line);
    if let Some(console) = console {
        console.resume().await;
    }
    let made = matches!(
        result,
        Err(RestoreError::Restore { .. } | RestoreError::Mismatch(_))
    );
    if made && asked.keep_failed {
        eprintln!("kept database {} as the restore left it", req.database);
    }
    let summary = result?;
    print_summary(&summary);
    Ok(())
}

/// Asks on a terminal for the database's name; off one, `--yes` is the
/// answer.
fn confirm(req: &Request, yes: bool) -> Result<(), RestoreError> {
    let refused = |why| RestoreError::NotConfirmed {
        database: req.database.clone(),
        why,
    };
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(refused("not on a terminal, so it needs --yes"));
    }
    print!(
        "database {} on {} will be dropped (sessions on it ended) and replaced.\n\
         type its name to go on: ",
        req.database, req.server.addr
    );
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    let _ = std::io::stdin().read_line(&mut answer);
    match answer.trim() == req.database {
        true => Ok(()),
        false => Err(refused("the name typed was not its name")),
    }
}

/// Pauses a running pgheal's databases on `dbname` and closes its
/// connections there, saying what it did or why it could not.
async fn pause_pgheal(config: &Config, dbname: &str) -> Option<Console> {
    match Console::pause(config, dbname).await {
        Ok(Some(console)) => {
            println!(
                "pgheal: paused {} and closed its connections to {dbname} until the restore ends",
                console.paused().join(", ")
            );
            Some(console)
        }
        Ok(None) => None,
        Err(why) => {
            println!(
                "pgheal's admin console not reached ({why}): \
                 its connections to {dbname} are ended by the drop"
            );
            None
        }
    }
}

fn print_summary(s: &restore::Summary) {
    for (table, recorded) in &s.tables {
        let rows = table.rows.map_or("?".into(), |n| n.to_string());
        match recorded {
            Some(want) => println!("  {}: {rows} rows ({want} when dumped)", table.qualified()),
            None => println!("  {}: {rows} rows", table.qualified()),
        }
    }
    let checked = match s.checked {
        true => "row counts match the dump's manifest",
        false => "no manifest: row counts not compared",
    };
    println!(
        "restored {} tables ({} objects) into {} on {} in {:.1} s; {checked}",
        s.tables.len(),
        s.objects,
        s.database,
        s.server,
        s.took.as_secs_f64()
    );
}
