//! RELOAD, SIGHUP and `watch_config`: read the configuration file again
//! and apply it without dropping clients. A file that fails validation is
//! refused whole and the running configuration stays.
//!
//! Users, TLS certificates and every other setting take effect for new
//! logins and transactions at once. A database whose section changed gets
//! a fresh target (health loops, pools): new clients use it; connected
//! clients finish on the old one. `[proxy] listen` needs a restart.

use std::fmt;
use std::sync::Arc;

use crate::config::ANY_DATABASE;
use crate::config::{Config, ConfigErrors, Database, User};
use crate::events::{At, Kind, Level};
use crate::frontend::App;

/// One thing a reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A database section that is new, or whose listed fields changed: it
    /// gets new health loops and pools.
    Database {
        name: String,
        fields: Vec<&'static str>,
    },
    DatabaseRemoved(String),
    UserAdded(String),
    UserRemoved(String),
    /// A user's password, secret, auth method or admin flag changed.
    UserChanged(String),
    /// Client TLS certificate, key and CA files were read again.
    TlsReread,
    /// A section applied to new logins and transactions.
    Section(&'static str),
    /// A key that takes effect only after a restart.
    NeedsRestart(&'static str),
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Database { name, fields } if fields.is_empty() => {
                write!(f, "databases.{name}: added")
            }
            Change::Database { name, fields } => {
                write!(
                    f,
                    "databases.{name}: applied ({} changed)",
                    fields.join(", ")
                )
            }
            Change::DatabaseRemoved(name) => write!(f, "databases.{name}: removed"),
            Change::UserAdded(name) => write!(f, "users.{name}: added"),
            Change::UserRemoved(name) => write!(f, "users.{name}: removed"),
            Change::UserChanged(name) => write!(f, "users.{name}: changed"),
            Change::TlsReread => f.write_str("tls: certificate files re-read"),
            Change::Section(s) => write!(f, "{s}: applied"),
            Change::NeedsRestart(key) => write!(f, "{key}: takes effect after a restart"),
        }
    }
}

/// Why a reload applied nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("pgheal was started without a configuration file")]
    NoFile,
    #[error("configuration not reloaded: {}", .0.0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(ConfigErrors),
}

impl App {
    /// Re-reads the configuration file (blocking: file reads) and applies
    /// it; logs what changed, or every error when the file is refused.
    pub fn reload(&self) -> Result<Vec<Change>, ReloadError> {
        let result = self.reload_quietly();
        let at = At::default();
        match &result {
            Ok(changes) => {
                let changes: Vec<String> = changes.iter().map(ToString::to_string).collect();
                let details = match changes.is_empty() {
                    true => "nothing changed".to_string(),
                    false => changes.join("; "),
                };
                self.events
                    .record(Level::Warn, Kind::ReloadApplied, at, details);
            }
            Err(e) => {
                self.events
                    .record(Level::Error, Kind::ReloadRefused, at, e.to_string());
            }
        }
        result
    }

    fn reload_quietly(&self) -> Result<Vec<Change>, ReloadError> {
        let path = self.config_path().ok_or(ReloadError::NoFile)?;
        let new = Config::load(&path)
            .map_err(ReloadError::Invalid)?
            .relative_to(Some(&path));
        let old = self.config();
        let mut changes = Vec::new();
        if new.proxy.listen != old.proxy.listen {
            changes.push(Change::NeedsRestart("proxy.listen"));
        }
        if new.proxy.http_listen != old.proxy.http_listen {
            changes.push(Change::NeedsRestart("proxy.http_listen"));
        }
        changes.extend(self.apply_databases(&old, &new));
        changes.extend(user_changes(&old.users, &new.users));
        if new.tls.is_some() {
            changes.push(Change::TlsReread);
        }
        for (name, a, b) in [
            (
                "proxy",
                format!("{:?}", old.proxy),
                format!("{:?}", new.proxy),
            ),
            ("pool", format!("{:?}", old.pool), format!("{:?}", new.pool)),
            (
                "failover",
                format!("{:?}", old.failover),
                format!("{:?}", new.failover),
            ),
        ] {
            if a != b {
                changes.push(Change::Section(name));
            }
        }
        self.set_config(new);
        Ok(changes)
    }

    /// Starts fresh targets for added and changed databases, drops removed
    /// ones; connected clients keep the target they have.
    fn apply_databases(&self, old: &Config, new: &Config) -> Vec<Change> {
        let health_changed = new.health != old.health;
        let mut changes = Vec::new();
        self.edit_targets(|targets| {
            // Served through "*": kept while "*" stays as it was.
            let any_kept = match (
                old.databases.get(ANY_DATABASE),
                new.databases.get(ANY_DATABASE),
            ) {
                (Some(a), Some(b)) => database_diff(a, b).is_empty() && !health_changed,
                _ => false,
            };
            targets.retain(|name, _| {
                if !old.databases.contains_key(name) {
                    return any_kept;
                }
                let kept = new.databases.contains_key(name);
                if !kept {
                    changes.push(Change::DatabaseRemoved(name.clone()));
                }
                kept
            });
            for (name, db) in &new.databases {
                let mut fields = targets
                    .get(name)
                    .map(|t| database_diff(&t.database, db))
                    .unwrap_or_default();
                if health_changed && targets.contains_key(name) {
                    fields.push("health");
                }
                let unchanged = targets.contains_key(name) && fields.is_empty();
                if unchanged {
                    continue;
                }
                let paused = targets.get(name).is_some_and(|t| *t.paused.borrow());
                let started = self.start_target(new, db, paused);
                if let Some(old) = targets.insert(name.clone(), started) {
                    old.retire();
                }
                // Only the limits changed: the pools stay, resized, so the
                // connections of clients that keep the old settings count
                // against the new pool_size too.
                let limits_only = !fields.is_empty()
                    && fields
                        .iter()
                        .all(|f| matches!(*f, "pool_size" | "min_idle"));
                match limits_only {
                    true => self.resize_pools(name, db.pool_size, db.min_idle),
                    false => self.forget_pools(name),
                }
                changes.push(Change::Database {
                    name: name.clone(),
                    fields,
                });
            }
        });
        changes
    }
}

/// Re-reads the configuration off the runtime's worker threads.
pub async fn reload(app: &Arc<App>) -> Result<Vec<Change>, ReloadError> {
    let app = app.clone();
    match tokio::task::spawn_blocking(move || app.reload()).await {
        Ok(result) => result,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// The fields of a database section that differ, by name.
fn database_diff(a: &Database, b: &Database) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |name, same: bool| {
        if !same {
            out.push(name);
        }
    };
    check("nodes", a.nodes == b.nodes);
    check("dbname", a.dbname == b.dbname);
    check("user", a.user == b.user);
    check("password", a.password == b.password);
    check("pool_size", a.pool_size == b.pool_size);
    check("min_idle", a.min_idle == b.min_idle);
    check("read_routing", a.read_routing == b.read_routing);
    check("max_replica_lag", a.max_replica_lag == b.max_replica_lag);
    check(
        "max_replica_lag_bytes",
        a.max_replica_lag_bytes == b.max_replica_lag_bytes,
    );
    check("tls", a.tls.mode == b.tls.mode);
    check("tls_ca", a.tls == b.tls || a.tls.mode != b.tls.mode);
    out
}

/// Users added, removed or changed. A SCRAM verifier made from a password
/// has a random salt, so passwords are compared as written.
fn user_changes(old: &[User], new: &[User]) -> Vec<Change> {
    let mut out = Vec::new();
    for u in new {
        match old.iter().find(|o| o.name == u.name) {
            None => out.push(Change::UserAdded(u.name.clone())),
            Some(o) if !same_user(o, u) => out.push(Change::UserChanged(u.name.clone())),
            Some(_) => {}
        }
    }
    for o in old.iter().filter(|o| !new.iter().any(|u| u.name == o.name)) {
        out.push(Change::UserRemoved(o.name.clone()));
    }
    out
}

fn same_user(a: &User, b: &User) -> bool {
    a.auth == b.auth
        && a.admin == b.admin
        && a.password == b.password
        && a.scram_secret == b.scram_secret
}
