//! Logged-in clients, for SHOW CLIENTS: registered at login, removed when
//! the session ends; the state is an atomic the session sets as it attaches
//! to and detaches from servers.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use crate::frontend::App;
use crate::sync::lock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ClientState {
    /// Between transactions, holding no server.
    Idle = 0,
    /// Running a transaction on a server.
    Active = 1,
    /// Held on its server for the rest of its session.
    Pinned = 2,
}

impl ClientState {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientState::Idle => "idle",
            ClientState::Active => "active",
            ClientState::Pinned => "pinned",
        }
    }
}

#[derive(Debug)]
pub struct ClientInfo {
    pub id: u64,
    pub peer: SocketAddr,
    /// Shared by every client of that name (see `Clients::intern`).
    pub user: Arc<str>,
    pub database: Arc<str>,
    pub tls: bool,
    pub since: Instant,
    state: AtomicU8,
    /// The waker that holds the client while it rests without a task.
    resting: Mutex<Option<Weak<dyn Resting>>>,
}

impl ClientInfo {
    pub fn state(&self) -> ClientState {
        match self.state.load(Ordering::Relaxed) {
            1 => ClientState::Active,
            2 => ClientState::Pinned,
            _ => ClientState::Idle,
        }
    }

    pub fn set_state(&self, state: ClientState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// Whether the client rests without a task now.
    pub fn is_resting(&self) -> bool {
        lock(&self.resting).is_some()
    }

    /// The client rests (see `session::rest`) with this waker, or no more.
    pub fn set_resting(&self, bench: Option<Weak<dyn Resting>>) {
        *lock(&self.resting) = bench;
    }
}

#[derive(Default)]
pub struct Clients {
    next: AtomicU64,
    map: Mutex<BTreeMap<u64, Arc<ClientInfo>>>,
    names: Mutex<HashSet<Arc<str>>>,
}

/// Distinct user and database names shared at most.
const MAX_NAMES: usize = 1024;

impl Clients {
    pub fn add(
        self: &Arc<Self>,
        peer: SocketAddr,
        user: &str,
        database: &str,
        tls: bool,
    ) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let info = Arc::new(ClientInfo {
            id,
            peer,
            user: self.intern(user),
            database: self.intern(database),
            tls,
            since: Instant::now(),
            state: AtomicU8::new(ClientState::Idle as u8),
            resting: Mutex::new(None),
        });
        lock(&self.map).insert(id, info.clone());
        Registered {
            info,
            clients: self.clone(),
        }
    }

    /// One shared copy of each user and database name clients use.
    fn intern(&self, name: &str) -> Arc<str> {
        let mut names = lock(&self.names);
        if let Some(known) = names.get(name) {
            return known.clone();
        }
        let name: Arc<str> = Arc::from(name);
        // Names of clients long gone are not kept forever; past the limit
        // a name is not shared.
        if names.len() >= MAX_NAMES {
            names.retain(|n| Arc::strong_count(n) > 1);
        }
        if names.len() < MAX_NAMES {
            names.insert(name.clone());
        }
        name
    }

    pub fn list(&self) -> Vec<Arc<ClientInfo>> {
        lock(&self.map).values().cloned().collect()
    }

    /// Gives every resting client its task back (at shutdown, so that it
    /// hears 57P01 and closes like the others).
    pub fn wake_resting(&self) {
        let resting: Vec<_> = lock(&self.map)
            .values()
            .filter_map(|info| lock(&info.resting).take())
            .filter_map(|bench| bench.upgrade())
            .collect();
        for bench in resting {
            bench.wake_up();
        }
    }
}

/// A client resting without a task (see `session::rest`).
pub trait Resting: Send + Sync {
    /// Gives the client a task again.
    fn wake_up(&self);
}

/// One of `max_client_connections`, given back when dropped.
pub struct ClientSlot(Arc<App>);

impl ClientSlot {
    pub fn take(app: &Arc<App>) -> Option<ClientSlot> {
        let max = app.config().proxy.max_client_connections;
        let open = &app.counters.client_connections;
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| ClientSlot(app.clone()))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0
            .counters
            .client_connections
            .fetch_sub(1, Ordering::AcqRel);
    }
}

/// A client's entry; dropping it removes the client from the list.
pub struct Registered {
    pub info: Arc<ClientInfo>,
    clients: Arc<Clients>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.clients.map).remove(&self.info.id);
    }
}
