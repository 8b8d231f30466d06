//! The data path of one attachment: bytes both ways, headers scanned,
//! ReadyForQuery/ParameterStatus/ErrorResponse read whole.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Buf;
use pgheal_protocol::backend::{self, TxStatus};
use pgheal_protocol::effects;
use pgheal_protocol::frame::{FrameError, Scanner, Step, HEADER_LEN};
use pgheal_protocol::frontend;
use pgheal_protocol::sqlstate;
use tokio_util::io::poll_read_buf;

use super::replies::{self, Reply};
use super::{translate, PumpEnd, Rerun, Session};
use crate::backend::conn::ServerConn;
use crate::config::PoolMode;
use crate::frontend::TargetStats;
use crate::net::flow::{write_some, MAX_PENDING};
use crate::net::stream::Stream;
use tokio::io::AsyncWrite;

/// Flushes a TLS stream; plain TCP has nothing to flush.
fn flush_tls(cx: &mut Context<'_>, stream: &mut Stream) -> Poll<io::Result<()>> {
    if !stream.is_tls() {
        return Poll::Ready(Ok(()));
    }
    Pin::new(stream).poll_flush(cx)
}

/// What one read in the pump found.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Read {
    /// Bytes, or the end of the stream.
    Got,
    /// Nothing yet: the task is woken when something arrives.
    Waits,
    /// Not read (back-pressure, or the side is done).
    NotTried,
}

impl Read {
    /// Whether it made progress, and whether that side now waits.
    fn outcome(self) -> (bool, bool) {
        (self == Read::Got, self == Read::Waits)
    }
}

impl Session {
    /// Puts the kept request of a read back as if the client had just sent
    /// it, and forgets what the server said.
    pub(super) fn restore_replay(&mut self) -> Result<(), FrameError> {
        let Some(request) = self.replay.take() else {
            return Ok(());
        };
        self.forget_fresh();
        let max = self.app.config().proxy.max_message_size;
        self.down.clear();
        self.down.scanner = super::server_scanner();
        self.forget_sent();
        self.up.buf = request;
        self.up.scanned = 0;
        self.up.scanner = Scanner::new(max);
        self.holding = false;
        self.flight.reset();
        self.scan_up()
    }

    /// A Query's start is in `up` at `scanned`: a statement that needs its
    /// database to itself gets pgheal's idle connections out of the way.
    fn before_query(&mut self, len: usize) {
        let start = self.up.scanned + HEADER_LEN;
        let end = (self.up.scanned + len).min(self.up.buf.len());
        let Some(sql) = self.up.buf.get(start..end) else {
            return;
        };
        if let Some(dbname) = effects::exclusive_database(sql) {
            self.app.release_database(&dbname);
        }
    }

    pub(super) fn scan_up(&mut self) -> Result<(), FrameError> {
        let translating = self.translating;
        loop {
            let step = self.up.scanner.next(&self.up.buf[self.up.scanned..], |t| {
                translating && translate::whole(t)
            })?;
            match step {
                Step::NeedMore => return Ok(()),
                Step::Body(n) if self.dropping => {
                    self.up.buf.advance(n);
                    self.dropping = !self.up.scanner.at_boundary();
                    continue;
                }
                Step::Header { tag, .. } if tag == frontend::TERMINATE => {
                    self.up.buf.truncate(self.up.scanned);
                    self.terminated = true;
                    return Ok(());
                }
                Step::Header { tag, .. } | Step::Whole { tag, .. } => {
                    self.record_up(step);
                    if self.tx_started.is_none() {
                        let now = std::time::Instant::now();
                        self.tx_started = Some(now);
                        self.ended_at = None;
                        self.note_return(now);
                    }
                    if self.holding {
                        // More from the client: the kept request is no
                        // longer all of it; answer as it comes.
                        self.forget_replay();
                        self.holding = false;
                    }
                    if let (frontend::QUERY, Step::Header { len, .. } | Step::Whole { len, .. }) =
                        (tag, step)
                    {
                        self.before_query(len);
                    }
                    if matches!(
                        tag,
                        frontend::QUERY | frontend::SYNC | frontend::FUNCTION_CALL
                    ) {
                        self.flight.pending += 1;
                    }
                    self.flight.owed = true;
                    self.flight.awaiting = true;
                }
                _ => self.record_up(step),
            }
            self.up.scanned += step.consumed();
        }
    }

    pub(super) fn scan_down(&mut self, conn: &mut ServerConn) -> Result<(), FrameError> {
        let translating = self.translating;
        // Transaction mode gives clients a pid of pgheal's: notifications
        // from the client's own server session get it too.
        let own_pid = self.mode == PoolMode::Transaction;
        let whole = |t| {
            matches!(
                t,
                backend::READY_FOR_QUERY | backend::PARAMETER_STATUS | backend::ERROR_RESPONSE
            ) || (translating && replies::tracked(t))
                || (own_pid && t == backend::NOTIFICATION_RESPONSE)
        };
        loop {
            let start = self.down.scanned;
            let step = self.down.scanner.next(&self.down.buf[start..], whole)?;
            if let (true, Step::Header { tag, .. } | Step::Whole { tag, .. }) = (self.holding, step)
            {
                self.watch_held_message(tag, start, step.consumed());
            }
            if let (true, Step::Whole { tag, len }) = (translating, step) {
                // Taken out for a moment so that the body can be read while
                // the session changes.
                let buf = std::mem::take(&mut self.down.buf);
                let reply = self.on_reply(conn, tag, &buf[start + HEADER_LEN..start + len]);
                self.down.buf = buf;
                match reply {
                    Reply::Keep => {}
                    Reply::Drop => {
                        self.splice_down(start, len, &[]);
                        continue;
                    }
                    Reply::Replace(with) => {
                        self.splice_down(start, len, &with);
                        self.down.scanned += with.len();
                        self.record_replaced(&with);
                        continue;
                    }
                }
            }
            match step {
                Step::Whole { tag, len } if !self.on_server_message(conn, tag, start, len) => {
                    continue;
                }
                Step::NeedMore => return Ok(()),
                _ => {}
            }
            self.down.scanned += step.consumed();
            if self.flight.record.is_some() {
                let ready = matches!(
                    step,
                    Step::Whole {
                        tag: backend::READY_FOR_QUERY,
                        ..
                    }
                );
                self.record_down(start, step.consumed(), ready);
            }
        }
    }

    /// A message of the answer to a held read (only the header is certain
    /// to be there, unless it is read whole).
    fn watch_held_message(&mut self, tag: u8, start: usize, len: usize) {
        let message = &self.down.buf[start..start + len];
        let error = (tag == backend::ERROR_RESPONSE)
            .then(|| {
                backend::ErrorFields::parse(message.get(HEADER_LEN..).unwrap_or_default()).ok()
            })
            .flatten();
        let read_only = error
            .as_ref()
            .is_some_and(|f| f.code == sqlstate::READ_ONLY_SQL_TRANSACTION.code().as_bytes());
        // A FATAL is the server going away, not an answer: the read stays
        // ready to run elsewhere.
        let fatal = error
            .as_ref()
            .is_some_and(|f| matches!(f.severity, b"FATAL" | b"PANIC"));
        let stale = error.as_ref().is_some_and(replies::stale_plan);
        if !fatal {
            self.watch_held_answer(tag, read_only, stale);
        }
    }

    /// ReadyForQuery, ErrorResponse or ParameterStatus at `start`. False
    /// when the message was taken out (a FATAL: the server is leaving).
    fn on_server_message(
        &mut self,
        conn: &mut ServerConn,
        tag: u8,
        start: usize,
        len: usize,
    ) -> bool {
        let body = &self.down.buf[start + HEADER_LEN..start + len];
        match tag {
            backend::READY_FOR_QUERY => {
                self.flight.tx = TxStatus::parse(body).unwrap_or(TxStatus::Failed);
                self.flight.pending = self.flight.pending.saturating_sub(1);
                self.count_ready();
                if self.flight.pending == 0 {
                    self.flight.awaiting = false;
                    self.flight.owed &= self.flight.tx != TxStatus::Idle;
                }
            }
            backend::ERROR_RESPONSE => {
                let fields = backend::ErrorFields::parse(body).unwrap_or_default();
                if fields.code == sqlstate::READ_ONLY_SQL_TRANSACTION.code().as_bytes() {
                    // A node taken for the primary refuses writes: re-probe it.
                    self.target.cluster.nudge(&conn.addr);
                }
                if matches!(fields.severity, b"FATAL" | b"PANIC") {
                    // The server is going away. Held back: a client whose
                    // session it ends hears it when the connection closes;
                    // a pooled client hears 08006 (or a re-run) instead.
                    let message = fields.message_lossy();
                    tracing::warn!(server = %conn.addr, %message, "server is closing the connection");
                    self.flight.server_dying = true;
                    self.flight.fatal = Some(bytes::Bytes::copy_from_slice(
                        &self.down.buf[start..start + len],
                    ));
                    self.splice_down(start, len, &[]);
                    return false;
                }
            }
            backend::NOTIFICATION_RESPONSE => {
                // Transaction mode: the sender is named by the pid its
                // client knows (this client's own, or another's).
                let at = start + HEADER_LEN;
                let sender = self
                    .down
                    .buf
                    .get(at..at + 4)
                    .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                let client = match sender {
                    _ if self.mode != PoolMode::Transaction => None,
                    Some(pid) if pid == conn.key.pid => Some(self.cancel.key.pid),
                    Some(pid) => self.app.client_of_server(&conn.addr, pid),
                    None => None,
                };
                if let Some(pid) = client {
                    self.down.buf[at..at + 4].copy_from_slice(&pid.to_be_bytes());
                }
            }
            backend::PARAMETER_STATUS => {
                let _ = conn.note_parameter(body);
                if conn.reported.get("in_hot_standby") == Some("on") && !self.intent.reads_only() {
                    // PostgreSQL 14+ says the node went into recovery.
                    self.target.cluster.nudge(&conn.addr);
                }
            }
            _ => {}
        }
        true
    }

    /// A ReadyForQuery: one request answered; at idle, a transaction ended.
    fn count_ready(&mut self) {
        let metrics = &self.app.metrics;
        metrics.queries.inc();
        if self.flight.pending == 0 && self.flight.tx == TxStatus::Idle {
            metrics.transactions.inc();
            TargetStats::add(&self.target.stats.transactions);
            let now = std::time::Instant::now();
            if let Some(start) = self.tx_started.take() {
                metrics.transaction_took(now.saturating_duration_since(start));
            }
            self.ended_at = Some(now);
        }
    }

    /// Replaces the server message at `start` (`len` bytes) with `with`.
    fn splice_down(&mut self, start: usize, len: usize, with: &[u8]) {
        let tail = self.down.buf.split_off(start + len);
        self.down.buf.truncate(start);
        self.down.buf.extend_from_slice(with);
        self.down.buf.unsplit(tail);
    }

    /// While a read's answer is held back: a 25006 from a replica means run
    /// it on the primary, a statement gone stale means prepare it afresh
    /// and run it again; anything that is an answer lets it through.
    pub(super) fn watch_held_answer(&mut self, tag: u8, read_only_error: bool, stale: bool) {
        match tag {
            // Describing the result is not yet an answer.
            backend::ROW_DESCRIPTION
            | backend::PARSE_COMPLETE
            | backend::BIND_COMPLETE
            | backend::CLOSE_COMPLETE
            | backend::PARAMETER_DESCRIPTION
            | backend::NO_DATA
            | backend::PARAMETER_STATUS => {}
            // The request is answered in full without an error.
            backend::READY_FOR_QUERY if self.rerun.is_none() => {
                self.holding = false;
                self.forget_replay();
            }
            backend::READY_FOR_QUERY => {}
            backend::ERROR_RESPONSE if read_only_error => self.rerun = Some(Rerun::OnPrimary),
            // Prepared afresh and run again only when the client has not
            // learnt the statement's description yet (it prepared it in
            // this very request): else its driver must hear 0A000, as from
            // PostgreSQL, and describe it again.
            backend::ERROR_RESPONSE if stale && !self.flight.known_shape => {
                self.rerun = Some(Rerun::Replan)
            }
            backend::ERROR_RESPONSE if self.flight.shared_fresh && !self.flight.known_shape => {
                self.rerun = Some(Rerun::Unshared)
            }
            _ => {
                self.holding = false;
                self.forget_replay();
            }
        }
    }

    /// Counts a request that came soon after the client went idle.
    fn note_return(&mut self, now: std::time::Instant) {
        if let Some(since) = self.idle_since.take() {
            self.quick_returns = match now.saturating_duration_since(since) < super::QUICK_RETURN {
                true => self.quick_returns.saturating_add(1),
                false => 0,
            };
        }
    }

    pub(super) fn releasable(&self) -> bool {
        self.mode == PoolMode::Transaction && self.pinned.is_none() && self.idle()
    }

    /// Releasable as soon as what the server sent is passed on.
    fn ends_once_written(&self) -> bool {
        self.mode == PoolMode::Transaction
            && self.pinned.is_none()
            && !self.holding
            && self.server_done()
    }

    /// Nothing is owed either way: the server is idle and every byte was
    /// passed on.
    pub(super) fn idle(&self) -> bool {
        self.server_done() && self.down.buf.is_empty()
    }

    /// The server owes nothing and has been sent everything.
    fn server_done(&self) -> bool {
        !self.flight.owed
            && self.up.buf.is_empty()
            && self.up.scanner.at_boundary()
            && self.wire.buf.is_empty()
    }

    /// Moves bytes both ways until the attachment ends. Each side is read
    /// only while the other side's backlog is small.
    pub(super) fn poll_pump(
        &mut self,
        cx: &mut Context<'_>,
        conn: &mut ServerConn,
    ) -> Poll<PumpEnd> {
        // A side whose read was Pending in this call is not read again
        // in it: its waker is registered, and whatever arrives wakes the
        // task, which then polls again (a read that finds nothing costs a
        // registration on the socket's lock each time).
        let (mut server_waits, mut client_waits) = (false, false);
        // In the first pass, an answer that ends the attachment once
        // written spares the client a read: the idle wait that follows
        // looks at the client anyway. Later passes read it as before.
        let mut first_pass = true;
        loop {
            // The server first: when it died while this task waited its
            // turn, the loss is seen before the client's next message (a
            // COMMIT, say) is read and sent into it, so the transaction
            // can still run again elsewhere (`replay`).
            let mut progress = false;
            if !server_waits {
                match self.poll_server_read(cx, conn) {
                    Ok(read) => (progress, server_waits) = read.outcome(),
                    Err(end) => return Poll::Ready(end),
                }
            }
            if let Some(end) = self.check_replay() {
                return Poll::Ready(end);
            }
            if self.rerun.is_some() && self.flight.pending == 0 {
                return Poll::Ready(PumpEnd::Rerun);
            }
            let only_writes_left = first_pass && self.ends_once_written();
            first_pass = false;
            if !client_waits && !only_writes_left {
                match self.poll_client_read(cx) {
                    Ok(read) => {
                        let (got, waits) = read.outcome();
                        progress |= got;
                        client_waits = waits;
                    }
                    Err(end) => return Poll::Ready(end),
                }
            }
            if self.client_eof || (self.terminated && self.up.buf.is_empty()) {
                return Poll::Ready(PumpEnd::ClientGone);
            }
            if !self.flight.server_dying {
                if self.translating {
                    if let Err(e) = self.translate(conn) {
                        return Poll::Ready(PumpEnd::ClientBroke(e));
                    }
                }
                let out = if self.translating {
                    &mut self.wire
                } else {
                    &mut self.up
                };
                match write_some(cx, &mut conn.stream, out) {
                    Poll::Ready(Ok(n)) => progress |= n > 0,
                    Poll::Ready(Err(e)) => return Poll::Ready(PumpEnd::ServerLost(e)),
                    Poll::Pending => {}
                }
            }
            if !self.holding {
                match write_some(cx, &mut self.client, &mut self.down) {
                    Poll::Ready(Ok(n)) => {
                        self.app.metrics.bytes_out.inc_by(n as u64);
                        progress |= n > 0;
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(PumpEnd::ClientGone),
                    Poll::Pending => {}
                }
            }
            if let Some(poll) = self.settle(cx, conn, progress) {
                return poll;
            }
        }
    }

    /// After a round of reads and writes: flushes TLS and tells whether the
    /// attachment ends (Ready), waits (Pending), or goes on (None).
    fn settle(
        &mut self,
        cx: &mut Context<'_>,
        conn: &mut ServerConn,
        progress: bool,
    ) -> Option<Poll<PumpEnd>> {
        // TLS keeps what was written in its own buffer until flushed.
        let flushed = match flush_tls(cx, &mut self.client) {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(_)) => return Some(Poll::Ready(PumpEnd::ClientGone)),
            Poll::Pending => false,
        };
        if let Poll::Ready(Err(e)) = flush_tls(cx, &mut conn.stream) {
            return Some(Poll::Ready(PumpEnd::ServerLost(e)));
        }
        if flushed && self.closing && self.idle() {
            return Some(Poll::Ready(PumpEnd::Closing));
        }
        if flushed && self.releasable() {
            return Some(Poll::Ready(PumpEnd::Released));
        }
        if progress {
            return None;
        }
        if self.pinned.is_some() && !self.watching_shutdown && self.verify.is_none() {
            // Pinned now: the attachment outlives this transaction, so it
            // must hear a shutdown (see `Session::attached`).
            return Some(Poll::Ready(PumpEnd::Rewatch));
        }
        tracing::trace!(pending = self.flight.pending, owed = self.flight.owed, tx = ?self.flight.tx, up = self.up.buf.len(), wire = self.wire.buf.len(), down = self.down.buf.len(), expect = ?self.expect, "pump waits");
        Some(Poll::Pending)
    }

    fn poll_client_read(&mut self, cx: &mut Context<'_>) -> Result<Read, PumpEnd> {
        let backlog = self.up.scanned + self.wire.buf.len();
        if self.terminated
            || self.client_eof
            || self.flight.server_dying
            || backlog >= MAX_PENDING
            || self.verify.is_some()
        {
            return Ok(Read::NotTried);
        }
        self.up.reserve();
        match poll_read_buf(Pin::new(&mut self.client), cx, &mut self.up.buf) {
            Poll::Ready(Ok(0)) => {
                self.client_eof = true;
                Ok(Read::Got)
            }
            Poll::Ready(Ok(n)) => {
                self.app.metrics.bytes_in.inc_by(n as u64);
                self.scan_up().map_err(|e| PumpEnd::ClientBroke(e.into()))?;
                Ok(Read::Got)
            }
            Poll::Ready(Err(_)) => Err(PumpEnd::ClientGone),
            Poll::Pending => Ok(Read::Waits),
        }
    }

    fn poll_server_read(
        &mut self,
        cx: &mut Context<'_>,
        conn: &mut ServerConn,
    ) -> Result<Read, PumpEnd> {
        if self.down.scanned >= MAX_PENDING {
            return Ok(Read::NotTried);
        }
        self.down.reserve();
        match poll_read_buf(Pin::new(&mut conn.stream), cx, &mut self.down.buf) {
            Poll::Ready(Ok(0)) => Err(PumpEnd::ServerLost(io::ErrorKind::UnexpectedEof.into())),
            Poll::Ready(Ok(_)) => {
                // A server that breaks framing is as good as gone.
                self.scan_down(conn).map_err(|e| {
                    PumpEnd::ServerLost(io::Error::new(io::ErrorKind::InvalidData, e))
                })?;
                Ok(Read::Got)
            }
            Poll::Ready(Err(e)) => Err(PumpEnd::ServerLost(e)),
            Poll::Pending => Ok(Read::Waits),
        }
    }
}
