//! The server's side of translation: replies to what pgheal added are
//! taken out, a reply pgheal must word itself is replaced, and what the
//! server refused is forgotten again.
//!
//! Only replies that pgheal may have to change are tracked: ParseComplete,
//! CloseComplete, and the ReadyForQuery that ends each Sync, Query and
//! FunctionCall. After an error the server skips everything up to the next
//! Sync, so the tracked replies before it never come.

use bytes::Bytes;
use pgheal_protocol::backend::{
    self, ErrorFields, CLOSE_COMPLETE, COMMAND_COMPLETE, NO_DATA, PARAMETER_DESCRIPTION,
    PARSE_COMPLETE, ROW_DESCRIPTION,
};
use pgheal_protocol::sqlstate;

use super::check::Check;
use super::Session;
use crate::backend::conn::ServerConn;
use crate::backend::params::Params;
use crate::backend::statements::ServerName;

/// A reply the server owes.
#[derive(Debug)]
pub(super) enum Expect {
    /// ParseComplete; `server` was recorded as prepared on the server and
    /// `client` as the client's before the server answered.
    Parse {
        swallow: bool,
        server: Option<ServerName>,
        client: Option<Box<[u8]>>,
        /// This Parse fails on purpose; the client hears this instead.
        error: Option<Bytes>,
    },
    /// CloseComplete; `evicted` was taken off the server's list before
    /// the server answered.
    Close {
        swallow: bool,
        evicted: Option<ServerName>,
    },
    /// ParameterDescription and RowDescription or NoData for a Describe
    /// pgheal added, to compare (see `check`).
    Describe(Box<Check>),
    /// ReadyForQuery. For a Query, `swallow` marks (by position) the
    /// CommandCompletes of statements pgheal added.
    Ready {
        completes: u32,
        swallow: u64,
        registered: bool,
    },
}

impl Expect {
    pub(super) fn ready() -> Expect {
        Expect::Ready {
            completes: 0,
            swallow: 0,
            registered: false,
        }
    }

    pub(super) fn parse(swallow: bool) -> Expect {
        Expect::Parse {
            swallow,
            server: None,
            client: None,
            error: None,
        }
    }

    pub(super) fn close(swallow: bool) -> Expect {
        Expect::Close {
            swallow,
            evicted: None,
        }
    }
}

/// What becomes of one server message.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Reply {
    Keep,
    Drop,
    Replace(Bytes),
}

/// PostgreSQL's message for a prepared statement that went stale
/// after a schema change.
pub(super) const STALE_PLAN: &str = "cached plan must not change result type";

/// A server's error saying a prepared statement went stale.
pub(super) fn stale_plan(f: &ErrorFields) -> bool {
    f.code == sqlstate::FEATURE_NOT_SUPPORTED.code().as_bytes()
        && f.message.starts_with(STALE_PLAN.as_bytes())
}

/// The tags `on_reply` needs whole.
pub(super) fn tracked(tag: u8) -> bool {
    matches!(
        tag,
        PARSE_COMPLETE
            | CLOSE_COMPLETE
            | COMMAND_COMPLETE
            | PARAMETER_DESCRIPTION
            | ROW_DESCRIPTION
            | NO_DATA
    )
}

impl Session {
    /// Decides what the client sees of one whole server message.
    pub(super) fn on_reply(&mut self, conn: &mut ServerConn, tag: u8, body: &[u8]) -> Reply {
        match tag {
            PARSE_COMPLETE => match self.expect.pop_front() {
                Some(Expect::Parse { swallow: true, .. }) => Reply::Drop,
                Some(Expect::Parse { .. }) => Reply::Keep,
                other => self.out_of_step(tag, other),
            },
            CLOSE_COMPLETE => match self.expect.pop_front() {
                Some(Expect::Close { swallow: true, .. }) => Reply::Drop,
                Some(Expect::Close { .. }) => Reply::Keep,
                other => self.out_of_step(tag, other),
            },
            COMMAND_COMPLETE => self.on_command_complete(conn, body),
            PARAMETER_DESCRIPTION | ROW_DESCRIPTION | NO_DATA => {
                self.on_description(conn, tag, body)
            }
            backend::ERROR_RESPONSE => self.on_error(conn, body),
            backend::READY_FOR_QUERY => {
                while let Some(e) = self.expect.pop_front() {
                    if matches!(e, Expect::Ready { .. }) {
                        break;
                    }
                    self.undo(conn, e);
                }
                Reply::Keep
            }
            _ => Reply::Keep,
        }
    }

    /// A reply that matches nothing expected: pass it on and stop
    /// tracking (the connection is not reused: see `releasable`).
    fn out_of_step(&mut self, tag: u8, got: Option<Expect>) -> Reply {
        tracing::error!(tag = %char::from(tag), expected = ?got, "server reply out of step with pgheal's tracking");
        self.expect.clear();
        self.out_of_step = true;
        Reply::Keep
    }

    fn on_command_complete(&mut self, conn: &mut ServerConn, body: &[u8]) -> Reply {
        let tag = body.strip_suffix(b"\0").unwrap_or(body);
        if tag == b"DISCARD ALL" {
            conn.statements.clear();
            conn.applied = Params::default();
            self.restore_startup_params();
        } else if tag == b"DEALLOCATE ALL" {
            conn.statements.clear();
        }
        if let Some(Expect::Ready {
            completes, swallow, ..
        }) = self.expect.front_mut()
        {
            let i = *completes;
            *completes += 1;
            if i < 64 && *swallow & (1 << i) != 0 {
                return Reply::Drop;
            }
        }
        Reply::Keep
    }

    fn on_error(&mut self, conn: &mut ServerConn, body: &[u8]) -> Reply {
        let fields = ErrorFields::parse(body).unwrap_or_default();
        if stale_plan(&fields) {
            // Prepared before a schema change: prepare them all afresh on
            // this server, and move the statements in use to a new epoch
            // for every client (which of them failed is not said).
            conn.statements.stale = true;
            let mut whole = Vec::with_capacity(body.len() + 5);
            whole.push(backend::ERROR_RESPONSE);
            whole.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
            whole.extend_from_slice(body);
            for (base, epoch) in &self.flight.bound {
                self.app.epochs.bump(*base, *epoch, &whole);
            }
        }
        let mut reply = Reply::Keep;
        match self.expect.front_mut() {
            Some(Expect::Ready { registered, .. }) => {
                // A Query failed part way: which PREPAREs ran is unknown.
                if *registered {
                    conn.statements.stale = true;
                }
                return reply;
            }
            Some(Expect::Parse { error, .. }) => {
                if let Some(error) = error.take() {
                    reply = Reply::Replace(error);
                }
            }
            _ => {}
        }
        // Everything up to the Sync is skipped by the server.
        while let Some(e) = self.expect.front() {
            if matches!(e, Expect::Ready { .. }) {
                break;
            }
            if let Some(e) = self.expect.pop_front() {
                self.undo(conn, e);
            }
        }
        reply
    }

    /// What was recorded for a Parse or Close the server skipped is taken
    /// back.
    fn undo(&mut self, conn: &mut ServerConn, e: Expect) {
        match e {
            Expect::Parse { server, client, .. } => {
                if let Some(server) = server {
                    conn.statements.remove(&server);
                }
                if let Some(client) = client {
                    self.statements_mut().remove(&client);
                }
            }
            Expect::Close {
                evicted: Some(name),
                ..
            } => conn.statements.add(name),
            Expect::Describe(check) => self.check_skipped(&check),
            _ => {}
        }
    }
}
