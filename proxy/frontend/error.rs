//! Errors a client can be told about, and the one place that turns them
//! into ErrorResponse messages.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use pgheal_protocol::build::{self, Severity};
use pgheal_protocol::sqlstate::{self, SqlState};
use pgheal_protocol::startup::StartupError;
use pgheal_protocol::FrameError;

use crate::backend::error::PoolError;

/// Why a client's connection or request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid message from client: {0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Startup(#[from] StartupError),
    #[error("invalid message from client: {0}")]
    Malformed(&'static str),
    #[error("password authentication failed for user \"{0}\"")]
    AuthFailed(String),
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
    #[error("{0}")]
    BadParameter(String),
    #[error("database \"{0}\" does not exist")]
    UnknownDatabase(String),
    #[error("{0} is not supported by pgheal")]
    Unsupported(&'static str),
    #[error("pgheal accepts only TLS connections: connect with sslmode=require (or stronger)")]
    TlsRequired,
    #[error("TLS handshake with the client failed: {0}")]
    TlsHandshake(#[source] io::Error),
    #[error("user \"{0}\" may not open the admin console (admin = true in [[users]])")]
    NotAdmin(String),
    #[error("terminating connection due to administrator command")]
    Shutdown,
    #[error("too many client connections (max_client_connections = {0})")]
    TooManyClients(usize),
    #[error("too many databases served through \"*\" at once (max_databases = {0})")]
    TooManyDatabases(usize),
    #[error("client did not finish logging in within {0:?}")]
    LoginTimeout(Duration),
    #[error("cannot execute a write: no primary is available for database \"{database}\" (waited {waited:?})")]
    NoPrimary {
        database: String,
        waited: std::time::Duration,
    },
    #[error("no node of database \"{0}\" is reachable")]
    NoNode(String),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("client connection: {0}")]
    ClientIo(#[source] io::Error),
    #[error("server connection lost: {0}")]
    ServerLost(#[source] io::Error),
    #[error("server connection lost inside a transaction, which was rolled back; end it with ROLLBACK ({0})")]
    ServerLostInTransaction(#[source] io::Error),
    #[error("server connection lost while a write ran: its outcome is unknown ({0})")]
    ServerLostDuringWrite(#[source] io::Error),
    #[error("current transaction is aborted, commands ignored until end of transaction block")]
    TransactionLost,
    /// The server ended this client's session on purpose while its node
    /// stays up (pg_terminate_backend, idle_in_transaction_session_timeout):
    /// its own SQLSTATE and message, as an ERROR in transaction mode.
    #[error("{message}")]
    SessionTerminated { code: String, message: String },
    /// The one server session of a session-mode (or pinned) client is gone
    /// and the client was told with a FATAL; nothing more to say.
    #[error("the server session ended: {0}")]
    SessionEnded(String),
    /// Session mode: the server connection was lost without a word.
    #[error("server connection lost: this session's server is gone ({0}); reconnect")]
    SessionServerLost(#[source] io::Error),
    #[error("invalid message from server: {0}")]
    ServerProtocol(FrameError),
}

impl ClientError {
    /// SQLSTATE and severity to send, or `None` when nothing can be sent
    /// (the client is gone or never spoke the protocol).
    fn wire(&self) -> Option<(Severity, String)> {
        use ClientError::*;
        let fatal = |s: SqlState| Some((Severity::Fatal, s.code().to_string()));
        match self {
            Frame(_) | Malformed(_) => fatal(sqlstate::PROTOCOL_VIOLATION),
            // As PostgreSQL: bytes that are no startup packet get no answer.
            Startup(e) if e.closes_silently() => None,
            Startup(StartupError::UnsupportedProtocol { .. }) => {
                fatal(sqlstate::FEATURE_NOT_SUPPORTED)
            }
            Startup(_) => fatal(sqlstate::PROTOCOL_VIOLATION),
            AuthFailed(_) => fatal(sqlstate::INVALID_PASSWORD),
            NoUser | TlsRequired | NotAdmin(_) => {
                fatal(sqlstate::INVALID_AUTHORIZATION_SPECIFICATION)
            }
            TooManyClients(_) | TooManyDatabases(_) => fatal(sqlstate::TOO_MANY_CONNECTIONS),
            Shutdown => fatal(sqlstate::ADMIN_SHUTDOWN),
            UnknownDatabase(_) => fatal(sqlstate::INVALID_CATALOG_NAME),
            BadParameter(_) => fatal(sqlstate::INVALID_PARAMETER_VALUE),
            Unsupported(_) => fatal(sqlstate::FEATURE_NOT_SUPPORTED),
            Pool(PoolError::Timeout { .. }) => Some((
                Severity::Error,
                sqlstate::TOO_MANY_CONNECTIONS.code().to_string(),
            )),
            Pool(PoolError::Upstream(e) | PoolError::Refused(e)) => {
                Some((Severity::Error, e.sqlstate()))
            }
            NoPrimary { .. } => Some((
                Severity::Error,
                sqlstate::READ_ONLY_SQL_TRANSACTION.code().to_string(),
            )),
            NoNode(_) => Some((
                Severity::Error,
                sqlstate::CANNOT_CONNECT_NOW.code().to_string(),
            )),
            SessionTerminated { code, .. } => Some((Severity::Error, code.clone())),
            SessionServerLost(_) => fatal(sqlstate::CONNECTION_FAILURE),
            SessionEnded(_) => None,
            TransactionLost => Some((
                Severity::Error,
                sqlstate::IN_FAILED_SQL_TRANSACTION.code().to_string(),
            )),
            ServerLost(_)
            | ServerLostInTransaction(_)
            | ServerLostDuringWrite(_)
            | ServerProtocol(_) => Some((
                Severity::Error,
                sqlstate::CONNECTION_FAILURE.code().to_string(),
            )),
            LoginTimeout(_) | ClientIo(_) | TlsHandshake(_) => None,
        }
    }

    fn hint(&self) -> Option<&'static str> {
        match self {
            ClientError::Pool(PoolError::Timeout { .. }) => {
                Some("All server connections are busy; raise pool_size or shorten transactions.")
            }
            ClientError::NoPrimary { .. } => Some(
                "pgheal is read-only while no node accepts writes; reads still work, and writes resume on this connection when a primary is back.",
            ),
            ClientError::NoNode(_) => Some("Every node is down or unreachable; pgheal keeps retrying them."),
            _ => None,
        }
    }

    /// True when the client connection must be closed after the error.
    pub fn is_fatal(&self) -> bool {
        !matches!(self.wire(), Some((Severity::Error, _)))
    }

    /// Appends the ErrorResponse for this error, if one can be sent. An
    /// error that is not fatal may be raised while the client is logged in.
    pub fn write_response(&self, buf: &mut BytesMut, logged_in: bool) -> bool {
        let Some((mut severity, code)) = self.wire() else {
            return false;
        };
        if let ClientError::Startup(StartupError::UnsupportedProtocol { major, .. }) = self {
            if *major < 3 {
                build::error_v2(buf, &format!("FATAL:  {self}\n"));
                return true;
            }
        }
        if !logged_in {
            severity = Severity::Fatal;
        }
        build::error_response_code(buf, severity, &code, &self.to_string(), self.hint());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgheal_protocol::backend::ErrorFields;

    fn code_of(e: ClientError, logged_in: bool) -> (Vec<u8>, Vec<u8>) {
        let mut buf = BytesMut::new();
        assert!(e.write_response(&mut buf, logged_in));
        let f = ErrorFields::parse(&buf[5..]).expect("test input is valid");
        (f.severity.to_vec(), f.code.to_vec())
    }

    #[test]
    fn errors_map_to_sqlstates() {
        assert_eq!(
            code_of(ClientError::AuthFailed("u".into()), false),
            (b"FATAL".to_vec(), b"28P01".to_vec())
        );
        assert_eq!(
            code_of(ClientError::UnknownDatabase("d".into()), false).1,
            b"3D000".to_vec()
        );
        let timeout = ClientError::Pool(PoolError::Timeout {
            database: "d".into(),
            waited: Duration::from_secs(1),
            size: 4,
        });
        assert!(!timeout.is_fatal());
        assert_eq!(
            code_of(timeout, true),
            (b"ERROR".to_vec(), b"53300".to_vec())
        );
        let frame = ClientError::Frame(FrameError::LengthTooSmall { tag: b'Q', len: -1 });
        assert_eq!(code_of(frame, true), (b"FATAL".to_vec(), b"08P01".to_vec()));
        let gone = ClientError::ClientIo(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(!gone.write_response(&mut BytesMut::new(), true));
    }
}
