//! The untagged first packet a client sends: StartupMessage, SSLRequest,
//! GSSENCRequest or CancelRequest.

use crate::cursor::Cursor;

/// PostgreSQL's own cap on a startup packet.
pub const MAX_STARTUP_LEN: usize = 10_000;

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;

/// The protocol minor version pgheal speaks with clients (3.0).
pub const SUPPORTED_MINOR: u16 = 0;

/// The one-byte answer to SSLRequest or GSSENCRequest: go ahead.
pub const ENCRYPTION_ACCEPTED: u8 = b'S';
/// The one-byte answer to SSLRequest or GSSENCRequest: stay in plain text.
pub const ENCRYPTION_REFUSED: u8 = b'N';

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel(CancelKey),
    Startup(StartupMessage),
}

/// The key a CancelRequest carries: the process id and secret the server
/// (here: pgheal) handed out in BackendKeyData.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub pid: i32,
    pub secret: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    /// Minor protocol version the client asked for (major is always 3).
    pub minor: u16,
    /// Parameters in the order sent; names are as sent.
    pub params: Vec<(String, String)>,
}

impl StartupMessage {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// `_pq_.` protocol options, which pgheal does not recognise.
    pub fn protocol_options(&self) -> impl Iterator<Item = &str> {
        self.params
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| k.starts_with("_pq_."))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    #[error("invalid length of startup packet: {0}")]
    BadLength(i32),
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("invalid startup packet layout: {0}")]
    Malformed(&'static str),
    #[error("invalid length of query cancel packet")]
    BadCancelLength,
}

impl StartupError {
    /// True for what PostgreSQL only logs and answers by closing the
    /// connection without a word: a length that cannot be a startup
    /// packet (any bytes that are not one, such as a regular message sent
    /// first) and a cancel request of the wrong size.
    pub fn closes_silently(&self) -> bool {
        matches!(
            self,
            StartupError::BadLength(_) | StartupError::BadCancelLength
        )
    }
}

/// Parses a startup packet at the front of `buf`, returning it and its size,
/// or `None` while it is incomplete.
pub fn parse(buf: &[u8]) -> Result<Option<(StartupPacket, usize)>, StartupError> {
    let [a, b, c, d, ..] = *buf else {
        return Ok(None);
    };
    let len = i32::from_be_bytes([a, b, c, d]);
    if len < 8 || len as usize > MAX_STARTUP_LEN {
        return Err(StartupError::BadLength(len));
    }
    let len = len as usize;
    if buf.len() < len {
        return Ok(None);
    }
    let body = &buf[4..len];
    let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let rest = &body[4..];
    let packet = match code {
        SSL_REQUEST if rest.is_empty() => StartupPacket::SslRequest,
        GSSENC_REQUEST if rest.is_empty() => StartupPacket::GssEncRequest,
        SSL_REQUEST | GSSENC_REQUEST => return Err(StartupError::Malformed("trailing bytes")),
        CANCEL_REQUEST => StartupPacket::Cancel(cancel(rest)?),
        _ => StartupPacket::Startup(startup(code, rest)?),
    };
    Ok(Some((packet, len)))
}

fn cancel(rest: &[u8]) -> Result<CancelKey, StartupError> {
    let mut cur = Cursor::new(rest);
    let bad = |_| StartupError::BadCancelLength;
    let pid = cur.i32().map_err(bad)?;
    let secret = cur.i32().map_err(bad)?;
    if !cur.is_empty() {
        return Err(StartupError::BadCancelLength);
    }
    Ok(CancelKey { pid, secret })
}

fn startup(code: u32, rest: &[u8]) -> Result<StartupMessage, StartupError> {
    let (major, minor) = ((code >> 16) as u16, (code & 0xffff) as u16);
    if major != 3 {
        return Err(StartupError::UnsupportedProtocol { major, minor });
    }
    let mut cur = Cursor::new(rest);
    let mut params = Vec::new();
    loop {
        let name = cur
            .cstr()
            .map_err(|_| StartupError::Malformed("missing terminator"))?;
        if name.is_empty() {
            break;
        }
        let value = cur
            .cstr()
            .map_err(|_| StartupError::Malformed("parameter without a value"))?;
        params.push((lossy(name), lossy(value)));
    }
    if !cur.is_empty() {
        return Err(StartupError::Malformed("bytes after the final terminator"));
    }
    Ok(StartupMessage { minor, params })
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build;
    use bytes::BytesMut;

    #[test]
    fn parses_a_startup_message() {
        let mut buf = BytesMut::new();
        build::startup_message(&mut buf, &[("user", "app"), ("database", "db")]);
        let (p, n) = parse(&buf)
            .expect("test input is valid")
            .expect("test input is valid");
        assert_eq!(n, buf.len());
        let StartupPacket::Startup(m) = p else {
            panic!("{p:?}")
        };
        assert_eq!(m.minor, 0);
        assert_eq!(m.param("user"), Some("app"));
        assert_eq!(m.param("database"), Some("db"));
        assert_eq!(parse(&buf[..buf.len() - 1]), Ok(None));
    }

    #[test]
    fn parses_requests_and_rejects_junk() {
        let ssl = [0, 0, 0, 8, 4, 210, 22, 47];
        assert_eq!(parse(&ssl), Ok(Some((StartupPacket::SslRequest, 8))));
        let mut c = BytesMut::new();
        build::cancel_request(&mut c, CancelKey { pid: 7, secret: -3 });
        assert_eq!(
            parse(&c),
            Ok(Some((
                StartupPacket::Cancel(CancelKey { pid: 7, secret: -3 }),
                16
            )))
        );
        assert_eq!(
            parse(&[0, 0, 0, 4, 0, 0, 0, 0]),
            Err(StartupError::BadLength(4))
        );
        assert_eq!(
            parse(&[0x7f, 0xff, 0xff, 0xff]),
            Err(StartupError::BadLength(i32::MAX))
        );
        let v2 = [0, 0, 0, 9, 0, 2, 0, 0, 0];
        assert!(matches!(
            parse(&v2),
            Err(StartupError::UnsupportedProtocol { major: 2, .. })
        ));
        let unterminated = [0, 0, 0, 11, 0, 3, 0, 0, b'u', b's', b'e'];
        assert!(matches!(
            parse(&unterminated),
            Err(StartupError::Malformed(_))
        ));
    }

    #[test]
    fn newer_minor_and_protocol_options_are_reported() {
        let mut buf = BytesMut::new();
        build::startup_message_version(&mut buf, 2, &[("user", "u"), ("_pq_.x", "1")]);
        let Some((StartupPacket::Startup(m), _)) = parse(&buf).expect("test input is valid") else {
            panic!()
        };
        assert_eq!(m.minor, 2);
        assert_eq!(m.protocol_options().collect::<Vec<_>>(), vec!["_pq_.x"]);
    }
}
