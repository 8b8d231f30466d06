//! Finding message boundaries in a byte stream from the 5-byte header alone.
//!
//! Every message after startup is `tag: u8, len: i32 (includes itself), body`.
//! [`Scanner`] walks a stream chunk by chunk: the caller asks for the whole
//! body of the few message types it inspects and lets every other body pass
//! through in pieces, so a 10 MB DataRow is never held or decoded.

/// Bytes in a message header: one tag byte and a 4-byte length.
pub const HEADER_LEN: usize = 5;

/// The default cap on one message, in bytes, including its header.
pub const DEFAULT_MAX_MESSAGE: usize = 256 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("invalid message length {len} (tag {tag:#04x}): a length is at least 4")]
    LengthTooSmall { tag: u8, len: i32 },
    #[error("message of {len} bytes (tag {tag:#04x}) exceeds the limit of {max} bytes")]
    TooLarge { tag: u8, len: u64, max: usize },
}

/// What [`Scanner::next`] found at the front of the unscanned bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing can be decided until more bytes arrive.
    NeedMore,
    /// A header of a message whose body passes through uninspected. `len` is
    /// the whole message size; 5 bytes were consumed.
    Header { tag: u8, len: usize },
    /// A whole message of `len` bytes (header included) is at the front.
    Whole { tag: u8, len: usize },
    /// This many bytes of an uninspected body were consumed.
    Body(usize),
}

impl Step {
    /// How many bytes this step consumed from the front of the buffer.
    pub fn consumed(self) -> usize {
        match self {
            Step::NeedMore => 0,
            Step::Header { .. } => HEADER_LEN,
            Step::Whole { len, .. } => len,
            Step::Body(n) => n,
        }
    }
}

/// Tracks where message boundaries fall in one direction of a connection.
#[derive(Debug, Clone)]
pub struct Scanner {
    skip: usize,
    max: usize,
    /// Length (tag included) of the message being passed through.
    current: usize,
    /// Messages up to this length are always read whole.
    whole_below: usize,
}

impl Scanner {
    pub fn new(max_message: usize) -> Self {
        Scanner {
            skip: 0,
            max: max_message,
            current: 0,
            whole_below: 0,
        }
    }

    /// Reads every message of at most `len` bytes whole, whatever its
    /// type: a connection cut in the middle of one then leaves nothing
    /// half-passed on.
    pub fn whole_below(mut self, len: usize) -> Self {
        self.whole_below = len;
        self
    }

    /// True when the next byte starts a new message.
    pub fn at_boundary(&self) -> bool {
        self.skip == 0
    }

    /// Bytes of the message being passed through that were scanned
    /// already (header included); 0 at a boundary.
    pub fn scanned_of_current(&self) -> usize {
        if self.skip == 0 {
            0
        } else {
            self.current - self.skip
        }
    }

    /// Looks at `buf` (the bytes not yet scanned) and reports the next step.
    /// `whole(tag)` says which message types must be seen whole.
    pub fn next(&mut self, buf: &[u8], whole: impl Fn(u8) -> bool) -> Result<Step, FrameError> {
        if self.skip > 0 {
            if buf.is_empty() {
                return Ok(Step::NeedMore);
            }
            let n = self.skip.min(buf.len());
            self.skip -= n;
            return Ok(Step::Body(n));
        }
        let Some((tag, len)) = header(buf, self.max)? else {
            return Ok(Step::NeedMore);
        };
        if len <= self.whole_below || whole(tag) {
            if buf.len() < len {
                return Ok(Step::NeedMore);
            }
            return Ok(Step::Whole { tag, len });
        }
        self.skip = len - HEADER_LEN;
        self.current = len;
        Ok(Step::Header { tag, len })
    }
}

/// Reads a message header: its tag and its total size including the tag.
pub fn header(buf: &[u8], max: usize) -> Result<Option<(u8, usize)>, FrameError> {
    let [tag, a, b, c, d, ..] = *buf else {
        return Ok(None);
    };
    let len = i32::from_be_bytes([a, b, c, d]);
    if len < 4 {
        return Err(FrameError::LengthTooSmall { tag, len });
    }
    let total = len as u64 + 1;
    if total > max as u64 {
        return Err(FrameError::TooLarge {
            tag,
            len: total,
            max,
        });
    }
    Ok(Some((tag, total as usize)))
}

/// One whole message at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub tag: u8,
    /// The bytes after the header.
    pub body: &'a [u8],
    /// The whole message size, header included.
    pub len: usize,
}

/// Finds one whole message at the front of `buf`, or `None` when it is not
/// all there yet.
pub fn message(buf: &[u8], max: usize) -> Result<Option<Message<'_>>, FrameError> {
    match header(buf, max)? {
        Some((tag, len)) if buf.len() >= len => Ok(Some(Message {
            tag,
            body: &buf[HEADER_LEN..len],
            len,
        })),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn passes_bodies_through_in_pieces() {
        let mut stream = msg(b'D', &[7; 100]);
        stream.extend(msg(b'Z', b"I"));
        let mut sc = Scanner::new(1 << 20);
        let is_z = |t| t == b'Z';
        assert_eq!(sc.next(&stream[..3], is_z), Ok(Step::NeedMore));
        assert_eq!(
            sc.next(&stream, is_z),
            Ok(Step::Header {
                tag: b'D',
                len: 105
            })
        );
        assert!(!sc.at_boundary());
        assert_eq!(sc.scanned_of_current(), 5);
        assert_eq!(sc.next(&stream[5..50], is_z), Ok(Step::Body(45)));
        assert_eq!(sc.scanned_of_current(), 50);
        assert_eq!(sc.next(&stream[50..], is_z), Ok(Step::Body(55)));
        assert!(sc.at_boundary());
        assert_eq!(sc.scanned_of_current(), 0);
        // Small messages whole, whatever their type.
        let mut small = Scanner::new(1 << 20).whole_below(105);
        assert_eq!(small.next(&stream[..50], |_| false), Ok(Step::NeedMore));
        assert_eq!(
            small.next(&stream, |_| false),
            Ok(Step::Whole {
                tag: b'D',
                len: 105
            })
        );
        assert_eq!(sc.next(&stream[105..109], is_z), Ok(Step::NeedMore));
        assert_eq!(
            sc.next(&stream[105..], is_z),
            Ok(Step::Whole { tag: b'Z', len: 6 })
        );
    }

    #[test]
    fn rejects_bad_lengths() {
        let mut sc = Scanner::new(1000);
        let short = [b'Q', 0, 0, 0, 3];
        assert!(matches!(
            sc.next(&short, |_| false),
            Err(FrameError::LengthTooSmall { .. })
        ));
        let negative = [b'Q', 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            sc.next(&negative, |_| false),
            Err(FrameError::LengthTooSmall { .. })
        ));
        let big = [b'Q', 0x7f, 0xff, 0xff, 0xff];
        assert!(matches!(
            sc.next(&big, |_| false),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn message_splits_whole_ones_only() {
        let m = msg(b'S', b"a\0b\0");
        assert_eq!(message(&m[..6], 100), Ok(None));
        let whole = message(&m, 100)
            .expect("test input is valid")
            .expect("test input is valid");
        assert_eq!(
            (whole.tag, whole.body, whole.len),
            (b'S', &b"a\0b\0"[..], 9)
        );
    }
}
