//! A server lost under a client: the session ends with it (session mode,
//! pinned), a held read runs again, a recorded transaction is replayed
//! (`replay`), or the client hears 08006; and a transaction whose server
//! was lost and not replayed: pgheal answers for it, as PostgreSQL answers
//! in a failed transaction, until the client ends it.

use std::future::poll_fn;
use std::io;

use bytes::{Buf, BytesMut};
use pgheal_protocol::backend::TxStatus;
use pgheal_protocol::build;
use pgheal_protocol::classify::{classify, Class};
use pgheal_protocol::frame::{self, Scanner, Step};
use pgheal_protocol::frontend;

use super::route::Rerun;
use super::{Attachment, Session};
use crate::backend::pool::Lease;
use crate::config::PoolMode;
use crate::frontend::error::ClientError;
use crate::metrics::ReplayRefusal;

/// Where a client stands in a transaction whose server was lost.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct LostTx {
    /// The extended-protocol batch being read ends the transaction.
    pub(super) ending: bool,
    /// The batch already got its 25P02.
    pub(super) errored: bool,
    /// The client has not heard of the loss yet: its next request gets
    /// 08006 rather than 25P02.
    pub(super) announce: bool,
}

impl Session {
    /// Answers, without a server, a client whose transaction died with its
    /// server: 25P02 for everything until ROLLBACK or COMMIT (which answers
    /// ROLLBACK), as PostgreSQL does in a failed transaction. Returns false
    /// when the client left.
    pub(super) async fn answer_lost_transaction(&mut self) -> Result<bool, ClientError> {
        let max = self.app.config().proxy.max_message_size;
        loop {
            while self.dropping {
                match self.up.scanner.next(&self.up.buf, |_| false)? {
                    Step::Body(n) => {
                        self.up.buf.advance(n);
                        self.dropping = !self.up.scanner.at_boundary();
                    }
                    _ => break,
                }
            }
            let mut out = BytesMut::new();
            let mut consumed = 0;
            while !self.dropping && self.lost_tx.is_some() {
                let Some(m) = frame::message(&self.up.buf[consumed..], max)? else {
                    break;
                };
                consumed += m.len;
                if m.tag == frontend::TERMINATE {
                    return Ok(false);
                }
                answer_in_lost_transaction(&mut self.lost_tx, m.tag, m.body, &mut out);
            }
            if consumed > 0 || self.lost_tx.is_none() {
                self.up.buf.advance(consumed);
                self.up.scanned = 0;
                self.up.scanner = Scanner::new(max);
                self.flight.reset();
                self.client
                    .send(&out)
                    .await
                    .map_err(ClientError::ClientIo)?;
                return Ok(true);
            }
            poll_fn(|cx| self.client.poll_read_ready(cx))
                .await
                .map_err(ClientError::ClientIo)?;
            self.up.reserve();
            match self.client.try_read_buf(&mut self.up.buf) {
                Ok(0) => return Ok(false),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(ClientError::ClientIo(e)),
            }
        }
    }
}

impl Session {
    /// The server under the client's requests was lost: the session ends
    /// with it (session mode, pinned), a held read runs again elsewhere, a
    /// recorded transaction is replayed, or the client hears 08006.
    pub(super) async fn server_lost(
        &mut self,
        e: std::io::Error,
        held: &mut Option<Lease>,
    ) -> Result<Attachment, ClientError> {
        let Some(lease) = held.as_mut() else {
            return Ok(Attachment::Detached);
        };
        if self.mode == PoolMode::Session || self.pinned.is_some() {
            let addr = lease.pool().shared_addr().clone();
            *held = None;
            if self.flight.tx != TxStatus::Idle && self.app.config().failover.replay {
                self.app.metrics.refuse_replay(ReplayRefusal::Pinned);
            }
            return self.end_session(&addr, e).await;
        }
        if self.replay.is_some() {
            let addr = lease.pool().shared_addr().clone();
            *held = None;
            if let Some(ended) = self.ended_on_purpose(&addr).await {
                return self.answer_terminated_read(ended).await;
            }
            tracing::warn!(server = %addr, error = %e, "server lost before answering a read; running it elsewhere");
            self.retried("server_lost");
            self.target.cluster.nudge(&addr);
            self.rerun = Some(Rerun::Elsewhere(addr));
            *held = None;
            self.forget_fresh();
            self.detach(None, false);
            self.restore_replay()?;
            return Ok(Attachment::Detached);
        }
        if self.flight.record.is_some() {
            let addr = lease.pool().shared_addr().clone();
            let pid = lease.server_key().pid;
            tracing::warn!(server = %addr, error = %e, "server lost in a transaction; replaying it");
            self.target.cluster.nudge(&addr);
            self.registered.info.cancel.detach();
            *held = None;
            match self.replay(&addr, pid).await? {
                Some(lease) => *held = Some(lease),
                None => self.report_server_lost(e).await?,
            }
            return Ok(Attachment::Detached);
        }
        tracing::warn!(server = %lease.pool().addr(), error = %e, "server connection lost");
        self.target.cluster.nudge(lease.pool().addr());
        self.registered.info.cancel.detach();
        // Dropping the lease closes the dead connection.
        *held = None;
        if self.replays && self.flight.owed {
            // Begun without BEGIN, or pipelined after another.
            let outcome_unknown = self.flight.tx == TxStatus::Idle;
            self.app.metrics.refuse_replay(if outcome_unknown {
                ReplayRefusal::CommitSent
            } else {
                ReplayRefusal::NotRecorded
            });
        }
        self.report_server_lost(e).await?;
        Ok(Attachment::Detached)
    }
}

/// One client message in a lost transaction, answered as PostgreSQL would
/// in a failed one.
fn answer_in_lost_transaction(lost: &mut Option<LostTx>, tag: u8, body: &[u8], out: &mut BytesMut) {
    let Some(mut state) = *lost else { return };
    let ends =
        |sql: Option<&[u8]>| matches!(sql.map(classify), Some(Class::Rollback | Class::Commit));
    let failed = |out: &mut BytesMut, state: &mut LostTx| {
        let err = if state.announce {
            ClientError::ServerLostInTransaction(std::io::ErrorKind::ConnectionReset.into())
        } else {
            ClientError::TransactionLost
        };
        err.write_response(out, true);
        state.announce = false;
    };
    match tag {
        frontend::QUERY => {
            if ends(frontend::query(body).ok()) {
                build::command_complete(out, "ROLLBACK");
                build::ready_for_query(out, TxStatus::Idle);
                *lost = None;
                return;
            }
            failed(out, &mut state);
            build::ready_for_query(out, TxStatus::Failed);
            state = LostTx {
                announce: state.announce,
                ..LostTx::default()
            };
        }
        frontend::PARSE if !state.errored && ends(body.split(|&b| b == 0).nth(1)) => {
            state.ending = true;
            build::parse_complete(out);
        }
        frontend::BIND if state.ending => build::bind_complete(out),
        frontend::DESCRIBE if state.ending => build::no_data(out),
        frontend::EXECUTE if state.ending => build::command_complete(out, "ROLLBACK"),
        frontend::SYNC => {
            let status = if state.ending {
                TxStatus::Idle
            } else {
                TxStatus::Failed
            };
            build::ready_for_query(out, status);
            if state.ending {
                *lost = None;
                return;
            }
            state = LostTx {
                announce: state.announce,
                ..LostTx::default()
            };
        }
        _ if !state.errored && !state.ending => {
            failed(out, &mut state);
            state.errored = true;
        }
        _ => {}
    }
    *lost = Some(state);
}
