//! RELOAD and SIGHUP: read the configuration file again and apply it
//! without dropping clients. A file that fails validation is refused whole
//! and the running configuration stays.
//!
//! Users, TLS certificates and every other setting take effect for new
//! logins and transactions at once. A database whose section changed gets
//! a fresh target (health loops, pools): new clients use it; connected
//! clients finish on the old one. `[proxy] listen` needs a restart.

use std::sync::{Arc, PoisonError};

use crate::config::{Config, Database};
use crate::{lock, App, Target};

impl App {
    /// Re-reads the configuration file. `Ok` lists what changed; `Err`
    /// lists every problem found (nothing was applied).
    pub fn reload(&self) -> Result<Vec<String>, Vec<String>> {
        let path = lock(&self.config_path)
            .clone()
            .ok_or_else(|| vec!["pgheal was started without a configuration file".to_string()])?;
        let new = Config::load(&path)
            .map_err(|errors| errors.0.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        let old = self.config();
        let mut changes = Vec::new();
        if new.proxy.listen != old.proxy.listen {
            changes.push("proxy.listen: takes effect after a restart".to_string());
        }
        let health_changed = format!("{:?}", new.health) != format!("{:?}", old.health)
            || new.health.password != old.health.password;
        {
            let mut targets = self.targets.write().unwrap_or_else(PoisonError::into_inner);
            targets.retain(|name, _| {
                let kept = new.databases.contains_key(name);
                if !kept {
                    changes.push(format!("databases.{name}: removed"));
                }
                kept
            });
            for (name, db) in &new.databases {
                let unchanged = targets
                    .get(name)
                    .is_some_and(|t| !health_changed && same_database(&t.database, db));
                if unchanged {
                    continue;
                }
                let paused = targets.get(name).is_some_and(|t| *t.paused.borrow());
                targets.insert(name.clone(), Target::start(&new, db, paused));
                self.pools.forget(name);
                changes.push(format!("databases.{name}: applied"));
            }
        }
        if format!("{:?}", new.users) != format!("{:?}", old.users) {
            changes.push("users: applied".to_string());
        }
        if new.tls.is_some() {
            changes.push("tls: certificate files re-read".to_string());
        }
        *self.config.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(new);
        tracing::warn!(?changes, "configuration reloaded");
        Ok(changes)
    }
}

/// True when nothing that a database's pools or health loops depend on
/// differs.
fn same_database(a: &Database, b: &Database) -> bool {
    a.nodes == b.nodes
        && a.dbname == b.dbname
        && a.user == b.user
        && a.password == b.password
        && a.pool_size == b.pool_size
        && a.min_idle == b.min_idle
        && a.read_routing == b.read_routing
        && a.max_replica_lag == b.max_replica_lag
        && a.tls.mode == b.tls.mode
}
