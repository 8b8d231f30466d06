//! One direction of a proxied connection: bytes read and not yet written,
//! how far they were scanned for message boundaries, and the scanner.

use std::cell::RefCell;
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
        if self.buf.capacity() == 0 {
            self.buf = spare::take();
        }
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK);
        }
    }

    /// [`Flow::reserve`] for a flow that holds a buffer; one that gave it
    /// up stays without.
    pub(crate) fn reserve_if_held(&mut self) {
        if self.buf.capacity() > 0 {
            self.reserve();
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

    /// Gives the buffer up while it is empty: an idle connection holds
    /// none (it goes back to this thread's spares).
    pub(crate) fn shrink(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            spare::give(std::mem::take(&mut self.buf));
        }
    }
}

impl Drop for Flow {
    /// A connection that ends gives its buffer to the spares: the next
    /// login on this thread reads into it.
    fn drop(&mut self) {
        if self.buf.capacity() > 0 {
            spare::give(std::mem::take(&mut self.buf));
        }
    }
}

/// Empty read buffers kept per thread for the next transaction: a client
/// gives its buffers up whenever it goes idle (so that thousands of idle
/// clients hold none), and takes them back at its next request without a
/// round through the allocator; a connection that ends leaves them for the
/// next. At most `MAX` per thread (1 MiB).
pub(crate) mod spare {
    use super::{BytesMut, RefCell, READ_CHUNK};

    const MAX: usize = 64;

    thread_local! {
        static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    }

    /// An empty buffer of at least `READ_CHUNK` bytes.
    pub(crate) fn take() -> BytesMut {
        SPARE
            .with(|s| s.borrow_mut().pop())
            .unwrap_or_else(|| BytesMut::with_capacity(READ_CHUNK))
    }

    /// Keeps an empty buffer of a usual size for `take`; others are freed.
    pub(crate) fn give(mut buf: BytesMut) {
        buf.clear();
        // The room already read past comes back without allocating (or
        // the buffer is not one of ours: too small, or shared).
        if !buf.try_reclaim(READ_CHUNK) || buf.capacity() > 4 * READ_CHUNK {
            return;
        }
        // (Not at all while the thread ends: its spares are gone.)
        let _ = SPARE.try_with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < MAX {
                s.push(buf);
            }
        });
    }

    /// Frees this thread's spares beyond `n`: when its clients go quiet
    /// (they rest), the buffers kept for busy times need not stay.
    pub(crate) fn keep_at_most(n: usize) {
        SPARE.with(|s| s.borrow_mut().truncate(n));
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn quiet_threads_keep_few_spares() {
            let bufs: Vec<_> = (0..10).map(|_| super::take()).collect();
            bufs.into_iter().for_each(super::give);
            super::keep_at_most(2);
            let kept = super::SPARE.with(|s| s.borrow().len());
            assert_eq!(kept, 2);
        }

        #[test]
        fn a_connection_that_ends_leaves_its_buffer_to_the_next() {
            let spares = || super::SPARE.with(|s| s.borrow().len());
            let mut flow = super::super::Flow::new(1 << 20);
            flow.reserve();
            flow.buf.extend_from_slice(b"Q\0\0\0\x05;");
            assert_eq!(spares(), 0);
            drop(flow);
            assert_eq!(spares(), 1, "the buffer is kept, emptied");
            let next = super::take();
            assert!(next.is_empty() && next.capacity() >= super::READ_CHUNK);
            drop(super::super::Flow::new(1 << 20));
            assert_eq!(spares(), 0, "a flow that never read leaves nothing");
        }

        #[test]
        fn buffers_come_back_empty_and_whole() {
            let mut b = super::take();
            assert!(b.capacity() >= super::READ_CHUNK);
            b.extend_from_slice(&[1; 100]);
            let _ = b.split_to(100);
            super::give(b);
            let again = super::take();
            assert!(again.is_empty());
            assert!(again.capacity() >= super::READ_CHUNK);
            // A buffer grown large, or a small one, is not kept.
            super::give(bytes::BytesMut::with_capacity(1 << 20));
            super::give(bytes::BytesMut::with_capacity(64));
            let next = super::take();
            assert!(next.capacity() >= super::READ_CHUNK && next.capacity() < 1 << 20);
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
