//! What a request intends, from its first message: the classifier applied
//! to a Query or Parse, so routing can tell reads from writes.

use crate::classify::{classify, Class};
use crate::frame::HEADER_LEN;
use crate::frontend;

/// What the first message of a transaction says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// Writes, or cannot be proven not to.
    Write,
    /// An autocommit read.
    Read,
    /// `BEGIN READ ONLY`.
    ReadOnlyTx,
    /// A plain `BEGIN`: may write.
    Begin,
}

impl Intent {
    pub fn reads_only(self) -> bool {
        matches!(self, Intent::Read | Intent::ReadOnlyTx)
    }
}

/// Reads the intent from a client's buffered bytes, which start at a
/// message boundary. An incomplete or unknown first message is a write.
pub fn intent(buf: &[u8]) -> Intent {
    let Some(&tag) = buf.first() else {
        return Intent::Write;
    };
    let Some(len) = buf
        .get(1..HEADER_LEN)
        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .and_then(|l| usize::try_from(l).ok())
    else {
        return Intent::Write;
    };
    let Some(body) = buf.get(HEADER_LEN..len + 1) else {
        return Intent::Write;
    };
    let sql = match tag {
        frontend::QUERY => body.split(|&b| b == 0).next(),
        // Parse: statement name, then the query.
        frontend::PARSE => body.split(|&b| b == 0).nth(1),
        _ => None,
    };
    sql.map_or(Intent::Write, sql_intent)
}

/// The intent of a statement's SQL text.
pub fn sql_intent(sql: &[u8]) -> Intent {
    class_intent(classify(sql))
}

/// The intent of a statement of this class.
pub fn class_intent(class: Class) -> Intent {
    match class {
        Class::Read | Class::Show => Intent::Read,
        Class::Begin { read_only: true } => Intent::ReadOnlyTx,
        Class::Begin { read_only: false } => Intent::Begin,
        _ => Intent::Write,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build;
    use bytes::BytesMut;

    fn q(sql: &str) -> BytesMut {
        let mut b = BytesMut::new();
        build::query(&mut b, sql);
        b
    }

    #[test]
    fn intent_from_the_first_message() {
        assert_eq!(intent(&q("SELECT 1")), Intent::Read);
        assert_eq!(intent(&q("BEGIN READ ONLY")), Intent::ReadOnlyTx);
        assert_eq!(intent(&q("BEGIN")), Intent::Begin);
        assert_eq!(intent(&q("INSERT INTO t VALUES (1)")), Intent::Write);
        let whole = q("SELECT 1");
        assert_eq!(
            intent(&whole[..whole.len() - 1]),
            Intent::Write,
            "incomplete"
        );
        let parse = b"P\0\0\0\x10s1\0SELECT 1\0\0\0";
        assert_eq!(intent(parse), Intent::Read);
        assert_eq!(intent(b"S\0\0\0\x04"), Intent::Write);
        assert_eq!(intent(b""), Intent::Write);
        assert_eq!(intent(b"Q\xff\xff\xff\xff"), Intent::Write);
    }
}
