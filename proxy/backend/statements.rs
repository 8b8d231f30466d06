//! Named prepared statements in transaction mode.
//!
//! A client's statement names are its own. On a server pgheal prepares each
//! statement under a name derived from what it is (its SQL and parameter
//! types): `pgheal_` and 32 hex digits of SHA-256. Clients that prepare the
//! same statement share it on every server, a server never holds two copies,
//! and the name says nothing about which client made it.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::backend::router::Intent;

/// `pgheal_` and 32 hex digits.
const NAME_LEN: usize = 39;

/// A statement's name on every server.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServerName([u8; NAME_LEN]);

impl ServerName {
    fn of(kind: &[u8], parts: &[&[u8]]) -> ServerName {
        let mut h = Sha256::new();
        h.update(kind);
        for p in parts {
            h.update((p.len() as u64).to_be_bytes());
            h.update(p);
        }
        let digest = h.finalize();
        let mut name = [0u8; NAME_LEN];
        name[..7].copy_from_slice(b"pgheal_");
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for (i, b) in digest.iter().take(16).enumerate() {
            name[7 + 2 * i] = HEX[usize::from(b >> 4)];
            name[8 + 2 * i] = HEX[usize::from(b & 0xf)];
        }
        ServerName(name)
    }

    /// The name of a protocol-level statement (Parse).
    pub fn protocol(query: &[u8], types: &[u8]) -> ServerName {
        ServerName::of(b"P", &[query, types])
    }

    /// The name of a SQL `PREPARE`d statement, from what follows its name.
    pub fn sql(body: &[u8]) -> ServerName {
        ServerName::of(b"Q", &[body])
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        // Always ASCII.
        std::str::from_utf8(&self.0).unwrap_or("pgheal_")
    }
}

impl std::fmt::Debug for ServerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to prepare a statement on a server that does not have it.
#[derive(Debug)]
pub enum Source {
    /// A Parse: its SQL and parameter type section as the client sent them.
    Protocol { query: Box<[u8]>, types: Box<[u8]> },
    /// A SQL `PREPARE`: what followed the name (`(types) AS statement`).
    Sql { body: Box<[u8]> },
}

/// One of a client's named statements.
#[derive(Debug)]
pub struct Statement {
    pub server: ServerName,
    pub source: Source,
    /// Where a request that starts by running it may go.
    pub intent: Intent,
}

/// A client's statements by the names it gave them.
pub type ClientStatements = HashMap<Box<[u8]>, Arc<Statement>>;

/// A statement that never exists: closing it gets CloseComplete and does
/// nothing, which is how a client's Close is answered in order.
pub const NONE: &[u8] = b"pgheal-none";
/// An empty statement re-made whenever a client's Parse needs no work on
/// the server, so the server still answers it with ParseComplete in order.
pub const NOOP: &[u8] = b"pgheal-noop";
/// A statement whose Parse fails on purpose; pgheal replaces the error.
pub const FAIL: &[u8] = b"pgheal-fail";

/// The statements one server connection holds, least recently used first
/// out when there are too many.
#[derive(Debug, Default)]
pub struct ServerStatements {
    used: HashMap<ServerName, u64>,
    clock: u64,
    /// A statement went stale (its plan's result type changed): drop them
    /// all before the next client uses this connection.
    pub stale: bool,
}

impl ServerStatements {
    pub fn contains(&self, name: &ServerName) -> bool {
        self.used.contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }

    /// Marks a statement as just used.
    pub fn touch(&mut self, name: &ServerName) {
        self.clock += 1;
        if let Some(t) = self.used.get_mut(name) {
            *t = self.clock;
        }
    }

    pub fn add(&mut self, name: ServerName) {
        self.clock += 1;
        self.used.insert(name, self.clock);
    }

    pub fn remove(&mut self, name: &ServerName) {
        self.used.remove(name);
    }

    /// The least recently used statement, when holding `max` already.
    pub fn victim(&self, max: usize) -> Option<ServerName> {
        if self.used.len() < max.max(1) {
            return None;
        }
        self.used.iter().min_by_key(|(_, t)| **t).map(|(n, _)| *n)
    }

    pub fn clear(&mut self) {
        self.used.clear();
        self.stale = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_content() {
        let a = ServerName::protocol(b"select $1", b"\0\0");
        assert_eq!(a, ServerName::protocol(b"select $1", b"\0\0"));
        assert_ne!(a, ServerName::protocol(b"select $1", b"\0\x01\0\0\0\x17"));
        assert_ne!(a, ServerName::sql(b"select $1"));
        assert!(a.as_str().starts_with("pgheal_"));
        assert_eq!(a.as_str().len(), 39);
        assert!(a.as_str()[7..].bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn least_recently_used_goes_first() {
        let names: Vec<ServerName> = (0..3u8)
            .map(|i| ServerName::protocol(&[i], b"\0\0"))
            .collect();
        let mut s = ServerStatements::default();
        for n in &names {
            s.add(*n);
        }
        assert_eq!(s.victim(4), None);
        assert_eq!(s.victim(3), Some(names[0]));
        s.touch(&names[0]);
        assert_eq!(s.victim(3), Some(names[1]));
        s.remove(&names[1]);
        assert_eq!(s.victim(3), None);
        assert_eq!(s.len(), 2);
        s.stale = true;
        s.clear();
        assert!(s.is_empty() && !s.stale);
    }
}
