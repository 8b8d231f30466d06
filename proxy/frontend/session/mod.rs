//! One client's life after login: the welcome, then the data path.
//!
//! The client task owns its server connection while attached; no other task
//! or channel sits between them. Bytes move in whole buffers. Only message
//! headers are scanned, except ReadyForQuery, ParameterStatus and
//! ErrorResponse from the server, which are read whole; DataRow bodies are
//! never looked at. `route` picks the node, `pump` moves the bytes, `lost`
//! answers for a server that died, `record` keeps the running transaction
//! and `replay` runs it again on the primary.

mod carry;
mod check;
mod lost;
mod pump;
mod record;
mod replay;
mod replies;
mod rest;
mod route;
mod translate;

use carry::{Dirty, Pinned};
use lost::LostTx;
use replies::Expect;
use route::{Fence, Rerun};

pub(crate) use rest::Rested;

use std::collections::VecDeque;

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::net::stream::Stream;
use bytes::{Buf, BytesMut};
use pgheal_protocol::backend::TxStatus;
use pgheal_protocol::build;
use pgheal_protocol::frame::Scanner;
use tokio_util::io::poll_read_buf;

use crate::backend::cluster::Topology;
use crate::backend::error::PoolError;
use crate::backend::params::Params;
use crate::backend::pool::{Lease, Pool};
use crate::backend::router::Intent;
use crate::backend::statements::{ClientStatements, ServerName};
use crate::config::PoolMode;
use crate::frontend::cancel::Registration;
use crate::frontend::clients::{ClientSlot, ClientState, Registered};
use crate::frontend::error::ClientError;
use crate::frontend::login::LoggedIn;
use crate::frontend::{App, Target};
use crate::net::flow::Flow;
use tokio::sync::watch;

/// Counts a client as active while it holds a server.
struct Active(Arc<App>);

impl Active {
    fn new(app: &Arc<App>) -> Active {
        app.counters
            .active_clients
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Active(app.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0
            .counters
            .active_clients
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Where the client's requests stand with the server. Everything here
/// describes one attachment and is reset together by [`InFlight::reset`]
/// when pgheal answers for the server or gives it up.
#[derive(Debug)]
struct InFlight {
    /// Queries, Syncs and FunctionCalls sent to the server and not yet
    /// answered by ReadyForQuery.
    pending: u32,
    /// The server has work from this client that has not ended with an
    /// idle ReadyForQuery.
    owed: bool,
    /// The client sent something not yet answered by a ReadyForQuery.
    awaiting: bool,
    /// The transaction status the last ReadyForQuery reported.
    tx: TxStatus,
    /// The server sent a FATAL error and is about to close: nothing more
    /// goes to it, and its FATAL already answered the oldest request.
    server_dying: bool,
    /// That FATAL, whole, for the client whose session it ends.
    fatal: Option<bytes::Bytes>,
    /// Named statements the requests in flight prepared (Parse).
    fresh: Vec<Box<[u8]>>,
    /// Shared statements the requests in flight use (base name, epoch).
    bound: Vec<(ServerName, u32)>,
    /// A request in flight uses a statement the client prepared before:
    /// its driver knows that statement's description already.
    known_shape: bool,
    /// A statement prepared in flight was already on the server (shared).
    shared_fresh: bool,
    /// Translation waits for pgheal's Describe of a statement (`check`).
    checking: bool,
    /// The running transaction, kept for a replay (see `record`).
    record: Option<Box<record::TxRecord>>,
}

impl InFlight {
    const IDLE: InFlight = InFlight {
        pending: 0,
        owed: false,
        awaiting: false,
        tx: TxStatus::Idle,
        server_dying: false,
        fatal: None,
        fresh: Vec::new(),
        bound: Vec::new(),
        known_shape: false,
        shared_fresh: false,
        checking: false,
        record: None,
    };

    /// Nothing in flight: the client's requests are answered or forgotten.
    fn reset(&mut self) {
        *self = InFlight::IDLE;
    }

    /// Nothing in flight and nothing of a transaction kept.
    fn is_idle(&self) -> bool {
        self.pending == 0
            && !self.owed
            && !self.awaiting
            && self.tx == TxStatus::Idle
            && !self.server_dying
            && self.fatal.is_none()
            && self.fresh.is_empty()
            && self.bound.is_empty()
            && !self.checking
            && self.record.is_none()
    }
}

/// Server messages up to this size reach the client only whole, so a server
/// that dies in the middle of one never leaves the client half a message
/// (it hears 08006 and keeps its connection); they nearly always arrive
/// whole anyway. Larger ones stream through.
const WHOLE_BELOW: usize = 8 * 1024;

/// The most room a session keeps for the next kept request of a read.
const REPLAY_ROOM: usize = 4 * 1024;

/// A request this soon after its client went idle is a quick return.
const QUICK_RETURN: std::time::Duration = std::time::Duration::from_millis(5);

/// Quick returns in a row after which a client keeps its buffers while
/// idle (until it rests).
const WARM_AFTER: u8 = 2;

/// How often a held read looks whether the health checks took its node for
/// down (a fifth of the default probe interval: next to the probes' own
/// detection time, the delay is small).
const NODE_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// The scanner of what a server sends.
pub(super) fn server_scanner() -> Scanner {
    Scanner::new(usize::MAX).whole_below(WHOLE_BELOW)
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
    ClientBroke(ClientError),
    ServerLost(io::Error),
    /// pgheal is shutting down and the client's work is done.
    Closing,
    /// A replay reproduced what the client had been passed.
    Verified,
    /// A replay's replies differed from what the client had been passed.
    Mismatch,
    /// The client got pinned: the attachment watches for shutdown now.
    Rewatch,
}

/// How a session's task ended without an error.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Left,
    /// Idle long enough: the client rests without a task (see `rest`).
    Resting,
}

/// What an idle wait ended with.
enum Wait {
    Request,
    Left,
    Rest,
}

/// Until `token` is cancelled; never without one.
async fn cancelled(token: Option<&tokio_util::sync::CancellationToken>) {
    match token {
        Some(token) => token.cancelled().await,
        None => std::future::pending().await,
    }
}

/// Waits until the client is readable (`None`), or, when it holds a read
/// buffer with room, reads into it (`Some(bytes read)`, 0 at its end).
fn wait_or_read(
    client: &mut Stream,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<Option<usize>>> {
    if buf.capacity() == buf.len() {
        return client.poll_read_ready(cx).map_ok(|()| None);
    }
    poll_read_buf(Pin::new(client), cx, buf).map_ok(Some)
}

/// Serves a client in this task until it leaves, closes or rests.
pub async fn live(mut session: Box<Session>) {
    let result = session.run().await;
    let info = session.registered.info.clone();
    let (peer, user, database) = (info.peer, &info.user, &info.database);
    match result {
        Ok(Ended::Left) => tracing::info!(%peer, %user, %database, "client left"),
        Ok(Ended::Resting) => rest::rest(session),
        Err(e) => tracing::info!(%peer, %user, %database, error = %e, "client closed"),
    }
}

pub struct Session {
    client: Stream,
    up: Flow,
    down: Flow,
    params: Params,
    mode: PoolMode,
    pool: Arc<Pool>,
    app: Arc<App>,
    target: Arc<Target>,
    /// The topology as of the last routing decision; wakes degraded
    /// writes when roles change.
    topology: watch::Receiver<Arc<Topology>>,
    /// This client's pool on each node, by node index, made on first use.
    node_pools: Vec<Option<Arc<Pool>>>,
    cancel: Registration,
    /// What the server owes for the client's requests; reset in one place.
    flight: InFlight,
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
    /// The room of the last kept request, for the next (see `keep_replay`).
    replay_spare: BytesMut,
    /// Server bytes are held back (not written to the client) while the
    /// read may still run again.
    holding: bool,
    rerun: Option<Rerun>,
    /// The request runs again with the statements it prepares kept to
    /// this client (see `Rerun::Unshared`).
    unshare: bool,
    /// Read-your-writes: after this client's write, its reads stay on the
    /// primary until a replica has replayed past it.
    fence: Option<Fence>,
    /// Transaction mode: client messages are rewritten for the server
    /// (statement names), so bytes go to the server from `wire`.
    translating: bool,
    wire: Flow,
    /// How far translation got through `up`.
    xl: Scanner,
    /// Replies the server owes for what was sent, where pgheal may act.
    expect: VecDeque<Expect>,
    /// The server's replies stopped matching `expect`: it is not reused.
    out_of_step: bool,
    /// The client's named prepared statements.
    statements: ClientStatements,
    /// Settings the running transaction may have changed.
    dirty: Option<Box<Dirty>>,
    /// The settings the client logged in with, once it changed some.
    startup: Option<Box<Params>>,
    pinned: Option<Pinned>,
    /// pgheal is shutting down: end the client once its work is done.
    closing: bool,
    /// The attachment watches for a shutdown (see `attached`).
    watching_shutdown: bool,
    /// When the running transaction's first message arrived.
    tx_started: Option<std::time::Instant>,
    /// When the last transaction ended (its ReadyForQuery), until the next
    /// one starts: its server's return and the idle wait after it use this
    /// reading of the clock instead of taking their own.
    ended_at: Option<std::time::Instant>,
    /// When the client last went idle (it could rest then), until its
    /// next request.
    idle_since: Option<std::time::Instant>,
    /// Requests in a row that came within `QUICK_RETURN` of the client
    /// going idle: a client in a burst keeps its buffers between them.
    quick_returns: u8,
    /// This client's entry in SHOW CLIENTS (also its user name and where
    /// its requests run, for cancel requests).
    registered: Registered,
    /// Transactions of this client are recorded for a replay.
    replays: bool,
    /// A replay runs and has not yet reproduced what the client saw.
    verify: Option<Box<replay::Verify>>,
    /// This client's place under `max_client_connections`.
    slot: ClientSlot,
    /// The wait before a rest, kept from one idle wait to the next:
    /// moving a registered timer later takes no lock (tokio extends it in
    /// place), where a new timer each time is registered and removed.
    /// While attached, it tells a held read when to look at its node
    /// again (see `attached`).
    rest_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// What routing found in the request's first Query (see `Analyzed`).
    analyzed: Option<route::Analyzed>,
}

impl Session {
    pub fn new(
        app: Arc<App>,
        target: Arc<Target>,
        client: LoggedIn,
        registered: Registered,
        slot: ClientSlot,
    ) -> Session {
        let mode = app.config().proxy.pool_mode;
        let translating =
            mode == PoolMode::Transaction && app.config().pool.max_prepared_statements > 0;
        let kept = rest::Rested {
            client: client.stream,
            params: client.params,
            mode,
            pool: app.pool_for(&target, &client.user),
            cancel: app.cancels.register(&registered.info),
            replays: translating && app.config().failover.replay,
            app,
            target,
            statements: None,
            startup: None,
            fence: None,
            translating,
            slot,
        };
        let mut session = Session::from_rested(kept, registered);
        session.welcomed = false;
        // What the client sent after its startup packet (rare) is read
        // first; an empty login buffer is dropped, and the first request
        // read into one of the spares.
        if !client.buf.is_empty() {
            session.up.buf = client.buf;
        }
        session
    }

    /// Sends the welcome (once) and serves the client until it leaves or
    /// rests. A fatal error is told to the client before its connection
    /// closes.
    async fn run(&mut self) -> Result<Ended, ClientError> {
        let result = self.serve().await;
        if let Err(e) = &result {
            let mut out = BytesMut::new();
            if !self.welcomed {
                // Still owed from the login (see `welcome`).
                build::auth_ok(&mut out);
            }
            // A server lost in the middle of a message leaves nothing to say.
            let mid_message = matches!(e, ClientError::ServerLost(_));
            if !mid_message && e.write_response(&mut out, self.welcomed) {
                let _ = self.client.send(&out).await;
            }
        }
        result
    }

    /// The client's life: idle waits are small; everything a transaction
    /// needs lives in a boxed future only while it runs, so thousands of
    /// idle clients cost little memory.
    async fn serve(&mut self) -> Result<Ended, ClientError> {
        let mut held = match self.welcomed {
            true => None,
            false => Box::pin(self.welcome()).await?,
        };
        self.welcomed = true;
        loop {
            if held.is_none() && self.app.shutdown.is_cancelled() {
                return Err(ClientError::Shutdown);
            }
            if self.lost_tx.is_some() {
                if !Box::pin(self.answer_lost_transaction()).await? {
                    return Ok(Ended::Left);
                }
                continue;
            }
            if held.is_none() {
                match self.wait_for_request().await? {
                    Wait::Request => {}
                    Wait::Left => return Ok(Ended::Left),
                    Wait::Rest => return Ok(Ended::Resting),
                }
            }
            if held.is_none() {
                if let Some(answer) = self.prepare_locally() {
                    self.client
                        .send(&answer)
                        .await
                        .map_err(ClientError::ClientIo)?;
                    continue;
                }
            }
            // One allocation per transaction, kept under glibc's per-thread
            // cache limit (1,032 bytes; this future is 1,008 in a release
            // build): past it every transaction's allocation and free take
            // malloc's slow path, ~450 instructions. Rare steps inside are
            // boxed for that (see `after_pump`).
            if Box::pin(self.attached(&mut held)).await? == Attachment::ClientGone {
                return Ok(Ended::Left);
            }
        }
    }

    /// Runs the client's requests on a server (the held one in session
    /// mode, a checked-out one in transaction mode) until they end.
    async fn attached(&mut self, held: &mut Option<Lease>) -> Result<Attachment, ClientError> {
        let lease = match held {
            Some(lease) => lease,
            None => match self.start_transaction().await {
                Ok(lease) => held.insert(lease),
                Err(e) => {
                    self.refuse_request(e).await?;
                    return Ok(Attachment::Detached);
                }
            },
        };
        let _active = Active::new(&self.app);
        self.registered.info.set_state(if self.pinned.is_some() {
            ClientState::Pinned
        } else {
            ClientState::Active
        });
        // A held read looks at its node's health on the timer that waits
        // for the rest between transactions: already armed a few tens of
        // milliseconds ahead, polling it registers nothing shared, where a
        // watch on the topology took a lock every client of the database
        // shares, twice a transaction.
        let mut check = self.rest_timer.take();
        let node = lease.pool().shared_addr().clone();
        let end = loop {
            // Only an attachment that outlives its transaction (session
            // mode, a pinned client) watches for a shutdown: any other ends
            // with its transaction, and the serve loop then sees it. So the
            // common transaction registers nothing on the shared token.
            self.watching_shutdown =
                !self.closing && (self.mode == PoolMode::Session || self.pinned.is_some());
            let shutdown = self.watching_shutdown.then(|| self.app.shutdown.clone());
            let watching = self.replay.is_some();
            if watching && check.is_none() {
                check = Some(Box::pin(tokio::time::sleep(NODE_CHECK)));
            }
            let looked_at = poll_fn(|cx| match check.as_mut() {
                Some(timer) => std::future::Future::poll(timer.as_mut(), cx),
                None => Poll::Pending,
            });
            tokio::select! {
                biased;
                end = poll_fn(|cx| self.poll_pump(cx, lease.conn())) => match end {
                    PumpEnd::Rewatch => continue,
                    end => break end,
                },
                // Finish what runs, then end the client (see poll_pump).
                _ = cancelled(shutdown.as_ref()) => self.closing = true,
                // A held read on a node the health checks now take for down
                // (a blackholed network answers nothing and closes nothing)
                // runs elsewhere instead of waiting on it.
                () = looked_at, if watching => {
                    if self.holding && self.node_is_down(&node) {
                        let why = "its node was taken for down by the health checks";
                        break PumpEnd::ServerLost(io::Error::new(io::ErrorKind::TimedOut, why));
                    }
                    if let Some(timer) = check.as_mut() {
                        timer.as_mut().reset(tokio::time::Instant::now() + NODE_CHECK);
                    }
                }
            }
        };
        self.watching_shutdown = false;
        self.rest_timer = check;
        tracing::debug!(?end, "detached from the server");
        self.registered.info.set_state(ClientState::Idle);
        self.after_pump(end, held).await
    }

    /// The health checks take `node` for down now.
    fn node_is_down(&self, node: &str) -> bool {
        let topology = self.topology.borrow();
        let down = crate::backend::cluster::Role::Down;
        topology
            .nodes
            .iter()
            .any(|n| *n.addr == *node && n.role == down)
    }

    /// Acts on how the attachment ended: gives the server back, runs a
    /// read again, or answers for a server that was lost.
    async fn after_pump(
        &mut self,
        end: PumpEnd,
        held: &mut Option<Lease>,
    ) -> Result<Attachment, ClientError> {
        let Some(lease) = held.as_mut() else {
            return Ok(Attachment::Detached);
        };
        match end {
            PumpEnd::Released => {
                if !self.intent.reads_only() {
                    self.fence = Some(Fence {
                        since: std::time::Instant::now(),
                        node: lease.pool().shared_addr().clone(),
                        lsn: None,
                    });
                }
                let mut reuse = !std::mem::take(&mut self.out_of_step);
                if let Err(e) = self.read_back(lease.conn()).await {
                    tracing::warn!(error = %e, "cannot read back the client's settings; closing that server connection");
                    reuse = false;
                }
                self.detach(held.take(), reuse);
                Ok(Attachment::Detached)
            }
            PumpEnd::Rerun => {
                let lease = held.take();
                self.run_again(lease)?;
                Ok(Attachment::Detached)
            }
            // Boxed, as the losses below: rare, and large enough to double
            // the size of what every transaction allocates.
            PumpEnd::ClientGone => {
                Box::pin(self.leave(held.take())).await;
                Ok(Attachment::ClientGone)
            }
            PumpEnd::Closing => {
                Box::pin(self.leave(held.take())).await;
                Err(ClientError::Shutdown)
            }
            PumpEnd::ClientBroke(e) => {
                self.detach(held.take(), false);
                Err(e)
            }
            // Only inside a replay, which waits for them itself; `attached`
            // polls again on Rewatch.
            PumpEnd::Verified | PumpEnd::Mismatch | PumpEnd::Rewatch => {
                self.detach(held.take(), false);
                Ok(Attachment::Detached)
            }
            PumpEnd::ServerLost(e) => Box::pin(self.server_lost(e, held)).await,
        }
    }

    /// Puts a held read back to run it again (see `Rerun`); the server it
    /// ran on is given back.
    fn run_again(&mut self, lease: Option<Lease>) -> Result<(), ClientError> {
        self.retried(match self.rerun {
            Some(Rerun::OnPrimary) => "replica_refused_write",
            Some(Rerun::Replan) => "stale_plan",
            Some(Rerun::Unshared) => "shared_statement_failed",
            _ => "server_lost",
        });
        if let Some(lease) = &lease {
            tracing::info!(server = %lease.pool().addr(), reason = ?self.rerun, "running a read again");
        }
        self.forget_fresh();
        self.detach(lease, true);
        self.unshare = matches!(self.rerun, Some(Rerun::Unshared));
        self.restore_replay()?;
        Ok(())
    }

    /// The one server session of a session-mode or pinned client is gone:
    /// as a direct connection would, the client hears the server's own
    /// FATAL (or 08006 when it said nothing) and its connection closes.
    /// Drivers reconnect through pgheal to the current primary.
    async fn end_session(&mut self, addr: &str, e: io::Error) -> Result<Attachment, ClientError> {
        tracing::warn!(server = %addr, error = %e, "the client's server session ended; closing the client");
        self.target.cluster.nudge(addr);
        self.registered.info.cancel.detach();
        let _ = self.unpin();
        let mut out = BytesMut::new();
        // A message cut off by the loss cannot be finished: say nothing.
        if self.down.scanner.at_boundary() {
            out.extend_from_slice(&self.down.buf[..self.down.scanned]);
            match self.flight.fatal.take() {
                Some(fatal) => out.extend_from_slice(&fatal),
                None => {
                    ClientError::SessionServerLost(e).write_response(&mut out, true);
                }
            }
        }
        let _ = self.client.send(&out).await;
        Err(ClientError::SessionEnded(addr.to_string()))
    }

    /// A held read whose server sent FATAL and went away: when a probe finds
    /// the node still up in the same role, an administrator (or a timeout)
    /// ended that one session, and the read must not run again elsewhere.
    async fn ended_on_purpose(&mut self, addr: &str) -> Option<ClientError> {
        let fatal = self.flight.fatal.clone()?;
        let fields =
            pgheal_protocol::backend::ErrorFields::parse(fatal.get(5..).unwrap_or_default())
                .ok()?;
        let (code, message) = (
            String::from_utf8_lossy(fields.code).into_owned(),
            fields.message_lossy(),
        );
        let snapshot = self.target.cluster.snapshot();
        let before = snapshot.nodes.iter().find(|n| &*n.addr == addr)?.role;
        let within = self.app.config().health.timeout * 2;
        let now = self.target.cluster.recheck(addr, within).await?;
        let on_purpose = now == before && now != crate::backend::cluster::Role::Down;
        tracing::info!(server = %addr, %code, on_purpose, "server ended a session running a read");
        on_purpose.then_some(ClientError::SessionTerminated { code, message })
    }

    /// Answers a held read that an administrator stopped with the server's
    /// own error; nothing of its partial answer goes out.
    async fn answer_terminated_read(&mut self, e: ClientError) -> Result<Attachment, ClientError> {
        self.forget_replay();
        self.holding = false;
        self.rerun = None;
        self.down.clear();
        self.down.scanner = server_scanner();
        self.registered.info.cancel.detach();
        let mut out = BytesMut::new();
        self.fail_requests(&e, &mut out);
        self.client
            .send(&out)
            .await
            .map_err(ClientError::ClientIo)?;
        Ok(Attachment::Detached)
    }

    /// A new transaction: waits while the database is paused (PAUSE), then
    /// routes and checks out a server.
    async fn start_transaction(&mut self) -> Result<Lease, ClientError> {
        let target = self.target.clone();
        tokio::select! {
            // Not paused, nearly always: the shutdown token is not touched.
            biased;
            _ = target.unpaused() => {}
            _ = self.app.shutdown.cancelled() => return Err(ClientError::Shutdown),
        }
        self.route_and_checkout().await
    }

    /// Authentication is done: tell the client the server's parameters, its
    /// cancel key and that it may start. Session mode keeps the server.
    async fn welcome(&mut self) -> Result<Option<Lease>, ClientError> {
        let (mut lease, reported) = match self.welcome_server().await {
            Ok(mut l) => {
                let reported = l.conn().reported.clone();
                (Some(l), reported)
            }
            Err(e) if e.is_refusal() => return Err(e.into()),
            Err(e) => match self.remembered_parameters() {
                // Transaction mode needs no server until the first query: a
                // server that is down or went away now costs the client
                // nothing.
                Some(reported) if self.mode == PoolMode::Transaction => {
                    tracing::warn!(error = %e, "no server for the welcome; using remembered parameters");
                    (None, reported)
                }
                _ => return Err(e.into()),
            },
        };
        if let (PoolMode::Session, Some(l)) = (self.mode, lease.as_ref()) {
            // One server session per client: the client learns its real
            // pid (notifications, pg_stat_activity, pg_terminate_backend
            // find it); the secret stays pgheal's.
            self.cancel = self
                .app
                .cancels
                .register_as(&self.registered.info, l.server_key().pid);
        }
        let status = reported.status_messages();
        let mut out = BytesMut::with_capacity(status.len() + 48);
        // The login's AuthenticationOk goes out with the rest, in one write.
        build::auth_ok(&mut out);
        out.extend_from_slice(status);
        build::backend_key_data(&mut out, self.cancel.key);
        build::ready_for_query(&mut out, TxStatus::Idle);
        self.client
            .send(&out)
            .await
            .map_err(ClientError::ClientIo)?;
        if self.mode == PoolMode::Transaction {
            if let Some(mut l) = lease.take() {
                l.release();
            }
        } else if let Some(l) = lease.as_mut() {
            self.registered
                .info
                .cancel
                .attach(l.pool().shared_addr(), l.server_key());
        }
        Ok(lease)
    }

    /// A server for the welcome, with the client's startup settings applied.
    async fn welcome_server(&mut self) -> Result<Lease, PoolError> {
        let mut lease = self.pool.checkout(self.cancel.key.pid).await?;
        match lease.conn().apply_params(&self.params).await {
            // The server refused a setting: as a direct connection would,
            // the client hears it and is not let in.
            Ok(Some(refused)) => Err(PoolError::Refused(refused)),
            Ok(None) => Ok(lease),
            Err(e) => {
                self.target.cluster.nudge(lease.pool().addr());
                Err(e.into())
            }
        }
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
    /// least one whole message header, left, or was idle long enough to
    /// rest (see `rest`).
    async fn wait_for_request(&mut self) -> Result<Wait, ClientError> {
        loop {
            self.scan_up()?;
            if self.terminated && self.up.scanned == 0 {
                return Ok(Wait::Left);
            }
            if self.up.scanned > 0 {
                return Ok(Wait::Request);
            }
            // A few expected replies' room is kept (a transaction needs it
            // again); more goes.
            if self.expect.is_empty() && self.expect.capacity() > 8 {
                self.expect = VecDeque::new();
            }
            let can_rest = self.can_rest();
            // Its buffers wait in this thread's spares while it idles,
            // unless its last requests came back at once: giving them up
            // and taking them again costs ~600 instructions a transaction.
            // (Kept by every client until it rests, a burst of clients
            // going idle together held them all for the 30-50 ms before
            // resting: 986-1,058 bytes of RSS per idle client in
            // benches/e2e.sh against 976; a client that ran one query and
            // stays idle gives them up at once.)
            if !can_rest || self.quick_returns < WARM_AFTER {
                self.up.shrink();
                self.down.shrink();
                self.wire.shrink();
            }
            if can_rest {
                self.arm_rest_timer();
            }
            // A client without a buffer waits with poll_read_ready, which
            // keeps the waker in the socket's own slot: an idle client's
            // wait costs no more than a pointer. One that kept its buffer
            // (warm, see above) reads into it at once: waiting for
            // readiness first asked tokio twice per request.
            self.up.reserve_if_held();
            let (client, up, shutdown, timer) = (
                &mut self.client,
                &mut self.up.buf,
                &self.app.shutdown,
                &mut self.rest_timer,
            );
            let rest = poll_fn(|cx| match timer {
                Some(timer) => std::future::Future::poll(timer.as_mut(), cx),
                None => Poll::Pending,
            });
            // The read first: the rest timer (~120 instructions a poll) and
            // the shutdown token are polled only while the read waits.
            let read = tokio::select! {
                biased;
                read = poll_fn(|cx| wait_or_read(client, up, cx)) => {
                    read.map_err(ClientError::ClientIo)?
                }
                // A client that can rest hears a shutdown when it does.
                _ = shutdown.cancelled(), if !can_rest => return Err(ClientError::Shutdown),
                _ = rest, if can_rest => return Ok(Wait::Rest),
            };
            let read = match read {
                Some(read) => Ok(read),
                None => self.read_request().await,
            };
            match read {
                Ok(0) => return Ok(Wait::Left),
                Ok(n) => {
                    self.app.metrics.bytes_in.inc_by(n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(ClientError::ClientIo(e)),
            }
        }
    }

    /// Reads what the client sent once it is readable.
    async fn read_request(&mut self) -> io::Result<usize> {
        self.up.reserve();
        // poll_read (unlike try_read) clears readiness after a short
        // read, which spares the pump a read that would find nothing.
        poll_fn(
            |cx| match poll_read_buf(Pin::new(&mut self.client), cx, &mut self.up.buf) {
                Poll::Pending => Poll::Ready(Err(io::ErrorKind::WouldBlock.into())),
                ready => ready,
            },
        )
        .await
    }

    /// No server could be had: answer the buffered requests with the error.
    async fn refuse_request(&mut self, e: ClientError) -> Result<(), ClientError> {
        tracing::warn!(error = %e, "request refused");
        match &e {
            ClientError::NoPrimary { .. } => self.rejected("no_primary"),
            ClientError::NoNode(_) => self.rejected("no_node"),
            _ => {}
        }
        let mut out = BytesMut::new();
        self.fail_requests(&e, &mut out);
        self.client.send(&out).await.map_err(ClientError::ClientIo)
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
        if self.flight.pending == 0 && self.flight.awaiting {
            err.write_response(out, true);
        }
        for _ in 0..self.flight.pending {
            err.write_response(out, true);
            build::ready_for_query(out, status);
        }
        self.forget_sent();
        self.up.buf.advance(self.up.scanned);
        self.up.scanned = 0;
        self.dropping = !self.up.scanner.at_boundary();
        self.flight.reset();
    }

    /// Forgets what went to a server that is no longer ours.
    fn forget_sent(&mut self) {
        self.wire.clear();
        self.xl = Scanner::new(usize::MAX);
        self.expect.clear();
        self.dirty = None;
    }

    /// Keeps the buffered request of an autocommit read (see `replay`), in
    /// the room the last one left.
    fn keep_replay(&mut self) {
        let mut kept = std::mem::take(&mut self.replay_spare);
        kept.extend_from_slice(&self.up.buf);
        self.replay = Some(kept);
    }

    /// The kept request is not needed: its room stays for the next one
    /// unless it is large.
    fn forget_replay(&mut self) {
        if let Some(mut kept) = self.replay.take() {
            if kept.capacity() <= REPLAY_ROOM {
                kept.clear();
                self.replay_spare = kept;
            }
        }
    }

    fn detach(&mut self, lease: Option<Lease>, reuse: bool) {
        self.registered.info.cancel.detach();
        self.unshare = false;
        self.forget_sent();
        // The next server starts at a message boundary, whatever this one
        // left half-read.
        if self.down.buf.is_empty() {
            self.down.scanner = server_scanner();
        }
        if let Some(mut lease) = lease {
            if reuse {
                lease.release_at(self.ended_at.unwrap_or_else(std::time::Instant::now));
            }
        }
        self.flight.reset();
    }

    /// The client left: give the server back when it is clean.
    async fn leave(&mut self, lease: Option<Lease>) {
        self.registered.info.cancel.detach();
        let Some(mut lease) = lease else { return };
        let pinned = self.pinned.take().is_some();
        if self.flight.owed || self.flight.tx != TxStatus::Idle {
            return;
        }
        if self.mode == PoolMode::Session || pinned {
            if let Err(e) = lease.conn().reset().await {
                tracing::warn!(error = %e, "cannot reset a session-mode server; closing it");
                return;
            }
        }
        lease.release();
    }

    /// Forgets the server message the loss cut off when nothing of it
    /// reached the client (it is then as if the server died between
    /// messages); false when part of it did.
    fn drop_cut_reply(&mut self) -> bool {
        if self.down.scanner.at_boundary() {
            return true;
        }
        let partial = self.down.scanner.scanned_of_current();
        if partial > self.down.scanned {
            return false;
        }
        self.down.scanned -= partial;
        self.down.buf.truncate(self.down.scanned);
        self.down.scanner = server_scanner();
        true
    }

    /// The server died under the client. Between messages the client hears
    /// 08006 and keeps its connection; in the middle of one it cannot.
    async fn report_server_lost(&mut self, e: io::Error) -> Result<(), ClientError> {
        if !self.drop_cut_reply() {
            tracing::warn!(
                bytes_of_it_sent = self.down.scanner.scanned_of_current() - self.down.scanned,
                buffered = self.down.buf.len(),
                "the server went away in the middle of a message part of which the client has; closing the client"
            );
            return Err(ClientError::ServerLost(e));
        }
        let mut out = BytesMut::new();
        out.extend_from_slice(&self.down.buf[..self.down.scanned]);
        self.down.clear();
        // The last ReadyForQuery said whether a transaction was open.
        let in_transaction = self.flight.tx != TxStatus::Idle;
        if in_transaction {
            // Told now if a request was waiting, else on the next one.
            let announce = self.flight.pending == 0 && !self.flight.awaiting;
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
        self.client.send(&out).await.map_err(ClientError::ClientIo)
    }
}
