//! Where a client's next transaction goes: what it intends (from its first
//! message, through the classifier) and the topology decide.

use pgheal_protocol::classify::{classify, Class};
use pgheal_protocol::frame::HEADER_LEN;

use crate::cluster::{Role, Topology};

/// What the first message of a transaction says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// Writes, or cannot be proven not to.
    Write,
    /// An autocommit read.
    Read,
    /// `BEGIN READ ONLY`.
    ReadOnlyTx,
    /// A plain `BEGIN`: may write.
    Begin,
}

impl Intent {
    pub fn reads_only(self) -> bool {
        matches!(self, Intent::Read | Intent::ReadOnlyTx)
    }
}

/// Reads the intent from the client's buffered bytes, which start at a
/// message boundary. An incomplete or unknown first message is a write.
pub fn intent(buf: &[u8]) -> Intent {
    let Some(&tag) = buf.first() else {
        return Intent::Write;
    };
    let Some(len) = buf
        .get(1..HEADER_LEN)
        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .and_then(|l| usize::try_from(l).ok())
    else {
        return Intent::Write;
    };
    let Some(body) = buf.get(HEADER_LEN..len + 1) else {
        return Intent::Write;
    };
    let sql = match tag {
        b'Q' => body.split(|&b| b == 0).next(),
        // Parse: statement name, then the query.
        b'P' => body.split(|&b| b == 0).nth(1),
        _ => None,
    };
    sql.map_or(Intent::Write, sql_intent)
}

/// The intent of a statement's SQL text.
pub fn sql_intent(sql: &[u8]) -> Intent {
    match classify(sql) {
        Class::Read | Class::Show => Intent::Read,
        Class::Begin { read_only: true } => Intent::ReadOnlyTx,
        Class::Begin { read_only: false } => Intent::Begin,
        _ => Intent::Write,
    }
}

/// How fresh a replica must be to serve a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaFit {
    /// Replayed at least this far (read-your-writes).
    pub min_lsn: u64,
    /// `max_replica_lag`.
    pub max_lag: std::time::Duration,
}

impl ReplicaFit {
    pub const ANY: ReplicaFit = ReplicaFit {
        min_lsn: 0,
        max_lag: std::time::Duration::MAX,
    };
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
/// `min_lsn` when `read_routing` is on, or to any replica when there is no
/// primary; everything else goes to the primary.
pub fn decide(
    topology: &Topology,
    intent: Intent,
    read_routing: bool,
    fit: ReplicaFit,
    busy: impl Fn(usize) -> usize,
) -> Decision {
    let primary = topology.primary_index();
    // Without a primary, availability wins over freshness.
    let fit = if primary.is_some() {
        fit
    } else {
        ReplicaFit::ANY
    };
    let replica = || {
        (0..topology.nodes.len())
            .filter(|&i| {
                let n = &topology.nodes[i];
                n.role == Role::Replica && n.lsn >= fit.min_lsn && n.replay_lag <= fit.max_lag
            })
            .min_by_key(|&i| busy(i))
    };
    if intent.reads_only() && (read_routing || primary.is_none()) {
        if let Some(r) = replica() {
            return Decision::Node(r);
        }
    }
    if let Some(p) = primary {
        return Decision::Node(p);
    }
    let up = (0..topology.nodes.len())
        .find(|&i| matches!(topology.nodes[i].role, Role::Primary | Role::Replica));
    match up {
        None => Decision::NoNode,
        // Split brain: either claimant may serve a read, neither a write.
        Some(i) if intent.reads_only() => Decision::Node(i),
        Some(_) => Decision::NoPrimary,
    }
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
    use crate::cluster::NodeStatus;
    use bytes::BytesMut;
    use pgheal_protocol::build;

    fn q(sql: &str) -> BytesMut {
        let mut b = BytesMut::new();
        build::query(&mut b, sql);
        b
    }

    fn topo(roles: &[Role]) -> Topology {
        Topology {
            nodes: roles
                .iter()
                .map(|&role| NodeStatus::new("h:1", role))
                .collect(),
        }
    }

    #[test]
    fn intent_from_the_first_message() {
        assert_eq!(intent(&q("SELECT 1")), Intent::Read);
        assert_eq!(intent(&q("BEGIN READ ONLY")), Intent::ReadOnlyTx);
        assert_eq!(intent(&q("BEGIN")), Intent::Begin);
        assert_eq!(intent(&q("INSERT INTO t VALUES (1)")), Intent::Write);
        let whole = q("SELECT 1");
        assert_eq!(
            intent(&whole[..whole.len() - 1]),
            Intent::Write,
            "incomplete"
        );
        let parse = b"P\0\0\0\x10s1\0SELECT 1\0\0\0";
        assert_eq!(intent(parse), Intent::Read);
        assert_eq!(intent(b"S\0\0\0\x04"), Intent::Write);
        assert_eq!(intent(b""), Intent::Write);
        assert_eq!(intent(b"Q\xff\xff\xff\xff"), Intent::Write);
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
        let down = topo(&[Role::Down, Role::Down]);
        assert_eq!(
            decide(&down, Intent::Read, true, ReplicaFit::ANY, busy),
            Decision::NoNode
        );
    }
}
