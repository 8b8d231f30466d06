//! Prometheus metrics: counters bumped on the data path (atomics, no
//! locks). Gauges (pools, nodes, clients) are filled from the live state
//! when scraped, by `admin::http`.

use std::sync::atomic::Ordering;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::sync::lock;

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
pub(crate) struct PoolLabels {
    pub(crate) database: String,
    pub(crate) node: String,
    pub(crate) user: String,
    pub(crate) state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct NodeLabels {
    pub(crate) database: String,
    pub(crate) node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RoleLabels {
    pub(crate) database: String,
    pub(crate) node: String,
    pub(crate) role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DbLabels {
    pub(crate) database: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ModeLabels {
    pub(crate) database: String,
    pub(crate) mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PoolWaitLabels {
    pub(crate) database: String,
    pub(crate) node: String,
    pub(crate) user: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CertLabels {
    pub(crate) file: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StateLabels {
    pub(crate) state: &'static str,
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
    /// Transactions run again, unseen, after their server was lost.
    pub transactions_replayed: Counter,
    /// Replays whose replies differed from what the client had seen.
    pub replay_mismatches: Counter,
    /// Transactions whose server was lost and that were not replayed.
    pub replay_refused: Family<Reason, Counter>,
    pub auth_failures: Counter,
    pub tls_failures: Counter,
    pub(crate) clients: Family<StateLabels, Gauge>,
    pub(crate) pool_servers: Family<PoolLabels, Gauge>,
    pub(crate) node_up: Family<NodeLabels, Gauge>,
    pub(crate) node_role: Family<RoleLabels, Gauge>,
    pub(crate) node_lag_seconds: Family<NodeLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub(crate) node_lag_bytes: Family<NodeLabels, Gauge>,
    pub(crate) failovers: Family<DbLabels, Gauge>,
    pub(crate) backup_last_success: Family<DbLabels, Gauge>,
    pub(crate) backup_last_failure: Family<DbLabels, Gauge>,
    pub(crate) backup_last_size: Family<DbLabels, Gauge>,
    pub(crate) restore_check_last_success: Family<DbLabels, Gauge>,
    pub(crate) restore_check_last_failure: Family<DbLabels, Gauge>,
    /// 1 for each database's current mode (read-write, read-only, down).
    pub(crate) database_mode: Family<ModeLabels, Gauge>,
    /// Each database's `max_replica_lag`, seconds.
    pub(crate) max_replica_lag: Family<DbLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Clients waiting for a server, per pool.
    pub(crate) pool_waiting: Family<PoolWaitLabels, Gauge>,
    /// How often backups are due, per database (`[backup] schedule`).
    pub(crate) backup_interval: Family<DbLabels, Gauge>,
    /// 1 while startup migrations failed and pgheal serves anyway.
    pub(crate) migrations_failed: Gauge,
    /// When the `[tls]` certificate expires, Unix seconds.
    pub(crate) tls_cert_expiry: Family<CertLabels, Gauge>,
    /// Each database's last backup outcomes, written into the backup
    /// families at scrape time for the databases still configured.
    backups: Mutex<BTreeMap<String, BackupStats>>,
}

/// When a database's backups last succeeded and failed (Unix seconds).
#[derive(Debug, Clone, Copy, Default)]
pub struct BackupStats {
    pub last_success: Option<i64>,
    pub last_failure: Option<i64>,
    pub last_size: u64,
    /// When a restore drill last proved (or failed to prove) a dump.
    pub last_restore_check_success: Option<i64>,
    pub last_restore_check_failure: Option<i64>,
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

/// Why a transaction whose server was lost was not replayed (README,
/// "Transaction replay"); the `reason` label of `pgheal_replay_refused`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayRefusal {
    /// Not opened by `BEGIN` at the start of a request (pipelined).
    NotRecorded,
    /// Beyond `replay_buffer` or `replay_memory`.
    Buffer,
    /// Names a function whose effects survive a rollback.
    Function,
    /// Its ending message was read from the client: the outcome is the
    /// server's.
    CommitSent,
    /// Pinned, or session mode.
    Pinned,
    /// A node that stays up ended the session on purpose.
    SessionEnded,
    /// The server died in the middle of a reply part of which the client had.
    MessageCut,
    /// No primary within `write_wait`.
    NoPrimary,
    /// A replay whose server was lost too.
    Replayed,
    /// The replay's server was lost, or it took longer than `replay_timeout`.
    ReplayFailed,
}

impl ReplayRefusal {
    pub const ALL: [ReplayRefusal; 10] = [
        ReplayRefusal::NotRecorded,
        ReplayRefusal::Buffer,
        ReplayRefusal::Function,
        ReplayRefusal::CommitSent,
        ReplayRefusal::Pinned,
        ReplayRefusal::SessionEnded,
        ReplayRefusal::MessageCut,
        ReplayRefusal::NoPrimary,
        ReplayRefusal::Replayed,
        ReplayRefusal::ReplayFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReplayRefusal::NotRecorded => "not_recorded",
            ReplayRefusal::Buffer => "buffer",
            ReplayRefusal::Function => "function",
            ReplayRefusal::CommitSent => "commit_sent",
            ReplayRefusal::Pinned => "pinned",
            ReplayRefusal::SessionEnded => "session_ended",
            ReplayRefusal::MessageCut => "message_cut",
            ReplayRefusal::NoPrimary => "no_primary",
            ReplayRefusal::Replayed => "replayed",
            ReplayRefusal::ReplayFailed => "replay_failed",
        }
    }
}

/// Sums a counter family over `reasons`.
fn sum_of(family: &Family<Reason, Counter>, reasons: &[&'static str]) -> u64 {
    reasons
        .iter()
        .map(|&reason| family.get_or_create(&Reason { reason }).get())
        .sum()
}

/// Sums a counter family over the reasons pgheal uses.
fn sum(family: &Family<Reason, Counter>) -> u64 {
    const REASONS: [&str; 7] = [
        "no_primary",
        "no_node",
        "replica_refused_write",
        "server_lost",
        "node_unreachable",
        "stale_plan",
        "shared_statement_failed",
    ];
    sum_of(family, &REASONS)
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
            transactions_replayed: Counter::default(),
            replay_mismatches: Counter::default(),
            replay_refused: Family::default(),
            auth_failures: Counter::default(),
            tls_failures: Counter::default(),
            clients: Family::default(),
            pool_servers: Family::default(),
            node_up: Family::default(),
            node_role: Family::default(),
            node_lag_seconds: Family::default(),
            node_lag_bytes: Family::default(),
            failovers: Family::default(),
            backup_last_success: Family::default(),
            backup_last_failure: Family::default(),
            backup_last_size: Family::default(),
            restore_check_last_success: Family::default(),
            restore_check_last_failure: Family::default(),
            database_mode: Family::default(),
            max_replica_lag: Family::default(),
            pool_waiting: Family::default(),
            backup_interval: Family::default(),
            migrations_failed: Gauge::default(),
            tls_cert_expiry: Family::default(),
            backups: Mutex::default(),
            registry: Registry::default(),
        };
        m.register(&mut r);
        Metrics { registry: r, ..m }
    }
}

impl Metrics {
    /// Puts every counter, histogram and gauge family in `r`.
    fn register(&self, r: &mut Registry) {
        r.register(
            "transactions",
            "Transactions (and autocommit statements) that ended",
            self.transactions.clone(),
        );
        r.register(
            "queries",
            "Requests answered (Query, Sync, FunctionCall)",
            self.queries.clone(),
        );
        r.register(
            "client_bytes_received",
            "Bytes read from clients",
            self.bytes_in.clone(),
        );
        r.register(
            "client_bytes_sent",
            "Bytes written to clients",
            self.bytes_out.clone(),
        );
        r.register(
            "transaction_duration_seconds",
            "Time from a transaction's first message to its end",
            self.transaction_seconds.clone(),
        );
        r.register(
            "rejected_writes",
            "Requests refused, by reason",
            self.rejected_writes.clone(),
        );
        r.register(
            "retried_reads",
            "Autocommit reads run again unseen, by reason",
            self.retried_reads.clone(),
        );
        r.register(
            "transactions_replayed",
            "Transactions run again, unseen, on a new server after theirs was lost",
            self.transactions_replayed.clone(),
        );
        r.register(
            "replay_mismatches",
            "Replayed transactions whose replies differed from what the client had seen (the client got 08006)",
            self.replay_mismatches.clone(),
        );
        r.register(
            "replay_refused",
            "Transactions whose server was lost that were not replayed, by reason",
            self.replay_refused.clone(),
        );
        r.register(
            "auth_failures",
            "Client logins refused",
            self.auth_failures.clone(),
        );
        r.register(
            "tls_failures",
            "Client TLS handshakes that failed",
            self.tls_failures.clone(),
        );
        self.register_gauges(r);
    }

    /// The gauge families, filled from the live state at scrape time.
    fn register_gauges(&self, r: &mut Registry) {
        r.register(
            "client_connections",
            "Client connections by state",
            self.clients.clone(),
        );
        r.register(
            "pool_servers",
            "Server connections by pool and state",
            self.pool_servers.clone(),
        );
        r.register(
            "node_up",
            "1 when the node's last health probe succeeded",
            self.node_up.clone(),
        );
        r.register(
            "node_role",
            "1 for the node's current role",
            self.node_role.clone(),
        );
        r.register(
            "node_replay_lag_seconds",
            "How stale a replica is: its replay delay, or how long ago the primary wrote WAL it has not replayed",
            self.node_lag_seconds.clone(),
        );
        r.register(
            "node_replay_lag_bytes",
            "WAL bytes the primary had that a replica has not replayed",
            self.node_lag_bytes.clone(),
        );
        r.register(
            "failovers",
            "Times a node became primary after another role",
            self.failovers.clone(),
        );
        r.register(
            "backup_last_success_timestamp_seconds",
            "When the last good backup was taken",
            self.backup_last_success.clone(),
        );
        r.register(
            "backup_last_failure_timestamp_seconds",
            "When the last backup failed",
            self.backup_last_failure.clone(),
        );
        r.register(
            "backup_last_size_bytes",
            "Size of the last good backup",
            self.backup_last_size.clone(),
        );
        r.register(
            "backup_last_restore_check_success_timestamp_seconds",
            "When a restore drill last restored the newest dump with its recorded row counts",
            self.restore_check_last_success.clone(),
        );
        r.register(
            "backup_last_restore_check_failure_timestamp_seconds",
            "When a restore drill last failed",
            self.restore_check_last_failure.clone(),
        );
        self.register_setup_gauges(r);
    }

    /// Modes, bounds, backups, migrations and the certificate: what the
    /// alert rules in deploy/prometheus watch besides the nodes.
    fn register_setup_gauges(&self, r: &mut Registry) {
        r.register(
            "database_mode",
            "1 for the database's current mode: read-write, read-only or down",
            self.database_mode.clone(),
        );
        r.register(
            "max_replica_lag_seconds",
            "The database's max_replica_lag: replicas further behind get no reads",
            self.max_replica_lag.clone(),
        );
        r.register(
            "pool_waiting_clients",
            "Clients waiting for a server connection of the pool",
            self.pool_waiting.clone(),
        );
        r.register(
            "backup_interval_seconds",
            "How often a backup is due ([backup] schedule)",
            self.backup_interval.clone(),
        );
        r.register(
            "migrations_failed",
            "1 while startup migrations failed and pgheal serves anyway",
            self.migrations_failed.clone(),
        );
        r.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the [tls] certificate expires (Unix time)",
            self.tls_cert_expiry.clone(),
        );
    }

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

    pub fn replay_refused_total(&self) -> u64 {
        let reasons = ReplayRefusal::ALL.map(ReplayRefusal::as_str);
        sum_of(&self.replay_refused, &reasons)
    }

    /// The transactions not replayed for `reason`.
    pub fn replay_refused(&self, reason: ReplayRefusal) -> u64 {
        let reason = reason.as_str();
        self.replay_refused.get_or_create(&Reason { reason }).get()
    }

    pub fn refuse_replay(&self, reason: ReplayRefusal) {
        let reason = reason.as_str();
        self.replay_refused.get_or_create(&Reason { reason }).inc();
    }

    /// Records a backup's outcome: its size when it succeeded.
    pub fn backup_done(&self, database: &str, size: Option<u64>) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mut all = lock(&self.backups);
        let stats = all.entry(database.to_string()).or_default();
        match size {
            Some(size) => {
                stats.last_success = Some(now);
                stats.last_size = size;
            }
            None => stats.last_failure = Some(now),
        }
    }

    /// The backup outcomes recorded so far, by database.
    /// A restore drill of `database`'s newest dump ended.
    pub fn restore_check_done(&self, database: &str, ok: bool) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mut all = lock(&self.backups);
        let stats = all.entry(database.to_string()).or_default();
        match ok {
            true => stats.last_restore_check_success = Some(now),
            false => stats.last_restore_check_failure = Some(now),
        }
    }

    pub fn backups(&self) -> BTreeMap<String, BackupStats> {
        lock(&self.backups).clone()
    }

    pub fn reject(&self, reason: &'static str) {
        self.rejected_writes.get_or_create(&Reason { reason }).inc();
    }

    pub fn retry(&self, reason: &'static str) {
        self.retried_reads.get_or_create(&Reason { reason }).inc();
    }

    /// The text exposition of everything registered.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
