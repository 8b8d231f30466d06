//! Typed views over the client messages pgheal inspects, by body.

use crate::cursor::{Cursor, Truncated};

pub const QUERY: u8 = b'Q';
pub const SYNC: u8 = b'S';
pub const FUNCTION_CALL: u8 = b'F';
pub const TERMINATE: u8 = b'X';
pub const PASSWORD: u8 = b'p';
pub const PARSE: u8 = b'P';
pub const BIND: u8 = b'B';
pub const DESCRIBE: u8 = b'D';
pub const CLOSE: u8 = b'C';
pub const EXECUTE: u8 = b'E';
pub const FLUSH: u8 = b'H';

/// Describe/Close target kinds.
pub const STATEMENT: u8 = b'S';
pub const PORTAL: u8 = b'P';

/// A Parse message: the statement name, its SQL, and the parameter type
/// section exactly as sent (count and OIDs), to pass on unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parse<'a> {
    pub name: &'a [u8],
    pub query: &'a [u8],
    pub types: &'a [u8],
}

pub fn parse(body: &[u8]) -> Result<Parse<'_>, Truncated> {
    let mut cur = Cursor::new(body);
    let name = cur.cstr()?;
    let query = cur.long_cstr()?;
    let types = cur.rest();
    let mut check = Cursor::new(types);
    let count = check.i16()?;
    check.bytes(usize::try_from(count).map_err(|_| Truncated)? * 4)?;
    if !check.is_empty() {
        return Err(Truncated);
    }
    Ok(Parse { name, query, types })
}

/// A Bind message's portal and statement names, and everything after them
/// (formats, parameters, result formats) to pass on unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    pub rest: &'a [u8],
}

pub fn bind(body: &[u8]) -> Result<Bind<'_>, Truncated> {
    let mut cur = Cursor::new(body);
    let portal = cur.cstr()?;
    let statement = cur.cstr()?;
    Ok(Bind {
        portal,
        statement,
        rest: cur.rest(),
    })
}

/// The target of a Describe or Close: kind (`S` or `P`) and name.
pub fn target(body: &[u8]) -> Result<(u8, &[u8]), Truncated> {
    let mut cur = Cursor::new(body);
    let kind = cur.u8()?;
    let name = cur.cstr()?;
    if !cur.is_empty() || !matches!(kind, STATEMENT | PORTAL) {
        return Err(Truncated);
    }
    Ok((kind, name))
}

/// A PasswordMessage: the password (cleartext or md5 form), without its NUL.
pub fn password(body: &[u8]) -> Result<&[u8], Truncated> {
    let mut cur = Cursor::new(body);
    let p = cur.cstr()?;
    if !cur.is_empty() {
        return Err(Truncated);
    }
    Ok(p)
}

/// A SASLInitialResponse: the mechanism and the client-first message.
pub fn sasl_initial_response(body: &[u8]) -> Result<(&[u8], &[u8]), Truncated> {
    let mut cur = Cursor::new(body);
    let mechanism = cur.cstr()?;
    let len = cur.i32()?;
    let data = if len < 0 {
        &[][..]
    } else {
        cur.bytes(len as usize)?
    };
    if !cur.is_empty() {
        return Err(Truncated);
    }
    Ok((mechanism, data))
}

/// The SQL text of a simple Query, without its NUL terminator.
pub fn query(body: &[u8]) -> Result<&[u8], Truncated> {
    match body.split_last() {
        Some((0, text)) => Ok(text),
        _ => Err(Truncated),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views() {
        assert_eq!(password(b"secret\0"), Ok(&b"secret"[..]));
        assert_eq!(password(b"secret"), Err(Truncated));
        let init = b"SCRAM-SHA-256\0\0\0\0\x03abc";
        assert_eq!(
            sasl_initial_response(init),
            Ok((&b"SCRAM-SHA-256"[..], &b"abc"[..]))
        );
        assert_eq!(
            sasl_initial_response(&init[..init.len() - 1]),
            Err(Truncated)
        );
        assert_eq!(query(b"select 1\0"), Ok(&b"select 1"[..]));
        assert_eq!(query(b""), Err(Truncated));
    }

    #[test]
    fn extended_protocol_views() {
        let p = parse(b"s1\0select $1\0\0\x01\0\0\0\x17").expect("valid Parse");
        assert_eq!(p.name, b"s1");
        assert_eq!(p.query, b"select $1");
        assert_eq!(p.types, b"\0\x01\0\0\0\x17");
        assert!(parse(b"s1\0select\0\0\x01\0\0").is_err());
        assert!(parse(b"s1\0select\0\xff\xff").is_err());
        let b = bind(b"\0s1\0\0\0").expect("valid Bind");
        assert_eq!(
            (b.portal, b.statement, b.rest),
            (&b""[..], &b"s1"[..], &b"\0\0"[..])
        );
        assert!(bind(b"p").is_err());
        assert_eq!(target(b"Ss1\0"), Ok((STATEMENT, &b"s1"[..])));
        assert!(target(b"Xs1\0").is_err());
        assert!(target(b"S").is_err());
    }
}
