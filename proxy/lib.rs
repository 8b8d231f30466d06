//! pgheal: a PostgreSQL wire-protocol proxy that pools server connections
//! and keeps applications working while the nodes behind it fail.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod auth;
pub mod cancel;
pub mod config;
pub mod demo;
pub mod error;
mod flow;
pub mod listener;
pub mod localpg;
pub mod login;
pub mod net;
pub mod params;
pub mod pool;
pub mod session;
pub mod upstream;

use std::sync::{Arc, Mutex, MutexGuard};

use cancel::CancelRegistry;
use config::{Config, Database};
use pool::{Pool, PoolLimits, Pools};
use upstream::ConnectSpec;

/// What every client task shares: the configuration, the pools and the
/// cancel keys.
pub struct App {
    config: Arc<Config>,
    pools: Pools,
    pub cancels: Arc<CancelRegistry>,
}

impl App {
    pub fn new(config: Config) -> Arc<App> {
        Arc::new(App {
            config: Arc::new(config),
            pools: Pools::default(),
            cancels: Arc::new(CancelRegistry::default()),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.pools.all()
    }

    /// The pool a client of `database` logged in as `user` draws from.
    pub fn pool_for(&self, database: &Database, user: &str) -> Arc<Pool> {
        let client = self.config.user(user);
        let spec = ConnectSpec {
            // Role discovery picks among the nodes in the cluster issue; for
            // now the first node serves everything.
            addr: database.nodes.first().cloned().unwrap_or_default(),
            user: database.user.clone().unwrap_or_else(|| user.to_string()),
            password: database
                .password
                .clone()
                .or_else(|| client.and_then(|u| u.password.clone())),
            database: database.dbname.clone(),
            connect_timeout: self.config.pool.connect_timeout,
        };
        let limits = PoolLimits {
            size: database.pool_size,
            min_idle: database.min_idle,
            checkout_timeout: self.config.pool.checkout_timeout,
            idle_timeout: self.config.pool.idle_timeout,
            server_lifetime: self.config.pool.server_lifetime,
        };
        self.pools.get(&database.name, &spec, &limits)
    }
}

/// Locks a mutex, carrying on if another thread panicked while holding it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
