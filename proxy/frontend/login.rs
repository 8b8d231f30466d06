//! The client's way in: startup packet, SSL/GSS refusals, cancel requests,
//! protocol version negotiation and authentication against `[[users]]` or
//! a secret looked up with `[auth] query`.

use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use pgheal_protocol::build;
use pgheal_protocol::frame;
use pgheal_protocol::frontend;
use pgheal_protocol::startup::{
    self, StartupMessage, StartupPacket, ENCRYPTION_ACCEPTED, ENCRYPTION_REFUSED, SUPPORTED_MINOR,
};
use rand::RngCore;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::auth::{self, ScramExchange, ScramKeys, ScramVerifier, SCRAM_SHA_256};
use crate::backend::params::Params;
use crate::config::AuthMethod;
use crate::frontend::error::ClientError;
use crate::frontend::{App, Target};
use crate::net::stream::Stream;

/// What the handshake ended with.
pub enum Handshake {
    /// A cancel request was handled; the connection ends.
    Cancelled,
    /// An authenticated client, ready for the welcome messages.
    Client(Box<LoggedIn>),
}

pub struct LoggedIn {
    pub stream: Stream,
    /// Bytes the client sent beyond the handshake.
    pub buf: BytesMut,
    pub user: String,
    /// What serves the database the client asked for; `None` for the
    /// admin console.
    pub target: Option<Arc<Target>>,
    pub params: Params,
}

/// A handshake that failed: the error is answered by the caller, after
/// AuthenticationOk when the client had authenticated (a direct
/// connection, too, says "database does not exist" after it).
pub struct Failed {
    pub stream: Stream,
    pub error: ClientError,
    pub authenticated: bool,
}

/// Reads the startup packet and authenticates, all within the login
/// timeout. AuthenticationOk is not sent here: it goes out with what
/// follows it (the welcome, or an error), in one write.
pub async fn handshake(app: &Arc<App>, tcp: TcpStream) -> Result<Handshake, Failed> {
    let timeout = app.config().proxy.login_timeout;
    let mut buf = BytesMut::with_capacity(512);
    let mut stream = Stream::Plain(tcp);
    let mut authenticated = false;
    let login = login(app, &mut stream, &mut buf, &mut authenticated);
    let result = tokio::time::timeout(timeout, login).await;
    let failed = |stream, error| Failed {
        stream,
        error,
        authenticated,
    };
    match result {
        Ok(Ok(None)) => Ok(Handshake::Cancelled),
        Ok(Ok(Some((user, target, params)))) => Ok(Handshake::Client(Box::new(LoggedIn {
            stream,
            buf,
            user,
            target,
            params,
        }))),
        Ok(Err(e)) => Err(failed(stream, e)),
        Err(_) => Err(failed(stream, ClientError::LoginTimeout(timeout))),
    }
}

async fn login(
    app: &Arc<App>,
    stream: &mut Stream,
    buf: &mut BytesMut,
    authenticated: &mut bool,
) -> Result<Option<(String, Option<Arc<Target>>, Params)>, ClientError> {
    let msg = loop {
        match read_startup(stream, buf).await? {
            // Boxed, here and below: the rare paths' state (a TLS handshake,
            // a SCRAM exchange, an [auth] query) is not carried in every
            // login's future, which is copied as a whole when it is spawned.
            StartupPacket::SslRequest => Box::pin(encrypt(app, stream, buf)).await?,
            StartupPacket::GssEncRequest => write(stream, &[ENCRYPTION_REFUSED]).await?,
            StartupPacket::Cancel(key) => {
                Box::pin(app.cancels.cancel(key)).await;
                return Ok(None);
            }
            StartupPacket::Startup(msg) => break msg,
        }
    };
    let tls_required = app.config().tls.as_ref().is_some_and(|t| t.required());
    if tls_required && !stream.is_tls() {
        return Err(ClientError::TlsRequired);
    }
    let asked = Asked::from(&msg);
    if msg.minor != SUPPORTED_MINOR || asked.protocol_options {
        negotiate_version(stream, &msg).await?;
    }
    let user = asked.user.ok_or(ClientError::NoUser)?.to_string();
    if matches!(asked.replication, Some(r) if !matches!(r, "false" | "0" | "off" | "no")) {
        return Err(ClientError::Unsupported("a replication connection"));
    }
    let db_name = asked.database.unwrap_or(&user).to_string();
    if db_name == crate::config::ADMIN_DATABASE {
        authenticate(app, stream, buf, &user, None).await?;
        *authenticated = true;
        if !app.config().user(&user).is_some_and(|u| u.admin) {
            return Err(ClientError::NotAdmin(user));
        }
        return Ok(Some((user, None, Params::default())));
    }
    let served = app.config().serves(&db_name);
    // Where an [auth] query runs: the database's own nodes, or "*"'s.
    let lookup_on = served
        .then(|| {
            app.target(&db_name)
                .or_else(|| app.target(crate::config::ANY_DATABASE))
        })
        .flatten();
    authenticate(app, stream, buf, &user, lookup_on.as_deref()).await?;
    *authenticated = true;
    if !served {
        return Err(ClientError::UnknownDatabase(db_name));
    }
    // Made now for a name served through "*".
    let target = app.target_for(&db_name)?;
    let params = app
        .params
        .from_startup(&msg)
        .map_err(ClientError::BadParameter)?;
    Ok(Some((user, Some(target), params)))
}

/// The startup keys the login reads, found in one pass (the first of
/// each, as `StartupMessage::param` finds it), and whether the client
/// asked for protocol options.
#[derive(Default)]
struct Asked<'a> {
    user: Option<&'a str>,
    database: Option<&'a str>,
    replication: Option<&'a str>,
    /// Any `_pq_.` protocol option (see `negotiate_version`).
    protocol_options: bool,
}

impl<'a> From<&'a StartupMessage> for Asked<'a> {
    fn from(msg: &'a StartupMessage) -> Self {
        let mut asked = Asked::default();
        for (name, value) in msg.params() {
            let slot = match name {
                "user" => &mut asked.user,
                "database" => &mut asked.database,
                "replication" => &mut asked.replication,
                _ => {
                    asked.protocol_options |= name.starts_with("_pq_.");
                    continue;
                }
            };
            slot.get_or_insert(value);
        }
        asked
    }
}

/// SSLRequest: `S` and the TLS handshake when `[tls]` is set (once), else
/// `N` and the client goes on in plain text.
async fn encrypt(app: &Arc<App>, stream: &mut Stream, buf: &BytesMut) -> Result<(), ClientError> {
    let Some(tls) = app.config().tls.clone().filter(|_| !stream.is_tls()) else {
        return write(stream, &[ENCRYPTION_REFUSED]).await;
    };
    if !buf.is_empty() {
        // Bytes sent before the handshake would be taken as encrypted.
        return Err(ClientError::Malformed("data after SSLRequest"));
    }
    write(stream, &[ENCRYPTION_ACCEPTED]).await?;
    let tcp = stream
        .take_plain()
        .ok_or(ClientError::Malformed("SSLRequest"))?;
    *stream = tls.accept(tcp).await.map_err(|e| {
        app.metrics.tls_failures.inc();
        ClientError::TlsHandshake(e)
    })?;
    Ok(())
}

async fn read_startup(
    stream: &mut Stream,
    buf: &mut BytesMut,
) -> Result<StartupPacket, ClientError> {
    loop {
        if let Some((packet, len)) = startup::parse(buf)? {
            buf.advance(len);
            return Ok(packet);
        }
        read_more(stream, buf).await?;
    }
}

async fn read_more(stream: &mut Stream, buf: &mut BytesMut) -> Result<(), ClientError> {
    match stream.read_buf(buf).await {
        Ok(0) => Err(ClientError::ClientIo(
            std::io::ErrorKind::UnexpectedEof.into(),
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(ClientError::ClientIo(e)),
    }
}

async fn write(stream: &mut Stream, bytes: &[u8]) -> Result<(), ClientError> {
    stream.send(bytes).await.map_err(ClientError::ClientIo)
}

/// A client asking for a newer 3.x minor version, or for `_pq_.` options,
/// is told what pgheal speaks, as PostgreSQL does.
async fn negotiate_version(stream: &mut Stream, msg: &StartupMessage) -> Result<(), ClientError> {
    let options: Vec<&str> = msg.protocol_options().collect();
    let mut out = BytesMut::new();
    build::negotiate_protocol_version(&mut out, SUPPORTED_MINOR, &options);
    write(stream, &out).await
}

/// Reads one PasswordMessage-type ('p') message.
async fn read_password(stream: &mut Stream, buf: &mut BytesMut) -> Result<Bytes, ClientError> {
    loop {
        if let Some(frame::Message { tag, len, .. }) = frame::message(buf, 64 * 1024)? {
            if tag != frontend::PASSWORD {
                return Err(ClientError::Malformed("expected a password message"));
            }
            let mut msg = buf.split_to(len).freeze();
            return Ok(msg.split_off(frame::HEADER_LEN));
        }
        read_more(stream, buf).await?;
    }
}

async fn authenticate(
    app: &Arc<App>,
    stream: &mut Stream,
    buf: &mut BytesMut,
    user: &str,
    lookup_on: Option<&Target>,
) -> Result<(), ClientError> {
    let config = app.config();
    let entry = config.user(user);
    let method = entry.map_or(AuthMethod::ScramSha256, |u| u.auth);
    // Not in [[users]]: maybe a user of the server ([auth] query).
    let looked_up = match (entry, &config.auth, lookup_on) {
        (None, Some(auth), Some(target)) => {
            let secret = app.auth_lookup.secret(&config, auth, target, user);
            Box::pin(secret)
                .await
                .map_err(|e| ClientError::Pool(e.into()))?
        }
        _ => None,
    };
    let ok = match method {
        // Trust and md5 come from a [[users]] entry.
        AuthMethod::Trust => true,
        AuthMethod::Md5 => {
            let password = entry
                .and_then(|u| u.password.as_deref())
                .unwrap_or_default();
            Box::pin(md5(stream, buf, user, password)).await?
        }
        AuthMethod::ScramSha256 => {
            let known = entry
                .and_then(|u| u.scram.clone())
                .or_else(|| looked_up.clone());
            // An unknown user meets a secret no proof matches.
            let real = known.is_some();
            match Box::pin(scram(
                stream,
                buf,
                known.unwrap_or_else(ScramVerifier::mock),
            ))
            .await?
            {
                Some(keys) if looked_up.is_some() => {
                    app.auth_lookup.remember_keys(user, keys);
                    true
                }
                Some(_) => real,
                None => {
                    // The password may have changed since the secret was
                    // cached: the next login looks it up again.
                    if looked_up.is_some() {
                        app.auth_lookup.forget(user);
                    }
                    false
                }
            }
        }
    };
    if !ok {
        tracing::info!(user, "client authentication failed");
        app.metrics.auth_failures.inc();
        return Err(ClientError::AuthFailed(user.to_string()));
    }
    Ok(())
}

async fn md5(
    stream: &mut Stream,
    buf: &mut BytesMut,
    user: &str,
    password: &str,
) -> Result<bool, ClientError> {
    let mut salt = [0u8; 4];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let mut out = BytesMut::new();
    build::auth_md5(&mut out, salt);
    write(stream, &out).await?;
    let body = read_password(stream, buf).await?;
    let sent = frontend::password(&body).map_err(|_| ClientError::Malformed("password message"))?;
    Ok(!password.is_empty() && auth::md5_matches(user, password, salt, sent))
}

/// The SCRAM exchange: the keys the client proved, or `None` for a wrong
/// proof.
async fn scram(
    stream: &mut Stream,
    buf: &mut BytesMut,
    verifier: ScramVerifier,
) -> Result<Option<ScramKeys>, ClientError> {
    let mut out = BytesMut::new();
    build::auth_sasl(&mut out, &[SCRAM_SHA_256]);
    write(stream, &out).await?;
    let body = read_password(stream, buf).await?;
    let (mechanism, first) = frontend::sasl_initial_response(&body)
        .map_err(|_| ClientError::Malformed("SASL initial response"))?;
    if mechanism != SCRAM_SHA_256.as_bytes() {
        return Err(ClientError::Malformed("unknown SASL mechanism"));
    }
    let (exchange, server_first) = ScramExchange::start(verifier, first)
        .map_err(|_| ClientError::Malformed("SCRAM client-first message"))?;
    out.clear();
    build::auth_sasl_continue(&mut out, server_first.as_bytes());
    write(stream, &out).await?;
    let client_final = read_password(stream, buf).await?;
    match exchange.finish(&client_final) {
        Ok((server_final, keys)) => {
            out.clear();
            build::auth_sasl_final(&mut out, server_final.as_bytes());
            write(stream, &out).await?;
            Ok(Some(keys))
        }
        Err(auth::ScramError::WrongProof) => Ok(None),
        Err(_) => Err(ClientError::Malformed("SCRAM client-final message")),
    }
}
