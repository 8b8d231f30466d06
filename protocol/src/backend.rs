//! Typed views over the server messages pgheal inspects. Each takes the
//! message body (the bytes after the 5-byte header).

use crate::cursor::{Cursor, Truncated};

pub const AUTHENTICATION: u8 = b'R';
pub const DATA_ROW: u8 = b'D';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const ERROR_RESPONSE: u8 = b'E';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const PARAMETER_STATUS: u8 = b'S';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
pub const PARSE_COMPLETE: u8 = b'1';
pub const BIND_COMPLETE: u8 = b'2';
pub const CLOSE_COMPLETE: u8 = b'3';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const ROW_DESCRIPTION: u8 = b'T';
pub const PARAMETER_DESCRIPTION: u8 = b't';
pub const NO_DATA: u8 = b'n';
pub const NOTIFICATION_RESPONSE: u8 = b'A';

/// The transaction status carried by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TxStatus {
    pub fn parse(body: &[u8]) -> Result<TxStatus, Truncated> {
        match body {
            [b'I'] => Ok(TxStatus::Idle),
            [b'T'] => Ok(TxStatus::InTransaction),
            [b'E'] => Ok(TxStatus::Failed),
            _ => Err(Truncated),
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }
}

/// ParameterStatus: a run-time parameter's name and value.
pub fn parameter_status(body: &[u8]) -> Result<(&[u8], &[u8]), Truncated> {
    let mut cur = Cursor::new(body);
    Ok((cur.cstr()?, cur.cstr()?))
}

/// BackendKeyData: process id and secret key (4 bytes in protocol 3.0).
pub fn backend_key_data(body: &[u8]) -> Result<(i32, i32), Truncated> {
    let mut cur = Cursor::new(body);
    Ok((cur.i32()?, cur.i32()?))
}

/// DataRow: each column's bytes, `None` for NULL. Only for the proxy's own
/// queries (health checks); client traffic is never decoded.
pub fn data_row(body: &[u8]) -> Result<Vec<Option<&[u8]>>, Truncated> {
    let mut cur = Cursor::new(body);
    let count = u16::from_be_bytes([cur.u8()?, cur.u8()?]);
    let mut out = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let len = cur.i32()?;
        out.push(if len < 0 {
            None
        } else {
            Some(cur.bytes(len as usize)?)
        });
    }
    if !cur.is_empty() {
        return Err(Truncated);
    }
    Ok(out)
}

/// The fields of an ErrorResponse or NoticeResponse that pgheal uses.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ErrorFields<'a> {
    pub severity: &'a [u8],
    pub code: &'a [u8],
    pub message: &'a [u8],
    /// The 1-based character position in the query, when given.
    pub position: &'a [u8],
}

impl<'a> ErrorFields<'a> {
    pub fn parse(body: &'a [u8]) -> Result<Self, Truncated> {
        let mut cur = Cursor::new(body);
        let mut f = ErrorFields::default();
        loop {
            let kind = cur.u8()?;
            if kind == 0 {
                return Ok(f);
            }
            let value = cur.cstr()?;
            match kind {
                b'V' => f.severity = value,
                b'S' if f.severity.is_empty() => f.severity = value,
                b'C' => f.code = value,
                b'M' => f.message = value,
                b'P' => f.position = value,
                _ => {}
            }
        }
    }

    pub fn message_lossy(&self) -> String {
        String::from_utf8_lossy(self.message).into_owned()
    }
}

/// An Authentication* request from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication<'a> {
    Ok,
    CleartextPassword,
    Md5Password {
        salt: [u8; 4],
    },
    Sasl {
        mechanisms: Vec<&'a [u8]>,
    },
    SaslContinue(&'a [u8]),
    SaslFinal(&'a [u8]),
    /// Kerberos, GSSAPI, SSPI and anything newer: not supported upstream.
    Unsupported(i32),
}

impl<'a> Authentication<'a> {
    pub fn parse(body: &'a [u8]) -> Result<Self, Truncated> {
        let mut cur = Cursor::new(body);
        Ok(match cur.i32()? {
            0 => Authentication::Ok,
            3 => Authentication::CleartextPassword,
            5 => {
                let s = cur.bytes(4)?;
                Authentication::Md5Password {
                    salt: [s[0], s[1], s[2], s[3]],
                }
            }
            10 => {
                let mut mechanisms = Vec::new();
                loop {
                    let m = cur.cstr()?;
                    if m.is_empty() {
                        break;
                    }
                    mechanisms.push(m);
                }
                Authentication::Sasl { mechanisms }
            }
            11 => Authentication::SaslContinue(cur.rest()),
            12 => Authentication::SaslFinal(cur.rest()),
            other => Authentication::Unsupported(other),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build;
    use crate::sqlstate;
    use bytes::BytesMut;

    #[test]
    fn error_fields_round_trip() {
        let mut buf = BytesMut::new();
        build::error_response(
            &mut buf,
            build::Severity::Fatal,
            sqlstate::INVALID_PASSWORD,
            "nope",
            Some("check it"),
        );
        let f = ErrorFields::parse(&buf[5..]).expect("test input is valid");
        assert_eq!(f.code, b"28P01");
        assert_eq!(f.severity, b"FATAL");
        assert_eq!(f.message, b"nope");
        assert!(ErrorFields::parse(&buf[5..buf.len() - 1]).is_err());
    }

    #[test]
    fn authentication_requests() {
        assert_eq!(Authentication::parse(&[0, 0, 0, 0]), Ok(Authentication::Ok));
        assert_eq!(
            Authentication::parse(&[0, 0, 0, 5, 1, 2, 3, 4]),
            Ok(Authentication::Md5Password { salt: [1, 2, 3, 4] })
        );
        let sasl = b"\0\0\0\x0aSCRAM-SHA-256\0\0";
        assert_eq!(
            Authentication::parse(sasl),
            Ok(Authentication::Sasl {
                mechanisms: vec![&b"SCRAM-SHA-256"[..]]
            })
        );
        assert_eq!(Authentication::parse(&[0, 0, 0, 5, 1]), Err(Truncated));
        assert_eq!(TxStatus::parse(b"T"), Ok(TxStatus::InTransaction));
        assert_eq!(TxStatus::parse(b"X"), Err(Truncated));
    }

    #[test]
    fn data_rows() {
        let row = b"\0\x02\0\0\0\x01t\xff\xff\xff\xff";
        assert_eq!(data_row(row), Ok(vec![Some(&b"t"[..]), None]));
        assert_eq!(data_row(&row[..row.len() - 1]), Err(Truncated));
        assert_eq!(data_row(b"\0\0x"), Err(Truncated));
    }
}
