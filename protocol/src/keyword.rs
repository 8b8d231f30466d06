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
    let mut bytes = [0u8; 8];
    bytes.get_mut(..word.len())?.copy_from_slice(word);
    let case = 0x2020_2020_2020_2020u64
        .checked_shr(8 * (8 - word.len() as u32))
        .unwrap_or(0);
    Some(u64::from_le_bytes(bytes) | case)
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
    const SELECT: u64 = pack(b"select");
    const WITH: u64 = pack(b"with");
    const VALUES: u64 = pack(b"values");
    const TABLE: u64 = pack(b"table");
    const SHOW: u64 = pack(b"show");
    const EXPLAIN: u64 = pack(b"explain");
    const COPY: u64 = pack(b"copy");
    const SET: u64 = pack(b"set");
    const RESET: u64 = pack(b"reset");
    const BEGIN: u64 = pack(b"begin");
    const START: u64 = pack(b"start");
    const COMMIT: u64 = pack(b"commit");
    const END: u64 = pack(b"end");
    const ROLLBACK: u64 = pack(b"rollback");
    const ABORT: u64 = pack(b"abort");
    const RELEASE: u64 = pack(b"release");
    const INSERT: u64 = pack(b"insert");
    const DELETE: u64 = pack(b"delete");
    const MERGE: u64 = pack(b"merge");
    const UPDATE: u64 = pack(b"update");
    const SHARE: u64 = pack(b"share");
    const FOR: u64 = pack(b"for");
    const NO: u64 = pack(b"no");
    const KEY: u64 = pack(b"key");
    const READ: u64 = pack(b"read");
    const ONLY: u64 = pack(b"only");
    const WRITE: u64 = pack(b"write");
    const ANALYZE: u64 = pack(b"analyze");
    const ANALYSE: u64 = pack(b"analyse");
    const INTO: u64 = pack(b"into");
    const TO: u64 = pack(b"to");
    const FROM: u64 = pack(b"from");
    const HOLD: u64 = pack(b"hold");
    const TEMP: u64 = pack(b"temp");
    const NEXTVAL: u64 = pack(b"nextval");
    const SETVAL: u64 = pack(b"setval");
    const LOCAL: u64 = pack(b"local");
    const PREPARED: u64 = pack(b"prepared");
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

/// The keywords longer than eight bytes.
fn long(word: &[u8]) -> Kw {
    const LONG: [(&str, Kw); 8] = [
        ("savepoint", Kw::Savepoint),
        ("transaction", Kw::Transaction),
        ("temporary", Kw::Temp),
        ("pg_notify", Kw::Writes),
        ("pg_advisory_lock", Kw::AdvisoryLock),
        ("pg_try_advisory_lock", Kw::AdvisoryLock),
        ("pg_advisory_lock_shared", Kw::AdvisoryLock),
        ("pg_try_advisory_lock_shared", Kw::AdvisoryLock),
    ];
    LONG.iter()
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
