//! Transaction replay: a transaction whose server died before the message
//! that ends it was sent runs again, unseen, on the primary.
//!
//! The client's messages since its `BEGIN` are sent again, in order, to a
//! server of the current primary (prepared statements are prepared there
//! as for any new server). The replies that cover what the client was
//! already passed are not sent again: their digest is compared with the
//! digest of what it was passed. Equal, the client carries on, and the
//! replies it had not had yet flow to it as usual. Different (the
//! transaction read `now()`, a sequence, or rows that changed since), the
//! new server's connection is closed, which rolls the replay back, and the
//! client hears 08006 and then 25P02 as if nothing had been tried.
//!
//! Replayed only when the transaction never reached its end (no `COMMIT`,
//! `END`, `ROLLBACK` or `PREPARE TRANSACTION` was read from the client):
//! nothing of it can have been committed, so running it again is what the
//! client would do on an error, without the error.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use pgheal_protocol::backend::{ErrorFields, TxStatus};
use pgheal_protocol::frame::Scanner;
use pgheal_protocol::sqlstate;
use tokio::time::Instant;
use xxhash_rust::xxh3::Xxh3;

use super::record::TxRecord;
use super::{PumpEnd, Rerun, Session};
use crate::backend::pool::Lease;
use crate::backend::router::Intent;
use crate::backend::statements::ClientStatements;
use crate::frontend::error::ClientError;
use crate::metrics::ReplayRefusal;

/// Why a replay did not carry the client on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failed {
    /// Its replies differed from what the client had been passed.
    Mismatch,
    Refused(ReplayRefusal),
}

/// What a replay must reproduce before the client sees anything of it.
pub(super) struct Verify {
    /// Bytes of the replay's replies still to compare.
    remaining: u64,
    hash: Xxh3,
    /// The digest of the bytes the client was passed.
    expected: u64,
    /// Requests that were still unanswered when the server was lost: a
    /// replay that answers more before it reproduced everything differs.
    unanswered: u32,
    /// The transaction's last message ends a request: once every request
    /// is answered, nothing more comes.
    settled: bool,
}

/// The session as the server loss left it, to answer as without replay
/// when the replay cannot be done.
struct Before {
    up: BytesMut,
    scanned: usize,
    scanner: Scanner,
    pending: u32,
    awaiting: bool,
    tx: TxStatus,
    /// The client's statements, when the transaction changed them.
    statements: Option<ClientStatements>,
}

impl Session {
    /// The server died under a recorded transaction: runs it again on the
    /// primary. `Some` is the server the client now carries on with; on
    /// `None` the session is as the loss left it.
    pub(super) async fn replay(
        &mut self,
        lost: &Arc<str>,
        lost_pid: i32,
    ) -> Result<Option<Lease>, ClientError> {
        let refusal = match self.replay_refusal() {
            Some(reason) => Some(reason),
            None => self.ended_on_purpose_by(lost).await,
        };
        if let Some(reason) = refusal {
            tracing::info!(server = %lost, reason = reason.as_str(), "transaction not replayed");
            self.app.metrics.refuse_replay(reason);
            self.flight.record = None;
            return Ok(None);
        }
        let Some(record) = self.flight.record.take() else {
            return Ok(None);
        };
        // What the lost server said before it died is the client's.
        self.deliver_answered().await?;
        let (before, verify) = self.rewind(record);
        match self.rerun_transaction(lost, lost_pid, verify).await {
            Ok(lease) => {
                tracing::info!(server = %lease.pool().addr(), "transaction replayed");
                self.app.metrics.transactions_replayed.inc();
                Ok(Some(lease))
            }
            Err(failed) => {
                tracing::warn!(server = %lost, ?failed, "transaction replay failed");
                match failed {
                    Failed::Mismatch => {
                        self.app.metrics.replay_mismatches.inc();
                    }
                    Failed::Refused(reason) => self.app.metrics.refuse_replay(reason),
                }
                self.restore(before);
                Ok(None)
            }
        }
    }

    /// Why the transaction running when the server was lost cannot be
    /// replayed, known without asking anyone.
    fn replay_refusal(&self) -> Option<ReplayRefusal> {
        let record = self.flight.record.as_ref()?;
        if let Some(reason) = record.refused {
            return Some(reason);
        }
        if record.replayed {
            return Some(ReplayRefusal::Replayed);
        }
        if record.ending || self.dropping {
            return Some(ReplayRefusal::CommitSent);
        }
        let partial = self.down.scanner.scanned_of_current();
        (partial > self.down.scanned).then_some(ReplayRefusal::MessageCut)
    }

    /// A FATAL before the loss: replayed when the node crashed, or a probe
    /// finds it down, shutting down or in another role; not when the node
    /// stays up and ended this one session on purpose.
    async fn ended_on_purpose_by(&mut self, lost: &str) -> Option<ReplayRefusal> {
        let fatal = self.flight.fatal.clone()?;
        let crashed = ErrorFields::parse(fatal.get(5..).unwrap_or_default())
            .is_ok_and(|f| f.code == sqlstate::CRASH_SHUTDOWN.code().as_bytes());
        if crashed {
            return None;
        }
        self.ended_on_purpose(lost)
            .await
            .map(|_| ReplayRefusal::SessionEnded)
    }

    /// Sends the client the whole messages the lost server answered with.
    async fn deliver_answered(&mut self) -> Result<(), ClientError> {
        self.drop_cut_reply();
        let answered = self.down.buf.split_to(self.down.scanned);
        self.down.clear();
        self.down.scanner = super::server_scanner();
        self.client
            .send(&answered)
            .await
            .map_err(ClientError::ClientIo)
    }

    /// Puts the transaction's messages back as if the client had just sent
    /// them (and then whatever it sent after), and notes what the replay
    /// must reproduce. Returns the session as it was, and what to check.
    fn rewind(&mut self, mut record: Box<TxRecord>) -> (Before, Box<Verify>) {
        let settled = record.ends_with_request();
        let log = std::mem::take(&mut record.log);
        // The statements as the transaction found them, for it to change
        // them again.
        let statements = record
            .statements_before
            .take()
            .map(|before| std::mem::replace(&mut self.statements, before));
        let before = Before {
            up: self.up.buf.clone(),
            scanned: self.up.scanned,
            scanner: self.up.scanner.clone(),
            pending: self.flight.pending,
            awaiting: self.flight.awaiting,
            tx: self.flight.tx,
            statements,
        };
        let mut again = log;
        again.extend_from_slice(&self.up.buf[self.up.scanned..]);
        self.forget_sent();
        self.flight.reset();
        self.up.buf = again;
        self.up.scanned = 0;
        self.up.scanner = Scanner::new(self.app.config().proxy.max_message_size);
        let verify = Box::new(Verify {
            remaining: record.delivered,
            hash: Xxh3::new(),
            expected: record.digest(),
            unanswered: before.pending,
            settled,
        });
        (before, verify)
    }

    /// The session as the loss left it, the replay forgotten.
    fn restore(&mut self, before: Before) {
        self.verify = None;
        self.forget_sent();
        self.flight.reset();
        self.registered.info.cancel.detach();
        self.down.clear();
        self.down.scanner = super::server_scanner();
        self.up.buf = before.up;
        self.up.scanned = before.scanned;
        self.up.scanner = before.scanner;
        self.flight.pending = before.pending;
        self.flight.awaiting = before.awaiting;
        self.flight.owed = true;
        self.flight.tx = before.tx;
        if let Some(statements) = before.statements {
            self.statements = statements;
        }
    }

    /// Runs the rewound transaction on the primary until the client was
    /// passed again everything it had been.
    async fn rerun_transaction(
        &mut self,
        lost: &Arc<str>,
        lost_pid: i32,
        verify: Box<Verify>,
    ) -> Result<Lease, Failed> {
        let failed = Failed::Refused(ReplayRefusal::ReplayFailed);
        self.scan_up().map_err(|_| failed)?;
        if let Some(r) = self.flight.record.as_mut() {
            r.replayed = true;
        }
        let mut lease = self.replay_server(lost, lost_pid).await?;
        tracing::debug!(server = %lease.pool().addr(), to_check = verify.remaining, "replaying");
        if verify.remaining == 0 {
            // The client had nothing of this transaction yet.
            return Ok(lease);
        }
        self.verify = Some(verify);
        let limit = self.app.config().failover.replay_timeout;
        let end = tokio::time::timeout(limit, poll_fn(|cx| self.poll_pump(cx, lease.conn()))).await;
        self.verify = None;
        match end {
            Ok(PumpEnd::Verified) => Ok(lease),
            Ok(PumpEnd::Mismatch) => Err(Failed::Mismatch),
            Ok(other) => {
                tracing::warn!(end = ?other, "the replay's server connection ended");
                Err(failed)
            }
            Err(_) => Err(failed),
        }
    }

    /// A server of the primary for the replay, waiting up to `write_wait`
    /// for one. The lost connection's own node only once a probe since the
    /// loss found it primary, and its old backend (and the locks it held)
    /// is gone.
    async fn replay_server(&mut self, lost: &Arc<str>, lost_pid: i32) -> Result<Lease, Failed> {
        let no_primary = Failed::Refused(ReplayRefusal::NoPrimary);
        let since = std::time::Instant::now();
        let deadline = Instant::now() + self.app.config().failover.write_wait;
        self.target.cluster.nudge(lost);
        loop {
            if self.probed_since(lost, since) {
                self.intent = Intent::Write;
                let pool = self
                    .route(Some(&Rerun::OnPrimary))
                    .await
                    .map_err(|_| no_primary)?;
                match self.checkout(&pool).await {
                    Ok(mut lease) if pool.shared_addr() == lost => {
                        if backend_gone(&mut lease, lost_pid, deadline).await {
                            return Ok(lease);
                        }
                    }
                    Ok(lease) => return Ok(lease),
                    Err(e) => {
                        tracing::debug!(server = %pool.addr(), error = %e, "no server for the replay yet");
                        self.target.cluster.nudge(pool.addr());
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(no_primary);
            }
            let wait = tokio::time::sleep(Duration::from_millis(50));
            let _ = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    _ = self.topology.changed() => {}
                    _ = wait => {}
                }
            })
            .await;
        }
    }

    /// Whether a probe of `node` ended after `since` (its role then says
    /// what became of it).
    fn probed_since(&self, node: &str, since: std::time::Instant) -> bool {
        let topology = self.target.cluster.snapshot();
        let status = topology.nodes.iter().find(|n| &*n.addr == node);
        status.is_none_or(|n| n.checked_at.is_some_and(|at| at > since))
    }

    /// While a replay runs: takes the replies that cover what the client
    /// was passed out of `down`, and says when they all matched or not.
    pub(super) fn check_replay(&mut self) -> Option<PumpEnd> {
        let v = self.verify.as_mut()?;
        let n = (v.remaining.min(self.down.scanned as u64)) as usize;
        tracing::trace!(
            n,
            remaining = v.remaining,
            pending = self.flight.pending,
            "replay replies"
        );
        v.hash.update(&self.down.buf[..n]);
        self.down.advance(n);
        v.remaining -= n as u64;
        if v.remaining == 0 {
            let same = v.hash.digest() == v.expected;
            return Some(if same {
                PumpEnd::Verified
            } else {
                PumpEnd::Mismatch
            });
        }
        let pending = self.flight.pending;
        let answered_more = pending < v.unanswered || (v.settled && pending == 0);
        answered_more.then_some(PumpEnd::Mismatch)
    }
}

/// Waits until the backend `pid` no longer exists on `lease`'s node.
async fn backend_gone(lease: &mut Lease, pid: i32, deadline: Instant) -> bool {
    let sql = format!("SELECT 1 FROM pg_stat_activity WHERE pid = {pid}");
    loop {
        match lease.conn().query_rows(&sql).await {
            Ok(rows) if rows.is_empty() => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
        if Instant::now() >= deadline {
            return false;
        }
        tracing::debug!(pid, "the lost connection's backend is still there; waiting");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
