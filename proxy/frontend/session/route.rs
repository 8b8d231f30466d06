//! Choosing the node for a client's next transaction, read-your-writes,
//! and running a read again when its first node could not answer it.

use std::sync::Arc;

use pgheal_protocol::effects::Effects;

use super::Session;
use crate::backend::cluster::{Role, Topology};
use crate::backend::error::PoolError;
use crate::backend::pool::{Lease, Pool};
use crate::backend::router::{self, Decision, Intent};
use crate::config::PoolMode;
use crate::frontend::error::ClientError;
use crate::frontend::TargetStats;

/// A client's last write: when it ended, the node it ran on, and a WAL
/// position at or past its commit once known: that node's, or else the
/// primary's, at the first health probe after the write.
#[derive(Debug, Clone)]
pub(super) struct Fence {
    pub(super) since: std::time::Instant,
    pub(super) node: Arc<str>,
    pub(super) lsn: Option<u64>,
}

impl Fence {
    /// The LSN a replica must have replayed to serve this client's reads,
    /// or `None` when every replica has. The write's own node counts also
    /// when it is down now: its last probe may have come after the write
    /// (so a primary lost well after a client's write does not hold that
    /// client's reads until another is promoted).
    pub(super) fn floor(&mut self, topology: &Topology) -> Option<u64> {
        if self.lsn.is_none() {
            let after = |n: &&crate::backend::cluster::NodeStatus| {
                n.probed_at.is_some_and(|at| at > self.since)
            };
            let own = topology.nodes.iter().find(|n| n.addr == self.node);
            self.lsn = own
                .filter(after)
                .or_else(|| topology.primary().filter(after))
                .map(|n| n.lsn);
        }
        let Some(lsn) = self.lsn else {
            // Not yet known: no replica qualifies.
            return Some(u64::MAX);
        };
        let behind = topology
            .nodes
            .iter()
            .any(|n| n.role == Role::Replica && n.lsn < lsn);
        behind.then_some(lsn)
    }
}

/// Why an autocommit read runs again, unseen by the client.
#[derive(Debug, Clone)]
pub(super) enum Rerun {
    /// A replica refused it with 25006 (a "read" that writes, such as
    /// `SELECT nextval(...)`): run it on the primary.
    OnPrimary,
    /// Its server was lost: run it on another node if there is one, else
    /// on the same node if it is still up (only that backend died).
    Elsewhere(Arc<str>),
    /// Its node could not be reached at all: not there again until a probe
    /// finds it up. `write` when it was already on its way to the primary
    /// (a rerun `OnPrimary`): it waits for a primary like any other write.
    Unreachable { node: Arc<str>, write: bool },
    /// A prepared statement's plan went stale after a schema change: run
    /// it again once the server's statements are prepared afresh.
    Replan,
    /// A statement the client prepared in this request was found already
    /// prepared on the server (shared) and the request failed: the shared
    /// copy may predate a schema change that a fresh Parse would see (a
    /// parameter type, a re-created type). Run it again with the client's
    /// statements prepared for it alone; a real error comes back again.
    Unshared,
}

impl Session {
    /// Picks the node for the buffered request and checks out a server
    /// there. A write with no primary waits up to `write_wait` for one.
    pub(super) async fn route_and_checkout(&mut self) -> Result<Lease, ClientError> {
        let mut rerun = self.rerun.take();
        if rerun.is_none() && self.target.is_retired() {
            self.follow_reload();
        }
        loop {
            let pool = self.route(rerun.as_ref()).await?;
            let e = match self.checkout(&pool).await {
                Ok(lease) => {
                    // One invisible second try for an autocommit read.
                    let autocommit_read =
                        self.intent == Intent::Read && self.mode == PoolMode::Transaction;
                    // Held only when the request ends in a Sync or Query:
                    // a client that sent Flush waits for the answer so far.
                    if rerun.is_none() && autocommit_read && self.flight.pending > 0 {
                        self.keep_replay();
                        self.holding = true;
                    }
                    return Ok(lease);
                }
                Err(e) => e,
            };
            let unreachable = matches!(&e, PoolError::Upstream(u) if u.is_unreachable());
            if !unreachable {
                return Err(e.into());
            }
            self.target.cluster.nudge(pool.addr());
            // Nothing was sent: route again once without that node. A read
            // goes elsewhere; a write (also a read a replica refused, such
            // as `SELECT pg_notify(...)`) waits for a primary like any other.
            let write = match rerun {
                Some(Rerun::Unreachable { .. }) => return Err(e.into()),
                Some(Rerun::OnPrimary) => true,
                _ => false,
            };
            tracing::warn!(server = %pool.addr(), error = %e, "node unreachable; routing again without it");
            self.retried("node_unreachable");
            let node = pool.shared_addr().clone();
            rerun = Some(Rerun::Unreachable { node, write });
        }
    }

    pub(super) async fn route(&mut self, rerun: Option<&Rerun>) -> Result<Arc<Pool>, ClientError> {
        if !self.target.cluster.is_probing() {
            self.intent = self.request_intent();
            return Ok(self.pool.clone());
        }
        if self.node_pools.iter().any(Option::is_none) {
            // "Least busy" compares every node's pool, so know them all.
            for i in 0..self.node_pools.len() {
                self.node_pool(i);
            }
        }
        let intent = match rerun {
            Some(Rerun::OnPrimary | Rerun::Unreachable { write: true, .. }) => Intent::Write,
            _ => self.request_intent(),
        };
        self.intent = intent;
        let read_routing = self.target.database.read_routing;
        let (waited, probe_interval) = {
            let config = self.app.config();
            (config.failover.write_wait, config.health.interval)
        };
        // Clocks are read only when needed (not for the common request,
        // routed at the first look).
        let mut deadline = None;
        // A node just lost or found unreachable is avoided until a probe
        // after this moment finds it up again (a restart in place).
        let lost_at = rerun.is_some().then(std::time::Instant::now);
        loop {
            let topology = self.topology.borrow_and_update().clone();
            // After a lost server, prefer another node; the same node is
            // fine when it is still up (only that backend died).
            let avoided = match rerun {
                Some(Rerun::Elsewhere(lost) | Rerun::Unreachable { node: lost, .. }) => {
                    let mut t = (*topology).clone();
                    t.nodes
                        .iter_mut()
                        .filter(|n| {
                            n.addr == *lost && n.probed_at.is_none_or(|p| Some(p) <= lost_at)
                        })
                        .for_each(|n| n.role = Role::Down);
                    Some(t)
                }
                _ => None,
            };
            let fit = self.replica_fit(&topology);
            let decide =
                |t: &Topology| router::decide(t, intent, read_routing, fit, |i| self.busy(i));
            let decision = match (avoided.as_ref().map(decide), rerun) {
                (Some(d), Some(Rerun::Unreachable { .. })) => d,
                (Some(Decision::Node(i)), _) => Decision::Node(i),
                _ => decide(&topology),
            };
            if let Decision::Node(i) = decision {
                return Ok(self.node_pool(i));
            }
            let now = tokio::time::Instant::now();
            let deadline = *deadline.get_or_insert(now + waited);
            let expired = now >= deadline;
            if expired && decision == Decision::NoPrimary {
                if let Some(i) = self.after_write_wait(&topology, intent, read_routing, fit) {
                    return Ok(self.node_pool(i));
                }
            }
            if expired {
                let database = self.target.database.name.clone();
                return Err(match decision {
                    Decision::NoNode => ClientError::NoNode(database),
                    _ => ClientError::NoPrimary { database, waited },
                });
            }
            // Replay progress is published without waking anyone: a read
            // waiting for its client's write to be replayed looks again at
            // each probe.
            let until = match intent.reads_only() {
                true => deadline.min(now + probe_interval),
                false => deadline,
            };
            let _ = tokio::time::timeout_at(until, self.topology.changed()).await;
        }
    }

    /// How fresh a replica must be for this client's reads: past its own
    /// last write (see `Fence`) and the schema's migration, and within the
    /// database's lag limits.
    fn replica_fit(&mut self, topology: &Topology) -> router::ReplicaFit {
        let floor = self.fence.as_mut().map_or(Some(0), |f| f.floor(topology));
        if floor.is_none() {
            self.fence = None;
        }
        router::ReplicaFit {
            min_lsn: floor.unwrap_or(0).max(self.target.cluster.floor()),
            max_lag: self.target.database.max_replica_lag,
            max_bytes: self.target.database.max_replica_lag_bytes,
            streaming: true,
        }
    }

    /// Where a request still without a primary after `write_wait` runs
    /// anyway: a plain BEGIN on a replica (PostgreSQL refuses the writes
    /// inside it), and a read that waited for a node with the client's own
    /// last write on any node that is up (availability first).
    fn after_write_wait(
        &self,
        topology: &Topology,
        intent: Intent,
        read_routing: bool,
        fit: router::ReplicaFit,
    ) -> Option<usize> {
        let busy = |i| self.busy(i);
        if intent == Intent::Begin {
            return router::degraded_begin(topology, busy);
        }
        if !intent.reads_only() || fit.min_lsn == 0 {
            return None;
        }
        let any = router::ReplicaFit { min_lsn: 0, ..fit };
        match router::decide(topology, intent, read_routing, any, busy) {
            Decision::Node(i) => Some(i),
            _ => None,
        }
    }

    /// What the buffered request intends: from its SQL, or for a Bind of
    /// a named statement, from the statement's SQL.
    fn request_intent(&mut self) -> Intent {
        use pgheal_protocol::frontend::{CLOSE, DESCRIBE, FLUSH, SYNC};
        // Close, Describe and Flush change no data: what follows them
        // decides, and a request of nothing else (a driver closing a
        // statement it is done with) reads, so it runs on any node rather
        // than wait for a primary.
        let mut buf = &self.up.buf[..];
        while let Some(&(CLOSE | DESCRIBE | FLUSH)) = buf.first() {
            let len = buf
                .get(1..5)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
            match len.and_then(|l| buf.get(1 + l as usize..)) {
                Some(rest) => buf = rest,
                None => return Intent::Read,
            }
        }
        if matches!(buf.first(), None | Some(&SYNC)) {
            return Intent::Read;
        }
        if buf.first() == Some(&pgheal_protocol::frontend::BIND) {
            let body = buf.get(5..).unwrap_or_default();
            if let Ok(bind) = pgheal_protocol::frontend::bind(body) {
                if let Some(stmt) = self.statements.get(bind.statement) {
                    return stmt.intent;
                }
            }
        }
        if let Some(sql) = first_parse(buf) {
            // Translation finds the same text's analysis remembered.
            let class = crate::backend::analysis::statement(sql).0;
            return pgheal_protocol::intent::class_intent(class);
        }
        if buf.first() == Some(&pgheal_protocol::frontend::QUERY) {
            if let Some(sql) = first_query(buf) {
                // Routing and translation both need the SQL looked at: once.
                let (class, effects) = pgheal_protocol::effects::analyze(sql);
                self.analyzed = Some(Analyzed::new(sql, effects));
                return pgheal_protocol::intent::class_intent(class);
            }
        }
        router::intent(buf)
    }

    /// A request ran again unseen, for `reason` (metrics and the page).
    pub(super) fn retried(&self, reason: &'static str) {
        self.app.metrics.retry(reason);
        TargetStats::add(&self.target.stats.retried);
    }

    /// A request was refused, for `reason`.
    pub(super) fn rejected(&self, reason: &'static str) {
        self.app.metrics.reject(reason);
        TargetStats::add(&self.target.stats.rejected);
    }

    pub(super) fn busy(&self, node: usize) -> usize {
        self.node_pools
            .get(node)
            .and_then(Option::as_ref)
            .map_or(0, |p| p.counts().1)
    }

    /// RELOAD replaced this client's database: from this transaction on,
    /// the new settings and pools serve it (its own statements and
    /// settings are the client's and go with it; a server prepares them
    /// as any new one does).
    fn follow_reload(&mut self) {
        let Some(target) = self.app.target(&self.target.database.name) else {
            return; // removed: this client keeps what it had
        };
        if Arc::ptr_eq(&target, &self.target) {
            return;
        }
        tracing::debug!(database = %target.database.name, "client follows the reloaded settings");
        self.topology = target.cluster.subscribe();
        self.node_pools = vec![None; target.database.nodes.len()];
        self.pool = self.app.pool_for(&target, &self.registered.info.user);
        self.target = target;
    }

    pub(super) fn node_pool(&mut self, node: usize) -> Arc<Pool> {
        if let Some(Some(pool)) = self.node_pools.get(node) {
            return pool.clone();
        }
        let target = &self.target;
        let addr = target.database.nodes.get(node).map_or("", String::as_str);
        let pool = self.app.pool_at(target, &self.registered.info.user, addr);
        if let Some(slot) = self.node_pools.get_mut(node) {
            *slot = Some(pool.clone());
        }
        pool
    }

    pub(super) async fn checkout(&mut self, pool: &Arc<Pool>) -> Result<Lease, PoolError> {
        let mut lease = pool.checkout(self.cancel.key.pid).await?;
        if !self.intent.reads_only() && lease.conn().reported.get("in_hot_standby") == Some("on") {
            // Taken for the primary, but it says it is a standby (PG 14+).
            self.target.cluster.nudge(pool.addr());
        }
        if lease.conn().statements.stale {
            // Plans went stale after a schema change: start afresh.
            if let Some(e) = lease.conn().run_quietly("DEALLOCATE ALL").await? {
                return Err(e.into());
            }
            lease.conn().statements.clear();
        }
        if let Some(e) = lease.conn().apply_params(&self.params).await? {
            tracing::warn!(error = %e, "cannot apply the client's session parameters");
        }
        self.registered
            .info
            .cancel
            .attach(lease.pool().shared_addr(), lease.server_key());
        Ok(lease)
    }
}

/// The SQL of the Query message `buf` starts with, when it is all there.
fn first_query(buf: &[u8]) -> Option<&[u8]> {
    let len = u32::from_be_bytes(buf.get(1..5)?.try_into().ok()?);
    let body = buf.get(5..1 + usize::try_from(len).ok()?)?;
    pgheal_protocol::frontend::query(body).ok()
}

/// The SQL of the Parse message `buf` starts with, when it is all there
/// and well formed.
fn first_parse(buf: &[u8]) -> Option<&[u8]> {
    if buf.first() != Some(&pgheal_protocol::frontend::PARSE) {
        return None;
    }
    let message = pgheal_protocol::frame::message(buf, usize::MAX).ok()??;
    Some(pgheal_protocol::frontend::parse(message.body).ok()?.query)
}

/// What routing found in a request's first Query, for its translation
/// (one pass over the SQL instead of two). The text's length and hash tell
/// that translation has the same Query before it.
pub(super) struct Analyzed {
    len: usize,
    hash: u64,
    pub(super) effects: Effects,
}

impl Analyzed {
    fn new(sql: &[u8], effects: Effects) -> Analyzed {
        Analyzed {
            len: sql.len(),
            hash: xxhash_rust::xxh3::xxh3_64(sql),
            effects,
        }
    }

    /// True when this was found in `sql`.
    pub(super) fn is_of(&self, sql: &[u8]) -> bool {
        self.len == sql.len() && self.hash == xxhash_rust::xxh3::xxh3_64(sql)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use pgheal_protocol::{build, effects};

    #[test]
    fn routing_finds_the_first_query_and_translation_knows_it_again() {
        let mut buf = BytesMut::new();
        build::query(&mut buf, "SET search_path = app");
        build::query(&mut buf, "SELECT 1");
        let sql = first_query(&buf).expect("a whole Query");
        assert_eq!(sql, b"SET search_path = app");
        let found = Analyzed::new(sql, effects::effects(sql));
        assert_eq!(found.effects.settings, ["search_path"]);
        assert!(found.is_of(b"SET search_path = app"));
        // Same length, other text; other length.
        assert!(!found.is_of(b"SET search_path = xyz"));
        assert!(!found.is_of(b"SET search_path = ap"));
        // Half a message is not read.
        assert_eq!(first_query(&buf[..10]), None);
    }
}
