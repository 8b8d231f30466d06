//! Named prepared statements in transaction mode.
//!
//! A client's statement names are its own. On a server pgheal prepares each
//! statement under a name derived from what it is (its SQL, parameter
//! types and the search_path it was prepared under): `pgheal_` and 32 hex
//! digits of SHA-256. Clients that prepare the same statement share it on
//! every server, a server never holds two copies, and the name says nothing
//! about which client made it.
//!
//! A schema change can make a shared statement stale (PostgreSQL answers
//! `0A000 cached plan must not change result type`). Its epoch then moves
//! on: clients that prepare it from then on get a new server name, prepared
//! afresh, and clients that prepared it before are told 0A000 as
//! PostgreSQL would tell them, until they prepare it again. The same
//! happens when a server describes a statement otherwise than the shape
//! recorded for it ([`Epochs::compare_shape`]; the session's `check`
//! module asks). No client ever gets rows in a shape its driver did not
//! learn.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::sync::{lock, FastMap};

use sha2::{Digest, Sha256};

use crate::backend::router::Intent;
use pgheal_protocol::backend::Column;

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

    /// The name of a protocol-level statement (Parse) prepared under
    /// `search_path`.
    pub fn protocol(query: &[u8], types: &[u8], search_path: &[u8]) -> ServerName {
        ServerName::of(b"P", &[query, types, search_path])
    }

    /// This statement prepared for one client alone (`client`: its key).
    pub fn for_client(self, client: i32) -> ServerName {
        ServerName::of(b"U", &[&self.0, &client.to_be_bytes()])
    }

    /// This statement as prepared after it went stale `epoch` times.
    pub fn at_epoch(self, epoch: u32) -> ServerName {
        if epoch == 0 {
            return self;
        }
        ServerName::of(b"E", &[&self.0, &epoch.to_be_bytes()])
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
    /// Its name on servers: `base` at `epoch`.
    pub server: ServerName,
    /// What it is, whatever its epoch.
    pub base: ServerName,
    /// How many times it had gone stale when the client prepared it.
    pub epoch: u32,
    /// Shared with other clients (else prepared for this client alone,
    /// and only the server says when it is stale).
    pub shared: bool,
    pub source: Source,
    /// Where a request that starts by running it may go.
    pub intent: Intent,
    /// Running it ends the transaction (`COMMIT`, `ROLLBACK`, ...).
    pub ends_transaction: bool,
    /// Whether its SQL names a function that is never replayed, for the
    /// list it was last checked against (see `NeverReplayed`).
    pub never_replayed: std::sync::atomic::AtomicUsize,
    /// A description made after the client prepared it was compared with
    /// the one recorded for its server name (see [`Epochs::compare_shape`]).
    pub checked: AtomicBool,
    /// Servers now describe it otherwise than the client learnt: it hears
    /// PostgreSQL's 0A000 until it prepares it again.
    pub stale: AtomicBool,
}

impl Statement {
    pub fn new(server: ServerName, base: ServerName, epoch: u32, source: Source) -> Statement {
        let (intent, ends_transaction) = match &source {
            Source::Protocol { query, .. } => {
                let analysis = crate::backend::analysis::statement(query);
                let (class, effects) = &*analysis;
                (
                    pgheal_protocol::intent::class_intent(*class),
                    effects.ends_transaction,
                )
            }
            Source::Sql { .. } => (Intent::Write, false),
        };
        Statement {
            server,
            base,
            epoch,
            shared: server == base.at_epoch(epoch),
            source,
            intent,
            ends_transaction,
            never_replayed: Default::default(),
            checked: AtomicBool::new(false),
            stale: AtomicBool::new(false),
        }
    }

    /// The same statement under another epoch (its shape changed).
    pub fn at_epoch(&self, epoch: u32) -> Statement {
        let source = match &self.source {
            Source::Protocol { query, types } => Source::Protocol {
                query: query.clone(),
                types: types.clone(),
            },
            Source::Sql { body } => Source::Sql { body: body.clone() },
        };
        Statement::new(self.base.at_epoch(epoch), self.base, epoch, source)
    }
}

/// A client's statements by the names it gave them.
pub type ClientStatements = HashMap<Box<[u8]>, Arc<Statement>, foldhash::fast::RandomState>;

/// How many times each shared statement went stale, for every client.
#[derive(Debug, Default)]
pub struct Epochs {
    /// Nothing ever went stale: no lookup on the data path.
    any: AtomicBool,
    by_base: Mutex<HashMap<ServerName, u32>>,
    /// The server's own 0A000, whole (drivers read its routine field).
    error: Mutex<Option<bytes::Bytes>>,
    /// What clients learnt of each statement: a digest of its parameter
    /// types and result columns, by server name.
    shapes: Mutex<HashMap<ServerName, u64>>,
}

/// How a server's description of a statement compares with the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Nothing was recorded: now it is.
    First,
    Same,
    Changed,
}

/// A digest of what a driver learns from describing a statement: its
/// ParameterDescription body and each result column's name, type and
/// modifier (`None` for NoData). Table OIDs are left out: PostgreSQL
/// itself accepts a re-created table of the same row type.
pub fn shape_of(parameters: &[u8], columns: Option<&[Column<'_>]>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parameters.hash(&mut h);
    columns.map(|c| c.len()).hash(&mut h);
    for c in columns.unwrap_or_default() {
        c.name.hash(&mut h);
        c.type_oid.hash(&mut h);
        c.type_modifier.hash(&mut h);
    }
    h.finish()
}

/// Stale statements remembered at most; past it the record starts over
/// (a client's old statement then still differs from the epoch it finds).
const MAX_EPOCHS: usize = 10_000;

impl Epochs {
    /// The epoch a statement prepared now gets.
    pub fn current(&self, base: &ServerName) -> u32 {
        if !self.any.load(Ordering::Acquire) {
            return 0;
        }
        lock(&self.by_base).get(base).copied().unwrap_or(0)
    }

    /// The client prepared `stmt` before it last went stale.
    pub fn is_stale(&self, stmt: &Statement) -> bool {
        stmt.stale.load(Ordering::Relaxed)
            || (stmt.shared && self.current(&stmt.base) != stmt.epoch)
    }

    /// Compares the description a server just gave of statement `name`
    /// (`shape`, see [`shape_of`]) with the one recorded for it.
    pub fn compare_shape(&self, name: ServerName, shape: u64) -> Shape {
        let mut shapes = lock(&self.shapes);
        if shapes.len() >= MAX_EPOCHS && !shapes.contains_key(&name) {
            shapes.clear();
        }
        match shapes.insert(name, shape) {
            None => Shape::First,
            Some(was) if was == shape => Shape::Same,
            Some(was) => {
                // The record keeps what clients of `name` learnt.
                shapes.insert(name, was);
                Shape::Changed
            }
        }
    }

    /// Records `shape` for `name` whatever was recorded (a statement
    /// prepared for one client that learns its new shape).
    pub fn adopt_shape(&self, name: ServerName, shape: u64) {
        lock(&self.shapes).insert(name, shape);
    }

    /// Statement `base` at `epoch` is now described as `shape`: it moves
    /// on to an epoch of that shape. Returns that epoch.
    pub fn reshape(&self, base: ServerName, epoch: u32, shape: u64) -> u32 {
        let now = self.advance(base, epoch);
        lock(&self.shapes).insert(base.at_epoch(now), shape);
        now
    }

    /// Moves `base` past `epoch` (once, however many say so); returns
    /// its epoch now.
    fn advance(&self, base: ServerName, epoch: u32) -> u32 {
        let now = {
            let mut by_base = lock(&self.by_base);
            if by_base.len() >= MAX_EPOCHS {
                by_base.clear();
            }
            let now = by_base.entry(base).or_insert(0);
            if *now == epoch {
                *now = epoch.wrapping_add(1);
            }
            *now
        };
        self.any.store(true, Ordering::Release);
        now
    }

    /// The error a server gave for a stale statement, to give clients
    /// whose statements went stale.
    pub fn stale_error(&self) -> Option<bytes::Bytes> {
        lock(&self.error).clone()
    }

    /// A server said the statement prepared at `epoch` is stale, with
    /// `error` (an ErrorResponse, whole).
    pub fn bump(&self, base: ServerName, epoch: u32, error: &[u8]) {
        *lock(&self.error) = Some(bytes::Bytes::copy_from_slice(error));
        self.advance(base, epoch);
    }
}

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
    /// Looked up at every Bind of a prepared statement; the names are
    /// pgheal's own (SHA-256 of the text), so a fast hash is safe.
    used: FastMap<ServerName, u64>,
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

    /// Marks a statement as just used; false when it is not held.
    pub fn touch(&mut self, name: &ServerName) -> bool {
        self.clock += 1;
        match self.used.get_mut(name) {
            Some(t) => {
                *t = self.clock;
                true
            }
            None => false,
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
        let a = ServerName::protocol(b"select $1", b"\0\0", b"");
        assert_eq!(a, ServerName::protocol(b"select $1", b"\0\0", b""));
        assert_ne!(
            a,
            ServerName::protocol(b"select $1", b"\0\x01\0\0\0\x17", b"")
        );
        assert_ne!(
            a,
            ServerName::protocol(b"select $1", b"\0\0", b"app, public")
        );
        assert_eq!(a.at_epoch(0), a);
        assert_ne!(a.at_epoch(1), a);
        assert_ne!(a.at_epoch(1), a.at_epoch(2));
        assert_ne!(a, ServerName::sql(b"select $1"));
        assert!(a.as_str().starts_with("pgheal_"));
        assert_eq!(a.as_str().len(), 39);
        assert!(a.as_str()[7..].bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn least_recently_used_goes_first() {
        let names: Vec<ServerName> = (0..3u8)
            .map(|i| ServerName::protocol(&[i], b"\0\0", b""))
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

    #[test]
    fn a_stale_statement_moves_to_a_new_epoch_once() {
        let base = ServerName::protocol(b"select * from t", b"\0\0", b"");
        let stmt = |epoch| {
            let source = Source::Sql {
                body: Box::default(),
            };
            Statement::new(base.at_epoch(epoch), base, epoch, source)
        };
        let epochs = Epochs::default();
        assert_eq!(epochs.current(&base), 0);
        assert!(!epochs.is_stale(&stmt(0)));
        epochs.bump(base, 0, b"E");
        // Two servers saying so about the same epoch move it once.
        epochs.bump(base, 0, b"E");
        assert_eq!(epochs.current(&base), 1);
        assert!(epochs.is_stale(&stmt(0)));
        assert!(!epochs.is_stale(&stmt(1)));
    }

    #[test]
    fn a_statement_described_otherwise_moves_to_an_epoch_of_its_new_shape() {
        let base = ServerName::protocol(b"select * from t where d = $1", b"\0\0", b"");
        let epochs = Epochs::default();
        let date = shape_of(b"\0\x01\0\0\x04\x3a", None);
        let int = shape_of(b"\0\x01\0\0\0\x17", None);
        assert_ne!(date, int);
        assert_eq!(epochs.compare_shape(base, date), Shape::First);
        assert_eq!(epochs.compare_shape(base, date), Shape::Same);
        assert_eq!(epochs.compare_shape(base, int), Shape::Changed);
        // The record keeps the shape clients learnt.
        assert_eq!(epochs.compare_shape(base, date), Shape::Same);
        assert_eq!(epochs.reshape(base, 0, int), 1);
        // A second server saying so about the same epoch moves it once.
        assert_eq!(epochs.reshape(base, 0, int), 1);
        assert_eq!(epochs.current(&base), 1);
        assert_eq!(epochs.compare_shape(base.at_epoch(1), int), Shape::Same);
        let old = Statement::new(
            base,
            base,
            0,
            Source::Sql {
                body: Box::default(),
            },
        );
        assert!(epochs.is_stale(&old));
        let moved = old.at_epoch(1);
        assert!(!epochs.is_stale(&moved) && moved.shared);
        moved.stale.store(true, Ordering::Relaxed);
        assert!(epochs.is_stale(&moved));
    }

    #[test]
    fn shapes_follow_what_a_driver_decodes() {
        let col = |name, type_oid| Column {
            name,
            type_oid,
            type_modifier: -1,
        };
        let int = [col(&b"a"[..], 23), col(&b"b"[..], 23)];
        let real = [col(&b"a"[..], 23), col(&b"b"[..], 700)];
        let renamed = [col(&b"a"[..], 23), col(&b"c"[..], 23)];
        let none = shape_of(b"\0\0", None);
        assert_eq!(shape_of(b"\0\0", Some(&int)), shape_of(b"\0\0", Some(&int)));
        assert_ne!(
            shape_of(b"\0\0", Some(&int)),
            shape_of(b"\0\0", Some(&real))
        );
        assert_ne!(
            shape_of(b"\0\0", Some(&int)),
            shape_of(b"\0\0", Some(&renamed))
        );
        assert_ne!(none, shape_of(b"\0\0", Some(&[])));
    }
}
