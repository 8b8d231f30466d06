//! A lexer-based SQL statement classifier for routing: is a statement
//! provably a read, or transaction control, or a session setting? Anything
//! it cannot prove to be a read is a write.
//!
//! It is not a parser. It walks tokens (skipping comments, quoted
//! identifiers, string and dollar-quoted literals) and looks at leading
//! keywords plus a few keywords anywhere in the statement. It never
//! allocates and never panics.

/// What one statement (or a whole multi-statement string) is, for routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Provably reads only: may run on a replica.
    Read,
    /// Writes, or might: must run on the primary.
    Write,
    /// `BEGIN` / `START TRANSACTION`, read-only or not.
    Begin { read_only: bool },
    /// `COMMIT` / `END`.
    Commit,
    /// `ROLLBACK` / `ABORT` (not `ROLLBACK TO`).
    Rollback,
    /// `SAVEPOINT`, `RELEASE`, `ROLLBACK TO`.
    Savepoint,
    /// `SET` / `RESET`; `local` for `SET LOCAL`.
    Set { local: bool },
    /// `SHOW`.
    Show,
}

impl Class {
    /// True when the statement may run on a replica.
    pub fn is_read(self) -> bool {
        matches!(self, Class::Read | Class::Show)
    }
}

/// Classifies a whole query string. A string of several statements is a
/// read only if every statement is; a single statement keeps its class;
/// any other mix is a write.
pub fn classify(sql: &[u8]) -> Class {
    let mut lexer = Lexer::new(sql);
    let mut overall: Option<Class> = None;
    let mut count = 0;
    loop {
        let (class, more) = statement(&mut lexer);
        if let Some(class) = class {
            count += 1;
            overall = Some(match overall {
                None => class,
                Some(prev) if prev.is_read() && class.is_read() => Class::Read,
                Some(_) => Class::Write,
            });
        }
        if !more {
            break;
        }
    }
    match (overall, count) {
        (None, _) => Class::Read,
        (Some(c), 1) => c,
        (Some(c), _) if c.is_read() => Class::Read,
        _ => Class::Write,
    }
}

/// True when `sql` starts with `BEGIN` or `START TRANSACTION` (reads two
/// words at most).
pub fn starts_transaction(sql: &[u8]) -> bool {
    let mut lx = Lexer::new(sql);
    let is = |t: Option<Token<'_>>, k: &str| matches!(t, Some(Token::Word(w)) if w.eq_ignore_ascii_case(k.as_bytes()));
    match lx.next() {
        t if is(t, "begin") => true,
        t if is(t, "start") => is(lx.next(), "transaction"),
        _ => false,
    }
}

/// Classifies the next statement; returns `None` for an empty one, and
/// whether a `;` followed.
fn statement(lx: &mut Lexer<'_>) -> (Option<Class>, bool) {
    let mut scan = Scan::default();
    let mut first: Option<&[u8]> = None;
    let mut second: Option<&[u8]> = None;
    let mut depth = 0u32;
    let more = loop {
        let Some(tok) = lx.next() else { break false };
        match tok {
            Token::Semicolon if depth == 0 => break true,
            Token::Open => depth += 1,
            Token::Close => depth = depth.saturating_sub(1),
            Token::Word(w) => {
                if first.is_none() {
                    first = Some(w);
                } else if second.is_none() {
                    second = Some(w);
                }
                scan.word(w, depth);
            }
            _ => scan.other(),
        }
    };
    let class = first.map(|f| decide(f, second, &scan));
    (class, more)
}

/// What was seen in one statement beyond its first two words.
#[derive(Default)]
struct Scan {
    /// INSERT/UPDATE/DELETE/MERGE anywhere (data-modifying CTEs).
    modifies: bool,
    /// `FOR UPDATE/SHARE/NO KEY UPDATE/KEY SHARE`.
    locks: bool,
    /// `INTO` at the top level of a SELECT.
    into: bool,
    /// `READ ONLY` / `READ WRITE` in a transaction mode.
    read_only: bool,
    read_write: bool,
    /// `ANALYZE` anywhere (EXPLAIN ANALYZE).
    analyze: bool,
    /// `TO` / `FROM` at the top level (COPY direction).
    to: bool,
    from: bool,
    prev: Option<PrevWord>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PrevWord {
    For,
    Read,
    No,
    Key,
    Other,
}

impl Scan {
    fn word(&mut self, w: &[u8], depth: u32) {
        let is = |k: &str| w.eq_ignore_ascii_case(k.as_bytes());
        if is("insert") || is("delete") || is("merge") {
            self.modifies = true;
        }
        // Session-level advisory locks tie the client to the primary.
        if is("pg_advisory_lock")
            || is("pg_advisory_lock_shared")
            || is("pg_try_advisory_lock")
            || is("pg_try_advisory_lock_shared")
        {
            self.modifies = true;
        }
        // Well-known functions that write although a SELECT calls them: a
        // replica would refuse them (25006) and they would run again on
        // the primary, one round trip dearer. Others are left to that.
        if is("nextval") || is("setval") || is("pg_notify") {
            self.modifies = true;
        }
        if is("update") {
            // `FOR UPDATE`, `FOR NO KEY UPDATE` lock rows; any other UPDATE writes.
            if matches!(self.prev, Some(PrevWord::For) | Some(PrevWord::Key)) {
                self.locks = true;
            } else {
                self.modifies = true;
            }
        }
        if is("share") && matches!(self.prev, Some(PrevWord::For) | Some(PrevWord::Key)) {
            self.locks = true;
        }
        if is("only") && self.prev == Some(PrevWord::Read) {
            self.read_only = true;
        }
        if is("write") && self.prev == Some(PrevWord::Read) {
            self.read_write = true;
        }
        if is("analyze") || is("analyse") {
            self.analyze = true;
        }
        if depth == 0 {
            self.into |= is("into");
            self.to |= is("to");
            self.from |= is("from");
        }
        self.prev = Some(if is("for") {
            PrevWord::For
        } else if is("read") {
            PrevWord::Read
        } else if is("no") && self.prev == Some(PrevWord::For) {
            PrevWord::No
        } else if is("key") && matches!(self.prev, Some(PrevWord::For) | Some(PrevWord::No)) {
            PrevWord::Key
        } else {
            PrevWord::Other
        });
    }

    fn other(&mut self) {
        self.prev = Some(PrevWord::Other);
    }
}

fn decide(first: &[u8], second: Option<&[u8]>, scan: &Scan) -> Class {
    let is = |w: &[u8], k: &str| w.eq_ignore_ascii_case(k.as_bytes());
    let second_is = |k: &str| second.is_some_and(|s| is(s, k));
    let reads = !scan.modifies && !scan.locks;
    match first {
        f if is(f, "select") || is(f, "with") || is(f, "values") || is(f, "table") => {
            if reads && !scan.into {
                Class::Read
            } else {
                Class::Write
            }
        }
        f if is(f, "show") => Class::Show,
        f if is(f, "explain") => {
            if !scan.analyze || reads {
                Class::Read
            } else {
                Class::Write
            }
        }
        f if is(f, "copy") => {
            if scan.to && !scan.from && reads {
                Class::Read
            } else {
                Class::Write
            }
        }
        f if is(f, "set") || is(f, "reset") => Class::Set {
            local: is(f, "set") && second_is("local"),
        },
        f if is(f, "begin") || (is(f, "start") && second_is("transaction")) => Class::Begin {
            read_only: scan.read_only && !scan.read_write,
        },
        f if (is(f, "commit") || is(f, "end")) && !second_is("prepared") => Class::Commit,
        f if is(f, "rollback") || is(f, "abort") => {
            if second_is("to") {
                Class::Savepoint
            } else if second_is("prepared") {
                Class::Write
            } else {
                Class::Rollback
            }
        }
        f if is(f, "savepoint") || is(f, "release") => Class::Savepoint,
        _ => Class::Write,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Token<'a> {
    Word(&'a [u8]),
    Semicolon,
    Open,
    Close,
    /// Literals, quoted identifiers, operators, numbers, parameters.
    Other,
}

pub(crate) struct Lexer<'a> {
    sql: &'a [u8],
    pos: usize,
    start: usize,
}

impl<'a> Lexer<'a> {
    pub(crate) fn new(sql: &'a [u8]) -> Self {
        Lexer {
            sql,
            pos: 0,
            start: 0,
        }
    }

    /// Where the last token returned by `next` starts and ends.
    pub(crate) fn span(&self) -> std::ops::Range<usize> {
        self.start..self.pos
    }

    fn peek(&self, ahead: usize) -> u8 {
        self.sql.get(self.pos + ahead).copied().unwrap_or(0)
    }

    pub(crate) fn next(&mut self) -> Option<Token<'a>> {
        loop {
            let c = *self.sql.get(self.pos)?;
            match c {
                b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' => self.pos += 1,
                b'-' if self.peek(1) == b'-' => self.line_comment(),
                b'/' if self.peek(1) == b'*' => self.block_comment(),
                _ => {
                    self.start = self.pos;
                    return Some(self.token(c));
                }
            }
        }
    }

    fn token(&mut self, c: u8) -> Token<'a> {
        match c {
            b';' => {
                self.pos += 1;
                Token::Semicolon
            }
            b'(' | b'[' => {
                self.pos += 1;
                Token::Open
            }
            b')' | b']' => {
                self.pos += 1;
                Token::Close
            }
            b'\'' => {
                self.quoted(b'\'', false);
                Token::Other
            }
            b'"' => {
                self.quoted(b'"', false);
                Token::Other
            }
            b'e' | b'E' if self.peek(1) == b'\'' => {
                self.pos += 1;
                self.quoted(b'\'', true);
                Token::Other
            }
            b'$' => {
                self.dollar();
                Token::Other
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => self.word(),
            _ => {
                self.pos += 1;
                Token::Other
            }
        }
    }

    fn word(&mut self) -> Token<'a> {
        let start = self.pos;
        while let Some(&c) = self.sql.get(self.pos) {
            if c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80 {
                self.pos += 1;
            } else {
                break;
            }
        }
        // U&'...' and B'...'/X'...' literals: the quote follows the word.
        Token::Word(&self.sql[start..self.pos])
    }

    fn line_comment(&mut self) {
        while let Some(&c) = self.sql.get(self.pos) {
            self.pos += 1;
            if c == b'\n' {
                return;
            }
        }
    }

    fn block_comment(&mut self) {
        let mut depth = 0usize;
        while self.pos < self.sql.len() {
            if self.peek(0) == b'/' && self.peek(1) == b'*' {
                depth += 1;
                self.pos += 2;
            } else if self.peek(0) == b'*' && self.peek(1) == b'/' {
                depth -= 1;
                self.pos += 2;
                if depth == 0 {
                    return;
                }
            } else {
                self.pos += 1;
            }
        }
    }

    /// A quoted literal or identifier; the quote doubled stands for itself,
    /// and with `backslash` a backslash escapes the next byte.
    fn quoted(&mut self, quote: u8, backslash: bool) {
        self.pos += 1;
        while let Some(&c) = self.sql.get(self.pos) {
            self.pos += 1;
            if backslash && c == b'\\' {
                self.pos += 1;
            } else if c == quote {
                if self.peek(0) == quote {
                    self.pos += 1;
                } else {
                    return;
                }
            }
        }
    }

    /// `$1` parameters and `$tag$ ... $tag$` literals.
    fn dollar(&mut self) {
        let start = self.pos;
        self.pos += 1;
        while let Some(&c) = self.sql.get(self.pos) {
            if c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80 {
                self.pos += 1;
            } else {
                break;
            }
        }
        let tag_is_param = self.sql[start + 1..self.pos]
            .first()
            .is_some_and(u8::is_ascii_digit);
        if tag_is_param || self.peek(0) != b'$' {
            return;
        }
        self.pos += 1;
        let tag = &self.sql[start..self.pos];
        while self.pos < self.sql.len() {
            if self.sql[self.pos..].starts_with(tag) {
                self.pos += tag.len();
                return;
            }
            self.pos += 1;
        }
    }
}
