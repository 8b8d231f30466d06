//! A bounds-checked reader over one message body.

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("message body is truncated or malformed")]
pub struct Truncated;

pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Cursor { buf }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(crate) fn rest(&self) -> &'a [u8] {
        self.buf
    }

    pub(crate) fn u8(&mut self) -> Result<u8, Truncated> {
        let (&b, rest) = self.buf.split_first().ok_or(Truncated)?;
        self.buf = rest;
        Ok(b)
    }

    pub(crate) fn i16(&mut self) -> Result<i16, Truncated> {
        let bytes = self.bytes(2)?;
        Ok(i16::from_be_bytes([bytes[0], bytes[1]]))
    }

    pub(crate) fn i32(&mut self) -> Result<i32, Truncated> {
        let bytes = self.bytes(4)?;
        Ok(i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], Truncated> {
        if self.buf.len() < n {
            return Err(Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// A NUL-terminated text that is usually long (SQL), without its
    /// terminator: memchr from the first byte.
    pub(crate) fn long_cstr(&mut self) -> Result<&'a [u8], Truncated> {
        let end = memchr::memchr(0, self.buf).ok_or(Truncated)?;
        let (s, rest) = self.buf.split_at(end);
        self.buf = rest.get(1..).unwrap_or_default();
        Ok(s)
    }

    /// A NUL-terminated string, without its terminator.
    pub(crate) fn cstr(&mut self) -> Result<&'a [u8], Truncated> {
        // Names are short and a byte loop finds their end soonest; SQL
        // texts are long, and memchr finds theirs many bytes at a time.
        const SHORT: usize = 16;
        let end = match self.buf.iter().take(SHORT).position(|&b| b == 0) {
            Some(end) => end,
            None => {
                let rest = self.buf.get(SHORT..).ok_or(Truncated)?;
                SHORT + memchr::memchr(0, rest).ok_or(Truncated)?
            }
        };
        let s = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_of_any_length_end_at_their_nul() {
        for len in [0, 1, 15, 16, 17, 40, 300] {
            let mut buf = vec![b'a'; len];
            buf.extend_from_slice(b"\0next\0");
            let mut cur = Cursor::new(&buf);
            assert_eq!(cur.cstr(), Ok(&buf[..len]), "{len} bytes");
            assert_eq!(cur.cstr(), Ok(&b"next"[..]));
            assert_eq!(cur.cstr(), Err(Truncated), "nothing left");
            let mut long = Cursor::new(&buf);
            assert_eq!(long.long_cstr(), Ok(&buf[..len]), "{len} bytes");
            assert_eq!(long.long_cstr(), Ok(&b"next"[..]));
            assert_eq!(long.long_cstr(), Err(Truncated), "nothing left");
            let unterminated = vec![b'a'; len];
            assert_eq!(
                Cursor::new(&unterminated).cstr(),
                Err(Truncated),
                "{len} bytes, no NUL"
            );
            assert_eq!(Cursor::new(&unterminated).long_cstr(), Err(Truncated));
        }
    }
}
