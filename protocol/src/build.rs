//! Builders for the messages pgheal sends. Each appends one message to a
//! `BytesMut` and patches the length afterwards.

use bytes::{BufMut, BytesMut};

use crate::backend::TxStatus;
use crate::sqlstate::SqlState;
use crate::startup::CancelKey;

/// Severity of an ErrorResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

fn message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    untagged(buf, body);
}

fn untagged(buf: &mut BytesMut, body: impl FnOnce(&mut BytesMut)) {
    let at = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn cstr(buf: &mut BytesMut, s: &[u8]) {
    buf.put_slice(s);
    buf.put_u8(0);
}

/// ErrorResponse with severity, SQLSTATE, message and an optional hint.
pub fn error_response(
    buf: &mut BytesMut,
    severity: Severity,
    code: SqlState,
    msg: &str,
    hint: Option<&str>,
) {
    error_response_code(buf, severity, code.code(), msg, hint);
}

/// ErrorResponse with a SQLSTATE given as text, for codes passed on from a
/// server.
/// An error in protocol 2's format (`E`, the message, NUL; no length, no
/// fields), for a client that asked for protocol 2 and is refused, as
/// PostgreSQL answers it.
pub fn error_v2(buf: &mut BytesMut, message: &str) {
    buf.put_u8(b'E');
    buf.extend_from_slice(message.replace('\0', " ").as_bytes());
    buf.put_u8(0);
}

pub fn error_response_code(
    buf: &mut BytesMut,
    severity: Severity,
    code: &str,
    msg: &str,
    hint: Option<&str>,
) {
    message(buf, b'E', |b| {
        for kind in [b'S', b'V'] {
            b.put_u8(kind);
            cstr(b, severity.as_str().as_bytes());
        }
        b.put_u8(b'C');
        cstr(b, code.as_bytes());
        b.put_u8(b'M');
        cstr(b, msg.as_bytes());
        if let Some(hint) = hint {
            b.put_u8(b'H');
            cstr(b, hint.as_bytes());
        }
        b.put_u8(0);
    });
}

pub fn parameter_status(buf: &mut BytesMut, name: &[u8], value: &[u8]) {
    message(buf, b'S', |b| {
        cstr(b, name);
        cstr(b, value);
    });
}

pub fn backend_key_data(buf: &mut BytesMut, key: CancelKey) {
    message(buf, b'K', |b| {
        b.put_i32(key.pid);
        b.put_i32(key.secret);
    });
}

pub fn ready_for_query(buf: &mut BytesMut, status: TxStatus) {
    message(buf, b'Z', |b| b.put_u8(status.byte()));
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    message(buf, b'C', |b| cstr(b, tag.as_bytes()));
}

pub fn parse_complete(buf: &mut BytesMut) {
    message(buf, b'1', |_| {});
}

pub fn bind_complete(buf: &mut BytesMut) {
    message(buf, b'2', |_| {});
}

pub fn empty_query_response(buf: &mut BytesMut) {
    message(buf, b'I', |_| {});
}

pub fn no_data(buf: &mut BytesMut) {
    message(buf, b'n', |_| {});
}

pub fn auth_ok(buf: &mut BytesMut) {
    message(buf, b'R', |b| b.put_i32(0));
}

pub fn auth_cleartext(buf: &mut BytesMut) {
    message(buf, b'R', |b| b.put_i32(3));
}

pub fn auth_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    message(buf, b'R', |b| {
        b.put_i32(5);
        b.put_slice(&salt);
    });
}

pub fn auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    message(buf, b'R', |b| {
        b.put_i32(10);
        for m in mechanisms {
            cstr(b, m.as_bytes());
        }
        b.put_u8(0);
    });
}

pub fn auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    message(buf, b'R', |b| {
        b.put_i32(11);
        b.put_slice(data);
    });
}

pub fn auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    message(buf, b'R', |b| {
        b.put_i32(12);
        b.put_slice(data);
    });
}

/// NegotiateProtocolVersion: the newest minor version pgheal supports and
/// the protocol options it did not recognise.
pub fn negotiate_protocol_version(buf: &mut BytesMut, newest_minor: u16, unrecognized: &[&str]) {
    message(buf, b'v', |b| {
        b.put_i32(3 << 16 | newest_minor as i32);
        b.put_i32(unrecognized.len() as i32);
        for o in unrecognized {
            cstr(b, o.as_bytes());
        }
    });
}

/// StartupMessage for protocol 3.0.
pub fn startup_message(buf: &mut BytesMut, params: &[(&str, &str)]) {
    startup_message_version(buf, 0, params);
}

/// StartupMessage for protocol 3.`minor`.
pub fn startup_message_version(buf: &mut BytesMut, minor: u16, params: &[(&str, &str)]) {
    untagged(buf, |b| {
        b.put_i32(3 << 16 | minor as i32);
        for (k, v) in params {
            cstr(b, k.as_bytes());
            cstr(b, v.as_bytes());
        }
        b.put_u8(0);
    });
}

/// RowDescription with every column as `text`.
pub fn row_description_text(buf: &mut BytesMut, columns: &[&str]) {
    message(buf, b'T', |b| {
        b.put_i16(columns.len() as i16);
        for name in columns {
            cstr(b, name.as_bytes());
            b.put_i32(0); // table OID
            b.put_i16(0); // column number
            b.put_i32(25); // text
            b.put_i16(-1); // variable size
            b.put_i32(-1); // no modifier
            b.put_i16(0); // text format
        }
    });
}

/// DataRow of text values; `None` is NULL.
pub fn data_row(buf: &mut BytesMut, values: &[Option<&str>]) {
    message(buf, b'D', |b| {
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.put_slice(v.as_bytes());
                }
                None => b.put_i32(-1),
            }
        }
    });
}

/// SSLRequest: asks a server to start TLS.
pub fn ssl_request(buf: &mut BytesMut) {
    buf.put_i32(8);
    buf.put_i32(80877103);
}

pub fn cancel_request(buf: &mut BytesMut, key: CancelKey) {
    untagged(buf, |b| {
        b.put_i32(80_877_102);
        b.put_i32(key.pid);
        b.put_i32(key.secret);
    });
}

pub fn password_message(buf: &mut BytesMut, password: &[u8]) {
    message(buf, b'p', |b| cstr(b, password));
}

pub fn sasl_initial_response(buf: &mut BytesMut, mechanism: &str, data: &[u8]) {
    message(buf, b'p', |b| {
        cstr(b, mechanism.as_bytes());
        b.put_i32(data.len() as i32);
        b.put_slice(data);
    });
}

pub fn sasl_response(buf: &mut BytesMut, data: &[u8]) {
    message(buf, b'p', |b| b.put_slice(data));
}

pub fn query(buf: &mut BytesMut, sql: &str) {
    query_bytes(buf, sql.as_bytes());
}

/// A Query whose text is bytes as a client sent them.
pub fn query_bytes(buf: &mut BytesMut, sql: &[u8]) {
    message(buf, b'Q', |b| cstr(b, sql));
}

pub fn terminate(buf: &mut BytesMut) {
    message(buf, b'X', |_| {});
}

/// Parse; `types` is the parameter type section as a client sent it
/// (an i16 count, then the OIDs).
pub fn parse(buf: &mut BytesMut, name: &[u8], query: &[u8], types: &[u8]) {
    message(buf, b'P', |b| {
        cstr(b, name);
        cstr(b, query);
        b.put_slice(types);
    });
}

/// Bind with the part after the two names (formats, values, result
/// formats) copied as sent.
pub fn bind(buf: &mut BytesMut, portal: &[u8], statement: &[u8], rest: &[u8]) {
    message(buf, b'B', |b| {
        cstr(b, portal);
        cstr(b, statement);
        b.put_slice(rest);
    });
}

/// Describe (`kind` is `S` or `P`).
pub fn describe(buf: &mut BytesMut, kind: u8, name: &[u8]) {
    message(buf, b'D', |b| {
        b.put_u8(kind);
        cstr(b, name);
    });
}

/// Close (`kind` is `S` or `P`).
pub fn close(buf: &mut BytesMut, kind: u8, name: &[u8]) {
    message(buf, b'C', |b| {
        b.put_u8(kind);
        cstr(b, name);
    });
}

/// Execute of a portal, all rows when `max_rows` is 0.
pub fn execute(buf: &mut BytesMut, portal: &[u8], max_rows: i32) {
    message(buf, b'E', |b| {
        cstr(b, portal);
        b.put_i32(max_rows);
    });
}

pub fn sync(buf: &mut BytesMut) {
    message(buf, b'S', |_| {});
}

pub fn flush(buf: &mut BytesMut) {
    message(buf, b'H', |_| {});
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{self, Authentication};
    use crate::frame;
    use crate::frontend;
    use crate::sqlstate;

    fn only(buf: &BytesMut) -> (u8, &[u8]) {
        let m = frame::message(buf, 1 << 20)
            .expect("test input is valid")
            .expect("test input is valid");
        assert_eq!(m.len, buf.len(), "exactly one message");
        (m.tag, m.body)
    }

    #[test]
    fn result_sets_read_back() {
        let mut b = BytesMut::new();
        data_row(&mut b, &[Some("a"), None, Some("")]);
        let (tag, body) = only(&b);
        assert_eq!(tag, backend::DATA_ROW);
        assert_eq!(
            backend::data_row(body).expect("valid"),
            vec![Some(&b"a"[..]), None, Some(&b""[..])]
        );
        let mut b = BytesMut::new();
        row_description_text(&mut b, &["x", "yz"]);
        let (tag, body) = only(&b);
        assert_eq!(tag, b'T');
        assert_eq!(&body[..2], &[0, 2]);
        assert_eq!(body.len(), 2 + (2 + 18) + (3 + 18));
    }

    #[test]
    fn extended_messages_read_back() {
        let mut b = BytesMut::new();
        parse(&mut b, b"s1", b"select $1", b"\0\x01\0\0\0\x17");
        let (tag, body) = only(&b);
        assert_eq!(tag, frontend::PARSE);
        let p = frontend::parse(body).expect("built Parse reads back");
        assert_eq!((p.name, p.query), (&b"s1"[..], &b"select $1"[..]));
        let mut b = BytesMut::new();
        bind(&mut b, b"", b"s2", b"\0\0\0\0\0\0");
        let (tag, body) = only(&b);
        assert_eq!(tag, frontend::BIND);
        assert_eq!(frontend::bind(body).expect("valid").statement, b"s2");
        for build in [describe, close] {
            let mut b = BytesMut::new();
            build(&mut b, frontend::STATEMENT, b"s3");
            assert_eq!(
                frontend::target(only(&b).1),
                Ok((frontend::STATEMENT, &b"s3"[..]))
            );
        }
        let mut b = BytesMut::new();
        execute(&mut b, b"", 0);
        sync(&mut b);
        assert_eq!(&b[..], b"E\0\0\0\x09\0\0\0\0\0S\0\0\0\x04");
    }

    #[test]
    fn backend_messages_read_back() {
        let mut b = BytesMut::new();
        parameter_status(&mut b, b"TimeZone", b"UTC");
        let (tag, body) = only(&b);
        assert_eq!(tag, backend::PARAMETER_STATUS);
        assert_eq!(
            backend::parameter_status(body),
            Ok((&b"TimeZone"[..], &b"UTC"[..]))
        );

        let mut b = BytesMut::new();
        backend_key_data(
            &mut b,
            CancelKey {
                pid: 42,
                secret: -7,
            },
        );
        assert_eq!(backend::backend_key_data(only(&b).1), Ok((42, -7)));

        let mut b = BytesMut::new();
        ready_for_query(&mut b, TxStatus::Failed);
        assert_eq!(TxStatus::parse(only(&b).1), Ok(TxStatus::Failed));

        let mut b = BytesMut::new();
        auth_ok(&mut b);
        assert_eq!(Authentication::parse(only(&b).1), Ok(Authentication::Ok));
        let mut b = BytesMut::new();
        auth_cleartext(&mut b);
        assert_eq!(
            Authentication::parse(only(&b).1),
            Ok(Authentication::CleartextPassword)
        );
        let mut b = BytesMut::new();
        auth_md5(&mut b, [9, 8, 7, 6]);
        assert_eq!(
            Authentication::parse(only(&b).1),
            Ok(Authentication::Md5Password { salt: [9, 8, 7, 6] })
        );
        let mut b = BytesMut::new();
        auth_sasl(&mut b, &["SCRAM-SHA-256"]);
        assert_eq!(
            Authentication::parse(only(&b).1),
            Ok(Authentication::Sasl {
                mechanisms: vec![&b"SCRAM-SHA-256"[..]]
            })
        );
        let mut b = BytesMut::new();
        auth_sasl_continue(&mut b, b"r=abc");
        assert_eq!(
            Authentication::parse(only(&b).1),
            Ok(Authentication::SaslContinue(b"r=abc"))
        );
        let mut b = BytesMut::new();
        auth_sasl_final(&mut b, b"v=xyz");
        assert_eq!(
            Authentication::parse(only(&b).1),
            Ok(Authentication::SaslFinal(b"v=xyz"))
        );
    }

    #[test]
    fn frontend_messages_read_back() {
        let mut b = BytesMut::new();
        password_message(&mut b, b"md5abc");
        assert_eq!(frontend::password(only(&b).1), Ok(&b"md5abc"[..]));
        let mut b = BytesMut::new();
        sasl_initial_response(&mut b, "SCRAM-SHA-256", b"n,,n=,r=x");
        assert_eq!(
            frontend::sasl_initial_response(only(&b).1),
            Ok((&b"SCRAM-SHA-256"[..], &b"n,,n=,r=x"[..]))
        );
        let mut b = BytesMut::new();
        sasl_response(&mut b, b"c=biws");
        assert_eq!(only(&b), (b'p', &b"c=biws"[..]));
        let mut b = BytesMut::new();
        query(&mut b, "SELECT 1");
        assert_eq!(frontend::query(only(&b).1), Ok(&b"SELECT 1"[..]));
        let mut b = BytesMut::new();
        command_complete(&mut b, "ROLLBACK");
        assert_eq!(only(&b), (b'C', &b"ROLLBACK\0"[..]));
        for (make, tag) in [
            (parse_complete as fn(&mut BytesMut), b'1'),
            (bind_complete, b'2'),
            (no_data, b'n'),
        ] {
            let mut b = BytesMut::new();
            make(&mut b);
            assert_eq!(only(&b), (tag, &b""[..]));
        }
        let mut b = BytesMut::new();
        terminate(&mut b);
        assert_eq!(only(&b), (frontend::TERMINATE, &b""[..]));
    }

    #[test]
    fn negotiate_and_errors() {
        let mut b = BytesMut::new();
        negotiate_protocol_version(&mut b, 0, &["_pq_.a", "_pq_.b"]);
        let (tag, body) = only(&b);
        assert_eq!(tag, backend::NEGOTIATE_PROTOCOL_VERSION);
        assert_eq!(&body[..8], &[0, 3, 0, 0, 0, 0, 0, 2]);
        assert_eq!(&body[8..], b"_pq_.a\0_pq_.b\0");

        let mut b = BytesMut::new();
        error_response(
            &mut b,
            Severity::Error,
            sqlstate::TOO_MANY_CONNECTIONS,
            "busy",
            None,
        );
        let f = backend::ErrorFields::parse(only(&b).1).expect("test input is valid");
        assert_eq!(
            (f.severity, f.code, f.message),
            (&b"ERROR"[..], &b"53300"[..], &b"busy"[..])
        );
        assert_eq!(sqlstate::TOO_MANY_CONNECTIONS.to_string(), "53300");
    }
}
