//! One client's life after login: the welcome, then the data path.
//!
//! The client task owns its server connection while attached; no other task
//! or channel sits between them. Bytes move in whole buffers. Only message
//! headers are scanned, except ReadyForQuery and ParameterStatus from the
//! server, which are read whole; DataRow bodies are never looked at.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use pgheal_protocol::backend::{self, TxStatus};
use pgheal_protocol::build;
use pgheal_protocol::classify::{classify, Class};
use pgheal_protocol::frame::{self, FrameError, Scanner, Step};
use pgheal_protocol::frontend;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::io::poll_read_buf;

use crate::cancel::Registration;
use crate::cluster::{Role, Topology};
use crate::config::PoolMode;
use crate::error::{ClientError, PoolError};
use crate::flow::{write_some, Flow, MAX_PENDING};
use crate::login::LoggedIn;
use crate::params::Params;
use crate::pool::{Lease, Pool};
use crate::router::{self, Decision, Intent};
use crate::upstream::ServerConn;
use crate::{App, Target};
use pgheal_protocol::sqlstate;
use tokio::sync::watch;

/// A client's last write: when it ended, and the primary's WAL position at
/// the first health probe after that (at or past the write's commit).
#[derive(Debug, Clone, Copy)]
struct Fence {
    since: std::time::Instant,
    lsn: Option<u64>,
}

impl Fence {
    /// The LSN a replica must have replayed to serve this client's reads,
    /// or `None` when every replica has.
    fn floor(&mut self, topology: &Topology) -> Option<u64> {
        if self.lsn.is_none() {
            self.lsn = topology
                .primary()
                .filter(|p| p.probed_at.is_some_and(|at| at > self.since))
                .map(|p| p.lsn);
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
enum Rerun {
    /// A replica refused it with 25006 (a "read" that writes, such as
    /// `SELECT nextval(...)`): run it on the primary.
    OnPrimary,
    /// Its server was lost: run it on another node.
    Elsewhere(Arc<str>),
}

/// Where a client stands in a transaction whose server was lost.
#[derive(Debug, Default, Clone, Copy)]
struct LostTx {
    /// The extended-protocol batch being read ends the transaction.
    ending: bool,
    /// The batch already got its 25P02.
    errored: bool,
    /// The client has not heard of the loss yet: its next request gets
    /// 08006 rather than 25P02.
    announce: bool,
}

/// Whether the client is still there after an attachment.
#[derive(Debug, PartialEq, Eq)]
enum Attachment {
    Detached,
    ClientGone,
}

/// How one attachment to a server ended.
#[derive(Debug)]
enum PumpEnd {
    /// Transaction mode: the server is idle again and may go back.
    Released,
    /// An autocommit read is to run again elsewhere; nothing of it reached
    /// the client.
    Rerun,
    ClientGone,
    ClientBroke(FrameError),
    ServerLost(io::Error),
}

pub struct Session {
    client: TcpStream,
    up: Flow,
    down: Flow,
    params: Params,
    mode: PoolMode,
    pool: Arc<Pool>,
    app: Arc<App>,
    target: Arc<Target>,
    user: String,
    /// The topology as of the last routing decision; wakes degraded
    /// writes when roles change.
    topology: watch::Receiver<Arc<Topology>>,
    /// This client's pool on each node, by node index, made on first use.
    node_pools: Vec<Option<Arc<Pool>>>,
    cancel: Registration,
    /// Queries, Syncs and FunctionCalls sent to the server and not yet
    /// answered by ReadyForQuery.
    pending: u32,
    /// The server has work from this client that has not ended with an
    /// idle ReadyForQuery.
    owed: bool,
    /// The client sent something not yet answered by a ReadyForQuery.
    awaiting: bool,
    tx: TxStatus,
    terminated: bool,
    client_eof: bool,
    /// Drop the rest of a client message whose request failed.
    dropping: bool,
    welcomed: bool,
    /// What the request now running intends (reads may be retried; a lost
    /// write's outcome is unknown).
    intent: Intent,
    /// The server died inside the client's transaction: until the client
    /// ends it, pgheal answers for the lost transaction itself.
    lost_tx: Option<LostTx>,
    /// The request of an autocommit read, kept until the server's answer
    /// shows it need not run again.
    replay: Option<BytesMut>,
    /// Server bytes are held back (not written to the client) while the
    /// read may still run again.
    holding: bool,
    rerun: Option<Rerun>,
    /// Read-your-writes: after this client's write, its reads stay on the
    /// primary until a replica has replayed past it.
    fence: Option<Fence>,
    /// The server sent a FATAL error and is about to close: nothing more
    /// goes to it, and its FATAL already answered the oldest request.
    server_dying: bool,
}

impl Session {
    pub fn new(app: Arc<App>, target: Arc<Target>, client: Box<LoggedIn>) -> Session {
        let client = *client;
        let max = app.config().proxy.max_message_size;
        let mode = app.config().proxy.pool_mode;
        let topology = target.cluster.subscribe();
        let pool = app.pool_for(&target, &client.user);
        let mut up = Flow::new(max);
        up.buf = client.buf;
        Session {
            cancel: app.cancels.register(),
            topology,
            node_pools: vec![None; target.database.nodes.len()],
            target,
            user: client.user,
            app,
            client: client.stream,
            up,
            down: Flow::new(usize::MAX),
            params: client.params,
            mode,
            pool,
            pending: 0,
            owed: false,
            awaiting: false,
            tx: TxStatus::Idle,
            terminated: false,
            client_eof: false,
            dropping: false,
            welcomed: false,
            intent: Intent::Write,
            lost_tx: None,
            replay: None,
            holding: false,
            rerun: None,
            fence: None,
            server_dying: false,
        }
    }

    /// Sends the welcome and serves the client until it leaves. A fatal
    /// error is told to the client before its connection closes.
    pub async fn run(mut self) -> Result<(), ClientError> {
        let result = self.serve().await;
        if let Err(e) = &result {
            let mut out = BytesMut::new();
            // A server lost in the middle of a message leaves nothing to say.
            let mid_message = matches!(e, ClientError::ServerLost(_));
            if !mid_message && e.write_response(&mut out, self.welcomed) {
                let _ = self.client.write_all(&out).await;
            }
        }
        result
    }

    /// The client's life: idle waits are small; everything a transaction
    /// needs lives in a boxed future only while it runs, so thousands of
    /// idle clients cost little memory.
    async fn serve(&mut self) -> Result<(), ClientError> {
        let mut held = Box::pin(self.welcome()).await?.map(Box::new);
        self.welcomed = true;
        loop {
            if self.lost_tx.is_some() {
                if !Box::pin(self.answer_lost_transaction()).await? {
                    return Ok(());
                }
                continue;
            }
            if held.is_none() && !self.wait_for_request().await? {
                return Ok(());
            }
            if Box::pin(self.attached(&mut held)).await? == Attachment::ClientGone {
                return Ok(());
            }
        }
    }

    /// Runs the client's requests on a server (the held one in session
    /// mode, a checked-out one in transaction mode) until they end.
    async fn attached(&mut self, held: &mut Option<Box<Lease>>) -> Result<Attachment, ClientError> {
        let lease = match held {
            Some(lease) => lease,
            None => match self.route_and_checkout().await {
                Ok(lease) => held.insert(Box::new(lease)),
                Err(e) => {
                    self.refuse_request(e).await?;
                    return Ok(Attachment::Detached);
                }
            },
        };
        let end = poll_fn(|cx| self.poll_pump(cx, lease.conn())).await;
        tracing::debug!(?end, "detached from the server");
        match end {
            PumpEnd::Released => {
                if !self.intent.reads_only() {
                    self.fence = Some(Fence {
                        since: std::time::Instant::now(),
                        lsn: None,
                    });
                }
                self.detach(held.take(), true);
                Ok(Attachment::Detached)
            }
            PumpEnd::Rerun => {
                tracing::info!(server = %lease.pool().addr(), reason = ?self.rerun, "running a read again");
                self.detach(held.take(), true);
                self.restore_replay()?;
                Ok(Attachment::Detached)
            }
            PumpEnd::ServerLost(e) if self.replay.is_some() => {
                let addr = lease.pool().shared_addr().clone();
                tracing::warn!(server = %addr, error = %e, "server lost before answering a read; running it elsewhere");
                self.target.cluster.nudge(&addr);
                self.rerun = Some(Rerun::Elsewhere(addr));
                *held = None;
                self.detach(None, false);
                self.restore_replay()?;
                Ok(Attachment::Detached)
            }
            PumpEnd::ClientGone => {
                self.leave(held.take()).await;
                Ok(Attachment::ClientGone)
            }
            PumpEnd::ClientBroke(e) => {
                self.detach(held.take(), false);
                Err(e.into())
            }
            PumpEnd::ServerLost(e) => {
                tracing::warn!(server = %lease.pool().addr(), error = %e, "server connection lost");
                self.target.cluster.nudge(lease.pool().addr());
                self.cancel.slot.detach();
                // Dropping the lease closes the dead connection.
                *held = None;
                self.report_server_lost(e).await?;
                Ok(Attachment::Detached)
            }
        }
    }

    /// Authentication is done: tell the client the server's parameters, its
    /// cancel key and that it may start. Session mode keeps the server.
    async fn welcome(&mut self) -> Result<Option<Lease>, ClientError> {
        let (mut lease, reported) = match self.pool.checkout().await {
            Ok(mut l) => {
                if let Some(e) = l
                    .conn()
                    .apply_params(&self.params)
                    .await
                    .map_err(PoolError::from)?
                {
                    return Err(PoolError::Upstream(e).into());
                }
                let reported = l.conn().reported.clone();
                (Some(l), reported)
            }
            Err(e) => match self.remembered_parameters() {
                // Transaction mode needs no server until the first query.
                Some(reported) if self.mode == PoolMode::Transaction => {
                    tracing::warn!(error = %e, "no server for the welcome; using remembered parameters");
                    (None, reported)
                }
                _ => return Err(e.into()),
            },
        };
        let mut out = BytesMut::new();
        for (name, value) in reported.iter() {
            build::parameter_status(&mut out, name.as_bytes(), value.as_bytes());
        }
        build::backend_key_data(&mut out, self.cancel.key);
        build::ready_for_query(&mut out, TxStatus::Idle);
        self.client
            .write_all(&out)
            .await
            .map_err(ClientError::ClientIo)?;
        if self.mode == PoolMode::Transaction {
            if let Some(mut l) = lease.take() {
                l.release();
            }
        } else if let Some(l) = lease.as_mut() {
            self.cancel
                .slot
                .attach(l.pool().shared_addr(), l.server_key());
        }
        Ok(lease)
    }

    /// The parameters the pool's last server reported, with the client's own
    /// settings laid over them.
    fn remembered_parameters(&self) -> Option<Params> {
        let mut reported = self.pool.welcome()?;
        for (name, value) in self.params.iter() {
            if reported.get(name).is_some() {
                reported.set(name, value);
            }
        }
        Some(reported)
    }

    /// Waits, holding no server and no buffers, until the client sent at
    /// least one whole message header. Returns false when the client left.
    async fn wait_for_request(&mut self) -> Result<bool, ClientError> {
        loop {
            self.scan_up()?;
            if self.terminated && self.up.scanned == 0 {
                return Ok(false);
            }
            if self.up.scanned > 0 {
                return Ok(true);
            }
            self.up.shrink();
            self.down.shrink();
            // poll_read_ready keeps the waker in the socket's own slot: an
            // idle client's wait costs no more than a pointer.
            poll_fn(|cx| self.client.poll_read_ready(cx))
                .await
                .map_err(ClientError::ClientIo)?;
            self.up.reserve();
            // poll_read (unlike try_read) clears readiness after a short
            // read, which spares the pump a read that would find nothing.
            let read = poll_fn(|cx| {
                match poll_read_buf(Pin::new(&mut self.client), cx, &mut self.up.buf) {
                    Poll::Pending => Poll::Ready(Err(io::ErrorKind::WouldBlock.into())),
                    ready => ready,
                }
            });
            match read.await {
                Ok(0) => return Ok(false),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(ClientError::ClientIo(e)),
            }
        }
    }

    /// Picks the node for the buffered request and checks out a server
    /// there. A write with no primary waits up to `write_wait` for one.
    async fn route_and_checkout(&mut self) -> Result<Lease, ClientError> {
        let mut rerun = self.rerun.take();
        loop {
            let pool = self.route(rerun.as_ref()).await?;
            let e = match self.checkout(&pool).await {
                Ok(lease) => {
                    // One invisible second try for an autocommit read.
                    let autocommit_read =
                        self.intent == Intent::Read && self.mode == PoolMode::Transaction;
                    if rerun.is_none() && autocommit_read {
                        self.replay = Some(BytesMut::from(&self.up.buf[..]));
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
            // goes elsewhere; a write waits for a primary like any other.
            if rerun.is_some() {
                return Err(e.into());
            }
            tracing::warn!(server = %pool.addr(), error = %e, "node unreachable; routing again without it");
            rerun = Some(Rerun::Elsewhere(pool.shared_addr().clone()));
        }
    }

    async fn route(&mut self, rerun: Option<&Rerun>) -> Result<Arc<Pool>, ClientError> {
        if !self.target.cluster.is_probing() {
            self.intent = Intent::Write;
            return Ok(self.pool.clone());
        }
        if self.node_pools.iter().any(Option::is_none) {
            // "Least busy" compares every node's pool, so know them all.
            for i in 0..self.node_pools.len() {
                self.node_pool(i);
            }
        }
        let intent = match rerun {
            Some(Rerun::OnPrimary) => Intent::Write,
            _ => router::intent(&self.up.buf),
        };
        self.intent = intent;
        let read_routing = self.target.database.read_routing;
        let waited = self.app.config().failover.write_wait;
        let deadline = tokio::time::Instant::now() + waited;
        loop {
            let mut topology = self.topology.borrow_and_update().clone();
            if let Some(Rerun::Elsewhere(lost)) = rerun {
                let mut t = (*topology).clone();
                t.nodes
                    .iter_mut()
                    .filter(|n| n.addr == *lost)
                    .for_each(|n| n.role = Role::Down);
                topology = Arc::new(t);
            }
            let floor = self.fence.as_mut().map_or(Some(0), |f| f.floor(&topology));
            if floor.is_none() {
                self.fence = None;
            }
            let fit = router::ReplicaFit {
                min_lsn: floor.unwrap_or(0),
                max_lag: self.target.database.max_replica_lag,
            };
            let decision = router::decide(&topology, intent, read_routing, fit, |i| self.busy(i));
            let expired = tokio::time::Instant::now() >= deadline;
            match decision {
                Decision::Node(i) => return Ok(self.node_pool(i)),
                Decision::NoPrimary if expired && intent == Intent::Begin => {
                    if let Some(i) = router::degraded_begin(&topology, |i| self.busy(i)) {
                        return Ok(self.node_pool(i));
                    }
                }
                _ => {}
            }
            if expired {
                let database = self.target.database.name.clone();
                return Err(match decision {
                    Decision::NoNode => ClientError::NoNode(database),
                    _ => ClientError::NoPrimary { database, waited },
                });
            }
            let _ = tokio::time::timeout_at(deadline, self.topology.changed()).await;
        }
    }

    fn busy(&self, node: usize) -> usize {
        self.node_pools
            .get(node)
            .and_then(Option::as_ref)
            .map_or(0, |p| p.counts().1)
    }

    fn node_pool(&mut self, node: usize) -> Arc<Pool> {
        if let Some(Some(pool)) = self.node_pools.get(node) {
            return pool.clone();
        }
        let addr = self
            .target
            .database
            .nodes
            .get(node)
            .cloned()
            .unwrap_or_default();
        let pool = self.app.pool_at(&self.target, &self.user, &addr);
        if let Some(slot) = self.node_pools.get_mut(node) {
            *slot = Some(pool.clone());
        }
        pool
    }

    async fn checkout(&mut self, pool: &Arc<Pool>) -> Result<Lease, PoolError> {
        let mut lease = pool.checkout().await?;
        if !self.intent.reads_only() && lease.conn().reported.get("in_hot_standby") == Some("on") {
            // Taken for the primary, but it says it is a standby (PG 14+).
            self.target.cluster.nudge(pool.addr());
        }
        if let Some(e) = lease.conn().apply_params(&self.params).await? {
            tracing::warn!(error = %e, "cannot apply the client's session parameters");
        }
        self.cancel
            .slot
            .attach(lease.pool().shared_addr(), lease.server_key());
        Ok(lease)
    }

    /// No server could be had: answer the buffered requests with the error.
    async fn refuse_request(&mut self, e: ClientError) -> Result<(), ClientError> {
        tracing::warn!(error = %e, "request refused");
        let mut out = BytesMut::new();
        self.fail_requests(&e, &mut out);
        self.client
            .write_all(&out)
            .await
            .map_err(ClientError::ClientIo)
    }

    /// Answers each request in flight (a Query, Sync or FunctionCall not yet
    /// answered) with `err` and ReadyForQuery, as the server would have, and
    /// forgets what the client sent for them. With none in flight (a Parse
    /// not yet followed by Sync) only the error goes out; the Sync still to
    /// come will get its ReadyForQuery.
    fn fail_requests(&mut self, err: &ClientError, out: &mut BytesMut) {
        self.fail_requests_as(err, out, TxStatus::Idle);
    }

    fn fail_requests_as(&mut self, err: &ClientError, out: &mut BytesMut, status: TxStatus) {
        // With nothing awaiting an answer an error would be unsolicited, which
        // drivers take for the end of the connection.
        if self.pending == 0 && self.awaiting {
            err.write_response(out, true);
        }
        for _ in 0..self.pending {
            err.write_response(out, true);
            build::ready_for_query(out, status);
        }
        self.server_dying = false;
        self.up.buf.advance(self.up.scanned);
        self.up.scanned = 0;
        self.dropping = !self.up.scanner.at_boundary();
        self.pending = 0;
        self.owed = false;
        self.awaiting = false;
        self.tx = TxStatus::Idle;
    }

    fn detach(&mut self, lease: Option<Box<Lease>>, reuse: bool) {
        self.cancel.slot.detach();
        if let Some(mut lease) = lease {
            if reuse {
                lease.release();
            }
        }
        self.pending = 0;
        self.owed = false;
        self.awaiting = false;
        self.tx = TxStatus::Idle;
        self.server_dying = false;
    }

    /// The client left: give the server back when it is clean.
    async fn leave(&mut self, lease: Option<Box<Lease>>) {
        self.cancel.slot.detach();
        let Some(mut lease) = lease else { return };
        if self.owed || self.tx != TxStatus::Idle {
            return;
        }
        if self.mode == PoolMode::Session {
            if let Err(e) = lease.conn().reset().await {
                tracing::warn!(error = %e, "cannot reset a session-mode server; closing it");
                return;
            }
        }
        lease.release();
    }

    /// The server died under the client. Between messages the client hears
    /// 08006 and keeps its connection; in the middle of one it cannot.
    async fn report_server_lost(&mut self, e: io::Error) -> Result<(), ClientError> {
        if !self.down.scanner.at_boundary() {
            return Err(ClientError::ServerLost(e));
        }
        let mut out = BytesMut::new();
        out.extend_from_slice(&self.down.buf[..self.down.scanned]);
        self.down.clear();
        // The last ReadyForQuery said whether a transaction was open.
        let in_transaction = self.tx != TxStatus::Idle;
        if in_transaction {
            // Told now if a request was waiting, else on the next one.
            let announce = self.pending == 0 && !self.awaiting;
            self.fail_requests_as(
                &ClientError::ServerLostInTransaction(e),
                &mut out,
                TxStatus::Failed,
            );
            self.lost_tx = Some(LostTx {
                announce,
                ..LostTx::default()
            });
        } else if self.intent.reads_only() {
            self.fail_requests(&ClientError::ServerLost(e), &mut out);
        } else {
            self.fail_requests(&ClientError::ServerLostDuringWrite(e), &mut out);
        }
        self.client
            .write_all(&out)
            .await
            .map_err(ClientError::ClientIo)
    }

    /// Answers, without a server, a client whose transaction died with its
    /// server: 25P02 for everything until ROLLBACK or COMMIT (which answers
    /// ROLLBACK), as PostgreSQL does in a failed transaction. Returns false
    /// when the client left.
    async fn answer_lost_transaction(&mut self) -> Result<bool, ClientError> {
        let max = self.app.config().proxy.max_message_size;
        loop {
            while self.dropping {
                match self.up.scanner.next(&self.up.buf, |_| false)? {
                    Step::Body(n) => {
                        self.up.buf.advance(n);
                        self.dropping = !self.up.scanner.at_boundary();
                    }
                    _ => break,
                }
            }
            let mut out = BytesMut::new();
            let mut consumed = 0;
            while !self.dropping && self.lost_tx.is_some() {
                let Some(m) = frame::message(&self.up.buf[consumed..], max)? else {
                    break;
                };
                consumed += m.len;
                if m.tag == frontend::TERMINATE {
                    return Ok(false);
                }
                answer_in_lost_transaction(&mut self.lost_tx, m.tag, m.body, &mut out);
            }
            if consumed > 0 || self.lost_tx.is_none() {
                self.up.buf.advance(consumed);
                self.up.scanned = 0;
                self.up.scanner = Scanner::new(max);
                self.pending = 0;
                self.owed = false;
                self.client
                    .write_all(&out)
                    .await
                    .map_err(ClientError::ClientIo)?;
                return Ok(true);
            }
            poll_fn(|cx| self.client.poll_read_ready(cx))
                .await
                .map_err(ClientError::ClientIo)?;
            self.up.reserve();
            match self.client.try_read_buf(&mut self.up.buf) {
                Ok(0) => return Ok(false),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(ClientError::ClientIo(e)),
            }
        }
    }

    /// Puts the kept request of a read back as if the client had just sent
    /// it, and forgets what the server said.
    fn restore_replay(&mut self) -> Result<(), FrameError> {
        let Some(request) = self.replay.take() else {
            return Ok(());
        };
        let max = self.app.config().proxy.max_message_size;
        self.down.clear();
        self.down.scanner = Scanner::new(usize::MAX);
        self.up.buf = request;
        self.up.scanned = 0;
        self.up.scanner = Scanner::new(max);
        self.holding = false;
        self.pending = 0;
        self.owed = false;
        self.awaiting = false;
        self.tx = TxStatus::Idle;
        self.scan_up()
    }

    fn scan_up(&mut self) -> Result<(), FrameError> {
        loop {
            let step = self
                .up
                .scanner
                .next(&self.up.buf[self.up.scanned..], |_| false)?;
            match step {
                Step::NeedMore => return Ok(()),
                Step::Body(n) if self.dropping => {
                    self.up.buf.advance(n);
                    self.dropping = !self.up.scanner.at_boundary();
                    continue;
                }
                Step::Header { tag, .. } if tag == frontend::TERMINATE => {
                    self.up.buf.truncate(self.up.scanned);
                    self.terminated = true;
                    return Ok(());
                }
                Step::Header { tag, .. } => {
                    if self.holding {
                        // More from the client: the kept request is no
                        // longer all of it; answer as it comes.
                        self.replay = None;
                        self.holding = false;
                    }
                    if matches!(
                        tag,
                        frontend::QUERY | frontend::SYNC | frontend::FUNCTION_CALL
                    ) {
                        self.pending += 1;
                    }
                    self.owed = true;
                    self.awaiting = true;
                }
                _ => {}
            }
            self.up.scanned += step.consumed();
        }
    }

    fn scan_down(&mut self, conn: &mut ServerConn) -> Result<(), FrameError> {
        let whole = |t| {
            matches!(
                t,
                backend::READY_FOR_QUERY | backend::PARAMETER_STATUS | backend::ERROR_RESPONSE
            )
        };
        loop {
            let start = self.down.scanned;
            let step = self.down.scanner.next(&self.down.buf[start..], whole)?;
            if let (true, Step::Header { tag, .. } | Step::Whole { tag, .. }) = (self.holding, step)
            {
                let message = &self.down.buf[start..start + step.consumed()];
                let read_only = tag == backend::ERROR_RESPONSE
                    && backend::ErrorFields::parse(message.get(5..).unwrap_or_default()).is_ok_and(
                        |f| f.code == sqlstate::READ_ONLY_SQL_TRANSACTION.code().as_bytes(),
                    );
                self.watch_held_answer(tag, read_only);
            }
            if let Step::Whole { tag, len } = step {
                let body = &self.down.buf[start + 5..start + len];
                if tag == backend::READY_FOR_QUERY {
                    self.tx = TxStatus::parse(body).unwrap_or(TxStatus::Failed);
                    self.pending = self.pending.saturating_sub(1);
                    if self.pending == 0 {
                        self.awaiting = false;
                        self.owed &= self.tx != TxStatus::Idle;
                    }
                } else if tag == backend::ERROR_RESPONSE {
                    let fields = backend::ErrorFields::parse(body).unwrap_or_default();
                    if fields.code == sqlstate::READ_ONLY_SQL_TRANSACTION.code().as_bytes() {
                        // A node taken for the primary refuses writes: re-probe it.
                        self.target.cluster.nudge(&conn.addr);
                    }
                    if matches!(fields.severity, b"FATAL" | b"PANIC") {
                        // The server is going away. Its FATAL would end the
                        // client's connection; the client hears 08006 from
                        // pgheal instead, in protocol order, and stays.
                        let message = fields.message_lossy();
                        tracing::warn!(server = %conn.addr, %message, "server is closing the connection");
                        self.server_dying = true;
                        let tail = self.down.buf.split_off(start + len);
                        self.down.buf.truncate(start);
                        self.down.buf.unsplit(tail);
                        continue;
                    }
                } else {
                    let _ = conn.note_parameter(body);
                    if conn.reported.get("in_hot_standby") == Some("on")
                        && !self.intent.reads_only()
                    {
                        // PostgreSQL 14+ says the node went into recovery.
                        self.target.cluster.nudge(&conn.addr);
                    }
                }
            } else if step == Step::NeedMore {
                return Ok(());
            }
            self.down.scanned += step.consumed();
        }
    }

    /// While a read's answer is held back: a 25006 from a replica means run
    /// it on the primary; anything that is an answer lets it through.
    fn watch_held_answer(&mut self, tag: u8, read_only_error: bool) {
        match tag {
            // Describing the result is not yet an answer.
            b'T' | b'1' | b'2' | b't' | b'n' | b'S' => {}
            // The request is answered in full without an error.
            backend::READY_FOR_QUERY if self.rerun.is_none() => {
                self.holding = false;
                self.replay = None;
            }
            backend::READY_FOR_QUERY => {}
            backend::ERROR_RESPONSE if read_only_error => self.rerun = Some(Rerun::OnPrimary),
            _ => {
                self.holding = false;
                self.replay = None;
            }
        }
    }

    fn releasable(&self) -> bool {
        self.mode == PoolMode::Transaction
            && !self.owed
            && self.up.buf.is_empty()
            && self.up.scanner.at_boundary()
            && self.down.buf.is_empty()
    }

    /// Moves bytes both ways until the attachment ends. Each side is read
    /// only while the other side's backlog is small.
    fn poll_pump(&mut self, cx: &mut Context<'_>, conn: &mut ServerConn) -> Poll<PumpEnd> {
        loop {
            let mut progress = match self.poll_client_read(cx) {
                Ok(p) => p,
                Err(end) => return Poll::Ready(end),
            };
            if self.client_eof || (self.terminated && self.up.buf.is_empty()) {
                return Poll::Ready(PumpEnd::ClientGone);
            }
            if !self.server_dying {
                match write_some(cx, &mut conn.stream, &mut self.up) {
                    Poll::Ready(Ok(n)) => progress |= n > 0,
                    Poll::Ready(Err(e)) => return Poll::Ready(PumpEnd::ServerLost(e)),
                    Poll::Pending => {}
                }
            }
            match self.poll_server_read(cx, conn) {
                Ok(p) => progress |= p,
                Err(end) => return Poll::Ready(end),
            }
            if self.rerun.is_some() && self.pending == 0 {
                return Poll::Ready(PumpEnd::Rerun);
            }
            if !self.holding {
                match write_some(cx, &mut self.client, &mut self.down) {
                    Poll::Ready(Ok(n)) => progress |= n > 0,
                    Poll::Ready(Err(_)) => return Poll::Ready(PumpEnd::ClientGone),
                    Poll::Pending => {}
                }
            }
            if self.releasable() {
                return Poll::Ready(PumpEnd::Released);
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    fn poll_client_read(&mut self, cx: &mut Context<'_>) -> Result<bool, PumpEnd> {
        if self.terminated || self.client_eof || self.server_dying || self.up.scanned >= MAX_PENDING
        {
            return Ok(false);
        }
        self.up.reserve();
        match poll_read_buf(Pin::new(&mut self.client), cx, &mut self.up.buf) {
            Poll::Ready(Ok(0)) => {
                self.client_eof = true;
                Ok(true)
            }
            Poll::Ready(Ok(_)) => {
                self.scan_up().map_err(PumpEnd::ClientBroke)?;
                Ok(true)
            }
            Poll::Ready(Err(_)) => Err(PumpEnd::ClientGone),
            Poll::Pending => Ok(false),
        }
    }

    fn poll_server_read(
        &mut self,
        cx: &mut Context<'_>,
        conn: &mut ServerConn,
    ) -> Result<bool, PumpEnd> {
        if self.down.scanned >= MAX_PENDING {
            return Ok(false);
        }
        self.down.reserve();
        match poll_read_buf(Pin::new(&mut conn.stream), cx, &mut self.down.buf) {
            Poll::Ready(Ok(0)) => Err(PumpEnd::ServerLost(io::ErrorKind::UnexpectedEof.into())),
            Poll::Ready(Ok(_)) => {
                // A server that breaks framing is as good as gone.
                self.scan_down(conn).map_err(|e| {
                    PumpEnd::ServerLost(io::Error::new(io::ErrorKind::InvalidData, e))
                })?;
                Ok(true)
            }
            Poll::Ready(Err(e)) => Err(PumpEnd::ServerLost(e)),
            Poll::Pending => Ok(false),
        }
    }
}

/// One client message in a lost transaction, answered as PostgreSQL would
/// in a failed one.
fn answer_in_lost_transaction(lost: &mut Option<LostTx>, tag: u8, body: &[u8], out: &mut BytesMut) {
    let Some(mut state) = *lost else { return };
    let ends =
        |sql: Option<&[u8]>| matches!(sql.map(classify), Some(Class::Rollback | Class::Commit));
    let failed = |out: &mut BytesMut, state: &mut LostTx| {
        let err = if state.announce {
            ClientError::ServerLostInTransaction(std::io::ErrorKind::ConnectionReset.into())
        } else {
            ClientError::TransactionLost
        };
        err.write_response(out, true);
        state.announce = false;
    };
    match tag {
        frontend::QUERY => {
            if ends(frontend::query(body).ok()) {
                build::command_complete(out, "ROLLBACK");
                build::ready_for_query(out, TxStatus::Idle);
                *lost = None;
                return;
            }
            failed(out, &mut state);
            build::ready_for_query(out, TxStatus::Failed);
            state = LostTx {
                announce: state.announce,
                ..LostTx::default()
            };
        }
        b'P' if !state.errored && ends(body.split(|&b| b == 0).nth(1)) => {
            state.ending = true;
            build::parse_complete(out);
        }
        b'B' if state.ending => build::bind_complete(out),
        b'D' if state.ending => build::no_data(out),
        b'E' if state.ending => build::command_complete(out, "ROLLBACK"),
        frontend::SYNC => {
            let status = if state.ending {
                TxStatus::Idle
            } else {
                TxStatus::Failed
            };
            build::ready_for_query(out, status);
            if state.ending {
                *lost = None;
                return;
            }
            state = LostTx {
                announce: state.announce,
                ..LostTx::default()
            };
        }
        _ if !state.errored && !state.ending => {
            failed(out, &mut state);
            state.errored = true;
        }
        _ => {}
    }
    *lost = Some(state);
}
