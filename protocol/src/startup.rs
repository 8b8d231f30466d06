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
    /// The parameters as sent: each name and value followed by a NUL, in
    /// the order sent, converted to UTF-8 as a whole (invalid bytes become
    /// U+FFFD). One allocation for all of them; [`Self::params`] reads it.
    text: String,
}

impl StartupMessage {
    /// Parameters in the order sent; names are as sent.
    pub fn params(&self) -> impl Iterator<Item = (&str, &str)> {
        let mut rest = self.text.as_str();
        std::iter::from_fn(move || Some((field(&mut rest)?, field(&mut rest)?)))
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    /// `_pq_.` protocol options, which pgheal does not recognise.
    pub fn protocol_options(&self) -> impl Iterator<Item = &str> {
        self.params()
            .map(|(k, _)| k)
            .filter(|k| k.starts_with("_pq_."))
    }

    /// Every parameter as sent, NUL after each name and value: two
    /// clients that sent the same parameters have the same text.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// The text up to the next NUL, which `rest` then starts after; `None` at
/// the end. (Names and values are short: a byte loop finds their end
/// sooner than `str::split` does.)
fn field<'a>(rest: &mut &'a str) -> Option<&'a str> {
    let end = rest.bytes().position(|b| b == 0)?;
    // A NUL is a character of its own: both cuts are on boundaries.
    let (field, after) = (rest.get(..end)?, rest.get(end + 1..)?);
    *rest = after;
    Some(field)
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
    // Names and values, each ended by a NUL; an empty name ends the list.
    let mut start = 0;
    let mut fields = 0;
    for end in memchr::memchr_iter(0, rest) {
        if fields % 2 == 0 && end == start {
            if end + 1 != rest.len() {
                return Err(StartupError::Malformed("bytes after the final terminator"));
            }
            let params = &rest[..end];
            // Checking is quicker than converting, and a client's
            // parameters nearly always are UTF-8.
            let text = match std::str::from_utf8(params) {
                Ok(text) => text.to_owned(),
                Err(_) => String::from_utf8_lossy(params).into_owned(),
            };
            return Ok(StartupMessage { minor, text });
        }
        fields += 1;
        start = end + 1;
    }
    Err(StartupError::Malformed(if fields % 2 == 0 {
        "missing terminator"
    } else {
        "parameter without a value"
    }))
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

    #[test]
    fn parameters_come_back_in_order_with_empty_values_and_bad_bytes() {
        let mut buf = BytesMut::new();
        build::startup_message(
            &mut buf,
            &[("user", "u"), ("options", ""), ("database", "d")],
        );
        let Some((StartupPacket::Startup(m), _)) = parse(&buf).expect("valid") else {
            panic!()
        };
        let params: Vec<_> = m.params().collect();
        assert_eq!(params, [("user", "u"), ("options", ""), ("database", "d")]);
        assert_eq!(m.param("options"), Some(""));
        assert_eq!(m.param("missing"), None);
        assert_eq!(m.text(), "user\0u\0options\0\0database\0d\0");

        // Bytes that are not UTF-8 become U+FFFD in the field they are in,
        // a sequence cut short by the NUL included.
        let body: &[u8] = b"\0\x03\0\0user\0b\xffd\0application_name\0x\xe2\x82\0\0";
        let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        packet.extend_from_slice(body);
        let Some((StartupPacket::Startup(m), n)) = parse(&packet).expect("valid") else {
            panic!()
        };
        assert_eq!(n, packet.len());
        let params: Vec<_> = m.params().collect();
        assert_eq!(
            params,
            [("user", "b\u{fffd}d"), ("application_name", "x\u{fffd}")]
        );

        // No parameters at all.
        let empty = [0, 0, 0, 9, 0, 3, 0, 0, 0];
        let Some((StartupPacket::Startup(m), _)) = parse(&empty).expect("valid") else {
            panic!()
        };
        assert_eq!(m.params().count(), 0);
        assert_eq!(m.param("user"), None);
    }

    #[test]
    fn each_broken_parameter_list_is_named() {
        let packet = |params: &[u8]| {
            let mut p = ((params.len() + 8) as u32).to_be_bytes().to_vec();
            p.extend_from_slice(&[0, 3, 0, 0]);
            p.extend_from_slice(params);
            parse(&p)
        };
        let malformed = |why| Err(StartupError::Malformed(why));
        assert_eq!(
            packet(b"user\0u\0\0x"),
            malformed("bytes after the final terminator")
        );
        assert_eq!(
            packet(b"user\0u\0\0\0"),
            malformed("bytes after the final terminator")
        );
        assert_eq!(packet(b"user\0"), malformed("parameter without a value"));
        assert_eq!(packet(b"user\0u"), malformed("parameter without a value"));
        assert_eq!(packet(b"user\0u\0"), malformed("missing terminator"));
        assert_eq!(packet(b"user"), malformed("missing terminator"));
        assert!(
            matches!(packet(b"user\0\0\0"), Ok(Some(_))),
            "an empty value"
        );
    }
}
