//! Cancel keys: pgheal hands each client a key of its own (in session
//! mode the server's real pid with a random secret, in transaction mode a
//! random pid that stays the client's for its session) and forwards a
//! matching CancelRequest to the server running that client's query, with
//! that server's key.

use std::sync::{Arc, Mutex};

use crate::frontend::clients::ClientInfo;
use crate::sync::{lock, FastMap};
use std::time::Duration;

use bytes::BytesMut;
use pgheal_protocol::build;
use pgheal_protocol::startup::CancelKey;
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where a client's current query runs.
#[derive(Debug, Clone)]
struct Target {
    addr: Arc<str>,
    key: CancelKey,
}

/// Where one client's requests run, for its cancel requests (in the
/// client's entry).
#[derive(Default)]
pub struct CancelSlot {
    target: Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    /// The server session the client is attached to, or was last.
    last: Option<Target>,
    attached: bool,
}

impl CancelSlot {
    pub fn attach(&self, addr: &Arc<str>, key: CancelKey) {
        *lock(&self.target) = Slot {
            last: Some(Target {
                addr: addr.clone(),
                key,
            }),
            attached: true,
        };
    }

    pub fn detach(&self) {
        lock(&self.target).attached = false;
    }
}

/// Clients by their cancel key.
#[derive(Default)]
pub struct CancelRegistry {
    clients: Mutex<FastMap<CancelKey, Arc<ClientInfo>>>,
}

/// A client's entry in the registry, removed on drop.
pub struct Registration {
    pub key: CancelKey,
    registry: Arc<CancelRegistry>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.registry.clients).remove(&self.key);
    }
}

impl CancelRegistry {
    /// Gives a client a fresh random key from the OS generator.
    pub fn register(self: &Arc<Self>, client: &Arc<ClientInfo>) -> Registration {
        self.register_with(client, None)
    }

    /// A key whose pid is `pid` (the real server's, in session mode) and
    /// whose secret is pgheal's own, random.
    pub fn register_as(self: &Arc<Self>, client: &Arc<ClientInfo>, pid: i32) -> Registration {
        self.register_with(client, Some(pid))
    }

    fn register_with(self: &Arc<Self>, client: &Arc<ClientInfo>, pid: Option<i32>) -> Registration {
        let mut clients = lock(&self.clients);
        let key = loop {
            let key = random_key(pid);
            if !clients.contains_key(&key) {
                break key;
            }
        };
        clients.insert(key, client.clone());
        Registration {
            key,
            registry: self.clone(),
        }
    }

    /// Forwards a cancel to the server running the query of the client
    /// that owns `key`. Unknown keys are ignored, as PostgreSQL does.
    pub async fn cancel(&self, key: CancelKey) {
        let target = {
            let clients = lock(&self.clients);
            clients.get(&key).and_then(|client| {
                let slot = lock(&client.cancel.target);
                slot.last.clone().filter(|_| slot.attached)
            })
        };
        let Some(target) = target else {
            tracing::debug!("cancel request with an unknown key or for an idle client ignored");
            return;
        };
        let mut out = BytesMut::new();
        build::cancel_request(&mut out, target.key);
        let send = async {
            let mut s = TcpStream::connect(&*target.addr).await?;
            s.write_all(&out).await?;
            // The server closes the connection once it has signalled the
            // backend; only then is the client's own cancel connection
            // closed, as a direct server does, so a driver that waits for
            // that (libpq, asyncpg) never has its next query cancelled.
            let mut rest = [0u8; 64];
            while s.read(&mut rest).await? > 0 {}
            Ok::<(), std::io::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(5), send).await {
            Ok(Ok(())) => tracing::info!(server = %target.addr, "forwarded a cancel request"),
            Ok(Err(e)) => {
                tracing::warn!(server = %target.addr, error = %e, "cannot forward a cancel request")
            }
            Err(_) => {
                tracing::warn!(server = %target.addr, "timed out forwarding a cancel request")
            }
        }
    }
}

/// A random key (pid positive), or one with the given pid.
pub fn random_key(pid: Option<i32>) -> CancelKey {
    let mut bytes = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let random_pid = i32::from_be_bytes([bytes[0] & 0x7f, bytes[1], bytes[2], bytes[3]]);
    CancelKey {
        pid: pid.unwrap_or(random_pid),
        secret: i32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
    }
}
