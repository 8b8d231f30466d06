//! Logged-in clients, for SHOW CLIENTS: registered at login, removed when
//! the session ends; the state is an atomic the session sets as it attaches
//! to and detaches from servers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

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
    pub user: String,
    pub database: String,
    pub tls: bool,
    pub since: Instant,
    state: AtomicU8,
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
}

#[derive(Default)]
pub struct Clients {
    next: AtomicU64,
    map: Mutex<BTreeMap<u64, Arc<ClientInfo>>>,
}

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
            user: user.to_string(),
            database: database.to_string(),
            tls,
            since: Instant::now(),
            state: AtomicU8::new(ClientState::Idle as u8),
        });
        lock(&self.map).insert(id, info.clone());
        Registered {
            info,
            clients: self.clone(),
        }
    }

    pub fn list(&self) -> Vec<Arc<ClientInfo>> {
        lock(&self.map).values().cloned().collect()
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
