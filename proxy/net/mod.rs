//! The byte stream on both sides: plain TCP or TLS, socket options, and
//! the buffers of one direction of a proxied connection.

pub mod flow;
pub mod stream;
pub mod tls;

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

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
