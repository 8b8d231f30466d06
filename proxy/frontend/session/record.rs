//! What a replay needs of the running transaction, kept only while one
//! runs: the client's messages since its `BEGIN`, and a digest of every
//! byte the client was passed since then (see `replay`).
//!
//! Recording starts at a request that opens a transaction with `BEGIN` or
//! `START TRANSACTION` (a Query, a Parse, or a Bind of a statement whose
//! SQL does) and ends at the ReadyForQuery that reports the transaction
//! over. Autocommit statements are never recorded: nothing is copied or
//! hashed for them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use pgheal_protocol::backend::TxStatus;
use pgheal_protocol::classify::starts_transaction;
use pgheal_protocol::effects::Effects;
use pgheal_protocol::frame::{Step, HEADER_LEN};
use pgheal_protocol::frontend;
use xxhash_rust::xxh3::Xxh3;

use super::Session;
use crate::backend::statements::{ClientStatements, Source, Statement};
use crate::config::NeverReplayed;
use crate::metrics::ReplayRefusal;
use crate::net::flow::spare;

/// How much of the process-wide budget a record takes at a time.
const CHARGE_STEP: usize = 4096;

/// Bytes taken from the process-wide replay budget, given back on drop.
struct Charge {
    total: Arc<AtomicUsize>,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// The running transaction, as far as a replay needs it.
pub(super) struct TxRecord {
    /// The client's messages since the `BEGIN`, as the client sent them.
    pub(super) log: BytesMut,
    /// Where in `log` each request (Query, Sync, FunctionCall) not yet
    /// answered ends.
    ends: VecDeque<usize>,
    /// Where the last request recorded ends.
    last_end: usize,
    /// A digest of every byte passed to the client in this transaction.
    hash: Xxh3,
    pub(super) delivered: u64,
    /// Why this transaction cannot be replayed, once that is known.
    pub(super) refused: Option<ReplayRefusal>,
    /// A message that ends the transaction was read: its outcome is the
    /// server's alone.
    pub(super) ending: bool,
    /// This run is a replay already.
    pub(super) replayed: bool,
    /// The client's statements as they were when the transaction began,
    /// taken when the transaction first changes them.
    pub(super) statements_before: Option<ClientStatements>,
    charge: Charge,
    /// The most `log` may hold, and the most all clients' logs may.
    limits: (usize, usize),
    never: NeverReplayed,
}

impl std::fmt::Debug for TxRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxRecord")
            .field("log", &self.log.len())
            .field("delivered", &self.delivered)
            .field("refused", &self.refused)
            .field("ending", &self.ending)
            .finish_non_exhaustive()
    }
}

impl Drop for TxRecord {
    fn drop(&mut self) {
        spare::give(std::mem::take(&mut self.log));
    }
}

impl TxRecord {
    fn new(total: Arc<AtomicUsize>, limits: (usize, usize), never: NeverReplayed) -> TxRecord {
        TxRecord {
            log: spare::take(),
            ends: VecDeque::new(),
            last_end: 0,
            hash: Xxh3::new(),
            delivered: 0,
            refused: None,
            ending: false,
            replayed: false,
            statements_before: None,
            charge: Charge { total, bytes: 0 },
            limits,
            never,
        }
    }

    /// Appends client bytes, within the budgets; beyond either the
    /// transaction is not replayable and its bytes are let go.
    fn append(&mut self, bytes: &[u8]) {
        if self.refused.is_some() {
            return;
        }
        let (per_client, all) = self.limits;
        let wanted = self.log.len() + bytes.len();
        if wanted > per_client {
            self.refuse(ReplayRefusal::Buffer);
            return;
        }
        if wanted > self.charge.bytes {
            // Taken from the process-wide budget a chunk at a time.
            let n = (wanted - self.charge.bytes).max(CHARGE_STEP);
            let before = self.charge.total.fetch_add(n, Ordering::Relaxed);
            self.charge.bytes += n;
            if before + n > all {
                self.refuse(ReplayRefusal::Buffer);
                return;
            }
        }
        self.log.extend_from_slice(bytes);
    }

    /// The transaction cannot be replayed: its bytes go at once.
    pub(super) fn refuse(&mut self, reason: ReplayRefusal) {
        self.refused.get_or_insert(reason);
        spare::give(std::mem::take(&mut self.log));
        let held = std::mem::take(&mut self.charge.bytes);
        self.charge.total.fetch_sub(held, Ordering::Relaxed);
        self.ends.clear();
    }

    /// Notes what SQL about to run means for a replay.
    fn note_sql(&mut self, sql: &[u8], ends_transaction: bool) {
        self.ending |= ends_transaction;
        if self.never.found_in(sql) {
            self.refuse(ReplayRefusal::Function);
        }
    }

    /// Notes what running a client's statement means for a replay.
    fn note_statement(&mut self, stmt: &Statement) {
        self.ending |= stmt.ends_transaction;
        let sql = match &stmt.source {
            Source::Protocol { query, .. } => query,
            Source::Sql { body } => body,
        };
        if self.never.found_in_cached(sql, &stmt.never_replayed) {
            self.refuse(ReplayRefusal::Function);
        }
    }

    /// True when the last message recorded ends a request.
    pub(super) fn ends_with_request(&self) -> bool {
        self.last_end == self.log.len()
    }

    /// The digest of what the client was passed so far.
    pub(super) fn digest(&self) -> u64 {
        self.hash.digest()
    }
}

impl Session {
    /// `scan_up` found `step` at `up.scanned`: records it when a
    /// replayable transaction runs (or starts with it).
    pub(super) fn record_up(&mut self, step: Step) {
        let starts = matches!(step, Step::Whole { .. }) && !self.flight.owed && self.replays;
        if self.flight.record.is_none() && !starts {
            return;
        }
        // Taken out for a moment so that the session can change while the
        // message is read.
        let buf = std::mem::take(&mut self.up.buf);
        self.record_message(step, &buf[self.up.scanned..]);
        self.up.buf = buf;
    }

    fn record_message(&mut self, step: Step, rest: &[u8]) {
        let bytes = rest.get(..step.consumed()).unwrap_or_default();
        if let Step::Header { tag, len } | Step::Whole { tag, len } = step {
            let body = bytes.get(HEADER_LEN..).unwrap_or_default();
            if !self.flight.owed && self.replays {
                self.start_record(tag, step, body);
            }
            let Some(r) = self.flight.record.as_mut() else {
                return;
            };
            if matches!(
                tag,
                frontend::QUERY | frontend::SYNC | frontend::FUNCTION_CALL
            ) {
                r.last_end = r.log.len() + len;
                r.ends.push_back(r.last_end);
            }
            if tag == frontend::FUNCTION_CALL {
                // A function called by OID: what it does is not known.
                r.refuse(ReplayRefusal::Function);
            }
        }
        if let Some(r) = self.flight.record.as_mut() {
            r.append(bytes);
        }
    }

    /// A request with nothing owed before it: recording starts when it
    /// opens a transaction.
    fn start_record(&mut self, tag: u8, step: Step, body: &[u8]) {
        if !matches!(step, Step::Whole { .. }) || self.pinned.is_some() {
            return;
        }
        let begins = match tag {
            frontend::QUERY => frontend::query(body).is_ok_and(starts_transaction),
            frontend::PARSE => frontend::parse(body).is_ok_and(|p| starts_transaction(p.query)),
            frontend::BIND => bound_sql(&self.statements, body).is_some_and(starts_transaction),
            _ => false,
        };
        if !begins {
            return;
        }
        let config = self.app.config();
        let f = &config.failover;
        self.flight.record = Some(Box::new(TxRecord::new(
            self.app.replay_memory.clone(),
            (f.replay_buffer, f.replay_memory),
            f.never_replayed.clone(),
        )));
    }

    /// SQL about to go to the server in a recorded transaction.
    pub(super) fn note_sql(&mut self, sql: &[u8], effects: &Effects) {
        if let Some(r) = self.flight.record.as_mut() {
            r.note_sql(sql, effects.ends_transaction);
        }
    }

    /// A client's statement about to run in a recorded transaction.
    pub(super) fn note_statement(&mut self, stmt: &Statement) {
        if let Some(r) = self.flight.record.as_mut() {
            r.note_statement(stmt);
        }
    }

    /// The client's statements, about to change: a transaction that may
    /// run again keeps them as they were when it began.
    pub(super) fn statements_mut(&mut self) -> &mut ClientStatements {
        if let Some(r) = self.flight.record.as_mut() {
            if r.statements_before.is_none() && r.refused.is_none() {
                r.statements_before = Some(self.statements.clone());
            }
        }
        &mut self.statements
    }

    /// `len` bytes at `start` in `down` go to the client.
    pub(super) fn record_down(&mut self, start: usize, len: usize, ready: bool) {
        let Some(r) = self.flight.record.as_mut() else {
            return;
        };
        if let Some(bytes) = self.down.buf.get(start..start + len) {
            r.hash.update(bytes);
            r.delivered += len as u64;
        }
        if ready {
            self.record_ready();
        }
    }

    /// Bytes pgheal put in place of a server message go to the client.
    pub(super) fn record_replaced(&mut self, with: &[u8]) {
        if let Some(r) = self.flight.record.as_mut() {
            r.hash.update(with);
            r.delivered += with.len() as u64;
        }
    }

    /// A ReadyForQuery went to the client: one request answered. At idle
    /// the transaction is over and so is its record (a client that sent
    /// its next transaction already, pipelined, is not recorded for it).
    fn record_ready(&mut self) {
        let Some(r) = self.flight.record.as_mut() else {
            return;
        };
        let end = r.ends.pop_front();
        if self.flight.tx != TxStatus::Idle {
            return;
        }
        if end.is_some_and(|e| e < r.log.len()) {
            tracing::debug!("a pipelined transaction follows; it is not recorded");
        }
        self.flight.record = None;
    }
}

/// The SQL of the client's statement a Bind uses, when pgheal knows it.
fn bound_sql<'a>(statements: &'a ClientStatements, bind_body: &[u8]) -> Option<&'a [u8]> {
    let bind = frontend::bind(bind_body).ok()?;
    match &statements.get(bind.statement)?.source {
        Source::Protocol { query, .. } => Some(query),
        Source::Sql { body } => Some(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(total: &Arc<AtomicUsize>, per_client: usize, all: usize) -> TxRecord {
        let never = NeverReplayed::new(&["audit_me".into()]).expect("names");
        TxRecord::new(total.clone(), (per_client, all), never)
    }

    #[test]
    fn a_transaction_beyond_either_budget_lets_its_bytes_go() {
        let total = Arc::new(AtomicUsize::new(0));
        let mut a = record(&total, 200, 3 * CHARGE_STEP);
        a.append(&[1; 100]);
        assert_eq!((a.log.len(), a.refused), (100, None));
        a.append(&[2; 150]);
        assert_eq!((a.log.len(), a.refused), (0, Some(ReplayRefusal::Buffer)));
        assert_eq!(
            total.load(Ordering::Relaxed),
            0,
            "a refused record holds nothing"
        );
        // The whole process's budget: `h` holds one step, and `b` wants
        // more than the two steps left.
        let mut h = record(&total, 4 * CHARGE_STEP, 3 * CHARGE_STEP);
        h.append(&[3; 100]);
        let mut b = record(&total, 4 * CHARGE_STEP, 3 * CHARGE_STEP);
        b.append(&vec![4; 2 * CHARGE_STEP]);
        assert_eq!(b.refused, None);
        b.append(&[4; 10]);
        assert_eq!(b.refused, Some(ReplayRefusal::Buffer));
        assert_eq!(h.refused, None);
        drop((a, b, h));
        assert_eq!(total.load(Ordering::Relaxed), 0, "every byte given back");
    }

    #[test]
    fn sql_that_ends_the_transaction_or_calls_a_listed_function_is_noted() {
        let total = Arc::new(AtomicUsize::new(0));
        let mut r = record(&total, 1000, 1000);
        r.note_sql(b"UPDATE t SET x = 1", false);
        assert!(!r.ending && r.refused.is_none());
        r.note_sql(b"DO $$BEGIN PERFORM Audit_Me(); END$$", false);
        assert_eq!(r.refused, Some(ReplayRefusal::Function));
        r.append(&[0; 10]);
        assert!(r.log.is_empty(), "a refused transaction keeps nothing");
        r.note_sql(b"SELECT SETVAL('s', 1)", false);
        assert_eq!(r.refused, Some(ReplayRefusal::Function));
        r.note_sql(b"COMMIT", true);
        assert!(r.ending);
    }
}
