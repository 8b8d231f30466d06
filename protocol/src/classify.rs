//! A lexer-based SQL statement classifier for routing: is a statement
//! provably a read, or transaction control, or a session setting? Anything
//! it cannot prove to be a read is a write.
//!
//! It is not a parser. It walks tokens (skipping comments, quoted
//! identifiers, string and dollar-quoted literals) and looks at leading
//! keywords plus a few keywords anywhere in the statement. It never
//! allocates and never panics.

use crate::keyword::{keyword, Kw};

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
    let mut overall = Overall::default();
    loop {
        let (class, more) = statement(&mut lexer);
        overall.add(class);
        if !more {
            return overall.class();
        }
    }
}

/// The class of a string of statements, from theirs (see [`classify`]).
#[derive(Default)]
pub(crate) struct Overall {
    class: Option<Class>,
    count: usize,
}

impl Overall {
    /// One more statement (`None`: an empty one).
    pub(crate) fn add(&mut self, class: Option<Class>) {
        let Some(class) = class else { return };
        self.count += 1;
        self.class = Some(match self.class {
            None => class,
            Some(prev) if prev.is_read() && class.is_read() => Class::Read,
            Some(_) => Class::Write,
        });
    }

    pub(crate) fn class(&self) -> Class {
        match (self.class, self.count) {
            (None, _) => Class::Read,
            (Some(c), 1) => c,
            (Some(c), _) if c.is_read() => Class::Read,
            _ => Class::Write,
        }
    }
}

/// True when `sql` starts with `BEGIN` or `START TRANSACTION` (reads two
/// words at most).
#[inline]
pub fn starts_transaction(sql: &[u8]) -> bool {
    may_lead(sql, &["begin", "start"]) && begins(sql)
}

fn begins(sql: &[u8]) -> bool {
    let mut lx = Lexer::new(sql);
    let mut kw = || match lx.next() {
        Some(Token::Word(w)) => keyword(w),
        _ => Kw::Other,
    };
    match kw() {
        Kw::Begin => true,
        Kw::Start => kw() == Kw::Transaction,
        _ => false,
    }
}

/// False when `sql` surely does not start with one of `words` (lower
/// case): after the blanks, neither one of them (any case) nor what may be
/// a comment comes first. Every Query is asked a few such questions, and
/// almost all leave here without being lexed.
#[inline]
pub(crate) fn may_lead(sql: &[u8], words: &[&str]) -> bool {
    let Some(&first) = sql.iter().find(|&&c| !is_blank(c)) else {
        return false;
    };
    if first == b'-' || first == b'/' {
        return true;
    }
    // The first byte rules out most words before any is compared.
    let lower = first | 0x20;
    words
        .iter()
        .any(|w| w.as_bytes().first() == Some(&lower) && leads(sql, w))
}

/// `sql` starts with `word` (any case) after its blanks. The blanks are
/// counted again here, only for a Query whose first byte matched: one
/// pass that keeps the count costs every Query more (168 against 103
/// instructions for both checks on pgbench's SELECT).
fn leads(sql: &[u8], word: &str) -> bool {
    let blanks = sql.iter().take_while(|&&c| is_blank(c)).count();
    sql.get(blanks..blanks + word.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(word.as_bytes()))
}

/// What the lexer skips between tokens (besides comments).
#[inline]
fn is_blank(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | b'\x0c')
}

/// Classifies the next statement; returns `None` for an empty one, and
/// whether a `;` followed.
fn statement(lx: &mut Lexer<'_>) -> (Option<Class>, bool) {
    let mut st = Statement::default();
    let more = loop {
        let Some(tok) = lx.next() else { break false };
        if tok == Token::Semicolon && st.depth == 0 {
            break true;
        }
        let kw = match tok {
            Token::Word(w) => keyword(w),
            _ => Kw::Other,
        };
        st.token(tok, kw);
    };
    (st.class(), more)
}

/// One statement's tokens as the classifier sees them.
#[derive(Default)]
pub(crate) struct Statement {
    scan: Scan,
    first: Option<Kw>,
    second: Option<Kw>,
    /// Parentheses and brackets open.
    depth: u32,
}

impl Statement {
    /// The next token (not the `;` that ends the statement) and, for a
    /// word, its keyword.
    pub(crate) fn token(&mut self, tok: Token<'_>, kw: Kw) {
        match tok {
            Token::Open => self.depth += 1,
            Token::Close => self.depth = self.depth.saturating_sub(1),
            Token::Word(_) => {
                if self.first.is_none() {
                    self.first = Some(kw);
                } else if self.second.is_none() {
                    self.second = Some(kw);
                }
                self.scan.word(kw, self.depth);
            }
            _ => self.scan.other(),
        }
    }

    /// `None` for an empty statement.
    pub(crate) fn class(&self) -> Option<Class> {
        self.first.map(|f| decide(f, self.second, &self.scan))
    }
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
    fn word(&mut self, kw: Kw, depth: u32) {
        let after_for_or_key = matches!(self.prev, Some(PrevWord::For) | Some(PrevWord::Key));
        match kw {
            // Session-level advisory locks tie the client to the primary;
            // nextval, setval and pg_notify write although a SELECT calls
            // them: a replica would refuse them (25006) and they would run
            // again on the primary, one round trip dearer. Other writing
            // functions are left to that.
            Kw::Insert | Kw::Delete | Kw::Merge | Kw::AdvisoryLock | Kw::Writes => {
                self.modifies = true
            }
            // `FOR UPDATE`, `FOR NO KEY UPDATE` lock rows; any other UPDATE writes.
            Kw::Update if after_for_or_key => self.locks = true,
            Kw::Update => self.modifies = true,
            Kw::Share if after_for_or_key => self.locks = true,
            Kw::Only if self.prev == Some(PrevWord::Read) => self.read_only = true,
            Kw::Write if self.prev == Some(PrevWord::Read) => self.read_write = true,
            Kw::Analyze => self.analyze = true,
            Kw::Into if depth == 0 => self.into = true,
            Kw::To if depth == 0 => self.to = true,
            Kw::From if depth == 0 => self.from = true,
            _ => {}
        }
        self.prev = Some(match kw {
            Kw::For => PrevWord::For,
            Kw::Read => PrevWord::Read,
            Kw::No if self.prev == Some(PrevWord::For) => PrevWord::No,
            Kw::Key if matches!(self.prev, Some(PrevWord::For) | Some(PrevWord::No)) => {
                PrevWord::Key
            }
            _ => PrevWord::Other,
        });
    }

    fn other(&mut self) {
        self.prev = Some(PrevWord::Other);
    }
}

fn decide(first: Kw, second: Option<Kw>, scan: &Scan) -> Class {
    let reads = !scan.modifies && !scan.locks;
    // `PREPARED` (COMMIT/ROLLBACK PREPARED) is no keyword of Kw's: it is
    // the only other second word that matters, and it makes a write.
    match (first, second) {
        (Kw::Select | Kw::With | Kw::Values | Kw::Table, _) => {
            if reads && !scan.into {
                Class::Read
            } else {
                Class::Write
            }
        }
        (Kw::Show, _) => Class::Show,
        (Kw::Explain, _) => {
            if !scan.analyze || reads {
                Class::Read
            } else {
                Class::Write
            }
        }
        (Kw::Copy, _) => {
            if scan.to && !scan.from && reads {
                Class::Read
            } else {
                Class::Write
            }
        }
        (Kw::Set, second) => Class::Set {
            local: second == Some(Kw::Local),
        },
        (Kw::Reset, _) => Class::Set { local: false },
        (Kw::Begin, _) | (Kw::Start, Some(Kw::Transaction)) => Class::Begin {
            read_only: scan.read_only && !scan.read_write,
        },
        (Kw::Commit | Kw::End, second) if second != Some(Kw::Prepared) => Class::Commit,
        (Kw::Rollback | Kw::Abort, Some(Kw::To)) => Class::Savepoint,
        (Kw::Rollback | Kw::Abort, Some(Kw::Prepared)) => Class::Write,
        (Kw::Rollback | Kw::Abort, _) => Class::Rollback,
        (Kw::Savepoint | Kw::Release, _) => Class::Savepoint,
        _ => Class::Write,
    }
}

/// A byte of a word after its first: letters, digits, `_`, `$` and any
/// non-ASCII byte.
fn is_word_byte(c: u8) -> bool {
    WORD_BYTES[usize::from(c)]
}

/// [`is_word_byte`] for every byte, looked up rather than computed: the
/// lexer asks it for most bytes of every Query.
static WORD_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        table[c] = b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80;
        c += 1;
    }
    table
};

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
                c if is_blank(c) => self.pos += 1,
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
            // Digits are one token (the scans look at words). A letter or
            // `_` after them starts a word as before: PostgreSQL before 15
            // reads `1into` as `1 into`, and before 16 `1_000` as `1 _000`.
            b'0'..=b'9' => {
                self.pos += self.run(|c| c.is_ascii_digit() || c == b'.');
                Token::Other
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let start = self.pos;
                self.pos += self.run(is_word_byte);
                // U&'...' and B'...'/X'...' literals: the quote follows the word.
                Token::Word(&self.sql[start..self.pos])
            }
            _ => {
                self.pos += 1;
                Token::Other
            }
        }
    }

    /// How many bytes from `pos` on are `accepted`.
    fn run(&self, accepted: impl Fn(u8) -> bool) -> usize {
        let rest = self.sql.get(self.pos..).unwrap_or_default();
        rest.iter()
            .position(|&c| !accepted(c))
            .unwrap_or(rest.len())
    }

    #[inline(never)]
    fn line_comment(&mut self) {
        while let Some(&c) = self.sql.get(self.pos) {
            self.pos += 1;
            if c == b'\n' {
                return;
            }
        }
    }

    #[inline(never)]
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
    #[inline(never)]
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
    #[inline(never)]
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
