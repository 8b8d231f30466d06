//! One direction of a proxied connection: bytes read and not yet written,
//! how far they were scanned for message boundaries, and the scanner.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use pgheal_protocol::frame::Scanner;
use tokio::io::AsyncWrite;

/// Bytes read per call when a buffer runs low.
pub(crate) const READ_CHUNK: usize = 16 * 1024;
/// Stop reading from one side while this much waits to be written to the
/// other: back-pressure instead of buffering.
pub(crate) const MAX_PENDING: usize = 256 * 1024;

/// One direction of the stream: bytes read but not yet written, the prefix
/// that was scanned (and so may be written), and where messages end.
pub(crate) struct Flow {
    pub(crate) buf: BytesMut,
    pub(crate) scanned: usize,
    pub(crate) scanner: Scanner,
}

impl Flow {
    pub(crate) fn new(max_message: usize) -> Self {
        Flow::with_scanner(Scanner::new(max_message))
    }

    pub(crate) fn with_scanner(scanner: Scanner) -> Self {
        Flow {
            buf: BytesMut::new(),
            scanned: 0,
            scanner,
        }
    }

    pub(crate) fn reserve(&mut self) {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK);
        }
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.buf.advance(n);
        self.scanned -= n;
    }

    /// Drops everything buffered, keeping the scanner's place.
    pub(crate) fn clear(&mut self) {
        self.buf.clear();
        self.scanned = 0;
    }

    pub(crate) fn shrink(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }
}

/// Writes what is scanned in `flow`; `Ready(Ok(0))` when there is nothing.
pub(crate) fn write_some<W: AsyncWrite + Unpin>(
    cx: &mut Context<'_>,
    w: &mut W,
    flow: &mut Flow,
) -> Poll<io::Result<usize>> {
    if flow.scanned == 0 {
        return Poll::Ready(Ok(0));
    }
    match Pin::new(w).poll_write(cx, &flow.buf[..flow.scanned]) {
        Poll::Ready(Ok(0)) => Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
        Poll::Ready(Ok(n)) => {
            flow.advance(n);
            Poll::Ready(Ok(n))
        }
        other => other,
    }
}
