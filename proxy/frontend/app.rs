//! What every client task shares: the configuration in force, the pools,
//! the cancel keys, the client registry, counters and each database's
//! cluster.

use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, RwLock};

use tokio_util::sync::CancellationToken;

use super::cancel::CancelRegistry;
use super::clients::Clients;
use crate::backend::cluster::{self, Cluster};
use crate::backend::conn::ConnectSpec;
use crate::backend::health::{self, Probes};
use crate::backend::pool::{Pool, PoolLimits, Pools};
use crate::backend::router::ReplicaFit;
use crate::backend::statements::Epochs;
use crate::config::ANY_DATABASE;
use crate::config::{Config, Database};
use crate::events::Events;
use crate::frontend::auth_query::AuthLookup;
use crate::frontend::error::ClientError;
use crate::metrics::Metrics;
use crate::sync::{lock, read, write, FastMap};

pub struct App {
    config: RwLock<Arc<Config>>,
    /// The file the configuration came from, for RELOAD and SIGHUP.
    config_path: Mutex<Option<PathBuf>>,
    pools: Pools,
    /// One health loop per node, shared by the databases on it.
    probes: Probes,
    pub cancels: Arc<CancelRegistry>,
    targets: RwLock<FastMap<String, Arc<Target>>>,
    pub counters: Counters,
    /// Cancelled on SIGTERM/SIGINT: no new clients or transactions; idle
    /// clients are told 57P01, running transactions finish.
    pub shutdown: CancellationToken,
    pub metrics: Metrics,
    pub clients: Arc<Clients>,
    /// Shared prepared statements that went stale (transaction mode).
    pub epochs: Epochs,
    /// `[auth] query` users: their secrets and the keys they proved.
    pub auth_lookup: AuthLookup,
    /// The startup parameter sets of clients, shared between them.
    pub params: crate::backend::params::Interned,
    /// What happened lately (SHOW EVENTS, `/events`).
    pub events: Arc<Events>,
    /// Bytes held by all clients' replayable transactions (bounded by
    /// `[failover] replay_memory`).
    pub replay_memory: Arc<std::sync::atomic::AtomicUsize>,
    /// Startup migrations failed and on_error = "serve": why.
    migration_failure: Mutex<Option<String>>,
}

/// Process-wide gauges and counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Transaction-mode clients held on one server (LISTEN, advisory
    /// locks, temporary tables, WITH HOLD cursors, SET ROLE).
    pub pinned_clients: AtomicUsize,
    /// Client connections open now, logging in or logged in.
    pub client_connections: AtomicUsize,
    /// Clients attached to a server right now (running a transaction, or
    /// held in session mode or by a pin).
    pub active_clients: AtomicUsize,
    /// Idle clients resting without a task (see `session::rest`).
    pub resting_clients: AtomicUsize,
}

/// A database clients can ask for, and the cluster serving it.
pub struct Target {
    pub database: Database,
    pub cluster: Arc<Cluster>,
    /// PAUSE: new transactions wait until RESUME; running ones finish.
    pub paused: tokio::sync::watch::Sender<bool>,
    /// When a client last used it (served through `"*"`: closed after
    /// `[pool] idle_timeout` without clients).
    last_used: Mutex<std::time::Instant>,
    /// What its clients did, for the status page's charts.
    pub stats: TargetStats,
    /// RELOAD replaced it: its sessions move to the new one at their next
    /// transaction (see `Session::follow_reload`).
    retired: std::sync::atomic::AtomicBool,
}

/// Counters of one database (the process-wide ones are in `Metrics`).
#[derive(Debug, Default)]
pub struct TargetStats {
    pub transactions: std::sync::atomic::AtomicU64,
    pub rejected: std::sync::atomic::AtomicU64,
    pub retried: std::sync::atomic::AtomicU64,
}

impl TargetStats {
    pub fn add(counter: &std::sync::atomic::AtomicU64) {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn get(counter: &std::sync::atomic::AtomicU64) -> u64 {
        counter.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Target {
    /// A database's target, following the health loops of its nodes
    /// (started when no other database runs them).
    pub fn start(
        config: &Config,
        db: &Database,
        paused: bool,
        probes: &Probes,
        events: &Arc<Events>,
    ) -> Arc<Target> {
        let specs: Option<Vec<_>> = db
            .nodes
            .iter()
            .map(|addr| health::health_spec(config, addr))
            .collect();
        let node_probes = specs
            .unwrap_or_default()
            .into_iter()
            .map(|spec| probes.get(spec, &config.health))
            .collect();
        let fit = ReplicaFit {
            min_lsn: 0,
            max_lag: db.max_replica_lag,
            max_bytes: db.max_replica_lag_bytes,
            streaming: true,
        };
        let cluster = Cluster::start(&db.name, &db.nodes, node_probes, fit, events.clone());
        Arc::new(Target {
            database: db.clone(),
            cluster,
            paused: tokio::sync::watch::Sender::new(paused),
            last_used: Mutex::new(std::time::Instant::now()),
            stats: TargetStats::default(),
            retired: Default::default(),
        })
    }

    /// RELOAD replaced or removed it.
    pub fn retire(&self) {
        self.retired
            .store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(std::sync::atomic::Ordering::Acquire)
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

/// Closes unused databases served through `"*"`, until the app is gone.
async fn close_unused(app: std::sync::Weak<App>) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        every.tick().await;
        let Some(app) = app.upgrade() else { return };
        app.close_unused_targets();
    }
}

impl App {
    /// Builds the shared state and starts the health loops; needs a tokio
    /// runtime.
    pub fn new(config: Config) -> Arc<App> {
        let probes = Probes::default();
        let events = Arc::new(Events::default());
        // "*" gets a target of its own too: its nodes' health and the
        // [auth] lookups for databases it serves.
        let targets = config
            .databases
            .iter()
            .map(|(name, db)| {
                let target = Target::start(&config, db, false, &probes, &events);
                (name.clone(), target)
            })
            .collect();
        let app = Arc::new(App {
            config: RwLock::new(Arc::new(config)),
            config_path: Mutex::new(None),
            pools: Pools::default(),
            probes,
            cancels: Arc::new(CancelRegistry::default()),
            targets: RwLock::new(targets),
            counters: Counters::default(),
            shutdown: CancellationToken::new(),
            metrics: Metrics::default(),
            clients: Arc::default(),
            epochs: Epochs::default(),
            auth_lookup: AuthLookup::default(),
            params: Default::default(),
            replay_memory: Arc::default(),
            events,
            migration_failure: Mutex::new(None),
        });
        tokio::spawn(close_unused(Arc::downgrade(&app)));
        app
    }

    /// The target serving database `name` for a client that logged in: its
    /// own, or one made on first use for a name `"*"` serves.
    pub fn target_for(&self, name: &str) -> Result<Arc<Target>, ClientError> {
        if let Some(t) = self.target(name) {
            *lock(&t.last_used) = std::time::Instant::now();
            return Ok(t);
        }
        let config = self.config();
        let (Some(any), Some(db)) = (
            config.databases.get(ANY_DATABASE),
            config.database_for(name),
        ) else {
            return Err(ClientError::UnknownDatabase(name.to_string()));
        };
        self.edit_targets(|targets| {
            if let Some(t) = targets.get(&db.name) {
                return Ok(t.clone());
            }
            let served = targets
                .keys()
                .filter(|n| !config.databases.contains_key(*n))
                .count();
            if served >= any.max_databases {
                return Err(ClientError::TooManyDatabases(any.max_databases));
            }
            tracing::info!(database = %db.name, "serving a database through \"*\"");
            let t = Target::start(&config, &db, false, &self.probes, &self.events);
            targets.insert(db.name.clone(), t.clone());
            Ok(t)
        })
    }

    /// Drops the targets and pools of databases served through `"*"` that
    /// had no client for `[pool] idle_timeout`.
    fn close_unused_targets(&self) {
        let config = self.config();
        let idle = config.pool.idle_timeout;
        let mut closed = Vec::new();
        self.edit_targets(|targets| {
            targets.retain(|name, t| {
                if config.databases.contains_key(name) {
                    return true;
                }
                let mut last = lock(&t.last_used);
                if Arc::strong_count(t) > 1 {
                    *last = std::time::Instant::now();
                }
                let keep = last.elapsed() < idle;
                if !keep {
                    closed.push(name.clone());
                }
                keep
            });
        });
        for name in closed {
            tracing::info!(database = %name, "no client for idle_timeout: closing the database served through \"*\"");
            self.forget_pools(&name);
        }
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

    /// A fresh target for `db` (RELOAD).
    pub fn start_target(&self, config: &Config, db: &Database, paused: bool) -> Arc<Target> {
        Target::start(config, db, paused, &self.probes, &self.events)
    }

    /// Changes the set of targets (RELOAD) under the write lock.
    pub fn edit_targets<R>(&self, edit: impl FnOnce(&mut FastMap<String, Arc<Target>>) -> R) -> R {
        edit(&mut write(&self.targets))
    }

    /// The configuration now in force (RELOAD may replace it).
    pub fn config(&self) -> Arc<Config> {
        read(&self.config).clone()
    }

    /// Puts a new configuration in force for new logins and transactions.
    pub fn set_config(&self, config: Config) {
        *write(&self.config) = Arc::new(config);
    }

    pub fn set_migration_failure(&self, why: String) {
        *lock(&self.migration_failure) = Some(why);
    }

    pub fn migration_failure(&self) -> Option<String> {
        lock(&self.migration_failure).clone()
    }

    /// Where RELOAD and SIGHUP read the configuration from.
    pub fn set_config_path(&self, path: PathBuf) {
        *lock(&self.config_path) = Some(path);
    }

    pub fn config_path(&self) -> Option<PathBuf> {
        lock(&self.config_path).clone()
    }

    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.pools.all()
    }

    /// A client is about to run a statement PostgreSQL refuses while
    /// others are connected to database `dbname` (DROP DATABASE and the
    /// like): pgheal's idle connections to it close first, so only real
    /// sessions stand in its way, as without a pooler.
    pub fn release_database(&self, dbname: &str) {
        let pools = self.pools.on_database(dbname);
        if pools.is_empty() {
            return;
        }
        tracing::info!(
            database = dbname,
            "closing idle server connections for a DROP/RENAME/TEMPLATE of the database"
        );
        tokio::spawn(async move {
            for pool in pools {
                pool.drain(std::time::Duration::from_secs(5)).await;
            }
        });
    }

    /// Sets a database's pools to a new pool_size and min_idle.
    pub fn resize_pools(&self, database: &str, size: usize, min_idle: usize) {
        self.pools.resize(database, size, min_idle);
    }

    /// Drops the pools of a database whose settings changed.
    pub fn forget_pools(&self, database: &str) {
        self.pools.forget(database);
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
            .map(|n| &*n.addr);
        let addr = node
            .or_else(|| target.database.nodes.first().map(String::as_str))
            .unwrap_or_default();
        self.pool_at(target, user, addr)
    }

    /// The pid of the client that holds pgheal's server session `pid` on
    /// `addr`, or held it last (see `Pools::client_of`).
    pub fn client_of_server(&self, addr: &str, pid: i32) -> Option<i32> {
        self.pools.client_of(addr, pid)
    }

    /// The pool of `target`'s node at `addr` for a client logged in as `user`.
    pub fn pool_at(&self, target: &Target, user: &str, addr: &str) -> Arc<Pool> {
        let database = &target.database;
        // An [auth] query user: the keys it proved at login.
        let scram_keys = database
            .user
            .is_none()
            .then(|| self.auth_lookup.keys(user))
            .flatten();
        let upstream = database.user.as_deref().unwrap_or(user);
        if let Some(pool) = self.pools.find(&database.name, addr, upstream) {
            pool.use_keys(scram_keys.as_ref());
            return pool;
        }
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
            scram_keys,
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
