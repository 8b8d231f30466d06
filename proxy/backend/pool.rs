//! Idle server connections per (node, database, user), with a size limit,
//! a checkout timeout, idle timeout, server lifetime and a minimum of idle
//! connections kept warm.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};

use crate::sync::{lock, FastMap};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::error::PoolError;
use crate::auth::ScramKeys;
use crate::backend::conn::{ConnectSpec, ServerConn};
use crate::backend::params::Params;

/// Limits of one pool.
#[derive(Debug, Clone)]
pub struct PoolLimits {
    pub size: usize,
    pub min_idle: usize,
    pub checkout_timeout: Duration,
    pub idle_timeout: Duration,
    pub server_lifetime: Duration,
}

struct Idle {
    conn: Box<ServerConn>,
    permit: OwnedSemaphorePermit,
    since: Instant,
}

/// The connections of one (node, database, user).
pub struct Pool {
    pub database: String,
    addr: Arc<str>,
    spec: ConnectSpec,
    /// The SCRAM keys an `[auth] query` user last proved at a login: new
    /// connections log in with them (the password may have changed).
    keys: Mutex<Option<Arc<ScramKeys>>>,
    limits: PoolLimits,
    /// `limits.size` and `limits.min_idle` as RELOAD last set them.
    size: AtomicUsize,
    min_idle: AtomicUsize,
    /// One permit per open connection, idle or in use.
    permits: Arc<Semaphore>,
    /// Permits out on connections beyond a lowered size: each one given
    /// back is forgotten (its connection closed) until none is owed.
    owed: AtomicUsize,
    /// RELOAD replaced it: no warm connections, none kept idle; it serves
    /// only the clients that still use it until they move on.
    retired: std::sync::atomic::AtomicBool,
    /// The idle connections and those out on lease, under one lock: a
    /// checkout and a give-back each take it once.
    conns: Mutex<Conns>,
    /// Requests waiting for a connection now.
    waiting: std::sync::atomic::AtomicUsize,
    returned: Notify,
    /// ParameterStatus values of the last server connected, for logins that
    /// find no server.
    welcome: Mutex<Option<Params>>,
    /// Warm connections failed this many times in a row: the next attempt
    /// waits (a dropped database or a down node is not hammered).
    warm_failures: std::sync::atomic::AtomicU32,
    warm_after: Mutex<Option<Instant>>,
    /// Connections given back before this close instead (see
    /// [`Pool::drain`]); `draining` says whether to look.
    drain_until: Mutex<Option<Instant>>,
    draining: std::sync::atomic::AtomicBool,
}

/// A pool's connections that are not being opened or closed.
#[derive(Default)]
struct Conns {
    idle: Vec<Idle>,
    /// Out on lease. A pool holds tens of connections, so a list is the
    /// cheapest map.
    leased: Vec<Leased>,
}

/// A connection out on lease, as the pool still knows it.
struct Leased {
    /// The server session's pid.
    pid: i32,
    /// When the connection opened.
    created: Instant,
    /// The pid of the client that holds it (`ServerConn::last_client`).
    client: i32,
}

impl Conns {
    /// `conn` goes out on lease to `client`.
    fn lease(&mut self, conn: &mut ServerConn, client: i32) {
        conn.last_client = client;
        self.leased.push(Leased {
            pid: conn.key.pid,
            created: conn.created,
            client,
        });
    }

    fn unlease(&mut self, pid: i32) {
        if let Some(at) = self.leased.iter().position(|l| l.pid == pid) {
            self.leased.swap_remove(at);
        }
    }

    /// The client that holds the server session `pid`, or held it last.
    fn client_of(&self, pid: i32) -> Option<i32> {
        let leased = self.leased.iter().find(|l| l.pid == pid).map(|l| l.client);
        let idle = || {
            let idle = self.idle.iter().find(|i| i.conn.key.pid == pid);
            idle.map(|i| i.conn.last_client)
        };
        leased.or_else(idle).filter(|&client| client != 0)
    }
}

/// A checked-out server connection. Dropping it closes the connection;
/// [`Lease::release`] returns it to the pool.
pub struct Lease {
    /// Boxed: a lease and an idle entry move it between them several
    /// times a transaction, a pointer instead of ~200 bytes.
    conn: Option<Box<ServerConn>>,
    permit: Option<OwnedSemaphorePermit>,
    pool: Arc<Pool>,
}

impl Pool {
    pub fn new(database: &str, spec: ConnectSpec, limits: PoolLimits) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            database: database.to_string(),
            addr: Arc::from(spec.addr.as_str()),
            permits: Arc::new(Semaphore::new(limits.size)),
            size: AtomicUsize::new(limits.size),
            min_idle: AtomicUsize::new(limits.min_idle),
            owed: AtomicUsize::new(0),
            retired: Default::default(),
            keys: Mutex::new(spec.scram_keys.clone()),
            spec,
            limits,
            conns: Mutex::new(Conns::default()),
            waiting: Default::default(),
            returned: Notify::new(),
            welcome: Mutex::new(None),
            warm_failures: Default::default(),
            warm_after: Mutex::new(None),
            drain_until: Mutex::new(None),
            draining: Default::default(),
        });
        tokio::spawn(maintain(Arc::downgrade(&pool)));
        pool
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The most connections this pool opens.
    pub fn size(&self) -> usize {
        self.size.load(Relaxed)
    }

    fn min_idle(&self) -> usize {
        self.min_idle.load(Relaxed)
    }

    /// RELOAD changed the size or min_idle: a larger size opens more at
    /// once; a smaller one closes idle connections now and, for the rest,
    /// each connection given back until the pool is within it (running
    /// transactions and pinned sessions keep theirs until then).
    pub fn resize(&self, size: usize, min_idle: usize) {
        self.min_idle.store(min_idle, Relaxed);
        let old = self.size.swap(size, Relaxed);
        if size > old {
            let mut more = size - old;
            while more > 0 && self.take_owed() {
                more -= 1;
            }
            self.permits.add_permits(more);
        } else if size < old {
            let fewer = old - size;
            let forgotten = self.permits.forget_permits(fewer);
            self.owed.fetch_add(fewer - forgotten, Relaxed);
            let closing: Vec<Box<ServerConn>> = {
                let idle = &mut lock(&self.conns).idle;
                let mut closing = Vec::new();
                while self.owed.load(Relaxed) > 0 {
                    let Some(i) = idle.pop() else { break };
                    if self.take_owed() {
                        i.permit.forget();
                    }
                    closing.push(i.conn);
                }
                closing
            };
            if !closing.is_empty() {
                tokio::spawn(async move {
                    for conn in closing {
                        conn.terminate().await;
                    }
                });
            }
        }
        self.returned.notify_waiters();
    }

    /// One owed permit paid, if any was owed.
    fn take_owed(&self) -> bool {
        self.owed
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    /// A connection's permit, given back: forgotten while permits are
    /// owed (true: close the connection), else returned.
    fn give_back(&self, permit: OwnedSemaphorePermit) -> bool {
        if self.take_owed() {
            permit.forget();
            return true;
        }
        drop(permit);
        false
    }

    /// The user this pool's connections log in as.
    pub fn user(&self) -> &str {
        &self.spec.user
    }

    /// The node address, cheap to clone.
    pub fn shared_addr(&self) -> &Arc<str> {
        &self.addr
    }

    /// This pool's connections go to `addr` as `user`.
    fn serves(&self, addr: &str, user: &str) -> bool {
        *self.addr == *addr && self.spec.user == user
    }

    /// The SCRAM keys an `[auth] query` user proved at its last login:
    /// new connections log in with them.
    pub fn use_keys(&self, keys: Option<&Arc<ScramKeys>>) {
        let Some(keys) = keys else { return };
        let mut current = lock(&self.keys);
        if !current.as_ref().is_some_and(|k| Arc::ptr_eq(k, keys)) {
            *current = Some(keys.clone());
        }
    }

    pub fn welcome(&self) -> Option<Params> {
        lock(&self.welcome).clone()
    }

    /// Counts of (idle, in use) connections.
    pub fn counts(&self) -> (usize, usize) {
        let idle = lock(&self.conns).idle.len();
        let open = (self.size() + self.owed.load(Relaxed))
            .saturating_sub(self.permits.available_permits());
        (idle, open.saturating_sub(idle))
    }

    /// Waits up to `checkout_timeout` for a healthy connection, for the
    /// client pgheal gave the pid `client` (0: for pgheal's own use).
    pub async fn checkout(self: &Arc<Self>, client: i32) -> Result<Lease, PoolError> {
        if let Some(lease) = self.take_idle(client) {
            return Ok(lease);
        }
        let deadline = tokio::time::Instant::now() + self.limits.checkout_timeout;
        let _waiting = Waiting::new(&self.waiting);
        loop {
            let returned = self.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if let Some(lease) = self.take_idle(client) {
                return Ok(lease);
            }
            if let Ok(permit) = self.permits.clone().try_acquire_owned() {
                return self.open(permit, client).await;
            }
            if tokio::time::timeout_at(deadline, returned).await.is_err() {
                return Err(PoolError::Timeout {
                    database: self.database.clone(),
                    waited: self.limits.checkout_timeout,
                    size: self.size(),
                });
            }
        }
    }

    async fn open(
        self: &Arc<Self>,
        permit: OwnedSemaphorePermit,
        client: i32,
    ) -> Result<Lease, PoolError> {
        // Boxed: the connect future is large and rare; it should not swell
        // every client task that might call it.
        let keys = lock(&self.keys).clone();
        let spec = match keys {
            Some(keys) => &ConnectSpec {
                scram_keys: Some(keys),
                ..self.spec.clone()
            },
            None => &self.spec,
        };
        match Box::pin(ServerConn::connect(spec)).await {
            Ok(conn) => {
                *lock(&self.welcome) = Some(conn.reported.clone());
                Ok(self.lease(Box::new(conn), permit, client))
            }
            Err(e) => {
                self.give_back(permit);
                self.returned.notify_one();
                Err(e.into())
            }
        }
    }

    fn lease(
        self: &Arc<Self>,
        mut conn: Box<ServerConn>,
        permit: OwnedSemaphorePermit,
        client: i32,
    ) -> Lease {
        lock(&self.conns).lease(&mut conn, client);
        self.leased(conn, permit)
    }

    /// A lease on a connection already counted as leased.
    fn leased(self: &Arc<Self>, conn: Box<ServerConn>, permit: OwnedSemaphorePermit) -> Lease {
        Lease {
            conn: Some(conn),
            permit: Some(permit),
            pool: self.clone(),
        }
    }

    /// Requests waiting for a connection.
    pub fn waiting(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every connection: (active?, backend pid, age).
    pub fn servers(&self) -> Vec<(bool, i32, Duration)> {
        let conns = lock(&self.conns);
        let idle = conns
            .idle
            .iter()
            .map(|i| (false, i.conn.key.pid, i.conn.created.elapsed()));
        let leased = conns
            .leased
            .iter()
            .map(|l| (true, l.pid, l.created.elapsed()));
        idle.chain(leased).collect()
    }

    /// The most recently given back idle connection that is still sound.
    /// Past `server_lifetime` connections are closed when given back and by
    /// the pool's tick, so a checkout reads no clock.
    fn take_idle(self: &Arc<Self>, client: i32) -> Option<Lease> {
        loop {
            let idle = {
                let mut conns = lock(&self.conns);
                let mut idle = conns.idle.pop()?;
                conns.lease(&mut idle.conn, client);
                idle
            };
            let Idle {
                mut conn, permit, ..
            } = idle;
            if !conn.is_broken() {
                return Some(self.leased(conn, permit));
            }
            lock(&self.conns).unlease(conn.key.pid);
            tracing::debug!(server = %self.spec.addr, "dropping a stale idle server connection");
        }
    }

    /// A leased connection given back: idle again, or closed when past its
    /// lifetime, drained, or beyond a lowered pool_size.
    fn put_back(&self, conn: Box<ServerConn>, permit: OwnedSemaphorePermit, now: Instant) {
        let retire = now.duration_since(conn.created) >= self.limits.server_lifetime
            || self.is_draining()
            || self.owed.load(Relaxed) > 0
            || self.retired.load(Relaxed);
        let permit = {
            let mut conns = lock(&self.conns);
            conns.unlease(conn.key.pid);
            if retire {
                Some(permit)
            } else {
                conns.idle.push(Idle {
                    conn,
                    permit,
                    since: now,
                });
                None
            }
        };
        if let Some(permit) = permit {
            self.give_back(permit);
        }
        self.returned.notify_one();
    }

    /// Closes idle connections past their idle timeout or lifetime (keeping
    /// `min_idle`), and opens connections up to `min_idle`.
    async fn tick(self: &Arc<Self>) {
        let expired: Vec<Idle> = {
            let idle = &mut lock(&self.conns).idle;
            let mut keep = Vec::with_capacity(idle.len());
            let mut drop_list = Vec::new();
            // Newest first, so the most recently used are the ones kept.
            for mut i in idle.drain(..).rev() {
                let old = i.since.elapsed() >= self.limits.idle_timeout;
                // Past its lifetime, or closed by a server that went away.
                let dead =
                    i.conn.created.elapsed() >= self.limits.server_lifetime || i.conn.is_broken();
                if dead || (old && keep.len() >= self.min_idle()) {
                    drop_list.push(i);
                } else {
                    keep.push(i);
                }
            }
            keep.reverse();
            *idle = keep;
            drop_list
        };
        for i in expired {
            i.conn.terminate().await;
            self.give_back(i.permit);
            self.returned.notify_one();
        }
        self.fill_min_idle().await;
    }

    /// Closes the idle connections, and for `window` every connection given
    /// back: a statement that needs the database to itself (DROP DATABASE
    /// waits 5 s for other sessions) finds none of pgheal's.
    pub async fn drain(&self, window: Duration) {
        *lock(&self.drain_until) = Some(Instant::now() + window);
        self.draining
            .store(true, std::sync::atomic::Ordering::Release);
        self.close_idle().await;
    }

    fn is_draining(&self) -> bool {
        use std::sync::atomic::Ordering;
        if !self.draining.load(Ordering::Acquire) {
            return false;
        }
        let mut until = lock(&self.drain_until);
        if until.is_some_and(|t| Instant::now() < t) {
            return true;
        }
        *until = None;
        self.draining.store(false, Ordering::Release);
        false
    }

    /// Shutdown: sends Terminate on every idle connection and closes it.
    pub async fn close_idle(&self) {
        let idle: Vec<Idle> = lock(&self.conns).idle.drain(..).collect();
        for i in idle {
            i.conn.terminate().await;
        }
    }

    async fn fill_min_idle(self: &Arc<Self>) {
        if self.retired.load(Relaxed) {
            return;
        }
        if lock(&self.warm_after).is_some_and(|at| Instant::now() < at) {
            return;
        }
        while lock(&self.conns).idle.len() < self.min_idle() {
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                return;
            };
            match self.open(permit, 0).await {
                Ok(mut lease) => {
                    self.warm_failures.store(0, Relaxed);
                    lease.release();
                }
                Err(e) => {
                    // 1 s, 2 s, 4 s ... up to a minute between attempts.
                    let failures = self.warm_failures.fetch_add(1, Relaxed).min(6);
                    let wait = Duration::from_secs(1 << failures);
                    *lock(&self.warm_after) = Some(Instant::now() + wait);
                    tracing::warn!(server = %self.spec.addr, error = %e, retry_in = ?wait, "cannot open a warm connection");
                    return;
                }
            }
        }
    }
}

async fn maintain(pool: Weak<Pool>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        pool.tick().await;
    }
}

impl Lease {
    pub fn conn(&mut self) -> &mut ServerConn {
        self.conn
            .as_mut()
            .expect("a lease holds its connection until released")
    }

    /// The server's own cancel key.
    pub fn server_key(&self) -> pgheal_protocol::startup::CancelKey {
        self.conn.as_ref().map_or(
            pgheal_protocol::startup::CancelKey { pid: 0, secret: 0 },
            |c| c.key,
        )
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Returns the connection to the pool.
    pub fn release(&mut self) {
        self.release_at(Instant::now());
    }

    /// Returns the connection to the pool, idle since `now` (a time its
    /// caller read already: the end of the transaction).
    pub fn release_at(&mut self, now: Instant) {
        if let (Some(conn), Some(permit)) = (self.conn.take(), self.permit.take()) {
            self.pool.put_back(conn, permit, now);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            lock(&self.pool.conns).unlease(conn.key.pid);
            if let Some(permit) = self.permit.take() {
                self.pool.give_back(permit);
            }
            self.pool.returned.notify_one();
        }
    }
}

/// Counts a request waiting for a connection while it lives.
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(n: &'a std::sync::atomic::AtomicUsize) -> Self {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Waiting(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Every pool, by database, then (node address, upstream user). A login
/// finds its pool without allocating: a database has a few pools (nodes
/// times upstream users), so a list is the cheapest second level.
#[derive(Default)]
pub struct Pools {
    map: Mutex<FastMap<String, Vec<Arc<Pool>>>>,
}

impl Pools {
    /// The pool for `database` at `addr` as `user`, if there is one.
    pub fn find(&self, database: &str, addr: &str, user: &str) -> Option<Arc<Pool>> {
        lock(&self.map)
            .get(database)?
            .iter()
            .find(|p| p.serves(addr, user))
            .cloned()
    }

    /// The pid pgheal gave the client that holds the server session `pid`
    /// on `addr`, or held it last; `None` for a session that is none of
    /// pgheal's or that no client used yet. (A pool holds tens of
    /// connections and pgheal a few pools per node: this walks those, not
    /// the clients.)
    pub fn client_of(&self, addr: &str, pid: i32) -> Option<i32> {
        let pools: Vec<Arc<Pool>> = lock(&self.map)
            .values()
            .flatten()
            .filter(|p| p.addr() == addr)
            .cloned()
            .collect();
        pools.iter().find_map(|p| lock(&p.conns).client_of(pid))
    }

    pub fn get(&self, database: &str, spec: &ConnectSpec, limits: &PoolLimits) -> Arc<Pool> {
        let pool = {
            let mut map = lock(&self.map);
            let pools = map.entry(database.to_string()).or_default();
            match pools.iter().find(|p| p.serves(&spec.addr, &spec.user)) {
                Some(pool) => pool.clone(),
                None => {
                    let pool = Pool::new(database, spec.clone(), limits.clone());
                    pools.push(pool.clone());
                    pool
                }
            }
        };
        pool.use_keys(spec.scram_keys.as_ref());
        pool
    }

    /// Drops the pools of a database whose settings changed: their idle
    /// connections close now; leases out keep theirs until given back,
    /// then they close too.
    pub fn forget(&self, database: &str) {
        let gone = lock(&self.map).remove(database).unwrap_or_default();
        for pool in gone {
            pool.retired.store(true, Relaxed);
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { pool.close_idle().await });
            }
        }
    }

    /// RELOAD changed only a database's pool_size or min_idle: its pools
    /// stay, with the new limits (see [`Pool::resize`]).
    pub fn resize(&self, database: &str, size: usize, min_idle: usize) {
        for pool in lock(&self.map).get(database).into_iter().flatten() {
            pool.resize(size, min_idle);
        }
    }

    /// The pools whose connections are to database `dbname` on the servers.
    pub fn on_database(&self, dbname: &str) -> Vec<Arc<Pool>> {
        lock(&self.map)
            .values()
            .flatten()
            .filter(|p| p.spec.database == dbname)
            .cloned()
            .collect()
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        lock(&self.map).values().flatten().cloned().collect()
    }
}
