//! Fills the metrics' gauges from the live state at scrape time. Each
//! family is cleared first, so the series of nodes, pools and databases a
//! reload removed disappear instead of staying at their last value.

use std::sync::atomic::Ordering;

use crate::backend::cluster::Role;
use crate::frontend::App;
use crate::metrics::{DbLabels, Metrics, NodeLabels, PoolLabels, RoleLabels, StateLabels};

/// The Prometheus text exposition with every gauge read now.
pub fn render(app: &App) -> String {
    let m = &app.metrics;
    clients(app, m);
    pools(app, m);
    nodes(app, m);
    backups(app, m);
    m.encode()
}

fn clients(app: &App, m: &Metrics) {
    let total = app.counters.client_connections.load(Ordering::Relaxed) as i64;
    let active = app.counters.active_clients.load(Ordering::Relaxed) as i64;
    let pinned = app.counters.pinned_clients.load(Ordering::Relaxed) as i64;
    for (state, v) in [
        ("active", active),
        ("idle", total - active),
        ("pinned", pinned),
    ] {
        m.clients.get_or_create(&StateLabels { state }).set(v);
    }
}

fn pools(app: &App, m: &Metrics) {
    m.pool_servers.clear();
    for pool in app.pools() {
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
    for (database, target) in app.targets() {
        let topology = target.cluster.snapshot();
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
    let config = app.config();
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
    }
}
