//! pgheal: a PostgreSQL wire-protocol proxy that pools server connections
//! and keeps applications working while the nodes behind it fail.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod admin;
pub mod auth;
pub mod backup;
pub mod cancel;
pub mod clients;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod error;
mod flow;
pub mod http;
pub mod listener;
pub mod localpg;
pub mod login;
pub mod metrics;
pub mod migrate;
pub mod net;
pub mod params;
pub mod pool;
pub mod prepared;
pub mod reload;
pub mod router;
pub mod session;
pub mod stream;
pub mod tls;
pub mod upstream;

use std::sync::{Arc, Mutex, MutexGuard};

use std::collections::HashMap;

use cancel::CancelRegistry;
use cluster::Cluster;
use config::{Config, Database};
use pool::{Pool, PoolLimits, Pools};
use upstream::ConnectSpec;

/// What every client task shares: the configuration, the pools, the
/// cancel keys and each database's cluster.
pub struct App {
    config: std::sync::RwLock<Arc<Config>>,
    /// The file the configuration came from, for RELOAD and SIGHUP.
    config_path: Mutex<Option<std::path::PathBuf>>,
    pools: Pools,
    pub cancels: Arc<CancelRegistry>,
    targets: std::sync::RwLock<HashMap<String, Arc<Target>>>,
    pub counters: Counters,
    /// Cancelled on SIGTERM/SIGINT: no new clients or transactions; idle
    /// clients are told 57P01, running transactions finish.
    pub shutdown: tokio_util::sync::CancellationToken,
    pub metrics: metrics::Metrics,
    pub clients: Arc<clients::Clients>,
    /// Startup migrations failed and on_error = "serve": why.
    migration_failure: Mutex<Option<String>>,
}

/// Process-wide gauges and counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Transaction-mode clients held on one server (LISTEN, advisory
    /// locks, temporary tables, WITH HOLD cursors, SET ROLE).
    pub pinned_clients: std::sync::atomic::AtomicUsize,
    /// Client connections open now, logging in or logged in.
    pub client_connections: std::sync::atomic::AtomicUsize,
    /// Clients attached to a server right now (running a transaction, or
    /// held in session mode or by a pin).
    pub active_clients: std::sync::atomic::AtomicUsize,
}

/// A database clients can ask for, and the cluster serving it.
pub struct Target {
    pub database: Database,
    pub cluster: Arc<Cluster>,
    /// PAUSE: new transactions wait until RESUME; running ones finish.
    pub paused: tokio::sync::watch::Sender<bool>,
}

impl Target {
    /// A database's target with its health loops started.
    pub fn start(config: &Config, db: &Database, paused: bool) -> Arc<Target> {
        let cluster = Cluster::start(&db.name, &db.nodes, &config.health, health_spec(config, db));
        Arc::new(Target {
            database: db.clone(),
            cluster,
            paused: tokio::sync::watch::Sender::new(paused),
        })
    }

    /// Waits while the database is paused.
    pub async fn unpaused(&self) {
        if !*self.paused.borrow() {
            return;
        }
        let mut rx = self.paused.subscribe();
        let _ = rx.wait_for(|paused| !paused).await;
    }
}

impl App {
    /// Builds the shared state and starts the health loops; needs a tokio
    /// runtime.
    pub fn new(config: Config) -> Arc<App> {
        let targets = config
            .databases
            .iter()
            .map(|(name, db)| (name.clone(), Target::start(&config, db, false)))
            .collect();
        Arc::new(App {
            config: std::sync::RwLock::new(Arc::new(config)),
            config_path: Mutex::new(None),
            pools: Pools::default(),
            cancels: Arc::new(CancelRegistry::default()),
            targets: std::sync::RwLock::new(targets),
            counters: Counters::default(),
            shutdown: tokio_util::sync::CancellationToken::new(),
            metrics: metrics::Metrics::default(),
            clients: Arc::default(),
            migration_failure: Mutex::new(None),
        })
    }

    pub fn target(&self, database: &str) -> Option<Arc<Target>> {
        read(&self.targets).get(database).cloned()
    }

    /// Every database clients can ask for, by name.
    pub fn targets(&self) -> Vec<(String, Arc<Target>)> {
        let mut all: Vec<_> = read(&self.targets)
            .iter()
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// The configuration now in force (RELOAD may replace it).
    pub fn config(&self) -> Arc<Config> {
        read(&self.config).clone()
    }

    pub fn set_migration_failure(&self, why: String) {
        *lock(&self.migration_failure) = Some(why);
    }

    pub fn migration_failure(&self) -> Option<String> {
        lock(&self.migration_failure).clone()
    }

    /// Where RELOAD and SIGHUP read the configuration from.
    pub fn set_config_path(&self, path: std::path::PathBuf) {
        *lock(&self.config_path) = Some(path);
    }

    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.pools.all()
    }

    /// The pool for a client's welcome: on the discovered primary, else
    /// the first node not known to be down.
    pub fn pool_for(&self, target: &Target, user: &str) -> Arc<Pool> {
        let topology = target.cluster.snapshot();
        let node = topology
            .primary()
            .or_else(|| {
                topology
                    .nodes
                    .iter()
                    .find(|n| n.role != cluster::Role::Down)
            })
            .map(|n| n.addr.to_string());
        let addr = node
            .or_else(|| target.database.nodes.first().cloned())
            .unwrap_or_default();
        self.pool_at(target, user, &addr)
    }

    /// The pool of `target`'s node at `addr` for a client logged in as `user`.
    pub fn pool_at(&self, target: &Target, user: &str, addr: &str) -> Arc<Pool> {
        let database = &target.database;
        let config = self.config();
        let client = config.user(user);
        let spec = ConnectSpec {
            addr: addr.to_string(),
            user: database.user.clone().unwrap_or_else(|| user.to_string()),
            password: database
                .password
                .clone()
                .or_else(|| client.and_then(|u| u.password.clone())),
            database: database.dbname.clone(),
            connect_timeout: config.pool.connect_timeout,
            application_name: None,
            tls: database.tls.clone(),
        };
        let limits = PoolLimits {
            size: database.pool_size,
            min_idle: database.min_idle,
            checkout_timeout: config.pool.checkout_timeout,
            idle_timeout: config.pool.idle_timeout,
            server_lifetime: config.pool.server_lifetime,
        };
        self.pools.get(&database.name, &spec, &limits)
    }
}

/// A connection of pgheal's own to one node of `db` (migrations, backups):
/// the database's upstream user, else the first `[[users]]` entry with a
/// password.
pub fn direct_spec(
    config: &Config,
    db: &Database,
    addr: &str,
    application_name: &'static str,
) -> ConnectSpec {
    let (user, password) = direct_credentials(config, db);
    ConnectSpec {
        addr: addr.to_string(),
        user,
        password,
        database: db.dbname.clone(),
        connect_timeout: config.pool.connect_timeout,
        application_name: Some(application_name),
        tls: db.tls.clone(),
    }
}

/// The user and password of [`direct_spec`].
pub fn direct_credentials(config: &Config, db: &Database) -> (String, Option<String>) {
    let user = db
        .user
        .clone()
        .or_else(|| {
            config
                .users
                .iter()
                .find(|u| u.password.is_some())
                .map(|u| u.name.clone())
        })
        .unwrap_or_default();
    let password = db.password.clone().or_else(|| {
        config
            .users
            .iter()
            .find(|u| u.name == user)
            .and_then(|u| u.password.clone())
    });
    (user, password)
}

/// How pgheal's health-check connections show in pg_stat_activity.
pub const HEALTH_APPLICATION_NAME: &str = "pgheal health check";

/// Credentials for a database's health checks: `[health]`'s, else the
/// database's own upstream user and password, else the first `[[users]]`
/// entry with a plain password (when clients' own credentials pass upstream).
fn health_spec(config: &Config, db: &Database) -> Option<ConnectSpec> {
    let (user, password) = match (&config.health.user, &db.user) {
        (Some(u), _) => (u.clone(), config.health.password.clone()),
        (None, Some(u)) => (u.clone(), db.password.clone()),
        (None, None) => {
            let u = config.users.iter().find(|u| u.password.is_some())?;
            (
                u.name.clone(),
                db.password.clone().or_else(|| u.password.clone()),
            )
        }
    };
    Some(ConnectSpec {
        addr: String::new(),
        user,
        password,
        database: db.dbname.clone(),
        connect_timeout: config.health.timeout,
        application_name: Some(HEALTH_APPLICATION_NAME),
        tls: db.tls.clone(),
    })
}

/// Read-locks, carrying on if another thread panicked while holding it.
pub(crate) fn read<T>(l: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|poisoned| poisoned.into_inner())
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
