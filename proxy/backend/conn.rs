//! One server connection: connect, authenticate, remember ParameterStatus,
//! bring session parameters in line with a client's, reset.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pgheal_protocol::backend::{self, Authentication, ErrorFields, TxStatus};
use pgheal_protocol::build;
use pgheal_protocol::frame;
use pgheal_protocol::startup::{CancelKey, ENCRYPTION_ACCEPTED, ENCRYPTION_REFUSED};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use super::error::UpstreamError;
use super::params::Params;
use super::statements::ServerStatements;
use crate::auth::{ScramClient, ScramKeys};
use crate::config::{Config, Database};
use crate::net::stream::Stream;
use crate::net::tls::{UpstreamMode, UpstreamTls};

/// Servers are trusted more than clients, but not without bound.
const MAX_SERVER_MESSAGE: usize = 1 << 30;

/// Where and as whom to connect.
#[derive(Clone)]
pub struct ConnectSpec {
    pub addr: String,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    pub connect_timeout: Duration,
    /// Sent at startup so pgheal's own connections show in pg_stat_activity.
    pub application_name: Option<&'static str>,
    pub tls: UpstreamTls,
    /// Without a password: SCRAM keys a client proved ([auth] query).
    pub scram_keys: Option<Arc<ScramKeys>>,
}

/// An authenticated server connection, ready for queries.
pub struct ServerConn {
    pub stream: Stream,
    pub addr: String,
    /// The server's own cancel key.
    pub key: CancelKey,
    /// What the server reported with ParameterStatus.
    pub reported: Params,
    /// Session parameters pgheal set on behalf of clients.
    pub applied: Params,
    pub created: Instant,
    /// Named statements pgheal prepared here for clients.
    pub statements: ServerStatements,
    /// The pid pgheal gave the client that leased this session last (0:
    /// none yet). In transaction mode a notification this session sends
    /// is named by it (see `Pools::client_of`).
    pub last_client: i32,
}

impl ServerConn {
    pub async fn connect(spec: &ConnectSpec) -> Result<ServerConn, UpstreamError> {
        let timeout = spec.connect_timeout;
        match tokio::time::timeout(timeout, Self::connect_inner(spec)).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::Timeout {
                addr: spec.addr.clone(),
                timeout,
            }),
        }
    }

    async fn connect_inner(spec: &ConnectSpec) -> Result<ServerConn, UpstreamError> {
        let addr = spec.addr.clone();
        let stream =
            TcpStream::connect(&spec.addr)
                .await
                .map_err(|source| UpstreamError::Connect {
                    addr: addr.clone(),
                    source,
                })?;
        crate::net::tune(&stream);
        let stream = Self::encrypt(spec, stream).await?;
        let mut conn = ServerConn {
            stream,
            addr,
            key: CancelKey { pid: 0, secret: 0 },
            reported: Params::default(),
            applied: Params::default(),
            created: Instant::now(),
            statements: ServerStatements::default(),
            last_client: 0,
        };
        let mut out = BytesMut::new();
        let mut params = vec![
            ("user", spec.user.as_str()),
            ("database", spec.database.as_str()),
        ];
        if let Some(name) = spec.application_name {
            params.push(("application_name", name));
        }
        build::startup_message(&mut out, &params);
        conn.send(&out).await?;
        let mut buf = BytesMut::new();
        conn.authenticate(spec, &mut buf).await?;
        if let Some(e) = conn.read_until_ready(&mut buf).await? {
            return Err(e);
        }
        Ok(conn)
    }

    /// SSLRequest and the TLS handshake, as the database's `tls` says.
    async fn encrypt(spec: &ConnectSpec, mut tcp: TcpStream) -> Result<Stream, UpstreamError> {
        let mode = spec.tls.mode;
        if mode == UpstreamMode::Disable {
            return Ok(Stream::Plain(tcp));
        }
        let io = |source| UpstreamError::Io {
            addr: spec.addr.clone(),
            source,
        };
        let mut out = BytesMut::new();
        build::ssl_request(&mut out);
        tcp.write_all(&out).await.map_err(io)?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await.map_err(io)?;
        match answer[0] {
            ENCRYPTION_ACCEPTED => {
                let host = spec.addr.rsplit_once(':').map_or("", |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                spec.tls
                    .connect(tcp, host)
                    .await
                    .map_err(|source| UpstreamError::Tls {
                        addr: spec.addr.clone(),
                        what: source.to_string(),
                    })
            }
            ENCRYPTION_REFUSED if mode == UpstreamMode::Prefer => Ok(Stream::Plain(tcp)),
            ENCRYPTION_REFUSED => Err(UpstreamError::Tls {
                addr: spec.addr.clone(),
                what: format!(
                    "the server does not support TLS (tls = \"{}\")",
                    mode.as_str()
                ),
            }),
            _ => Err(UpstreamError::Protocol {
                addr: spec.addr.clone(),
                what: "unexpected answer to SSLRequest".into(),
            }),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), UpstreamError> {
        self.stream.send(bytes).await.map_err(|e| self.io(e))
    }

    fn io(&self, source: io::Error) -> UpstreamError {
        UpstreamError::Io {
            addr: self.addr.clone(),
            source,
        }
    }

    fn protocol(&self, what: impl Into<String>) -> UpstreamError {
        UpstreamError::Protocol {
            addr: self.addr.clone(),
            what: what.into(),
        }
    }

    /// Reads one whole message, and not a byte more: what the server sends
    /// after it (a FATAL right after pgheal's own query's ReadyForQuery,
    /// say) is the data path's to read, whole. Reading ahead into a buffer
    /// that is then dropped would cut such a message in two and hand the
    /// client its tail as garbage.
    async fn read_message(&mut self, buf: &mut BytesMut) -> Result<(u8, Bytes), UpstreamError> {
        loop {
            match frame::message(buf, MAX_SERVER_MESSAGE) {
                Ok(Some(frame::Message { tag, len, .. })) => {
                    let mut msg = buf.split_to(len).freeze();
                    let body = msg.split_off(frame::HEADER_LEN);
                    return Ok((tag, body));
                }
                Ok(None) => {}
                Err(e) => return Err(self.protocol(e.to_string())),
            }
            // Exactly the header, then exactly the rest of the message.
            let want = match frame::header(buf, MAX_SERVER_MESSAGE) {
                Ok(Some((_, len))) => len,
                Ok(None) => frame::HEADER_LEN,
                Err(e) => return Err(self.protocol(e.to_string())),
            };
            let start = buf.len();
            buf.resize(want.max(start), 0);
            let read = self.stream.read_exact(&mut buf[start..]).await;
            if let Err(e) = read {
                buf.truncate(start);
                return Err(self.io(e));
            }
        }
    }

    fn server_error(&self, body: &[u8]) -> UpstreamError {
        match ErrorFields::parse(body) {
            Ok(f) => UpstreamError::Server {
                addr: self.addr.clone(),
                code: String::from_utf8_lossy(f.code).into_owned(),
                message: f.message_lossy(),
                position: std::str::from_utf8(f.position)
                    .ok()
                    .and_then(|p| p.parse().ok()),
            },
            Err(_) => self.protocol("malformed ErrorResponse"),
        }
    }

    async fn authenticate(
        &mut self,
        spec: &ConnectSpec,
        buf: &mut BytesMut,
    ) -> Result<(), UpstreamError> {
        let mut scram: Option<Sasl> = None;
        loop {
            let (tag, body) = self.read_message(buf).await?;
            match tag {
                backend::AUTHENTICATION => {}
                backend::ERROR_RESPONSE => return Err(self.server_error(&body)),
                backend::NEGOTIATE_PROTOCOL_VERSION => continue,
                other => {
                    return Err(self.protocol(format!(
                        "unexpected message {:?} during login",
                        other as char
                    )))
                }
            }
            let auth = Authentication::parse(&body)
                .map_err(|_| self.protocol("malformed Authentication"))?;
            let mut out = BytesMut::new();
            match auth {
                Authentication::Ok => return Ok(()),
                Authentication::CleartextPassword => {
                    build::password_message(&mut out, self.password(spec)?.as_bytes());
                }
                Authentication::Md5Password { salt } => {
                    let pw = self.password(spec)?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        spec.user.as_bytes(),
                        pw.as_bytes(),
                        salt,
                    );
                    build::password_message(&mut out, hash.as_bytes());
                }
                Authentication::Sasl { mechanisms } => {
                    if !mechanisms.iter().any(|m| *m == b"SCRAM-SHA-256") {
                        return Err(self.unsupported("a SASL mechanism other than SCRAM-SHA-256"));
                    }
                    let (s, first) = Sasl::start(spec).map_err(|what| self.unsupported(what))?;
                    build::sasl_initial_response(&mut out, "SCRAM-SHA-256", &first);
                    scram = Some(s);
                }
                Authentication::SaslContinue(data) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| self.protocol("SASL continue without start"))?;
                    let last = s.update(data).map_err(|e| self.protocol(e))?;
                    build::sasl_response(&mut out, &last);
                }
                Authentication::SaslFinal(data) => {
                    let s = scram
                        .take()
                        .ok_or_else(|| self.protocol("SASL final without start"))?;
                    s.finish(data).map_err(|e| self.protocol(e))?;
                    continue;
                }
                Authentication::Unsupported(_) => {
                    return Err(self.unsupported("Kerberos/GSSAPI/SSPI"))
                }
            }
            self.send(&out).await?;
        }
    }

    fn password<'s>(&self, spec: &'s ConnectSpec) -> Result<&'s str, UpstreamError> {
        spec.password
            .as_deref()
            .ok_or_else(|| self.unsupported("a password (set one for the database or the user)"))
    }

    fn unsupported(&self, what: &'static str) -> UpstreamError {
        UpstreamError::Auth {
            addr: self.addr.clone(),
            what,
        }
    }

    /// Reads until ReadyForQuery, keeping ParameterStatus and BackendKeyData.
    /// Returns the first ErrorResponse seen, if any, once the server is ready.
    async fn read_until_ready(
        &mut self,
        buf: &mut BytesMut,
    ) -> Result<Option<UpstreamError>, UpstreamError> {
        let mut first_error = None;
        loop {
            let (tag, body) = self.read_message(buf).await?;
            match tag {
                backend::READY_FOR_QUERY => {
                    TxStatus::parse(&body).map_err(|_| self.protocol("malformed ReadyForQuery"))?;
                    return Ok(first_error);
                }
                backend::PARAMETER_STATUS => self.note_parameter(&body)?,
                backend::BACKEND_KEY_DATA => {
                    let (pid, secret) = backend::backend_key_data(&body)
                        .map_err(|_| self.protocol("malformed BackendKeyData"))?;
                    self.key = CancelKey { pid, secret };
                }
                // The server is closing the connection: no ReadyForQuery
                // follows, and its own error says why.
                backend::ERROR_RESPONSE if is_fatal(&body) => return Err(self.server_error(&body)),
                backend::ERROR_RESPONSE if first_error.is_none() => {
                    first_error = Some(self.server_error(&body))
                }
                _ => {}
            }
        }
    }

    /// Records a ParameterStatus body.
    pub fn note_parameter(&mut self, body: &[u8]) -> Result<(), UpstreamError> {
        let (name, value) = backend::parameter_status(body)
            .map_err(|_| self.protocol("malformed ParameterStatus"))?;
        self.reported.set(
            &String::from_utf8_lossy(name),
            &String::from_utf8_lossy(value),
        );
        Ok(())
    }

    /// Runs one simple query whose results nobody sees; the server's first
    /// error, if any, is returned after it is ready again.
    pub async fn run_quietly(&mut self, sql: &str) -> Result<Option<UpstreamError>, UpstreamError> {
        let mut out = BytesMut::new();
        build::query(&mut out, sql);
        self.send(&out).await?;
        self.read_until_ready(&mut BytesMut::new()).await
    }

    /// Runs one simple query and returns its rows as text (`None` for NULL),
    /// or the server's error. For pgheal's own small queries only.
    pub async fn query_rows(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, UpstreamError> {
        let mut out = BytesMut::new();
        build::query(&mut out, sql);
        self.send(&out).await?;
        let mut buf = BytesMut::new();
        let mut rows = Vec::new();
        let mut failed = None;
        loop {
            let (tag, body) = self.read_message(&mut buf).await?;
            match tag {
                backend::DATA_ROW => {
                    let cols =
                        backend::data_row(&body).map_err(|_| self.protocol("malformed DataRow"))?;
                    rows.push(
                        cols.into_iter()
                            .map(|c| c.map(|v| String::from_utf8_lossy(v).into_owned()))
                            .collect(),
                    );
                }
                backend::ERROR_RESPONSE if failed.is_none() => {
                    failed = Some(self.server_error(&body))
                }
                backend::PARAMETER_STATUS => self.note_parameter(&body)?,
                backend::READY_FOR_QUERY => {
                    return match failed {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    }
                }
                _ => {}
            }
        }
    }

    /// Brings this connection's session parameters in line with `wanted`.
    pub async fn apply_params(
        &mut self,
        wanted: &Params,
    ) -> Result<Option<UpstreamError>, UpstreamError> {
        let Some(sql) = self.applied.diff_sql(wanted) else {
            return Ok(None);
        };
        let failed = self.run_quietly(&sql).await?;
        if failed.is_none() {
            self.applied = wanted.clone();
        } else {
            // The server rolled back the whole batch: keep the old picture.
        }
        Ok(failed)
    }

    /// Session mode: forget everything the last client did.
    pub async fn reset(&mut self) -> Result<(), UpstreamError> {
        if let Some(e) = self.run_quietly("DISCARD ALL").await? {
            return Err(e);
        }
        self.applied = Params::default();
        self.statements.clear();
        Ok(())
    }

    /// True when the server closed the connection or sent something
    /// unasked while it sat idle.
    pub fn is_broken(&mut self) -> bool {
        self.stream.is_closed_or_chatty()
    }

    pub async fn terminate(mut self) {
        let mut out = BytesMut::new();
        build::terminate(&mut out);
        let _ = tokio::time::timeout(Duration::from_millis(100), self.stream.send(&out)).await;
    }
}

/// pgheal's side of SCRAM with a server: from the password, or from the
/// keys a client proved when it has no password ([auth] query users).
enum Sasl {
    Password(ScramSha256),
    Keys(ScramClient),
}

impl Sasl {
    fn start(spec: &ConnectSpec) -> Result<(Sasl, Vec<u8>), &'static str> {
        if let Some(pw) = &spec.password {
            let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
            let first = s.message().to_vec();
            return Ok((Sasl::Password(s), first));
        }
        let keys = spec
            .scram_keys
            .as_deref()
            .ok_or("a password (set one for the database or the user)")?;
        let (client, first) = ScramClient::start(keys.clone());
        Ok((Sasl::Keys(client), first.into_bytes()))
    }

    fn update(&mut self, data: &[u8]) -> Result<Vec<u8>, String> {
        match self {
            Sasl::Password(s) => {
                s.update(data).map_err(|e| e.to_string())?;
                Ok(s.message().to_vec())
            }
            Sasl::Keys(c) => c
                .update(data)
                .map(String::into_bytes)
                .map_err(|e| e.to_string()),
        }
    }

    fn finish(self, data: &[u8]) -> Result<(), String> {
        match self {
            Sasl::Password(mut s) => s.finish(data).map_err(|e| e.to_string()),
            Sasl::Keys(c) => c.finish(data).map_err(|e| e.to_string()),
        }
    }
}

/// An ErrorResponse body whose severity ends the session.
fn is_fatal(body: &[u8]) -> bool {
    ErrorFields::parse(body).is_ok_and(|f| matches!(f.severity, b"FATAL" | b"PANIC"))
}

impl ConnectSpec {
    /// A connection of pgheal's own to one node of `db` (migrations,
    /// backups): the database's upstream user, else the first `[[users]]`
    /// entry with a password.
    pub fn direct(
        config: &Config,
        db: &Database,
        addr: &str,
        application_name: &'static str,
    ) -> ConnectSpec {
        let (user, password) = direct_credentials(config, db);
        ConnectSpec {
            addr: addr.to_string(),
            user,
            password,
            database: db.dbname.clone(),
            connect_timeout: config.pool.connect_timeout,
            application_name: Some(application_name),
            tls: db.tls.clone(),
            scram_keys: None,
        }
    }
}

/// The user and password of [`ConnectSpec::direct`].
pub fn direct_credentials(config: &Config, db: &Database) -> (String, Option<String>) {
    let user = db
        .user
        .clone()
        .or_else(|| {
            config
                .users
                .iter()
                .find(|u| u.password.is_some())
                .map(|u| u.name.clone())
        })
        .unwrap_or_default();
    let password = db
        .password
        .clone()
        .or_else(|| config.user(&user).and_then(|u| u.password.clone()));
    (user, password)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgheal_protocol::build;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A scripted peer: trusts the login, answers the one query with its
    /// ReadyForQuery and, in the same write, a FATAL (what a backend does
    /// when its postmaster dies right after answering).
    async fn dying_server(listener: tokio::net::TcpListener) {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut startup = [0u8; 4];
        s.read_exact(&mut startup).await.expect("startup length");
        let mut rest = vec![0u8; u32::from_be_bytes(startup) as usize - 4];
        s.read_exact(&mut rest).await.expect("startup");
        let mut out = BytesMut::new();
        out.extend_from_slice(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0]);
        build::backend_key_data(&mut out, CancelKey { pid: 7, secret: 7 });
        build::ready_for_query(&mut out, TxStatus::Idle);
        s.write_all(&out).await.expect("welcome");
        let mut query = [0u8; 5];
        s.read_exact(&mut query).await.expect("query header");
        let len = u32::from_be_bytes([query[1], query[2], query[3], query[4]]) as usize;
        let mut sql = vec![0u8; len - 4];
        s.read_exact(&mut sql).await.expect("query");
        let mut out = BytesMut::new();
        build::command_complete(&mut out, "SET");
        build::ready_for_query(&mut out, TxStatus::Idle);
        let fatal = "terminating connection due to unexpected postmaster exit";
        let code = pgheal_protocol::sqlstate::ADMIN_SHUTDOWN;
        build::error_response(&mut out, build::Severity::Fatal, code, fatal, None);
        s.write_all(&out).await.expect("answer");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    }

    #[tokio::test]
    async fn pgheals_own_query_leaves_what_follows_its_answer_whole() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(dying_server(listener));
        let spec = ConnectSpec {
            addr,
            user: "app".into(),
            password: None,
            database: "app".into(),
            connect_timeout: Duration::from_secs(5),
            application_name: None,
            tls: UpstreamTls::default(),
            scram_keys: None,
        };
        let mut conn = ServerConn::connect(&spec).await.expect("login");
        assert!(conn
            .run_quietly("SET x = 1")
            .await
            .expect("answered")
            .is_none());
        // The FATAL is still on the socket, from its first byte.
        let mut header = [0u8; 5];
        conn.stream
            .read_exact(&mut header)
            .await
            .expect("the FATAL");
        assert_eq!(header[0], pgheal_protocol::backend::ERROR_RESPONSE);
    }
}
