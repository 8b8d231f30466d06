//! The byte stream on both sides: plain TCP or TLS, socket options, and
//! the buffers of one direction of a proxied connection.

pub mod flow;
pub mod stream;
pub mod tls;

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream};

/// TCP_NODELAY and keepalive, so small messages go out at once and a
/// vanished peer is noticed.
pub fn tune(stream: &TcpStream) {
    set_options(SockRef::from(stream));
}

/// The same options on a listening socket, and whether the connections it
/// accepts inherit them: Linux makes an accepted socket as a copy of the
/// listener's, options included, so a login then needs no five system
/// calls of its own (`tune_listener_options_reach_accepted_sockets` checks
/// it). Elsewhere the accept loop tunes each connection.
pub fn tune_listener(listener: &TcpListener) -> bool {
    cfg!(target_os = "linux") && set_options(SockRef::from(listener))
}

fn set_options(socket: SockRef<'_>) -> bool {
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    let nodelay = socket.set_nodelay(true);
    let keepalive = socket.set_tcp_keepalive(&keepalive);
    nodelay.is_ok() && keepalive.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tune_listener_options_reach_accepted_sockets() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        assert_eq!(tune_listener(&listener), cfg!(target_os = "linux"));
        let addr = listener.local_addr().expect("address");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        if cfg!(target_os = "linux") {
            let sock = SockRef::from(&accepted);
            assert!(sock.nodelay().expect("getsockopt"));
            assert!(sock.keepalive().expect("getsockopt"));
            assert_eq!(
                sock.keepalive_time().expect("getsockopt"),
                Duration::from_secs(30)
            );
            assert_eq!(
                sock.keepalive_interval().expect("getsockopt"),
                Duration::from_secs(10)
            );
            assert_eq!(sock.keepalive_retries().expect("getsockopt"), 3);
        }
        // Only the accepted side: the client's own socket is not tuned.
        assert!(!SockRef::from(&client).keepalive().expect("getsockopt"));
    }
}
