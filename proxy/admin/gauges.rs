//! Fills the metrics' gauges from the live state at scrape time. Each
//! family is cleared first, so the series of nodes, pools and databases a
//! reload removed disappear instead of staying at their last value.

use std::sync::atomic::Ordering;

use crate::backend::cluster::{Mode, Role};
use crate::frontend::App;
use crate::metrics::{
    CertLabels, DbLabels, Metrics, ModeLabels, NodeLabels, PoolLabels, PoolWaitLabels, RoleLabels,
    StateLabels,
};

/// The Prometheus text exposition with every gauge read now.
pub fn render(app: &App) -> String {
    let m = &app.metrics;
    clients(app, m);
    pools(app, m);
    nodes(app, m);
    backups(app, m);
    health_of_setup(app, m);
    m.encode()
}

/// Migrations that failed, and the TLS certificate's expiry.
fn health_of_setup(app: &App, m: &Metrics) {
    m.migrations_failed
        .set(i64::from(app.migration_failure().is_some()));
    m.tls_cert_expiry.clear();
    let config = app.config();
    if let Some(tls) = &config.tls {
        if let Some(at) = tls.not_after {
            let file = tls.config.cert.display().to_string();
            m.tls_cert_expiry
                .get_or_create(&CertLabels { file })
                .set(at);
        }
    }
}

fn clients(app: &App, m: &Metrics) {
    let total = app.counters.client_connections.load(Ordering::Relaxed) as i64;
    let active = app.counters.active_clients.load(Ordering::Relaxed) as i64;
    let pinned = app.counters.pinned_clients.load(Ordering::Relaxed) as i64;
    let resting = app.counters.resting_clients.load(Ordering::Relaxed) as i64;
    for (state, v) in [
        ("active", active),
        ("idle", total - active),
        ("pinned", pinned),
        ("resting", resting),
    ] {
        m.clients.get_or_create(&StateLabels { state }).set(v);
    }
}

fn pools(app: &App, m: &Metrics) {
    m.pool_servers.clear();
    m.pool_waiting.clear();
    for pool in app.pools() {
        let labels = PoolWaitLabels {
            database: pool.database.clone(),
            node: pool.addr().to_string(),
            user: pool.user().to_string(),
        };
        m.pool_waiting
            .get_or_create(&labels)
            .set(pool.waiting() as i64);
        let (idle, busy) = pool.counts();
        for (state, v) in [("idle", idle), ("busy", busy)] {
            let labels = PoolLabels {
                database: pool.database.clone(),
                node: pool.addr().to_string(),
                user: pool.user().to_string(),
                state,
            };
            m.pool_servers.get_or_create(&labels).set(v as i64);
        }
    }
}

fn nodes(app: &App, m: &Metrics) {
    m.node_up.clear();
    m.node_lag_seconds.clear();
    m.node_lag_bytes.clear();
    m.node_role.clear();
    m.failovers.clear();
    m.database_mode.clear();
    m.max_replica_lag.clear();
    for (database, target) in app.targets() {
        let topology = target.cluster.snapshot();
        for mode in [Mode::ReadWrite, Mode::ReadOnly, Mode::Down] {
            let labels = ModeLabels {
                database: database.clone(),
                mode: mode.as_str(),
            };
            let current = i64::from(topology.mode() == mode);
            m.database_mode.get_or_create(&labels).set(current);
        }
        let labels = DbLabels {
            database: database.clone(),
        };
        let bound = target.database.max_replica_lag.as_secs_f64();
        m.max_replica_lag.get_or_create(&labels).set(bound);
        for n in &topology.nodes {
            let node = NodeLabels {
                database: database.clone(),
                node: n.addr.to_string(),
            };
            let up = matches!(n.role, Role::Primary | Role::Replica);
            m.node_up.get_or_create(&node).set(i64::from(up));
            m.node_lag_seconds
                .get_or_create(&node)
                .set(n.replay_lag.as_secs_f64());
            if let Some(bytes) = n.lag_bytes {
                m.node_lag_bytes
                    .get_or_create(&node)
                    .set(i64::try_from(bytes).unwrap_or(i64::MAX));
            }
            for role in [Role::Primary, Role::Replica, Role::Down, Role::Unknown] {
                let labels = RoleLabels {
                    database: database.clone(),
                    node: n.addr.to_string(),
                    role: role.as_str(),
                };
                m.node_role
                    .get_or_create(&labels)
                    .set(i64::from(n.role == role));
            }
        }
        m.failovers
            .get_or_create(&DbLabels { database })
            .set(target.cluster.failovers() as i64);
    }
}

fn backups(app: &App, m: &Metrics) {
    m.backup_last_success.clear();
    m.backup_last_failure.clear();
    m.backup_last_size.clear();
    m.backup_interval.clear();
    m.restore_check_last_success.clear();
    m.restore_check_last_failure.clear();
    let config = app.config();
    if let Some(b) = &config.backup {
        let every = match b.schedule {
            crate::config::Schedule::Every(d) => d.as_secs(),
            crate::config::Schedule::DailyAt { .. } => 24 * 3600,
        };
        for db in config.named_databases() {
            let labels = DbLabels {
                database: db.name.clone(),
            };
            m.backup_interval.get_or_create(&labels).set(every as i64);
        }
    }
    for (database, stats) in m.backups() {
        if !config.databases.contains_key(&database) {
            continue;
        }
        let labels = DbLabels { database };
        if let Some(at) = stats.last_success {
            m.backup_last_success.get_or_create(&labels).set(at);
            m.backup_last_size
                .get_or_create(&labels)
                .set(stats.last_size as i64);
        }
        if let Some(at) = stats.last_failure {
            m.backup_last_failure.get_or_create(&labels).set(at);
        }
        if let Some(at) = stats.last_restore_check_success {
            m.restore_check_last_success.get_or_create(&labels).set(at);
        }
        if let Some(at) = stats.last_restore_check_failure {
            m.restore_check_last_failure.get_or_create(&labels).set(at);
        }
    }
}
