//! Where a client's next transaction goes: what it intends (from its first
//! message, see `pgheal_protocol::intent`) and the topology decide.

pub use pgheal_protocol::intent::{intent, sql_intent, Intent};

use super::cluster::{NodeStatus, Role, Topology};

/// How fresh a replica must be to serve a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaFit {
    /// Replayed at least this far (read-your-writes).
    pub min_lsn: u64,
    /// `max_replica_lag`.
    pub max_lag: std::time::Duration,
    /// `max_replica_lag_bytes`.
    pub max_bytes: u64,
    /// Streams from a primary, on the primary's timeline when the probe
    /// can see it.
    pub streaming: bool,
}

impl ReplicaFit {
    pub const ANY: ReplicaFit = ReplicaFit {
        min_lsn: 0,
        max_lag: std::time::Duration::MAX,
        max_bytes: u64::MAX,
        streaming: false,
    };

    /// Whether replica `n` fits, with the primary on `timeline`.
    pub fn fits(&self, n: &NodeStatus, timeline: Option<u32>) -> bool {
        let current = !self.streaming
            || (n.streaming
                && (timeline.is_none() || n.timeline.is_none() || n.timeline == timeline));
        n.role == Role::Replica
            && current
            && n.lsn >= self.min_lsn
            && n.replay_lag <= self.max_lag
            && n.lag_bytes.unwrap_or(0) <= self.max_bytes
    }
}

/// Where to run, by node index, or that nothing fits now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Node(usize),
    /// A write with no single primary.
    NoPrimary,
    /// Nothing is up at all.
    NoNode,
}

/// Reads go to the least busy replica that has replayed at least
/// `min_lsn` when `read_routing` is on, or when there is no primary to any
/// replica that has (lag limits aside; `min_lsn` capped at what the nodes
/// have received); everything else goes to the primary. A read with no
/// primary and no node that has replayed that far is `NoPrimary`: it
/// waits, as a write does. So does every read while there is no primary
/// and a node has not been probed yet (pgheal just started, or RELOAD
/// added it): that node may be the primary, and a replica serves reads
/// only when there is none.
pub fn decide(
    topology: &Topology,
    intent: Intent,
    read_routing: bool,
    fit: ReplicaFit,
    busy: impl Fn(usize) -> usize,
) -> Decision {
    let primary = topology.primary_index();
    // Without a primary, availability wins over freshness, but not over
    // the client's own writes: a node must have replayed them, or all that
    // any node that is up has received (a write that reached none of them
    // died with its primary).
    let fit = if primary.is_some() {
        fit
    } else {
        ReplicaFit {
            min_lsn: fit.min_lsn.min(received(topology)),
            ..ReplicaFit::ANY
        }
    };
    let timeline = topology.primary().and_then(|p| p.timeline);
    let replica = || {
        (0..topology.nodes.len())
            .filter(|&i| fit.fits(&topology.nodes[i], timeline))
            .min_by_key(|&i| busy(i))
    };
    if intent.reads_only() && (read_routing || (primary.is_none() && topology.settled())) {
        if let Some(r) = replica() {
            return Decision::Node(r);
        }
    }
    if let Some(p) = primary {
        return Decision::Node(p);
    }
    let up = |i: &usize| matches!(topology.nodes[*i].role, Role::Primary | Role::Replica);
    if !(0..topology.nodes.len()).any(|i| up(&i)) {
        return Decision::NoNode;
    }
    if !topology.settled() && !read_routing {
        return Decision::NoPrimary;
    }
    // Split brain: either claimant may serve a read, neither a write.
    let claimant = (0..topology.nodes.len())
        .filter(up)
        .find(|&i| topology.nodes[i].lsn >= fit.min_lsn);
    match claimant {
        Some(i) if intent.reads_only() => Decision::Node(i),
        _ => Decision::NoPrimary,
    }
}

/// The most WAL any node that is up has received, counting only probes
/// taken after the last node went down (before, a replica may still have
/// been receiving from a dying primary); `u64::MAX` when none is known.
fn received(topology: &Topology) -> u64 {
    let lost = topology.nodes.iter().filter_map(|n| n.down_since).max();
    topology
        .nodes
        .iter()
        .filter(|n| matches!(n.role, Role::Primary | Role::Replica))
        .filter(|n| lost.is_none_or(|d| n.probed_at.is_some_and(|p| p > d)))
        .map(|n| n.received.max(n.lsn))
        .max()
        .unwrap_or(u64::MAX)
}

/// After `write_wait` a plain BEGIN goes to a replica, where PostgreSQL
/// itself refuses the writes inside it and the reads still work.
pub fn degraded_begin(topology: &Topology, busy: impl Fn(usize) -> usize) -> Option<usize> {
    (0..topology.nodes.len())
        .filter(|&i| topology.nodes[i].role == Role::Replica)
        .min_by_key(|&i| busy(i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cluster::NodeStatus;

    fn topo(roles: &[Role]) -> Topology {
        Topology {
            nodes: roles
                .iter()
                .map(|&role| NodeStatus::new("h:1", role))
                .collect(),
        }
    }

    #[test]
    fn decisions() {
        let t = topo(&[Role::Replica, Role::Primary, Role::Replica]);
        let busy = |i: usize| if i == 0 { 5 } else { 1 };
        assert_eq!(
            decide(&t, Intent::Read, true, ReplicaFit::ANY, busy),
            Decision::Node(2),
            "least busy replica"
        );
        assert_eq!(
            decide(&t, Intent::Read, false, ReplicaFit::ANY, busy),
            Decision::Node(1)
        );
        assert_eq!(
            decide(&t, Intent::Write, true, ReplicaFit::ANY, busy),
            Decision::Node(1)
        );
        assert_eq!(
            decide(&t, Intent::ReadOnlyTx, true, ReplicaFit::ANY, busy),
            Decision::Node(2)
        );
        // A replica behind the client's last write gets none of its reads.
        assert_eq!(
            decide(
                &t,
                Intent::Read,
                true,
                ReplicaFit {
                    min_lsn: 1,
                    ..ReplicaFit::ANY
                },
                busy
            ),
            Decision::Node(1)
        );
        let degraded = topo(&[Role::Replica, Role::Down]);
        assert_eq!(
            decide(&degraded, Intent::Read, false, ReplicaFit::ANY, busy),
            Decision::Node(0)
        );
        assert_eq!(
            decide(&degraded, Intent::Write, false, ReplicaFit::ANY, busy),
            Decision::NoPrimary
        );
        assert_eq!(degraded_begin(&degraded, busy), Some(0));
        let split = topo(&[Role::Primary, Role::Primary]);
        assert_eq!(
            decide(&split, Intent::Write, false, ReplicaFit::ANY, busy),
            Decision::NoPrimary
        );
        assert_eq!(
            decide(&split, Intent::Read, false, ReplicaFit::ANY, busy),
            Decision::Node(0)
        );
        // Before the first probe of every node, no primary may only mean
        // its probe has not answered yet: reads wait unless read routing
        // sends them to replicas anyway.
        let starting = topo(&[Role::Unknown, Role::Replica]);
        assert_eq!(
            decide(&starting, Intent::Read, false, ReplicaFit::ANY, busy),
            Decision::NoPrimary
        );
        assert_eq!(
            decide(&starting, Intent::Read, true, ReplicaFit::ANY, busy),
            Decision::Node(1)
        );
        let down = topo(&[Role::Down, Role::Down]);
        assert_eq!(
            decide(&down, Intent::Read, true, ReplicaFit::ANY, busy),
            Decision::NoNode
        );
    }

    #[test]
    fn without_a_primary_a_read_waits_for_a_node_with_the_clients_own_write() {
        let mut t = topo(&[Role::Down, Role::Replica, Role::Replica]);
        t.nodes[0].received = 900; // down: what it had does not count
        t.nodes[1].lsn = 100;
        t.nodes[2].lsn = 200;
        t.nodes[2].received = 300;
        let lagging = |min_lsn| ReplicaFit {
            min_lsn,
            max_lag: std::time::Duration::ZERO,
            max_bytes: 0,
            streaming: true,
        };
        let busy = |i: usize| if i == 2 { 9 } else { 1 };
        assert_eq!(
            decide(&t, Intent::Read, true, lagging(0), busy),
            Decision::Node(1),
            "no write of its own: any replica, lag and streaming aside"
        );
        assert_eq!(
            decide(&t, Intent::Read, true, lagging(150), busy),
            Decision::Node(2),
            "only the replica that has replayed the client's write"
        );
        assert_eq!(
            decide(&t, Intent::Read, true, lagging(250), busy),
            Decision::NoPrimary,
            "received but not yet replayed: wait"
        );
        assert_eq!(
            decide(&t, Intent::Read, true, lagging(u64::MAX), busy),
            Decision::NoPrimary,
            "position unknown: wait for all that was received to be replayed"
        );
        t.nodes[2].lsn = 300;
        assert_eq!(
            decide(&t, Intent::Read, true, lagging(u64::MAX), busy),
            Decision::Node(2),
            "the node with all that was received"
        );
        assert_eq!(
            decide(&t, Intent::Read, true, lagging(400), busy),
            Decision::Node(2),
            "a write no node received is not waited for"
        );
        // What a replica had received before the primary was found down
        // may not be all it gets: only a later probe caps the wait.
        let now = std::time::Instant::now();
        t.nodes[2].lsn = 200;
        t.nodes[2].probed_at = Some(now);
        t.nodes[0].down_since = Some(now + std::time::Duration::from_millis(1));
        assert_eq!(
            decide(&t, Intent::Read, true, lagging(u64::MAX), busy),
            Decision::NoPrimary,
            "received as probed before the loss"
        );
        t.nodes[2].probed_at = Some(now + std::time::Duration::from_millis(2));
        t.nodes[2].lsn = 300;
        assert_eq!(
            decide(&t, Intent::Read, true, lagging(u64::MAX), busy),
            Decision::Node(2),
            "received as probed after the loss"
        );
        let mut split = topo(&[Role::Primary, Role::Primary]);
        split.nodes[1].lsn = 300;
        assert_eq!(
            decide(&split, Intent::Read, false, lagging(250), busy),
            Decision::Node(1),
            "split brain: the claimant that has the client's write"
        );
    }

    #[test]
    fn a_replica_fits_only_while_it_follows_the_primary() {
        let fit = ReplicaFit {
            min_lsn: 0,
            max_lag: std::time::Duration::from_secs(1),
            max_bytes: 1000,
            streaming: true,
        };
        let mut n = NodeStatus::new("r", Role::Replica);
        n.streaming = true;
        assert!(
            fit.fits(&n, Some(2)),
            "timeline not visible: the LSNs decide"
        );
        n.timeline = Some(2);
        assert!(fit.fits(&n, Some(2)));
        assert!(!fit.fits(&n, Some(3)), "a replica on another timeline");
        n.lag_bytes = Some(1001);
        assert!(!fit.fits(&n, Some(2)), "too many bytes behind");
        n.lag_bytes = Some(10);
        n.replay_lag = std::time::Duration::from_secs(2);
        assert!(!fit.fits(&n, Some(2)), "too long behind");
        n.replay_lag = std::time::Duration::ZERO;
        n.streaming = false;
        assert!(!fit.fits(&n, Some(2)), "streams from nobody");
        assert!(
            ReplicaFit::ANY.fits(&n, Some(3)),
            "without a primary anything up serves reads"
        );
    }
}
