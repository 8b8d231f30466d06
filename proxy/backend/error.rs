//! Why a server connection failed or could not be had, and which
//! failures leave another node or a later try safe.

use std::io;
use std::time::Duration;

use pgheal_protocol::sqlstate;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to server {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("server {addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("server {addr}: {message}")]
    Server {
        addr: String,
        code: String,
        message: String,
        /// Character position in the query the error points at.
        position: Option<usize>,
    },
    #[error("server {addr} asks for {what}, which pgheal cannot provide")]
    Auth { addr: String, what: &'static str },
    #[error("server {addr} broke the protocol: {what}")]
    Protocol { addr: String, what: String },
    #[error("TLS with server {addr}: {what}")]
    Tls { addr: String, what: String },
    #[error("server {addr} connection lost: {source}")]
    Io {
        addr: String,
        #[source]
        source: io::Error,
    },
}

impl UpstreamError {
    /// The node could not take the request at all (down, shutting down,
    /// starting up, unreachable): nothing was sent, so another node or a
    /// later try is safe.
    pub fn is_unreachable(&self) -> bool {
        match self {
            UpstreamError::Connect { .. }
            | UpstreamError::Timeout { .. }
            | UpstreamError::Io { .. } => true,
            UpstreamError::Server { code, .. } => code.starts_with("57P") || code.starts_with("08"),
            UpstreamError::Auth { .. }
            | UpstreamError::Protocol { .. }
            | UpstreamError::Tls { .. } => false,
        }
    }

    /// Where in the query a server error points, 1-based.
    pub fn position(&self) -> Option<usize> {
        match self {
            UpstreamError::Server { position, .. } => *position,
            _ => None,
        }
    }

    /// Moves the position by `chars` (the query was part of a longer text).
    pub fn shift_position(&mut self, chars: usize) {
        if let UpstreamError::Server {
            position: Some(p), ..
        } = self
        {
            *p += chars;
        }
    }

    pub fn sqlstate(&self) -> String {
        match self {
            UpstreamError::Server { code, .. } => code.clone(),
            UpstreamError::Connect { .. }
            | UpstreamError::Timeout { .. }
            | UpstreamError::Tls { .. } => sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION
                .code()
                .to_string(),
            UpstreamError::Auth { .. } => sqlstate::INVALID_AUTHORIZATION_SPECIFICATION
                .code()
                .to_string(),
            UpstreamError::Protocol { .. } | UpstreamError::Io { .. } => {
                sqlstate::CONNECTION_FAILURE.code().to_string()
            }
        }
    }
}

/// Why no server connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(
        "no server connection for database \"{database}\" became free within {waited:?} (pool_size {size})"
    )]
    Timeout {
        database: String,
        waited: Duration,
        size: usize,
    },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The server answered and said no (e.g. a setting it rejects): not a
    /// failure of the server, so nothing else is tried.
    #[error(transparent)]
    Refused(UpstreamError),
}

impl PoolError {
    /// The server answered and said no (a missing database, a wrong
    /// password, a rejected setting), as opposed to a node that is down,
    /// busy or gone: trying later or elsewhere would not help.
    pub fn is_refusal(&self) -> bool {
        match self {
            PoolError::Refused(_) => true,
            PoolError::Upstream(e) => !e.is_unreachable(),
            PoolError::Timeout { .. } => false,
        }
    }
}
