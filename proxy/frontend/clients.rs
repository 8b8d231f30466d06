//! Logged-in clients, for SHOW CLIENTS: registered at login, removed when
//! the session ends; the state is an atomic the session sets as it attaches
//! to and detaches from servers. A client's entry also holds where its
//! queries run (for cancel requests) and, while it rests without a task,
//! what its session keeps (see `session::rest`): an idle client so costs
//! one allocation besides its socket.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::Instant;

use crate::frontend::cancel::CancelSlot;
use crate::frontend::session::Rested;
use crate::frontend::App;
use crate::sync::{lock, FastHash};

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

pub struct ClientInfo {
    pub id: u64,
    pub peer: SocketAddr,
    /// Shared by every client of that name (see `Clients::intern`).
    pub user: Arc<str>,
    pub database: Arc<str>,
    pub tls: bool,
    pub since: Instant,
    state: AtomicU8,
    /// Where the client's requests run, for its cancel requests.
    pub cancel: CancelSlot,
    /// What the session keeps while the client rests without a task (the
    /// entry is then the waker of the client socket's read readiness).
    pub(crate) rested: Mutex<Option<Rested>>,
}

impl std::fmt::Debug for ClientInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientInfo")
            .field("id", &self.id)
            .field("peer", &self.peer)
            .field("user", &self.user)
            .field("database", &self.database)
            .field("state", &self.state())
            .field("resting", &self.is_resting())
            .finish()
    }
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
        lock(&self.rested).is_some()
    }
}

#[derive(Default)]
pub struct Clients {
    next: AtomicU64,
    map: Mutex<BTreeMap<u64, Arc<ClientInfo>>>,
    names: Mutex<HashSet<Arc<str>, FastHash>>,
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
            cancel: CancelSlot::default(),
            rested: Mutex::new(None),
        });
        lock(&self.map).insert(id, info.clone());
        Registered {
            info,
            clients: Some(self.clone()),
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
            .filter(|info| info.is_resting())
            .cloned()
            .collect();
        for info in resting {
            Waker::from(info).wake();
        }
    }
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
    /// `None` once parked: the entry stays listed.
    clients: Option<Arc<Clients>>,
}

impl Registered {
    /// The entry stays listed without a session owning it (the client
    /// rests: its entry holds it).
    pub(crate) fn park(mut self) -> Arc<ClientInfo> {
        self.clients = None;
        self.info.clone()
    }

    /// The entry of a client that was parked, owned by a session again.
    pub(crate) fn again(info: Arc<ClientInfo>, clients: Arc<Clients>) -> Registered {
        Registered {
            info,
            clients: Some(clients),
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(clients) = &self.clients {
            lock(&clients.map).remove(&self.info.id);
        }
    }
}
#[cfg(all(test, target_pointer_width = "64"))]
mod tests {
    /// An idle client costs its socket and this entry (see
    /// `session::rest`): a field added to the entry or to what a resting
    /// session keeps shows here first.
    #[test]
    fn an_idle_clients_entry_stays_small() {
        let entry = std::mem::size_of::<super::ClientInfo>();
        let rested = std::mem::size_of::<crate::frontend::session::Rested>();
        assert!(entry <= 280, "ClientInfo is {entry} bytes");
        assert!(rested <= 128, "Rested is {rested} bytes");
    }
}
