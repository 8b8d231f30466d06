//! Typed views over the client messages pgheal inspects, by body.

use crate::cursor::{Cursor, Truncated};

pub const QUERY: u8 = b'Q';
pub const SYNC: u8 = b'S';
pub const FUNCTION_CALL: u8 = b'F';
pub const TERMINATE: u8 = b'X';
pub const PASSWORD: u8 = b'p';

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
}
