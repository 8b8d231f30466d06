//! Cancel keys: pgheal hands each client a key of its own (in session
//! mode the server's real pid with a random secret, in transaction mode a
//! random pid that stays the client's for its session) and forwards a
//! matching CancelRequest to the server running that client's query, with
//! that server's key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::sync::lock;
use std::time::Duration;

use bytes::BytesMut;
use pgheal_protocol::build;
use pgheal_protocol::startup::CancelKey;
use rand::RngCore;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Where a client's current query runs.
#[derive(Debug, Clone)]
struct Target {
    addr: Arc<str>,
    key: CancelKey,
}

#[derive(Default)]
pub struct CancelSlot {
    target: Mutex<Option<Target>>,
}

impl CancelSlot {
    pub fn attach(&self, addr: &Arc<str>, key: CancelKey) {
        *lock(&self.target) = Some(Target {
            addr: addr.clone(),
            key,
        });
    }

    pub fn detach(&self) {
        *lock(&self.target) = None;
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    clients: Mutex<HashMap<CancelKey, Arc<CancelSlot>>>,
}

/// A client's entry in the registry, removed on drop.
pub struct Registration {
    pub key: CancelKey,
    pub slot: Arc<CancelSlot>,
    registry: Arc<CancelRegistry>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.registry.clients).remove(&self.key);
    }
}

impl CancelRegistry {
    /// Gives a client a fresh random key from the OS generator.
    pub fn register(self: &Arc<Self>) -> Registration {
        self.register_with(None)
    }

    /// A key whose pid is `pid` (the real server's, in session mode) and
    /// whose secret is pgheal's own, random.
    pub fn register_as(self: &Arc<Self>, pid: i32) -> Registration {
        self.register_with(Some(pid))
    }

    fn register_with(self: &Arc<Self>, pid: Option<i32>) -> Registration {
        let slot = Arc::new(CancelSlot::default());
        let mut clients = lock(&self.clients);
        let key = loop {
            let mut bytes = [0u8; 8];
            rand::rngs::OsRng.fill_bytes(&mut bytes);
            let random_pid = i32::from_be_bytes([bytes[0] & 0x7f, bytes[1], bytes[2], bytes[3]]);
            let key = CancelKey {
                pid: pid.unwrap_or(random_pid),
                secret: i32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            };
            if !clients.contains_key(&key) {
                break key;
            }
        };
        clients.insert(key, slot.clone());
        Registration {
            key,
            slot,
            registry: self.clone(),
        }
    }

    /// Forwards a cancel to the server running the query of the client
    /// that owns `key`. Unknown keys are ignored, as PostgreSQL does.
    pub async fn cancel(&self, key: CancelKey) {
        let target = {
            let clients = lock(&self.clients);
            clients
                .get(&key)
                .and_then(|slot| lock(&slot.target).clone())
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
            s.shutdown().await
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
