//! Shared statements must describe themselves as they would on the
//! client's own connection.
//!
//! A statement prepared on a server keeps the parameter types and result
//! columns it was analysed with, and PostgreSQL re-checks only the result
//! columns. A client that prepares a statement already on the server, or
//! runs its statement on a server that prepares it only now, could
//! otherwise be given a description from before (or after) a schema
//! change: a parameter still a `date` that is an `int` now, rows decoded
//! with columns the driver did not learn.
//!
//! So pgheal compares. Whenever it has a server analyse a client's
//! statement anew, it describes it too (the client does not see that
//! reply) and compares the digest with the one recorded for the
//! statement's server name:
//! - a statement the client prepared and has not used yet is analysed
//!   once, on the first server it reaches (under a scratch name when that
//!   server already holds the shared copy); a different shape moves the
//!   shared statement to a new epoch, so the client runs a copy of the
//!   shape it is told, and clients that learnt the old one hear 0A000;
//! - a statement the client knows, prepared on one more server, is
//!   compared before the client's Bind or Describe of it goes out: when
//!   the server now describes it otherwise, the client hears 0A000, as
//!   from PostgreSQL, instead of rows in a shape it did not learn.
//!
//! Translation waits for the comparison when the next messages depend on
//! it (one round trip, once per statement and server).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use pgheal_protocol::backend::{self, NO_DATA, PARAMETER_DESCRIPTION};
use pgheal_protocol::build;
use pgheal_protocol::frontend::STATEMENT;

use super::replies::{Expect, Reply};
use super::Session;
use crate::backend::conn::ServerConn;
use crate::backend::statements::{shape_of, Shape, Source, Statement, NOOP};

/// A description pgheal asked for, to compare with the record.
#[derive(Debug)]
pub(super) struct Check {
    /// The client's name for the statement.
    client: Box<[u8]>,
    stmt: Arc<Statement>,
    /// The client learnt the statement's shape: a change refuses it.
    known: bool,
    /// Analysed under the scratch name: the server's copy under the
    /// statement's own name is of the recorded shape.
    scratch: bool,
    /// Translation waits for this answer.
    wait: bool,
    /// The ParameterDescription body, once it came.
    parameters: Option<Bytes>,
}

/// What a use of a statement on a server needs first.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Ready {
    /// Go on translating.
    Go,
    /// Wait for a comparison, then translate the same message again.
    Wait,
}

impl Session {
    /// Prepares the client's statement `name` on `conn` for a Bind or
    /// Describe of it.
    pub(super) fn prepare_on(
        &mut self,
        conn: &mut ServerConn,
        name: &[u8],
        stmt: &Arc<Statement>,
    ) -> Ready {
        let Source::Protocol { query, types } = &stmt.source else {
            // A SQL PREPAREd statement bound by the protocol: prepared by
            // the EXECUTE path only; the server names what is missing.
            return Ready::Go;
        };
        let present = conn.statements.touch(&stmt.server);
        let checked = stmt.checked.swap(true, Ordering::Relaxed);
        if present {
            if checked {
                return Ready::Go;
            }
            // Prepared without a server (see `prepare_locally`): analysed
            // now under a scratch name, compared with the shared copy.
            self.scratch_check(name, stmt, None);
            return Ready::Wait;
        }
        self.parse_on(conn, stmt.server, query, types);
        build::describe(&mut self.wire.buf, STATEMENT, stmt.server.as_bytes());
        // A client that knows the statement waits for the comparison; one
        // that does not learns the shape of this very copy.
        self.push_check(name, stmt, checked, false);
        if checked {
            build::flush(&mut self.wire.buf);
            return Ready::Wait;
        }
        Ready::Go
    }

    /// A client's Parse of a statement `conn` already holds: analysed anew
    /// under a scratch name (its ParseComplete is the client's), compared
    /// with the shared copy before anything uses it.
    pub(super) fn parse_shared(
        &mut self,
        conn: &mut ServerConn,
        name: &[u8],
        stmt: &Arc<Statement>,
    ) {
        conn.statements.touch(&stmt.server);
        stmt.checked.store(true, Ordering::Relaxed);
        self.scratch_check(name, stmt, Some(name.into()));
    }

    /// Analyses `stmt` under the scratch name and describes it; translation
    /// waits for the answer. `client`: the Parse is the client's own.
    fn scratch_check(&mut self, name: &[u8], stmt: &Arc<Statement>, client: Option<Box<[u8]>>) {
        let Source::Protocol { query, types } = &stmt.source else {
            return;
        };
        build::close(&mut self.wire.buf, STATEMENT, NOOP);
        self.expect.push_back(Expect::close(true));
        build::parse(&mut self.wire.buf, NOOP, query, types);
        self.expect.push_back(Expect::Parse {
            swallow: client.is_none(),
            server: None,
            client,
            error: None,
        });
        build::describe(&mut self.wire.buf, STATEMENT, NOOP);
        build::flush(&mut self.wire.buf);
        self.push_check(name, stmt, false, true);
    }

    /// Describes `stmt` as just prepared under its server name, for a
    /// client's Parse.
    pub(super) fn describe_check(&mut self, name: &[u8], stmt: &Arc<Statement>) {
        stmt.checked.store(true, Ordering::Relaxed);
        build::describe(&mut self.wire.buf, STATEMENT, stmt.server.as_bytes());
        self.push_check(name, stmt, false, false);
    }

    /// Expects the reply to a Describe just written. A scratch check or
    /// one for a client that knows the statement holds translation back.
    fn push_check(&mut self, name: &[u8], stmt: &Arc<Statement>, known: bool, scratch: bool) {
        let wait = known || scratch;
        self.flight.checking |= wait;
        self.expect.push_back(Expect::Describe(Box::new(Check {
            client: name.into(),
            stmt: stmt.clone(),
            known,
            scratch,
            wait,
            parameters: None,
        })));
    }

    /// A ParameterDescription, RowDescription or NoData while a check is
    /// first in line: the reply to pgheal's Describe.
    pub(super) fn on_description(&mut self, conn: &mut ServerConn, tag: u8, body: &[u8]) -> Reply {
        let Some(Expect::Describe(check)) = self.expect.front_mut() else {
            return Reply::Keep;
        };
        if tag == PARAMETER_DESCRIPTION {
            check.parameters = Some(Bytes::copy_from_slice(body));
            return Reply::Drop;
        }
        let Some(Expect::Describe(check)) = self.expect.pop_front() else {
            return Reply::Keep;
        };
        let parameters = check.parameters.clone().unwrap_or_default();
        let shape = if tag == NO_DATA {
            shape_of(&parameters, None)
        } else {
            match backend::row_description(body) {
                Ok(columns) => shape_of(&parameters, Some(&columns)),
                Err(_) => return self.garbled_description(),
            }
        };
        self.resolve(conn, *check, shape);
        Reply::Drop
    }

    fn garbled_description(&mut self) -> Reply {
        tracing::error!("server sent a RowDescription pgheal cannot read");
        self.flight.checking = false;
        self.out_of_step = true;
        Reply::Drop
    }

    /// Acts on a comparison: the client's statement keeps its server name,
    /// moves to one of the new shape, or is refused (see the module text).
    fn resolve(&mut self, conn: &mut ServerConn, check: Check, shape: u64) {
        self.check_skipped(&check);
        let stmt = &check.stmt;
        let epochs = &self.app.epochs;
        if epochs.compare_shape(stmt.server, shape) != Shape::Changed {
            return;
        }
        tracing::info!(statement = ?stmt.server, known = check.known, "a prepared statement's description changed");
        // Copies of either shape on this server are dropped before its
        // next client.
        conn.statements.stale = true;
        if check.scratch {
            // The old shape's copy: not for this client either. Translation
            // waits at a message boundary, so the Close goes out in order.
            build::close(&mut self.wire.buf, STATEMENT, stmt.server.as_bytes());
            conn.statements.remove(&stmt.server);
            self.expect.push_back(Expect::Close {
                swallow: true,
                evicted: Some(stmt.server),
            });
        }
        let epoch = stmt
            .shared
            .then(|| epochs.reshape(stmt.base, stmt.epoch, shape));
        if check.known {
            stmt.stale.store(true, Ordering::Relaxed);
            return;
        }
        let Some(epoch) = epoch else {
            // Prepared for this client alone: the shape it learns now.
            epochs.adopt_shape(stmt.server, shape);
            return;
        };
        let same = self
            .statements
            .get(&check.client)
            .is_some_and(|s| Arc::ptr_eq(s, stmt));
        if same {
            let moved = stmt.at_epoch(epoch);
            moved.checked.store(true, Ordering::Relaxed);
            self.statements_mut().insert(check.client, Arc::new(moved));
        }
    }

    /// A check answered, or skipped by the server (an error came first).
    pub(super) fn check_skipped(&mut self, check: &Check) {
        if check.wait {
            self.flight.checking = false;
        }
    }
}
