//! The keywords the classifier and the session-effects scan look for in
//! every word of every Query, found with one comparison instead of one per
//! keyword: a word of up to eight bytes is packed, lower-cased, into a
//! `u64` and matched against constants; the few longer keywords are
//! compared by length first.

/// A word that matters to routing or to the session, or `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kw {
    Other,
    // Leading words.
    Select,
    With,
    Values,
    Table,
    Show,
    Explain,
    Copy,
    Set,
    Reset,
    Begin,
    Start,
    Commit,
    End,
    Rollback,
    Abort,
    Savepoint,
    Release,
    // Second words.
    Local,
    Transaction,
    Prepared,
    // Anywhere in a statement.
    Insert,
    Delete,
    Merge,
    Update,
    Share,
    For,
    No,
    Key,
    Read,
    Only,
    Write,
    Analyze,
    Into,
    To,
    From,
    Hold,
    Temp,
    /// `pg_advisory_lock` and its shared and `try` forms (session level).
    AdvisoryLock,
    /// `nextval`, `setval`, `pg_notify`: functions that write.
    Writes,
}

/// A keyword of at most eight bytes (lower case) as a number: its bytes
/// in little-endian order.
const fn pack(keyword: &[u8]) -> u64 {
    let mut key = 0u64;
    let mut i = 0;
    while i < keyword.len() {
        key |= (keyword[i] as u64) << (8 * i);
        i += 1;
    }
    key
}

/// A word of at most eight bytes as [`pack`] packs a keyword. Setting bit
/// 0x20 of every byte lower-cases a letter, and turns no other byte into
/// a lower-case letter; keywords are made of letters only.
fn pack_word(word: &[u8]) -> Option<u64> {
    // Two loads that overlap when the word is shorter than twice their
    // size: the bytes both hold are the same, so OR puts each byte once
    // in its place (a loop over the bytes costs several times as much).
    let n = word.len();
    let key = if let (Some(lo), Some(hi)) = (word.first_chunk::<4>(), word.last_chunk::<4>()) {
        if n > 8 {
            return None;
        }
        u64::from(u32::from_le_bytes(*lo)) | u64::from(u32::from_le_bytes(*hi)) << (8 * (n - 4))
    } else if let (Some(lo), Some(hi)) = (word.first_chunk::<2>(), word.last_chunk::<2>()) {
        u64::from(u16::from_le_bytes(*lo)) | u64::from(u16::from_le_bytes(*hi)) << (8 * (n - 2))
    } else {
        word.first().map_or(0, |&b| u64::from(b))
    };
    // 0x20 into each of the word's bytes, none beyond it.
    let lower = match n {
        0 => 0,
        n => 0x2020_2020_2020_2020u64 >> (8 * (8 - n)),
    };
    Some(key | lower)
}

/// The short keywords, packed.
mod packed {
    use super::pack;

    pub(super) const SELECT: u64 = pack(b"select");
    pub(super) const WITH: u64 = pack(b"with");
    pub(super) const VALUES: u64 = pack(b"values");
    pub(super) const TABLE: u64 = pack(b"table");
    pub(super) const SHOW: u64 = pack(b"show");
    pub(super) const EXPLAIN: u64 = pack(b"explain");
    pub(super) const COPY: u64 = pack(b"copy");
    pub(super) const SET: u64 = pack(b"set");
    pub(super) const RESET: u64 = pack(b"reset");
    pub(super) const BEGIN: u64 = pack(b"begin");
    pub(super) const START: u64 = pack(b"start");
    pub(super) const COMMIT: u64 = pack(b"commit");
    pub(super) const END: u64 = pack(b"end");
    pub(super) const ROLLBACK: u64 = pack(b"rollback");
    pub(super) const ABORT: u64 = pack(b"abort");
    pub(super) const RELEASE: u64 = pack(b"release");
    pub(super) const INSERT: u64 = pack(b"insert");
    pub(super) const DELETE: u64 = pack(b"delete");
    pub(super) const MERGE: u64 = pack(b"merge");
    pub(super) const UPDATE: u64 = pack(b"update");
    pub(super) const SHARE: u64 = pack(b"share");
    pub(super) const FOR: u64 = pack(b"for");
    pub(super) const NO: u64 = pack(b"no");
    pub(super) const KEY: u64 = pack(b"key");
    pub(super) const READ: u64 = pack(b"read");
    pub(super) const ONLY: u64 = pack(b"only");
    pub(super) const WRITE: u64 = pack(b"write");
    pub(super) const ANALYZE: u64 = pack(b"analyze");
    pub(super) const ANALYSE: u64 = pack(b"analyse");
    pub(super) const INTO: u64 = pack(b"into");
    pub(super) const TO: u64 = pack(b"to");
    pub(super) const FROM: u64 = pack(b"from");
    pub(super) const HOLD: u64 = pack(b"hold");
    pub(super) const TEMP: u64 = pack(b"temp");
    pub(super) const NEXTVAL: u64 = pack(b"nextval");
    pub(super) const SETVAL: u64 = pack(b"setval");
    pub(super) const LOCAL: u64 = pack(b"local");
    pub(super) const PREPARED: u64 = pack(b"prepared");
}

/// The keyword `word` is (any case), if it is one of [`Kw`]'s.
pub(crate) fn keyword(word: &[u8]) -> Kw {
    // A trailing zero byte would pack like the word without it; no keyword
    // ends with one.
    let key = match pack_word(word) {
        _ if word.last() == Some(&0) => return Kw::Other,
        Some(key) => key,
        None => return long(word),
    };
    use packed::*;
    match key {
        SELECT => Kw::Select,
        WITH => Kw::With,
        VALUES => Kw::Values,
        TABLE => Kw::Table,
        SHOW => Kw::Show,
        EXPLAIN => Kw::Explain,
        COPY => Kw::Copy,
        SET => Kw::Set,
        RESET => Kw::Reset,
        BEGIN => Kw::Begin,
        START => Kw::Start,
        COMMIT => Kw::Commit,
        END => Kw::End,
        ROLLBACK => Kw::Rollback,
        ABORT => Kw::Abort,
        RELEASE => Kw::Release,
        INSERT => Kw::Insert,
        DELETE => Kw::Delete,
        MERGE => Kw::Merge,
        UPDATE => Kw::Update,
        SHARE => Kw::Share,
        FOR => Kw::For,
        NO => Kw::No,
        KEY => Kw::Key,
        READ => Kw::Read,
        ONLY => Kw::Only,
        WRITE => Kw::Write,
        ANALYZE | ANALYSE => Kw::Analyze,
        INTO => Kw::Into,
        TO => Kw::To,
        FROM => Kw::From,
        HOLD => Kw::Hold,
        TEMP => Kw::Temp,
        NEXTVAL | SETVAL => Kw::Writes,
        LOCAL => Kw::Local,
        PREPARED => Kw::Prepared,
        _ => Kw::Other,
    }
}

/// The keywords longer than eight bytes, told apart by length first:
/// most long words are identifiers of no keyword's length.
fn long(word: &[u8]) -> Kw {
    let candidates: &[(&str, Kw)] = match word.len() {
        9 => &[
            ("savepoint", Kw::Savepoint),
            ("temporary", Kw::Temp),
            ("pg_notify", Kw::Writes),
        ],
        11 => &[("transaction", Kw::Transaction)],
        16 => &[("pg_advisory_lock", Kw::AdvisoryLock)],
        20 => &[("pg_try_advisory_lock", Kw::AdvisoryLock)],
        23 => &[("pg_advisory_lock_shared", Kw::AdvisoryLock)],
        27 => &[("pg_try_advisory_lock_shared", Kw::AdvisoryLock)],
        _ => return Kw::Other,
    };
    candidates
        .iter()
        .find(|(k, _)| word.eq_ignore_ascii_case(k.as_bytes()))
        .map_or(Kw::Other, |&(_, kw)| kw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_in_any_case() {
        assert_eq!(keyword(b"SELECT"), Kw::Select);
        assert_eq!(keyword(b"sElEcT"), Kw::Select);
        assert_eq!(keyword(b"analyse"), Kw::Analyze);
        assert_eq!(keyword(b"TEMPORARY"), Kw::Temp);
        assert_eq!(keyword(b"Pg_Try_Advisory_Lock_Shared"), Kw::AdvisoryLock);
        assert_eq!(keyword(b"NEXTVAL"), Kw::Writes);
        for (word, kw) in [
            ("savepoint", Kw::Savepoint),
            ("Transaction", Kw::Transaction),
            ("pg_notify", Kw::Writes),
            ("pg_advisory_lock", Kw::AdvisoryLock),
            ("pg_try_advisory_lock", Kw::AdvisoryLock),
            ("PG_ADVISORY_LOCK_SHARED", Kw::AdvisoryLock),
            ("pg_try_advisory_lock_shared", Kw::AdvisoryLock),
        ] {
            assert_eq!(keyword(word.as_bytes()), kw, "{word}");
        }
    }

    #[test]
    fn near_misses_are_other() {
        // Same packed prefix, other lengths, other bytes.
        for w in [
            &b"selects"[..],
            b"selec",
            b"xselect",
            b"",
            b"select\0",
            b"pg_advisory_xact_lock",
            b"pg_advisory_locks",
            b"savepoints",
            b"tempor",
            b"\xc3\xa9t\xc3\xa9",
        ] {
            assert_eq!(keyword(w), Kw::Other, "{:?}", String::from_utf8_lossy(w));
        }
    }

    #[test]
    fn packing_any_length_matches_packing_byte_by_byte() {
        let bytes = b"SeLeCtEd_Xy";
        for n in 0..=bytes.len() {
            let word = &bytes[..n];
            let mut slow = 0u64;
            for (i, &b) in word.iter().enumerate().take(8) {
                slow |= u64::from(b | 0x20) << (8 * i);
            }
            let expected = (n <= 8).then_some(slow);
            assert_eq!(pack_word(word), expected, "{n} bytes");
        }
    }

    #[test]
    fn packing_tells_words_of_different_lengths_apart() {
        assert_ne!(pack(b"to"), pack(b"o"));
        assert_eq!(pack_word(b"To"), pack_word(b"tO"));
        assert_eq!(pack_word(b"TO"), Some(pack(b"to")));
        assert_eq!(keyword(b"to\0"), Kw::Other);
        // Bytes that are not letters never pack like one.
        assert_eq!(keyword(b"\x13\x0f"), Kw::Other);
        assert_eq!(keyword(b"_o"), Kw::Other);
    }
}
