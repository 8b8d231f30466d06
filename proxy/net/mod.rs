//! The byte stream on both sides: plain TCP or TLS, socket options, and
//! the buffers of one direction of a proxied connection.

pub mod flow;
pub mod stream;
pub mod tls;

use std::cell::Cell;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

thread_local! {
    static SHARD: Cell<u16> = const { Cell::new(NO_SHARD) };
}

/// Not a shard's thread.
pub const NO_SHARD: u16 = u16::MAX;

/// The shard whose thread this is (see `server::shards`), or [`NO_SHARD`]:
/// a socket opened here is watched by that thread's runtime.
pub fn shard() -> u16 {
    SHARD.with(Cell::get)
}

/// Marks this thread as shard `i`'s.
pub fn set_shard(i: u16) {
    SHARD.with(|s| s.set(i));
}

/// TCP_NODELAY and keepalive, so small messages go out at once and a
/// vanished peer is noticed.
pub fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    let _ = SockRef::from(stream).set_tcp_keepalive(&keepalive);
}
