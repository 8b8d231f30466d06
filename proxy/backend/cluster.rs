//! Health checks and role discovery. Each node has a loop on its own
//! connection (not from the pool) that asks, every `[health] interval`,
//! whether the node is in recovery and where its WAL is. Results are
//! published as a topology snapshot that sessions read without locks.
//! Roles are discovered, never configured.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rand::Rng;
use tokio::sync::{watch, Notify};

use super::conn::{ConnectSpec, ServerConn, UpstreamError};
use crate::config::{Config, Database, HealthConfig};
use crate::sync::lock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not probed yet.
    Unknown,
    Primary,
    Replica,
    /// The last probe failed; retried with backoff.
    Down,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Unknown => "unknown",
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Down => "down",
        }
    }
}

/// What a database can do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One primary: reads and writes.
    ReadWrite,
    /// Replicas only (or two claimants to primary): reads.
    ReadOnly,
    /// No node up.
    Down,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::ReadWrite => "read-write",
            Mode::ReadOnly => "read-only",
            Mode::Down => "down",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct NodeStatus {
    pub addr: Arc<str>,
    pub role: Role,
    /// Current WAL position on a primary, replayed position on a replica.
    pub lsn: u64,
    /// Consecutive failed probes.
    pub failures: u32,
    /// When the last successful probe was taken.
    pub probed_at: Option<std::time::Instant>,
    /// When the last probe ended, successful or not.
    pub checked_at: Option<std::time::Instant>,
    /// A replica's replay delay: zero when it has replayed all it received,
    /// else the age of the last transaction it replayed.
    pub replay_lag: Duration,
    pub last_error: Option<String>,
    /// When a failing node is probed next (after backoff).
    pub retry_at: Option<std::time::Instant>,
}

impl NodeStatus {
    /// A node nothing is known about yet but its role.
    pub fn new(addr: &str, role: Role) -> NodeStatus {
        NodeStatus {
            addr: Arc::from(addr),
            role,
            lsn: 0,
            failures: 0,
            probed_at: None,
            checked_at: None,
            replay_lag: Duration::ZERO,
            last_error: None,
            retry_at: None,
        }
    }
}

/// How pgheal's health-check connections show in pg_stat_activity.
pub const HEALTH_APPLICATION_NAME: &str = "pgheal health check";

/// Credentials for a database's health checks: `[health]`'s, else the
/// database's own upstream user and password, else the first `[[users]]`
/// entry with a plain password (when clients' own credentials pass upstream).
pub fn health_spec(config: &Config, db: &Database) -> Option<ConnectSpec> {
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

/// What is known about one database's nodes at one moment.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    pub nodes: Vec<NodeStatus>,
}

impl Topology {
    /// Read-write with one primary, read-only with replicas (or a split
    /// brain) only, down with no node up.
    pub fn mode(&self) -> Mode {
        if self.primary().is_some() {
            Mode::ReadWrite
        } else if self
            .nodes
            .iter()
            .any(|n| matches!(n.role, Role::Replica | Role::Primary))
        {
            Mode::ReadOnly
        } else {
            Mode::Down
        }
    }

    /// The node to write to: the one node claiming to be primary. Two or
    /// more claimants (split brain) give none.
    pub fn primary(&self) -> Option<&NodeStatus> {
        let mut primaries = self.nodes.iter().filter(|n| n.role == Role::Primary);
        match (primaries.next(), primaries.next()) {
            (Some(p), None) => Some(p),
            _ => None,
        }
    }

    /// The index of [`Topology::primary`].
    pub fn primary_index(&self) -> Option<usize> {
        let mut primaries = (0..self.nodes.len()).filter(|&i| self.nodes[i].role == Role::Primary);
        match (primaries.next(), primaries.next()) {
            (Some(p), None) => Some(p),
            _ => None,
        }
    }

    pub fn count(&self, role: Role) -> usize {
        self.nodes.iter().filter(|n| n.role == role).count()
    }
}

/// The health loops of one database and the topology they publish.
pub struct Cluster {
    pub database: String,
    state: Mutex<Topology>,
    publish: watch::Sender<Arc<Topology>>,
    /// One per node: wakes its health loop for an immediate probe.
    wake: Vec<Arc<Notify>>,
    probing: bool,
    /// Times a node became primary after having another role.
    failovers: std::sync::atomic::AtomicU64,
}

const PROBE: &str = "SELECT pg_is_in_recovery(), \
    CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, \
    CASE WHEN NOT pg_is_in_recovery() OR pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 \
         ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0) END";

impl Cluster {
    /// Starts one health loop per node. With no credentials there is
    /// nothing to probe with: the topology stays empty.
    pub fn start(
        database: &str,
        nodes: &[String],
        health: &HealthConfig,
        spec: Option<ConnectSpec>,
    ) -> Arc<Cluster> {
        let topology = Topology {
            nodes: nodes
                .iter()
                .map(|addr| NodeStatus::new(addr, Role::Unknown))
                .collect(),
        };
        let (publish, _) = watch::channel(Arc::new(topology.clone()));
        let cluster = Arc::new(Cluster {
            database: database.to_string(),
            state: Mutex::new(topology),
            publish,
            wake: nodes.iter().map(|_| Arc::new(Notify::new())).collect(),
            probing: spec.is_some(),
            failovers: Default::default(),
        });
        match spec {
            Some(spec) => {
                for (index, addr) in nodes.iter().enumerate() {
                    let spec = ConnectSpec {
                        addr: addr.clone(),
                        connect_timeout: health.timeout,
                        ..spec.clone()
                    };
                    let wake = cluster.wake[index].clone();
                    tokio::spawn(node_loop(Arc::downgrade(&cluster), index, spec, health.clone(), wake));
                }
            }
            None => tracing::warn!(
                database,
                "no credentials for health checks (set the database's user/password or [health] user/password); \
                 roles are not discovered and the first node serves everything"
            ),
        }
        cluster
    }

    /// False when there are no credentials to probe with: then the first
    /// node serves everything.
    pub fn is_probing(&self) -> bool {
        self.probing
    }

    /// Something on the data path suggests `addr` changed (a refused
    /// connection, a lost server, a 25006 where a primary was expected):
    /// probe it now rather than at the next interval.
    pub fn nudge(&self, addr: &str) {
        let state = lock(&self.state);
        if let Some(i) = state.nodes.iter().position(|n| &*n.addr == addr) {
            if let Some(w) = self.wake.get(i) {
                w.notify_one();
            }
        }
    }

    /// Probes `addr` now and returns its role as that probe found it
    /// (`Down` when it failed), or `None` when no probe ended `within`.
    /// Tells a session ended on purpose (the node still answers in the same
    /// role) from a node that failed or is shutting down.
    pub async fn recheck(&self, addr: &str, within: std::time::Duration) -> Option<Role> {
        let asked = std::time::Instant::now();
        self.nudge(addr);
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            let topology = self.snapshot();
            let node = topology.nodes.iter().find(|n| &*n.addr == addr)?;
            // A success counts only from a probe that started after the
            // question (one already under way may predate the failure).
            if node.probed_at.is_some_and(|at| at > asked) {
                return Some(node.role);
            }
            if node.role == Role::Down && node.checked_at.is_some_and(|at| at > asked) {
                return Some(Role::Down);
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        None
    }

    pub fn failovers(&self) -> u64 {
        self.failovers.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Each node's role now, in configuration order.
    pub fn roles(&self) -> Vec<Role> {
        self.snapshot().nodes.iter().map(|n| n.role).collect()
    }

    pub fn snapshot(&self) -> Arc<Topology> {
        self.publish.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Topology>> {
        self.publish.subscribe()
    }

    fn update(&self, index: usize, change: impl FnOnce(&mut NodeStatus)) {
        let mut state = lock(&self.state);
        let mode_before = state.mode();
        let Some(node) = state.nodes.get_mut(index) else {
            return;
        };
        let before = node.role;
        change(node);
        let after = node.role;

        if before != after {
            tracing::warn!(database = %self.database, node = %node.addr, from = ?before, to = ?after, "node role changed");
            if after == Role::Primary && before != Role::Unknown {
                self.failovers
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            if state.count(Role::Primary) > 1 {
                tracing::error!(
                    database = %self.database,
                    "more than one node claims to be primary: no writes until exactly one remains"
                );
            }
        }
        if mode_before != state.mode() {
            tracing::warn!(database = %self.database, from = %mode_before, to = %state.mode(), "database mode changed");
        }
        let snapshot = Arc::new(state.clone());
        drop(state);
        if before != after {
            self.publish.send_replace(snapshot);
        } else {
            // LSN and failure counts change without waking anybody.
            self.publish.send_if_modified(|current| {
                *current = snapshot;
                false
            });
        }
    }
}

/// Probes one node forever (until the cluster is dropped).
async fn node_loop(
    cluster: Weak<Cluster>,
    index: usize,
    spec: ConnectSpec,
    health: HealthConfig,
    wake: Arc<Notify>,
) {
    let mut conn: Option<ServerConn> = None;
    let mut failures = 0u32;
    loop {
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(health.timeout, probe(&mut conn, &spec)).await;
        let result = result.unwrap_or_else(|_| {
            Err(UpstreamError::Timeout {
                addr: spec.addr.clone(),
                timeout: health.timeout,
            })
        });
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        let wait = match result {
            Ok((role, lsn, lag)) => {
                failures = 0;
                cluster.update(index, |n| {
                    n.role = role;
                    n.lsn = lsn;
                    n.replay_lag = lag;
                    n.probed_at = Some(started);
                    n.checked_at = Some(std::time::Instant::now());
                    n.failures = 0;
                    n.last_error = None;
                    n.retry_at = None;
                });
                health.interval
            }
            Err(e) => {
                conn = None;
                failures = failures.saturating_add(1);
                let message = e.to_string();
                let wait = backoff(&health, failures);
                cluster.update(index, |n| {
                    n.checked_at = Some(std::time::Instant::now());
                    n.role = Role::Down;
                    n.failures = failures;
                    n.last_error = Some(message);
                    n.retry_at = Some(std::time::Instant::now() + wait);
                });
                wait
            }
        };
        drop(cluster);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = wake.notified() => {}
        }
    }
}

async fn probe(
    conn: &mut Option<ServerConn>,
    spec: &ConnectSpec,
) -> Result<(Role, u64, Duration), UpstreamError> {
    if conn.is_none() {
        *conn = Some(ServerConn::connect(spec).await?);
    }
    let Some(c) = conn.as_mut() else {
        return Err(UpstreamError::Protocol {
            addr: spec.addr.clone(),
            what: "no health connection".into(),
        });
    };
    let rows = c.query_rows(PROBE).await?;
    let row = rows.first().ok_or_else(|| UpstreamError::Protocol {
        addr: spec.addr.clone(),
        what: "health probe returned no row".into(),
    })?;
    let role = match row.first().and_then(|v| v.as_deref()) {
        Some("f") => Role::Primary,
        Some("t") => Role::Replica,
        other => {
            return Err(UpstreamError::Protocol {
                addr: spec.addr.clone(),
                what: format!("pg_is_in_recovery() returned {other:?}"),
            })
        }
    };
    let lsn = row
        .get(1)
        .and_then(|v| v.as_deref())
        .and_then(parse_lsn)
        .unwrap_or(0);
    let lag = row
        .get(2)
        .and_then(|v| v.as_deref())
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(Duration::ZERO, |s| Duration::from_secs_f64(s.min(1e9)));
    Ok((role, lsn, lag))
}

/// `16/B374D848` as a number.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some(u64::from_str_radix(hi, 16).ok()? << 32 | u64::from_str_radix(lo, 16).ok()?)
}

/// Exponential backoff with jitter: between half and all of
/// `initial * multiplier^(failures-1)`, capped at `max`.
pub fn backoff(health: &HealthConfig, failures: u32) -> Duration {
    let exp = health
        .backoff_multiplier
        .powi(failures.saturating_sub(1).min(64) as i32);
    let full = health
        .backoff_initial
        .mul_f64(exp.min(1e6))
        .min(health.backoff_max);
    let half = full / 2;
    half + half.mul_f64(rand::thread_rng().gen_range(0.0..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_parsing() {
        assert_eq!(parse_lsn("0/3000060"), Some(0x3000060));
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn("nope"), None);
        assert_eq!(parse_lsn("1/zz"), None);
    }

    #[test]
    fn backoff_grows_with_jitter_and_stays_capped() {
        let h = HealthConfig::default();
        for failures in 1..40 {
            let d = backoff(&h, failures);
            let full = h
                .backoff_initial
                .mul_f64(2f64.powi(failures as i32 - 1))
                .min(h.backoff_max);
            assert!(d >= full / 2 && d <= full, "{failures}: {d:?} vs {full:?}");
        }
        assert!(backoff(&h, 1) <= Duration::from_millis(100));
        assert!(backoff(&h, 30) >= Duration::from_secs(5));
    }

    #[test]
    fn split_brain_has_no_primary() {
        let node = |role| NodeStatus::new("x:1", role);
        let one = Topology {
            nodes: vec![node(Role::Primary), node(Role::Replica)],
        };
        assert!(one.primary().is_some());
        let two = Topology {
            nodes: vec![node(Role::Primary), node(Role::Primary)],
        };
        assert!(two.primary().is_none());
        assert!(Topology::default().primary().is_none());
    }
}
