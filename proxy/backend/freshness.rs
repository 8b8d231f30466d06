//! How stale each replica is, measured against the primary.
//!
//! A replica's own view is not enough: it reports no delay when it has
//! replayed everything it *received*, also when it receives nothing (a
//! broken replication connection, a replica still following a dead
//! primary). So the primary's WAL position is sampled at each of its probes
//! and a replica is compared with those samples:
//! - bytes behind: what the primary had written at its last probe that
//!   started before the replica's, minus what the replica replayed;
//! - time behind: if the replica has not replayed WAL that the primary had
//!   written at time `t`, the replica is at least `now - t` stale (taken at
//!   the replica's probe). An idle, healthy cluster is never behind, and a
//!   busy healthy replica is behind by its real streaming delay only.
//!
//! A replica that streams from nobody, or streams another timeline than the
//! primary writes (it still follows a deposed primary), is not current at
//! all (see [`super::router::ReplicaFit`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::health::{NodeStatus, Role};

/// Primary samples kept: at the default 1 s interval, four minutes. A
/// replica behind the oldest is at least that stale.
const MAX_SAMPLES: usize = 256;

/// The primary's WAL position at its recent probes.
#[derive(Debug, Default)]
pub struct Samples {
    /// The node sampled: a new primary starts a new history.
    from: Option<Arc<str>>,
    /// When a probe started and the position it found, oldest first.
    taken: VecDeque<(Instant, u64)>,
}

impl Samples {
    /// Records the primary's latest probe (if new) and works out every
    /// replica's `lag_bytes` and `replay_lag` against the samples.
    pub fn freshen(&mut self, nodes: &mut [NodeStatus]) {
        let mut primaries = nodes.iter().filter(|n| n.role == Role::Primary);
        let primary = match (primaries.next(), primaries.next()) {
            (Some(p), None) => Some((p.addr.clone(), p.probed_at, p.lsn)),
            _ => None,
        };
        let Some((addr, probed_at, lsn)) = primary else {
            // No primary to compare with: the replicas' own delay.
            self.from = None;
            self.taken.clear();
            for n in nodes.iter_mut() {
                n.lag_bytes = None;
                n.replay_lag = n.replay_delay;
            }
            return;
        };
        self.record(addr, probed_at, lsn);
        for n in nodes.iter_mut() {
            match n.role {
                Role::Replica => self.compare(n),
                _ => {
                    n.lag_bytes = None;
                    n.replay_lag = n.replay_delay;
                }
            }
        }
    }

    fn record(&mut self, addr: Arc<str>, probed_at: Option<Instant>, lsn: u64) {
        if self.from.as_ref() != Some(&addr) {
            self.from = Some(addr);
            self.taken.clear();
        }
        let Some(at) = probed_at else {
            return;
        };
        if self.taken.back().is_none_or(|(t, _)| *t < at) {
            self.taken.push_back((at, lsn));
            if self.taken.len() > MAX_SAMPLES {
                self.taken.pop_front();
            }
        }
    }

    fn compare(&self, n: &mut NodeStatus) {
        let Some(at) = n.probed_at else {
            return;
        };
        let before = || self.taken.iter().take_while(|(t, _)| *t <= at);
        n.lag_bytes = before().last().map(|(_, lsn)| lsn.saturating_sub(n.lsn));
        let behind = before()
            .find(|(_, lsn)| *lsn > n.lsn)
            .map_or(Duration::ZERO, |(t, _)| at.saturating_duration_since(*t));
        n.replay_lag = n.replay_delay.max(behind);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(addr: &str, role: Role, lsn: u64, at: Instant) -> NodeStatus {
        let mut n = NodeStatus::new(addr, role);
        n.lsn = lsn;
        n.probed_at = Some(at);
        n
    }

    #[test]
    fn a_replica_that_receives_nothing_falls_behind_the_primary() {
        let t0 = Instant::now();
        let s = |secs: f64| t0 + Duration::from_secs_f64(secs);
        let mut samples = Samples::default();
        // Idle and caught up: never behind.
        let mut nodes = vec![
            node("p", Role::Primary, 100, s(0.0)),
            node("r", Role::Replica, 100, s(0.5)),
        ];
        samples.freshen(&mut nodes);
        assert_eq!(
            (nodes[1].lag_bytes, nodes[1].replay_lag),
            (Some(0), Duration::ZERO)
        );
        // The primary writes; the replica (its own delay 0) does not follow.
        nodes[0] = node("p", Role::Primary, 600, s(1.0));
        samples.freshen(&mut nodes);
        nodes[1] = node("r", Role::Replica, 100, s(1.5));
        samples.freshen(&mut nodes);
        assert_eq!(nodes[1].lag_bytes, Some(500));
        assert_eq!(nodes[1].replay_lag, Duration::from_millis(500));
        nodes[0] = node("p", Role::Primary, 600, s(2.0));
        samples.freshen(&mut nodes);
        nodes[1] = node("r", Role::Replica, 100, s(3.5));
        samples.freshen(&mut nodes);
        assert_eq!(
            nodes[1].replay_lag,
            Duration::from_millis(2500),
            "counted from the first WAL it lacks"
        );
        // It catches up: fresh again.
        nodes[1] = node("r", Role::Replica, 600, s(4.0));
        samples.freshen(&mut nodes);
        assert_eq!(
            (nodes[1].lag_bytes, nodes[1].replay_lag),
            (Some(0), Duration::ZERO)
        );
    }

    #[test]
    fn a_primary_sampled_after_the_replica_does_not_count() {
        let t0 = Instant::now();
        let s = |secs: f64| t0 + Duration::from_secs_f64(secs);
        let mut samples = Samples::default();
        let mut nodes = vec![
            node("p", Role::Primary, 100, s(0.0)),
            node("r", Role::Replica, 100, s(0.5)),
        ];
        samples.freshen(&mut nodes);
        // The primary moved on after the replica's probe: not yet behind.
        nodes[0] = node("p", Role::Primary, 900, s(0.8));
        samples.freshen(&mut nodes);
        assert_eq!(
            (nodes[1].lag_bytes, nodes[1].replay_lag),
            (Some(0), Duration::ZERO)
        );
        // Its own replay delay still counts.
        nodes[1].replay_delay = Duration::from_secs(3);
        samples.freshen(&mut nodes);
        assert_eq!(nodes[1].replay_lag, Duration::from_secs(3));
    }

    #[test]
    fn without_a_primary_only_the_replicas_own_delay_counts() {
        let t0 = Instant::now();
        let mut samples = Samples::default();
        let mut nodes = vec![
            node("p", Role::Primary, 900, t0),
            node("r", Role::Replica, 100, t0 + Duration::from_secs(2)),
        ];
        samples.freshen(&mut nodes);
        assert!(nodes[1].replay_lag > Duration::ZERO);
        nodes[0].role = Role::Down;
        samples.freshen(&mut nodes);
        assert_eq!(
            (nodes[1].lag_bytes, nodes[1].replay_lag),
            (None, Duration::ZERO)
        );
        // A new primary starts a history of its own.
        nodes[0] = node("q", Role::Primary, 50, t0 + Duration::from_secs(3));
        samples.freshen(&mut nodes);
        assert_eq!(samples.taken.len(), 1);
    }
}
