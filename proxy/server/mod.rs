//! The accept loop (one task per client, the admin console or a session)
//! and the process's life: startup, signals, reload, shutdown.

pub mod run;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use pgheal_protocol::build;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::frontend::clients::ClientSlot;
use crate::frontend::error::ClientError;
use crate::frontend::login::{self, Handshake};
use crate::frontend::session::Session;
use crate::frontend::App;
use crate::net::stream::Stream;

/// A running proxy.
pub struct Running {
    pub addr: SocketAddr,
    /// Where the HTTP endpoints listen, when configured.
    pub http_addr: Option<SocketAddr>,
    pub app: Arc<App>,
    accept: JoinHandle<()>,
}

impl Running {
    /// Stops accepting new clients.
    pub fn stop_accepting(&self) {
        self.accept.abort();
    }

    /// Runs until the accept loop ends.
    pub async fn wait(mut self) {
        let _ = (&mut self.accept).await;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Binds `[proxy] listen` and starts serving.
pub async fn start(config: Config) -> io::Result<Running> {
    let listener = TcpListener::bind(config.proxy.listen).await?;
    let addr = listener.local_addr()?;
    let http = config.proxy.http_listen;
    let app = App::new(config);
    let http_addr = match http {
        Some(at) => Some(crate::admin::http::start(app.clone(), at).await?),
        None => None,
    };
    let inherits = crate::net::tune_listener(&listener);
    let accept = tokio::spawn(accept_loop(listener, inherits, app.clone()));
    tracing::info!(%addr, "pgheal is listening");
    Ok(Running {
        addr,
        http_addr,
        app,
        accept,
    })
}

/// `tuned`: accepted sockets inherit the listener's options (see
/// `net::tune_listener`).
async fn accept_loop(listener: TcpListener, tuned: bool, app: Arc<App>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = app.shutdown.cancelled() => {
                tracing::info!("shutting down: no longer accepting clients");
                return;
            }
        };
        match accepted {
            Ok((stream, peer)) => {
                if !tuned {
                    crate::net::tune(&stream);
                }
                match ClientSlot::take(&app) {
                    Some(slot) => {
                        // Boxed: the task then holds a pointer, and spawning
                        // it moves 8 bytes instead of the whole future
                        // (several copies per login, in tokio).
                        tokio::spawn(Box::pin(serve(app.clone(), stream, peer, slot)));
                    }
                    None => {
                        tokio::spawn(refuse(app.clone(), stream, peer));
                    }
                }
            }
            Err(e) => {
                // Out of file descriptors and the like: back off briefly.
                tracing::error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Beyond `max_client_connections`: FATAL 53300 and close, without
/// reading anything; clients already in are not affected.
async fn refuse(app: Arc<App>, stream: TcpStream, peer: SocketAddr) {
    let max = app.config().proxy.max_client_connections;
    let e = ClientError::TooManyClients(max);
    tracing::warn!(%peer, error = %e, "client refused");
    let mut out = BytesMut::new();
    e.write_response(&mut out, false);
    let mut stream = Stream::Plain(stream);
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.send(&out)).await;
}

async fn serve(app: Arc<App>, stream: TcpStream, peer: SocketAddr, slot: ClientSlot) {
    // The handshake's state is boxed, and freed when it ends: the task
    // then holds only the session's, until the client rests (session::rest)
    // and the task ends. (A task of its own for the session would cost a
    // spawn and a copy of its future per login.)
    let Some(client) = Box::pin(login(&app, stream, peer)).await else {
        return;
    };
    session(app, client, peer, slot).await;
}

async fn session(
    app: Arc<App>,
    mut client: Box<login::LoggedIn>,
    peer: SocketAddr,
    slot: ClientSlot,
) {
    let Some(target) = client.target.take() else {
        let user = client.user.clone();
        // Boxed: the console's state is not carried in every session's task.
        if let Err(e) = Box::pin(crate::admin::console::serve(app, client)).await {
            tracing::info!(%peer, %user, error = %e, "admin console closed");
        }
        return;
    };
    let database = &target.database.name;
    tracing::info!(%peer, user = %client.user, %database, "client logged in");
    let tls = client.stream.is_tls();
    let registered = app.clients.add(peer, &client.user, database, tls);
    let session = Box::new(Session::new(app, target, *client, registered, slot));
    crate::frontend::session::live(session).await;
}

/// The handshake; a failure is answered here.
async fn login(
    app: &Arc<App>,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<Box<login::LoggedIn>> {
    match login::handshake(app, stream).await {
        Ok(Handshake::Cancelled) => None,
        Ok(Handshake::Client(c)) => Some(c),
        Err(mut failed) => {
            let e = &failed.error;
            tracing::info!(%peer, error = %e, "login failed");
            let mut out = BytesMut::new();
            if failed.authenticated {
                build::auth_ok(&mut out);
            }
            if e.write_response(&mut out, false) {
                let _ = failed.stream.send(&out).await;
            }
            None
        }
    }
}
