//! Resting clients: a transaction-mode client idle for [`REST_AFTER`] gives
//! up its task. What its session keeps between transactions ([`Rested`])
//! moves into the client's registry entry ([`ClientInfo`]), which becomes
//! the waker of the client socket's read readiness. The next byte from the
//! client (or its leaving) wakes the entry, which starts a new task for the
//! session. An idle client so costs its socket and its registry entry, one
//! allocation, not a task with a whole session future.
//!
//! Shutdown reaches resting clients through the registry
//! ([`crate::frontend::clients::Clients::wake_resting`]).

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Wake, Waker};
use std::time::Duration;

use pgheal_protocol::frame::Scanner;

use super::{server_scanner, InFlight, Session};
use crate::backend::params::Params;
use crate::backend::pool::Pool;
use crate::backend::router::Intent;
use crate::backend::statements::ClientStatements;
use crate::config::PoolMode;
use crate::frontend::cancel::Registration;
use crate::frontend::clients::{ClientInfo, ClientSlot, Registered};
use crate::frontend::{App, Target};
use crate::net::flow::Flow;
use crate::net::stream::Stream;
use crate::sync::lock;

use super::route::Fence;

/// How long a client waits idle, holding its task, before it rests (at the
/// next `REST_TICK`). Short enough that a burst of logins leaves few
/// sessions alive at once (their freed memory becomes holes the allocator
/// cannot return); long enough that a client in steady use never rests.
/// Resting and waking cost about 5 µs of CPU (a task each, measured with
/// clients 50 ms apart), against the 30 ms the client waited.
pub(super) const REST_AFTER: Duration = Duration::from_millis(30);

/// Rest timers fire on a shared tick: clients that went idle at different
/// moments rest in one timer turn, so resting wakes a worker thread once
/// per tick rather than once per client (on an otherwise idle worker each
/// such wake-up costs a context switch, more than the rest itself).
const REST_TICK: Duration = Duration::from_millis(20);

/// When a client idle from now on rests: after `REST_AFTER`, at the next
/// `REST_TICK`.
pub(super) fn rest_deadline(now: tokio::time::Instant) -> tokio::time::Instant {
    use tokio::time::Instant;
    thread_local! {
        /// The last deadline worked out here, and the idle starts that get
        /// it too: a deadline holds for a whole tick of them, and every
        /// idle wait asks (the division below costs ~150 instructions).
        static LAST: std::cell::Cell<Option<(Instant, Instant, Instant)>> =
            const { std::cell::Cell::new(None) };
    }
    match LAST.get() {
        Some((from, until, deadline)) if from < now && now <= until => deadline,
        _ => {
            let deadline = next_tick_after(now + REST_AFTER);
            let until = deadline - REST_AFTER;
            let from = until.checked_sub(REST_TICK).unwrap_or(until);
            LAST.set(Some((from, until, deadline)));
            deadline
        }
    }
}

/// The first `REST_TICK` boundary at or after `due`.
fn next_tick_after(due: tokio::time::Instant) -> tokio::time::Instant {
    static ORIGIN: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(|| due);
    // In u64 nanoseconds (585 years).
    let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    let tick = nanos(REST_TICK);
    if due >= origin {
        let ticks = nanos(due - origin).div_ceil(tick);
        origin + Duration::from_nanos(ticks.saturating_mul(tick))
    } else {
        // Before the first one asked (another thread set the origin).
        let ticks = nanos(origin - due) / tick;
        origin - Duration::from_nanos(ticks.saturating_mul(tick))
    }
}

/// What a session keeps between transactions: everything else starts
/// afresh at the next request (and a new session starts from one).
pub(crate) struct Rested {
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
    pub(super) translating: bool,
    pub(super) replays: bool,
    pub(super) slot: ClientSlot,
}

/// A resting client's entry wakes it: the client gets a task again.
impl Wake for ClientInfo {
    fn wake(self: Arc<Self>) {
        wake_up(&self);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        wake_up(self);
    }
}

fn wake_up(info: &Arc<ClientInfo>) {
    let Some(rested) = lock(&info.rested).take() else {
        return; // not resting (already woken)
    };
    counted(&rested.app, false);
    let registered = Registered::again(info.clone(), rested.app.clients.clone());
    // Without a runtime (it is shutting down) the client closes.
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let session = Box::new(Session::from_rested(rested, registered));
        runtime.spawn(Box::pin(super::live(session)));
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

/// Read buffers a thread keeps for its next transactions once one of its
/// clients rests (a quiet time): busy threads keep more (`spare`).
const QUIET_SPARES: usize = 4;

/// Lets the session's task end with the client kept by its entry.
pub(super) fn rest(session: Box<Session>) {
    let app = session.app.clone();
    counted(&app, true);
    crate::net::flow::spare::keep_at_most(QUIET_SPARES);
    let (rested, registered) = session.into_rested();
    let info = registered.park();
    let waker = Waker::from(info.clone());
    {
        let mut entry = lock(&info.rested);
        // The session is in place before the waker is: a request arriving
        // now wakes the entry (after this lock) and finds the session there.
        let r = entry.insert(rested);
        let mut cx = Context::from_waker(&waker);
        if r.client.poll_read_ready(&mut cx).is_ready() {
            // Something came meanwhile: no rest after all.
            drop(entry);
            wake_up(&info);
            return;
        }
    }
    // A shutdown that began before the entry held the session would not
    // have found it.
    if app.shutdown.is_cancelled() {
        wake_up(&info);
    }
}

impl Session {
    /// Starts the client's idle time (from the end of its last
    /// transaction) and sets its rest timer to the deadline that follows.
    pub(super) fn arm_rest_timer(&mut self) {
        let now = match self.ended_at.take() {
            Some(ended) => tokio::time::Instant::from_std(ended),
            None => tokio::time::Instant::now(),
        };
        self.idle_since = Some(now.into_std());
        let deadline = rest_deadline(now);
        match &mut self.rest_timer {
            // Idle starts within one tick share a deadline.
            Some(timer) if timer.deadline() == deadline => {}
            Some(timer) => timer.as_mut().reset(deadline),
            None => self.rest_timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
    }

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
    fn into_rested(self: Box<Session>) -> (Rested, Registered) {
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
            replay_spare: _,
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
            ended_at: _,
            idle_since: _,
            quick_returns: _,
            registered,
            replays,
            verify: _,
            rest_timer: _,
            analyzed: _,
            slot,
        } = *self;
        let rested = Rested {
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
            translating,
            replays,
            slot,
        };
        (rested, registered)
    }

    /// A session from what it keeps between transactions: a resting one's,
    /// or a new one's (`Session::new`).
    pub(super) fn from_rested(r: Rested, registered: Registered) -> Session {
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
            replay_spare: bytes::BytesMut::new(),
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
            ended_at: None,
            idle_since: None,
            quick_returns: 0,
            registered,
            replays: r.replays,
            verify: None,
            slot: r.slot,
            rest_timer: None,
            analyzed: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    /// The deadline remembered for a tick is the one worked out afresh,
    /// for idle starts a millisecond apart across several ticks, and for
    /// one earlier than all of them.
    #[test]
    fn a_remembered_deadline_is_the_one_worked_out() {
        let start = Instant::now() + Duration::from_secs(1);
        let mut starts: Vec<Instant> = (0..100)
            .map(|ms| start + Duration::from_micros(ms * 1_000 + 7))
            .collect();
        starts.push(start - Duration::from_millis(500));
        for now in starts {
            assert_eq!(rest_deadline(now), next_tick_after(now + REST_AFTER));
        }
    }

    #[test]
    fn clients_going_idle_close_together_rest_on_one_tick() {
        let start = Instant::now();
        let deadlines: Vec<Instant> = (0..100).map(|_| rest_deadline(Instant::now())).collect();
        let end = Instant::now();
        for d in &deadlines {
            assert!(*d >= start + REST_AFTER && *d <= end + REST_AFTER + REST_TICK);
        }
        let mut distinct = deadlines.clone();
        distinct.dedup();
        // One tick, or two where the loop crossed a boundary (more only if
        // this thread stalled for whole ticks).
        let crossed = (end - start).as_nanos().div_ceil(REST_TICK.as_nanos()) as usize;
        assert!(
            distinct.len() <= 1 + crossed,
            "{} deadlines",
            distinct.len()
        );
    }
}
