//! Resting clients: a transaction-mode client idle for [`REST_AFTER`] gives
//! up its task. What its session keeps between transactions moves into a
//! [`Bench`], which becomes the waker of the client socket's read
//! readiness; the socket's registration is then the only owner of the
//! client. The next byte from the client (or its leaving) wakes the bench,
//! which starts a new task for the session. An idle client so costs its
//! socket, its registry entries and the few hundred bytes of [`Rested`],
//! not a task with a whole session future.
//!
//! Shutdown reaches resting clients through their registry entry
//! ([`crate::frontend::clients::Clients::wake_resting`]).

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use pgheal_protocol::frame::Scanner;

use super::{server_scanner, InFlight, Session};
use crate::backend::params::Params;
use crate::backend::pool::Pool;
use crate::backend::router::Intent;
use crate::backend::statements::ClientStatements;
use crate::config::PoolMode;
use crate::frontend::cancel::Registration;
use crate::frontend::clients::{ClientSlot, Registered, Resting};
use crate::frontend::{App, Target};
use crate::net::flow::Flow;
use crate::net::stream::Stream;
use crate::sync::lock;

use super::route::Fence;

/// How long a client waits idle, holding its task, before it rests. Short
/// enough that idle clients cost little soon; long enough that a client
/// in steady use never rests (resting and waking cost a task each).
pub(super) const REST_AFTER: Duration = Duration::from_millis(100);

/// What a session keeps between transactions: everything else starts
/// afresh at the next request (and a new session starts from one).
pub(super) struct Rested {
    pub(super) client: Stream,
    pub(super) params: Params,
    pub(super) mode: PoolMode,
    pub(super) pool: Arc<Pool>,
    pub(super) app: Arc<App>,
    pub(super) target: Arc<Target>,
    pub(super) cancel: Registration,
    /// Boxed: most clients have none of these (Rested stays small).
    pub(super) statements: Option<Box<ClientStatements>>,
    pub(super) startup: Option<Box<Params>>,
    pub(super) fence: Option<Box<Fence>>,
    pub(super) registered: Registered,
    pub(super) translating: bool,
    pub(super) replays: bool,
    pub(super) slot: ClientSlot,
}

/// A resting client, owned by the waker it is.
pub struct Bench {
    rested: Mutex<Option<Rested>>,
}

impl Wake for Bench {
    fn wake(self: Arc<Self>) {
        self.wake_up();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.wake_up();
    }
}

impl Resting for Bench {
    fn wake_up(&self) {
        let Some(rested) = lock(&self.rested).take() else {
            return; // already woken
        };
        counted(&rested.app, false);
        // Without a runtime (it is shutting down) the client closes.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let session = Box::new(Session::from_rested(rested));
            runtime.spawn(super::live(session));
        }
    }
}

/// Counts a client resting, or no longer.
fn counted(app: &App, resting: bool) {
    let n = &app.counters.resting_clients;
    match resting {
        true => n.fetch_add(1, Relaxed),
        false => n.fetch_sub(1, Relaxed),
    };
}

impl Drop for Bench {
    /// The runtime went away with the client still resting.
    fn drop(&mut self) {
        if let Some(rested) = lock(&self.rested).take() {
            counted(&rested.app, false);
        }
    }
}

/// Read buffers a thread keeps for its next transactions once one of its
/// clients rests (a quiet time): busy threads keep more (`spare`).
const QUIET_SPARES: usize = 4;

/// Lets the session's task end with the client kept by its socket.
pub(super) fn rest(session: Box<Session>) {
    let app = session.app.clone();
    counted(&app, true);
    crate::net::flow::spare::keep_at_most(QUIET_SPARES);
    let bench = Arc::new(Bench {
        rested: Mutex::new(Some(session.into_rested())),
    });
    let waker = Waker::from(bench.clone());
    {
        let mut rested = lock(&bench.rested);
        let Some(r) = rested.as_mut() else { return };
        // The bench is in place before the waker is: a request arriving
        // now wakes it (after this lock) and finds the session there.
        match r.client.poll_read_ready(&mut Context::from_waker(&waker)) {
            Poll::Pending => {
                let weak: std::sync::Weak<dyn Resting> = Arc::downgrade(&bench) as _;
                r.registered.info.set_resting(Some(weak));
            }
            // Something came meanwhile: no rest after all.
            Poll::Ready(_) => {
                drop(rested);
                bench.wake_up();
                return;
            }
        }
    }
    // A shutdown that began before the registry entry had the bench would
    // not have found it.
    if app.shutdown.is_cancelled() {
        bench.wake_up();
    }
}

impl Session {
    /// Idle between transactions with nothing a task must keep: no
    /// server, no request, no transaction state, no pinned settings.
    pub(super) fn can_rest(&self) -> bool {
        self.mode == PoolMode::Transaction
            && self.pinned.is_none()
            && self.lost_tx.is_none()
            && self.replay.is_none()
            && self.verify.is_none()
            && self.dirty.is_none()
            && self.rerun.is_none()
            && !(self.holding
                || self.closing
                || self.terminated
                || self.client_eof
                || self.dropping
                || self.out_of_step
                || self.unshare)
            && self.flight.is_idle()
            && self.expect.is_empty()
            && self.wire.buf.is_empty()
            && self.up.buf.is_empty()
            && self.up.scanner.at_boundary()
            && self.down.buf.is_empty()
            && self.down.scanner.at_boundary()
            && self.tx_started.is_none()
    }

    /// Every field is named: a new one needs a decision here.
    fn into_rested(self: Box<Session>) -> Rested {
        let Session {
            client,
            up: _,
            down: _,
            params,
            mode,
            pool,
            app,
            target,
            // Pools are found again.
            topology: _,
            node_pools: _,
            cancel,
            flight: _,
            terminated: _,
            client_eof: _,
            dropping: _,
            welcomed: _,
            intent: _,
            lost_tx: _,
            replay: _,
            holding: _,
            rerun: _,
            unshare: _,
            fence,
            translating,
            wire: _,
            xl: _,
            expect: _,
            out_of_step: _,
            statements,
            dirty: _,
            startup,
            pinned: _,
            closing: _,
            watching_shutdown: _,
            tx_started: _,
            registered,
            replays,
            verify: _,
            slot,
        } = *self;
        Rested {
            client,
            params,
            mode,
            pool,
            app,
            target,
            cancel,
            statements: (!statements.is_empty()).then(|| Box::new(statements)),
            startup,
            fence: fence.map(Box::new),
            registered,
            translating,
            replays,
            slot,
        }
    }

    /// A session from what it keeps between transactions: a resting one's,
    /// or a new one's (`Session::new`).
    pub(super) fn from_rested(r: Rested) -> Session {
        r.registered.info.set_resting(None);
        let max = r.app.config().proxy.max_message_size;
        Session {
            client: r.client,
            up: Flow::new(max),
            down: Flow::with_scanner(server_scanner()),
            params: r.params,
            mode: r.mode,
            pool: r.pool,
            topology: r.target.cluster.subscribe(),
            node_pools: vec![None; r.target.database.nodes.len()],
            app: r.app,
            target: r.target,
            cancel: r.cancel,
            flight: InFlight::IDLE,
            terminated: false,
            client_eof: false,
            dropping: false,
            welcomed: true,
            intent: Intent::Write,
            lost_tx: None,
            replay: None,
            holding: false,
            rerun: None,
            unshare: false,
            fence: r.fence.map(|f| *f),
            translating: r.translating,
            wire: Flow::new(usize::MAX),
            xl: Scanner::new(usize::MAX),
            expect: VecDeque::new(),
            out_of_step: false,
            statements: r.statements.map(|s| *s).unwrap_or_default(),
            dirty: None,
            startup: r.startup,
            pinned: None,
            closing: false,
            watching_shutdown: false,
            tx_started: None,
            registered: r.registered,
            replays: r.replays,
            verify: None,
            slot: r.slot,
        }
    }
}
