//! A database's view of its nodes: the topology its sessions route by,
//! composed from the node health loops (`health.rs`) it shares with every
//! other database on the same nodes, with role and mode changes logged per
//! database. Roles are discovered, never configured.

use std::sync::{Arc, Mutex, Weak};

use tokio::sync::watch;

use super::freshness::Samples;
use super::health::NodeProbe;
use super::router::ReplicaFit;
use crate::events::{At, Events, Kind, Level};
use crate::sync::lock;

pub use super::health::{NodeStatus, Role, HEALTH_APPLICATION_NAME};

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

    /// Whether the mode means what it says: a primary is known, or every
    /// node has been probed at least once. Before that (just after start, a
    /// replica's first probe answered before the primary's), "no primary"
    /// only means "not heard from yet".
    pub fn settled(&self) -> bool {
        self.primary().is_some() || self.nodes.iter().all(|n| n.role != Role::Unknown)
    }

    /// Why the database is in its mode, when it is not read-write.
    pub fn reason(&self) -> Option<&'static str> {
        match self.mode() {
            Mode::ReadWrite => None,
            Mode::ReadOnly if self.count(Role::Primary) > 1 => {
                Some("more than one node claims to be primary")
            }
            Mode::ReadOnly => Some("no primary is reachable"),
            Mode::Down => Some("no node is up"),
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

/// The topology and the primary's recent WAL positions it is freshened by.
struct State {
    topology: Topology,
    samples: Samples,
    /// The nodes' probes were told to hurry (no usable primary).
    hurrying: bool,
    /// Since when the database has had no primary.
    no_primary_since: Option<std::time::Instant>,
    /// The mode the timeline last told (changes only once settled).
    told: Mode,
    /// Replicas taken out of reads for lag, by node index.
    excluded: Vec<bool>,
}

/// One database's nodes and the topology they publish.
pub struct Cluster {
    pub database: String,
    state: Mutex<State>,
    publish: watch::Sender<Arc<Topology>>,
    /// One per node, in configuration order; empty without credentials.
    probes: Vec<Arc<NodeProbe>>,
    /// Times a node became primary after having another role.
    failovers: std::sync::atomic::AtomicU64,
    /// Replicas serve reads only once replayed this far (the primary's
    /// position after startup migrations).
    floor: std::sync::atomic::AtomicU64,
    /// How stale a replica may be (its database's `max_replica_lag` and
    /// `max_replica_lag_bytes`), for the exclusion events.
    fit: ReplicaFit,
    events: Arc<Events>,
}

impl Cluster {
    /// Follows the health loops of `nodes` (`probes`, one per node in the
    /// same order; none when there are no credentials to probe with: the
    /// topology then stays unknown).
    pub fn start(
        database: &str,
        nodes: &[String],
        probes: Vec<Arc<NodeProbe>>,
        fit: ReplicaFit,
        events: Arc<Events>,
    ) -> Arc<Cluster> {
        let topology = Topology {
            nodes: nodes
                .iter()
                .map(|addr| NodeStatus::new(addr, Role::Unknown))
                .collect(),
        };
        let (publish, _) = watch::channel(Arc::new(topology.clone()));
        if probes.is_empty() {
            tracing::warn!(
                database,
                "no credentials for health checks (set the database's user/password or [health] user/password); \
                 roles are not discovered and the first node serves everything"
            );
        }
        let cluster = Arc::new(Cluster {
            database: database.to_string(),
            state: Mutex::new(State {
                topology,
                samples: Samples::default(),
                hurrying: false,
                no_primary_since: Some(std::time::Instant::now()),
                told: Mode::Down,
                excluded: vec![false; nodes.len()],
            }),
            publish,
            probes,
            failovers: Default::default(),
            floor: Default::default(),
            fit,
            events,
        });
        // The probes may know the nodes already (RELOAD starts a cluster
        // over running probes): start from that, so that no request is
        // routed on an unknown topology before the followers first run (a
        // read would detour to the primary).
        for (index, probe) in cluster.probes.iter().enumerate() {
            let now = probe.status();
            cluster.update(index, |n| *n = now);
        }
        for (index, probe) in cluster.probes.iter().enumerate() {
            tokio::spawn(follow(Arc::downgrade(&cluster), index, probe.subscribe()));
        }
        cluster
    }

    /// False when there are no credentials to probe with: then the first
    /// node serves everything.
    pub fn is_probing(&self) -> bool {
        !self.probes.is_empty()
    }

    /// Something on the data path suggests `addr` changed (a refused
    /// connection, a lost server, a 25006 where a primary was expected):
    /// probe it now rather than at the next interval.
    pub fn nudge(&self, addr: &str) {
        let state = lock(&self.state);
        if let Some(i) = state.topology.nodes.iter().position(|n| &*n.addr == addr) {
            if let Some(probe) = self.probes.get(i) {
                probe.nudge();
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

    /// No replica serves reads before it has replayed up to `lsn`.
    pub fn set_floor(&self, lsn: u64) {
        self.floor
            .fetch_max(lsn, std::sync::atomic::Ordering::Relaxed);
    }

    /// See [`Cluster::set_floor`]; 0 when none was set.
    pub fn floor(&self) -> u64 {
        self.floor.load(std::sync::atomic::Ordering::Relaxed)
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
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        let primaries_before = state.topology.count(Role::Primary);
        let Some(node) = state.topology.nodes.get_mut(index) else {
            return;
        };
        let before = node.role;
        change(node);
        let (after, addr) = (node.role, node.addr.clone());
        if before != after {
            self.role_changed(state, &addr, before, after, primaries_before);
        }
        let mode = state.topology.mode();
        let told = state.told;
        if mode != told && state.topology.settled() {
            self.mode_changed(state, told, mode);
            state.told = mode;
        }
        state.samples.freshen(&mut state.topology.nodes);
        self.note_exclusions(state);
        let hurry = state.topology.primary().is_none();
        if hurry != state.hurrying {
            state.hurrying = hurry;
            for probe in &self.probes {
                probe.hurry(hurry);
            }
        }
        let snapshot = Arc::new(state.topology.clone());
        drop(guard);
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

    /// Records a node's change of role (up, down, promoted, fenced).
    fn role_changed(
        &self,
        state: &mut State,
        addr: &str,
        before: Role,
        after: Role,
        primaries: usize,
    ) {
        let at = At::node(&self.database, addr);
        let (level, kind) = match (before, after) {
            (_, Role::Down) => (Level::Error, Kind::NodeDown),
            (Role::Down | Role::Unknown, _) => (Level::Info, Kind::NodeUp),
            _ => (Level::Warn, Kind::RoleChanged),
        };
        let details = format!("{} -> {}", before.as_str(), after.as_str());
        self.events.record(level, kind, at, details);
        if after == Role::Primary && before != Role::Unknown {
            self.failovers
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let waited = state.no_primary_since.map(|t| t.elapsed());
            let details = match waited {
                Some(w) => format!(
                    "{addr} is primary now; writes were unavailable for {:.1} s",
                    w.as_secs_f64()
                ),
                None => format!("{addr} is primary now"),
            };
            self.events.record(Level::Warn, Kind::Failover, at, details);
        }
        let primaries_now = state.topology.count(Role::Primary);
        let at = At::database(&self.database);
        if primaries_now > 1 && primaries <= 1 {
            let details =
                "more than one node claims to be primary: no writes until exactly one remains";
            self.events
                .record(Level::Error, Kind::SplitBrain, at, details);
        } else if primaries_now <= 1 && primaries > 1 {
            let details = format!("{primaries_now} node(s) claim to be primary now");
            self.events
                .record(Level::Warn, Kind::SplitBrainOver, at, details);
        }
    }

    fn mode_changed(&self, state: &mut State, before: Mode, after: Mode) {
        if after == Mode::ReadWrite {
            state.no_primary_since = None;
        } else if before == Mode::ReadWrite {
            state.no_primary_since = Some(std::time::Instant::now());
        }
        let why = state
            .topology
            .reason()
            .map_or(String::new(), |r| format!(": {r}"));
        let level = if after == Mode::ReadWrite {
            Level::Info
        } else {
            Level::Warn
        };
        let details = format!("{before} -> {after}{why}");
        let at = At::database(&self.database);
        self.events.record(level, Kind::ModeChanged, at, details);
    }

    /// Records replicas leaving and rejoining reads for lag.
    fn note_exclusions(&self, state: &mut State) {
        let timeline = state.topology.primary().and_then(|p| p.timeline);
        for (i, n) in state.topology.nodes.iter().enumerate() {
            let excluded = n.role == Role::Replica && !self.fit.fits(n, timeline);
            let Some(was) = state.excluded.get_mut(i) else {
                continue;
            };
            if n.role != Role::Replica {
                // Down or promoted: its role change is the event.
                *was = false;
                continue;
            }
            if excluded == *was {
                continue;
            }
            *was = excluded;
            let at = At::node(&self.database, &n.addr);
            if excluded {
                let details = if n.streaming {
                    format!(
                        "too far behind: replay lag {:.1} s, {} bytes behind the primary",
                        n.replay_lag.as_secs_f64(),
                        n.lag_bytes.unwrap_or(0)
                    )
                } else {
                    "not streaming from the current primary".to_string()
                };
                self.events
                    .record(Level::Warn, Kind::ReplicaExcluded, at, details);
            } else {
                self.events
                    .record(Level::Info, Kind::ReplicaReadmitted, at, "caught up");
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A database going away (reload) no longer hurries its nodes.
        let hurrying = std::mem::take(&mut lock(&self.state).hurrying);
        if hurrying {
            for probe in &self.probes {
                probe.hurry(false);
            }
        }
    }
}

/// Copies what a node's health loop finds into the database's topology,
/// until the cluster is dropped (or the loop ends).
async fn follow(cluster: Weak<Cluster>, index: usize, mut status: watch::Receiver<NodeStatus>) {
    loop {
        {
            let Some(cluster) = cluster.upgrade() else {
                return;
            };
            let now = status.borrow_and_update().clone();
            cluster.update(index, |n| *n = now);
        }
        if status.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn cluster(nodes: &[&str]) -> (Arc<Cluster>, Arc<Events>) {
        let events = Arc::new(Events::default());
        let nodes: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
        let cluster = Cluster::start("app", &nodes, vec![], ReplicaFit::ANY, events.clone());
        (cluster, events)
    }

    #[tokio::test]
    async fn a_cluster_over_running_probes_knows_the_nodes_before_it_yields() {
        let found = |addr: &str, role| Arc::new(NodeProbe::found(NodeStatus::new(addr, role)));
        let nodes = vec!["p:1".to_string(), "r:1".to_string()];
        let probes = vec![found("p:1", Role::Primary), found("r:1", Role::Replica)];
        let events = Arc::new(Events::default());
        let cluster = Cluster::start("app", &nodes, probes, ReplicaFit::ANY, events);
        // A current-thread runtime: the followers have not run yet.
        let roles: Vec<Role> = cluster
            .subscribe()
            .borrow()
            .nodes
            .iter()
            .map(|n| n.role)
            .collect();
        assert_eq!(roles, [Role::Primary, Role::Replica]);
    }

    fn modes(events: &Events) -> Vec<String> {
        let changes = events.since(0).into_iter();
        changes
            .filter(|e| e.kind == Kind::ModeChanged)
            .map(|e| e.details)
            .collect()
    }

    #[test]
    fn a_replica_heard_first_at_start_is_no_read_only_alarm() {
        let (cluster, events) = cluster(&["p:1", "r:1"]);
        cluster.update(1, |n| n.role = Role::Replica);
        assert!(!cluster.snapshot().settled());
        assert_eq!(modes(&events), Vec::<String>::new());
        cluster.update(0, |n| n.role = Role::Primary);
        assert_eq!(modes(&events), ["down -> read-write"]);
        cluster.update(0, |n| n.role = Role::Down);
        let told = modes(&events);
        assert_eq!(told[1], "read-write -> read-only: no primary is reachable");
    }

    #[test]
    fn a_primary_down_at_start_is_told_once_every_node_answered() {
        let (cluster, events) = cluster(&["p:1", "r:1"]);
        cluster.update(1, |n| n.role = Role::Replica);
        cluster.update(0, |n| n.role = Role::Down);
        assert!(cluster.snapshot().settled());
        assert_eq!(
            modes(&events),
            ["down -> read-only: no primary is reachable"]
        );
    }
}
