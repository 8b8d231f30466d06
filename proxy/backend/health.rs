//! Health checks, one loop per node. Each loop keeps its own connection to
//! the node's maintenance database (`[health] database`, `postgres` unless
//! set) and asks, every `[health] interval`, whether the node is in
//! recovery and where its WAL is. Every database listing the node reads the
//! same loop, so pgheal never holds a connection to a database just to
//! watch it (a `DROP DATABASE` or `CREATE DATABASE ... TEMPLATE` of it
//! works), and a database created after pgheal started is served at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::{watch, Notify};

use super::conn::{ConnectSpec, ServerConn, UpstreamError};
use crate::config::{Config, HealthConfig};
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

#[derive(Debug, Clone)]
pub struct NodeStatus {
    pub addr: Arc<str>,
    pub role: Role,
    /// Current WAL position on a primary, replayed position on a replica.
    pub lsn: u64,
    /// WAL a replica has received and flushed (at least `lsn`; what it
    /// will have replayed once it catches up); a primary's `lsn`.
    pub received: u64,
    /// Consecutive failed probes.
    pub failures: u32,
    /// When the last successful probe was taken.
    pub probed_at: Option<Instant>,
    /// When the last probe ended, successful or not.
    pub checked_at: Option<Instant>,
    /// When the first of the current run of failed probes ended.
    pub down_since: Option<Instant>,
    /// How stale a replica is: the larger of its replay delay (what it
    /// received but has not replayed) and how long ago the primary wrote
    /// WAL it has not replayed (see `Cluster`). Zero for a primary.
    pub replay_lag: Duration,
    /// The probe's replay delay alone: zero when a replica has replayed all
    /// it received, else the age of the last transaction it replayed.
    pub replay_delay: Duration,
    /// How many bytes of WAL the primary had, at its last probe before this
    /// replica's, that the replica has not replayed (`None`: no primary).
    pub lag_bytes: Option<u64>,
    /// The timeline a primary writes, or a replica streams (`None` when
    /// the health user may not see it: pg_read_all_stats, or no stream).
    pub timeline: Option<u32>,
    /// A replica has a WAL receiver (it streams from some primary).
    pub streaming: bool,
    pub last_error: Option<String>,
    /// When a failing node is probed next (after backoff).
    pub retry_at: Option<Instant>,
}

impl NodeStatus {
    /// A node nothing is known about yet but its role.
    pub fn new(addr: &str, role: Role) -> NodeStatus {
        NodeStatus {
            addr: Arc::from(addr),
            role,
            lsn: 0,
            received: 0,
            failures: 0,
            probed_at: None,
            checked_at: None,
            down_since: None,
            replay_lag: Duration::ZERO,
            replay_delay: Duration::ZERO,
            lag_bytes: None,
            timeline: None,
            streaming: false,
            last_error: None,
            retry_at: None,
        }
    }
}

/// How pgheal's health-check connections show in pg_stat_activity.
pub const HEALTH_APPLICATION_NAME: &str = "pgheal health check";

/// How the health loop of the node at `addr` logs in: as `[health]` user
/// when set, else as the first database listing the node (its upstream
/// user, else the first `[[users]]` entry with a password; the password
/// of the database section, else of that user's `[[users]]` entry), always to
/// `[health] database`, with the TLS settings of the first database listing
/// the node. `None` when there are no credentials to probe with.
pub fn health_spec(config: &Config, addr: &str) -> Option<ConnectSpec> {
    let db = config
        .databases
        .values()
        .find(|d| d.nodes.iter().any(|n| n == addr))?;
    let (user, password) = match &config.health.user {
        Some(u) => (u.clone(), config.health.password.clone()),
        // The database's upstream user, with the password of its
        // [[users]] entry when the database section gives none.
        None => super::conn::direct_credentials(config, db),
    };
    if user.is_empty() {
        return None;
    }
    Some(ConnectSpec {
        addr: addr.to_string(),
        user,
        password,
        database: config.health.database.clone(),
        connect_timeout: config.health.timeout,
        application_name: Some(HEALTH_APPLICATION_NAME),
        tls: db.tls.clone(),
        scram_keys: None,
    })
}

/// The health loop of one node: its latest status, and a way to ask for a
/// probe now. The loop ends when the last holder drops it.
pub struct NodeProbe {
    status: watch::Sender<NodeStatus>,
    wake: Arc<Notify>,
    /// Databases on this node with no usable primary now: while any, a
    /// failing node is retried every interval, without backoff, so writes
    /// resume within one interval of a primary answering.
    hurry: AtomicUsize,
}

impl NodeProbe {
    /// Probe now rather than at the next interval.
    pub fn nudge(&self) {
        self.wake.notify_one();
    }

    /// A database on this node lost (`true`) or regained its primary.
    pub fn hurry(&self, on: bool) {
        if on {
            self.hurry.fetch_add(1, Ordering::AcqRel);
            self.nudge();
        } else {
            let _ = self
                .hurry
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        }
    }

    fn in_hurry(&self) -> bool {
        self.hurry.load(Ordering::Acquire) > 0
    }

    pub fn subscribe(&self) -> watch::Receiver<NodeStatus> {
        self.status.subscribe()
    }

    /// A probe that has found `status` and probes no more (tests).
    #[cfg(test)]
    pub(crate) fn found(status: NodeStatus) -> NodeProbe {
        NodeProbe {
            status: watch::channel(status).0,
            wake: Arc::new(Notify::new()),
            hurry: AtomicUsize::new(0),
        }
    }

    pub fn status(&self) -> NodeStatus {
        self.status.borrow().clone()
    }
}

/// What identifies a health loop: the same node probed the same way is
/// probed once, whichever databases ask.
#[derive(Clone)]
struct ProbeKey {
    spec: ConnectSpec,
    health: HealthConfig,
}

impl PartialEq for ProbeKey {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (&self.spec, &other.spec);
        a.addr == b.addr
            && a.user == b.user
            && a.password == b.password
            && a.database == b.database
            && a.tls == b.tls
            && self.health == other.health
    }
}

/// The health loops running now, shared by every database (and kept across
/// reloads while a database still uses them).
#[derive(Default)]
pub struct Probes {
    running: Mutex<Vec<(ProbeKey, Weak<NodeProbe>)>>,
}

impl Probes {
    /// The loop probing `spec.addr` with `spec`, started when none runs.
    pub fn get(&self, spec: ConnectSpec, health: &HealthConfig) -> Arc<NodeProbe> {
        let key = ProbeKey {
            spec,
            health: health.clone(),
        };
        let mut running = lock(&self.running);
        running.retain(|(_, probe)| probe.strong_count() > 0);
        if let Some(probe) = running
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, p)| p.upgrade())
        {
            return probe;
        }
        let wake = Arc::new(Notify::new());
        let probe = Arc::new(NodeProbe {
            status: watch::Sender::new(NodeStatus::new(&key.spec.addr, Role::Unknown)),
            wake: wake.clone(),
            hurry: AtomicUsize::new(0),
        });
        running.push((key.clone(), Arc::downgrade(&probe)));
        tokio::spawn(node_loop(
            Arc::downgrade(&probe),
            wake,
            key.spec,
            key.health,
        ));
        probe
    }
}

/// Probes one node until its [`NodeProbe`] is dropped.
async fn node_loop(
    probe: Weak<NodeProbe>,
    wake: Arc<Notify>,
    spec: ConnectSpec,
    health: HealthConfig,
) {
    let mut conn: Option<ServerConn> = None;
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        let result = tokio::time::timeout(health.timeout, probe_node(&mut conn, &spec)).await;
        let result = result.unwrap_or_else(|_| {
            Err(UpstreamError::Timeout {
                addr: spec.addr.clone(),
                timeout: health.timeout,
            })
        });
        let Some(probe) = probe.upgrade() else {
            return;
        };
        let wait = match result {
            Ok(found) => {
                failures = 0;
                probe.status.send_modify(|n| found.apply(n, started));
                health.interval
            }
            Err(e) => {
                conn = None;
                failures = failures.saturating_add(1);
                let mut wait = backoff(&health, failures);
                if probe.in_hurry() {
                    wait = wait.min(health.interval);
                }
                probe.status.send_modify(|n| {
                    n.checked_at = Some(Instant::now());
                    n.down_since = n.down_since.or(n.checked_at);
                    n.role = Role::Down;
                    n.failures = failures;
                    n.last_error = Some(e.to_string());
                    n.retry_at = Some(Instant::now() + wait);
                });
                wait
            }
        };
        drop(probe);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = wake.notified() => {}
        }
    }
}

/// What one successful probe found.
struct Found {
    role: Role,
    lsn: u64,
    received: u64,
    lag: Duration,
    timeline: Option<u32>,
    streaming: bool,
}

impl Found {
    fn apply(&self, n: &mut NodeStatus, started: Instant) {
        n.role = self.role;
        n.lsn = self.lsn;
        n.received = self.received;
        n.replay_delay = self.lag;
        n.replay_lag = self.lag;
        n.timeline = self.timeline;
        n.streaming = self.streaming;
        n.probed_at = Some(started);
        n.checked_at = Some(Instant::now());
        n.down_since = None;
        n.failures = 0;
        n.last_error = None;
        n.retry_at = None;
    }
}

/// Role, WAL position, replay delay, timeline (a primary's from its WAL
/// file name; a replica's from its WAL receiver, visible with
/// pg_read_all_stats), whether a replica has a WAL receiver (visible to
/// anyone) and what it has received. Everything else needs no privilege.
const PROBE: &str = "SELECT pg_is_in_recovery(), \
    CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, \
    CASE WHEN NOT pg_is_in_recovery() OR pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 \
         ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0) END, \
    CASE WHEN pg_is_in_recovery() THEN (SELECT received_tli FROM pg_stat_wal_receiver) \
         ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END, \
    EXISTS (SELECT 1 FROM pg_stat_wal_receiver), \
    CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() END";

/// One probe. A kept connection that fails (an administrator ended it, a
/// restart in between) is replaced at once: only a fresh connection's
/// failure says something about the node.
async fn probe_node(
    conn: &mut Option<ServerConn>,
    spec: &ConnectSpec,
) -> Result<Found, UpstreamError> {
    if let Some(c) = conn.as_mut() {
        match ask(c, spec).await {
            Ok(found) => return Ok(found),
            Err(e) => {
                tracing::debug!(node = %spec.addr, error = %e, "health connection failed; reconnecting")
            }
        }
    }
    let c = conn.insert(ServerConn::connect(spec).await?);
    ask(c, spec).await
}

async fn ask(c: &mut ServerConn, spec: &ConnectSpec) -> Result<Found, UpstreamError> {
    let protocol = |what: String| UpstreamError::Protocol {
        addr: spec.addr.clone(),
        what,
    };
    let rows = c.query_rows(PROBE).await?;
    let row = rows
        .first()
        .ok_or_else(|| protocol("health probe returned no row".into()))?;
    let role = match row.first().and_then(|v| v.as_deref()) {
        Some("f") => Role::Primary,
        Some("t") => Role::Replica,
        other => return Err(protocol(format!("pg_is_in_recovery() returned {other:?}"))),
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
    let timeline = row
        .get(3)
        .and_then(|v| v.as_deref())
        .and_then(|v| v.parse::<u32>().ok());
    let streaming = row.get(4).and_then(|v| v.as_deref()) == Some("t");
    let received = row
        .get(5)
        .and_then(|v| v.as_deref())
        .and_then(parse_lsn)
        .map_or(lsn, |r| r.max(lsn));
    Ok(Found {
        role,
        lsn,
        received,
        lag,
        timeline,
        streaming,
    })
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
    fn probes_log_in_with_the_users_password_when_the_database_names_only_the_user() {
        let config = Config::parse(
            "[[users]]\nname = \"other\"\npassword = \"o\"\n\
             [[users]]\nname = \"app\"\npassword = \"a\"\n\
             [databases.app]\nnodes = [\"127.0.0.1:5432\"]\nuser = \"app\"\n",
        )
        .expect("config");
        let spec = health_spec(&config, "127.0.0.1:5432").expect("a spec");
        assert_eq!(
            (spec.user.as_str(), spec.password.as_deref()),
            ("app", Some("a"))
        );
        assert!(health_spec(&config, "127.0.0.1:9").is_none());
    }

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
}
