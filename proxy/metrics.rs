//! Prometheus metrics: counters bumped on the data path (atomics, no
//! locks), gauges read from pools and topologies when scraped.

use std::sync::atomic::Ordering;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::cluster::Role;
use crate::App;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_falls_in_the_right_bucket() {
        let m = Metrics::default();
        assert_eq!(m.p99_transaction_ms(), 0.0);
        for _ in 0..990 {
            m.transaction_took(std::time::Duration::from_micros(150));
        }
        for _ in 0..10 {
            m.transaction_took(std::time::Duration::from_millis(50));
        }
        assert_eq!(m.p99_transaction_ms(), 0.2);
        m.transaction_took(std::time::Duration::from_millis(50));
        assert!(m.p99_transaction_ms() >= 50.0);
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    database: String,
    node: String,
    user: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    database: String,
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    database: String,
    node: String,
    role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DbLabels {
    database: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// Everything pgheal counts.
pub struct Metrics {
    registry: Registry,
    pub transactions: Counter,
    pub queries: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub transaction_seconds: Histogram,
    /// Sum of transaction durations in microseconds, for averages.
    transaction_us: std::sync::atomic::AtomicU64,
    /// Transactions per power-of-two duration bucket from 100 us, for
    /// the p99 SHOW STATS prints.
    by_duration: [std::sync::atomic::AtomicU64; BUCKETS],
    pub rejected_writes: Family<Reason, Counter>,
    pub retried_reads: Family<Reason, Counter>,
    pub auth_failures: Counter,
    pub tls_failures: Counter,
    clients: Family<StateLabels, Gauge>,
    pool_servers: Family<PoolLabels, Gauge>,
    node_up: Family<NodeLabels, Gauge>,
    node_role: Family<RoleLabels, Gauge>,
    node_lag_seconds: Family<NodeLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    failovers: Family<DbLabels, Gauge>,
    backup_last_success: Family<DbLabels, Gauge>,
    backup_last_failure: Family<DbLabels, Gauge>,
    backup_last_size: Family<DbLabels, Gauge>,
}

const BUCKETS: usize = 24;

/// The upper bound of bucket `i`: 100 us doubled `i` times.
fn bound_us(i: usize) -> u64 {
    100u64 << i
}

fn bucket(us: u64) -> usize {
    (0..BUCKETS - 1)
        .find(|&i| us <= bound_us(i))
        .unwrap_or(BUCKETS - 1)
}

/// Sums a counter family over the reasons pgheal uses.
fn sum(family: &Family<Reason, Counter>) -> u64 {
    const REASONS: [&str; 6] = [
        "no_primary",
        "no_node",
        "replica_refused_write",
        "server_lost",
        "node_unreachable",
        "stale_plan",
    ];
    REASONS
        .iter()
        .map(|&reason| family.get_or_create(&Reason { reason }).get())
        .sum()
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("pgheal");
        let m = Metrics {
            transactions: Counter::default(),
            queries: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            transaction_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            transaction_us: Default::default(),
            by_duration: Default::default(),
            rejected_writes: Family::default(),
            retried_reads: Family::default(),
            auth_failures: Counter::default(),
            tls_failures: Counter::default(),
            clients: Family::default(),
            pool_servers: Family::default(),
            node_up: Family::default(),
            node_role: Family::default(),
            node_lag_seconds: Family::default(),
            failovers: Family::default(),
            backup_last_success: Family::default(),
            backup_last_failure: Family::default(),
            backup_last_size: Family::default(),
            registry: Registry::default(),
        };
        r.register(
            "transactions",
            "Transactions (and autocommit statements) that ended",
            m.transactions.clone(),
        );
        r.register(
            "queries",
            "Requests answered (Query, Sync, FunctionCall)",
            m.queries.clone(),
        );
        r.register(
            "client_bytes_received",
            "Bytes read from clients",
            m.bytes_in.clone(),
        );
        r.register(
            "client_bytes_sent",
            "Bytes written to clients",
            m.bytes_out.clone(),
        );
        r.register(
            "transaction_duration_seconds",
            "Time from a transaction's first message to its end",
            m.transaction_seconds.clone(),
        );
        r.register(
            "rejected_writes",
            "Requests refused, by reason",
            m.rejected_writes.clone(),
        );
        r.register(
            "retried_reads",
            "Autocommit reads run again unseen, by reason",
            m.retried_reads.clone(),
        );
        r.register(
            "auth_failures",
            "Client logins refused",
            m.auth_failures.clone(),
        );
        r.register(
            "tls_failures",
            "Client TLS handshakes that failed",
            m.tls_failures.clone(),
        );
        r.register(
            "client_connections",
            "Client connections by state",
            m.clients.clone(),
        );
        r.register(
            "pool_servers",
            "Server connections by pool and state",
            m.pool_servers.clone(),
        );
        r.register(
            "node_up",
            "1 when the node's last health probe succeeded",
            m.node_up.clone(),
        );
        r.register(
            "node_role",
            "1 for the node's current role",
            m.node_role.clone(),
        );
        r.register(
            "node_replay_lag_seconds",
            "A replica's replay delay",
            m.node_lag_seconds.clone(),
        );
        r.register(
            "failovers",
            "Times a node became primary after another role",
            m.failovers.clone(),
        );
        r.register(
            "backup_last_success_timestamp_seconds",
            "When the last good backup was taken",
            m.backup_last_success.clone(),
        );
        r.register(
            "backup_last_failure_timestamp_seconds",
            "When the last backup failed",
            m.backup_last_failure.clone(),
        );
        r.register(
            "backup_last_size_bytes",
            "Size of the last good backup",
            m.backup_last_size.clone(),
        );
        Metrics { registry: r, ..m }
    }
}

impl Metrics {
    /// Records one finished transaction's duration.
    pub fn transaction_took(&self, took: std::time::Duration) {
        self.transaction_seconds.observe(took.as_secs_f64());
        let slot = bucket(took.as_micros() as u64);
        self.by_duration[slot].fetch_add(1, Ordering::Relaxed);
        self.transaction_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn average_transaction_ms(&self) -> f64 {
        let n = self.transactions.get();
        if n == 0 {
            return 0.0;
        }
        self.transaction_us.load(Ordering::Relaxed) as f64 / 1000.0 / n as f64
    }

    /// The duration below which 99% of transactions ended, in ms (to the
    /// bucket: within a factor of two).
    pub fn p99_transaction_ms(&self) -> f64 {
        let counts: Vec<u64> = self
            .by_duration
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen * 100 >= total * 99 {
                return bound_us(i) as f64 / 1000.0;
            }
        }
        bound_us(BUCKETS - 1) as f64 / 1000.0
    }

    pub fn rejected_total(&self) -> u64 {
        sum(&self.rejected_writes)
    }

    pub fn retried_total(&self) -> u64 {
        sum(&self.retried_reads)
    }

    /// Records a scheduled backup's outcome.
    pub fn backup_done(&self, o: &crate::backup::Outcome) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let db = DbLabels {
            database: o.database.clone(),
        };
        match &o.result {
            Ok(b) => {
                self.backup_last_success.get_or_create(&db).set(now);
                self.backup_last_size.get_or_create(&db).set(b.size as i64);
            }
            Err(_) => {
                self.backup_last_failure.get_or_create(&db).set(now);
            }
        }
    }

    pub fn reject(&self, reason: &'static str) {
        self.rejected_writes.get_or_create(&Reason { reason }).inc();
    }

    pub fn retry(&self, reason: &'static str) {
        self.retried_reads.get_or_create(&Reason { reason }).inc();
    }

    /// The text exposition, with gauges read now.
    pub fn render(&self, app: &App) -> String {
        self.read_gauges(app);
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    fn read_gauges(&self, app: &App) {
        let total = app.counters.client_connections.load(Ordering::Relaxed) as i64;
        let active = app.counters.active_clients.load(Ordering::Relaxed) as i64;
        let pinned = app.counters.pinned_clients.load(Ordering::Relaxed) as i64;
        for (state, v) in [
            ("active", active),
            ("idle", total - active),
            ("pinned", pinned),
        ] {
            self.clients.get_or_create(&StateLabels { state }).set(v);
        }
        for pool in app.pools() {
            let (idle, busy) = pool.counts();
            for (state, v) in [("idle", idle), ("busy", busy)] {
                let labels = PoolLabels {
                    database: pool.database.clone(),
                    node: pool.addr().to_string(),
                    user: pool.user().to_string(),
                    state,
                };
                self.pool_servers.get_or_create(&labels).set(v as i64);
            }
        }
        for (database, target) in app.targets() {
            let topology = target.cluster.snapshot();
            for n in &topology.nodes {
                let node = NodeLabels {
                    database: database.clone(),
                    node: n.addr.to_string(),
                };
                let up = matches!(n.role, Role::Primary | Role::Replica);
                self.node_up.get_or_create(&node).set(i64::from(up));
                self.node_lag_seconds
                    .get_or_create(&node)
                    .set(n.replay_lag.as_secs_f64());
                for (role, name) in [
                    (Role::Primary, "primary"),
                    (Role::Replica, "replica"),
                    (Role::Down, "down"),
                    (Role::Unknown, "unknown"),
                ] {
                    let labels = RoleLabels {
                        database: database.clone(),
                        node: n.addr.to_string(),
                        role: name,
                    };
                    self.node_role
                        .get_or_create(&labels)
                        .set(i64::from(n.role == role));
                }
            }
            self.failovers
                .get_or_create(&DbLabels {
                    database: database.clone(),
                })
                .set(target.cluster.failovers() as i64);
        }
    }
}
