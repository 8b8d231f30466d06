//! What a SQL string does to the session beyond its own transaction:
//! settings it changes, features that tie the client to one server, and the
//! SQL-level prepared statements it creates, runs or drops.
//!
//! Like the classifier, this walks tokens and never panics; it allocates
//! only for what it finds.

use std::ops::Range;

use crate::classify::{may_lead, Class, Lexer, Overall, Statement as Classified, Token};
use crate::keyword::{keyword, Kw};

/// Why a client cannot move to another server any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    /// `LISTEN`: notifications arrive on the server that listens.
    Listen,
    /// A session-level advisory lock is held by one backend.
    AdvisoryLock,
    /// A temporary table, view or sequence lives in one backend.
    TempObject,
    /// A `WITH HOLD` cursor outlives its transaction on one backend.
    HoldCursor,
    /// `SET ROLE` / `SET SESSION AUTHORIZATION`.
    Role,
}

impl Pin {
    pub fn as_str(self) -> &'static str {
        match self {
            Pin::Listen => "LISTEN",
            Pin::AdvisoryLock => "session advisory lock",
            Pin::TempObject => "temporary object",
            Pin::HoldCursor => "WITH HOLD cursor",
            Pin::Role => "SET ROLE / SESSION AUTHORIZATION",
        }
    }
}

/// A SQL-level prepared statement command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// `PREPARE name <body>`; `body` spans what follows the name.
    Prepare { name: String, body: Range<usize> },
    /// `EXECUTE name ...`; `at` spans the name.
    Execute { name: String, at: Range<usize> },
    /// `DEALLOCATE [PREPARE] name`, or `ALL` when `name` is `None`.
    Deallocate { name: Option<String> },
}

/// One prepared-statement command and where it sits in the string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedAt {
    /// Its position among the non-empty statements of the string.
    pub index: usize,
    /// The statement, without its semicolon.
    pub span: Range<usize>,
    pub command: Prepared,
}

/// Everything [`effects`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    pub pin: Option<Pin>,
    /// Settings changed by a session-level `SET`/`RESET`, lower case.
    pub settings: Vec<String>,
    /// Those of them that a `RESET` (not a `SET`) changed last.
    pub reset: Vec<String>,
    pub reset_all: bool,
    pub discard_all: bool,
    pub prepared: Vec<PreparedAt>,
    /// Non-empty statements in the string.
    pub statements: usize,
    /// A statement ends the running transaction or hands its outcome on:
    /// `COMMIT`/`END`, `ROLLBACK`/`ABORT` (not `ROLLBACK TO`), `PREPARE
    /// TRANSACTION`. (Outlives nothing: not part of `is_empty`.)
    pub ends_transaction: bool,
}

impl Effects {
    /// True when nothing outlives the transaction.
    pub fn is_empty(&self) -> bool {
        self.pin.is_none()
            && self.settings.is_empty()
            && !self.reset_all
            && !self.discard_all
            && self.prepared.is_empty()
    }
}

/// How many leading tokens a statement's decision looks at.
const LEAD: usize = 5;

/// One token of a statement's head: a word (or `None` for anything else)
/// and where it is.
type Lead<'a> = (Option<&'a [u8]>, Range<usize>);

pub fn effects(sql: &[u8]) -> Effects {
    scan(sql, None)
}

/// [`effects`] and [`crate::classify::classify`] at once, in one pass over
/// `sql`: what a Query is for routing and what it does to the session.
pub fn analyze(sql: &[u8]) -> (Class, Effects) {
    let mut overall = Overall::default();
    let effects = scan(sql, Some(&mut overall));
    (overall.class(), effects)
}

/// The effects of `sql`, each statement also classified into `overall`
/// when there is one.
fn scan(sql: &[u8], mut overall: Option<&mut Overall>) -> Effects {
    let mut lx = Lexer::new(sql);
    let mut out = Effects::default();
    let mut st = Statement::new();
    loop {
        let mut class = overall.is_some().then(Classified::default);
        let more = next_statement(&mut lx, class.as_mut(), &mut st);
        if let (Some(overall), Some(class)) = (overall.as_deref_mut(), class) {
            overall.add(class.class());
        }
        if !st.is_empty() {
            st.apply(sql, out.statements, &mut out);
            out.statements += 1;
        }
        if !more {
            return out;
        }
    }
}

/// The database a statement needs no other session on, when `sql` starts
/// with one: `DROP DATABASE [IF EXISTS] x`, `ALTER DATABASE x RENAME ...`
/// and `CREATE DATABASE ... TEMPLATE [=] x` (PostgreSQL refuses them while
/// anyone else is connected to `x`, pooled idle connections included).
/// Only the start of `sql` is needed.
#[inline]
pub fn exclusive_database(sql: &[u8]) -> Option<String> {
    // Every Query passes here: most leave at its first byte, allocating
    // nothing.
    if !may_lead(sql, &["drop", "alter", "create"]) {
        return None;
    }
    database_to_itself(sql)
}

fn database_to_itself(sql: &[u8]) -> Option<String> {
    let mut peek = Lexer::new(sql);
    let lead = |t: Option<Token<'_>>, ks: &[&str]| matches!(t, Some(Token::Word(w)) if ks.iter().any(|k| is(w, k)));
    if !lead(peek.next(), &["drop", "alter", "create"]) || !lead(peek.next(), &["database"]) {
        return None;
    }
    let mut lx = Lexer::new(sql);
    let word = |lx: &mut Lexer<'_>| match lx.next()? {
        Token::Word(w) => Some(String::from_utf8_lossy(w).to_lowercase()),
        Token::Other => identifier(sql.get(lx.span())?),
        _ => None,
    };
    let first = word(&mut lx)?;
    word(&mut lx)?; // DATABASE

    match first.as_str() {
        "drop" => {
            let name = word(&mut lx)?;
            if name != "if" {
                return Some(name);
            }
            (word(&mut lx)? == "exists")
                .then(|| word(&mut lx))
                .flatten()
        }
        "alter" => {
            let name = word(&mut lx)?;
            (word(&mut lx)? == "rename").then_some(name)
        }
        _ => {
            // CREATE DATABASE name [WITH] ... TEMPLATE [=] x ...
            while let Some(tok) = lx.next() {
                if matches!(tok, Token::Word(w) if is(w, "template")) {
                    let mut next = word(&mut lx);
                    if sql.get(lx.span()) == Some(b"=") {
                        next = word(&mut lx);
                    }
                    return next;
                }
            }
            None
        }
    }
}

/// A quoted identifier's name (`"My ""db"""` is `My "db"`).
fn identifier(token: &[u8]) -> Option<String> {
    let inner = token.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    let text = String::from_utf8_lossy(inner).replace("\"\"", "\"");
    Some(text)
}

/// Where each non-empty statement of `sql` is (without its semicolon).
pub fn statements(sql: &[u8]) -> Vec<Range<usize>> {
    let mut lx = Lexer::new(sql);
    let mut out = Vec::new();
    let mut st = Statement::new();
    loop {
        let more = next_statement(&mut lx, None, &mut st);
        if !st.is_empty() {
            out.push(st.span.clone());
        }
        if !more {
            return out;
        }
    }
}

/// The tokens of one statement that matter here.
struct Statement<'a> {
    lead: [Lead<'a>; LEAD],
    /// How many of `lead` this statement filled (none: it is empty).
    leads: usize,
    span: Range<usize>,
    advisory: bool,
    with_hold: bool,
    into_temp: bool,
}

impl Statement<'_> {
    fn new() -> Self {
        Statement {
            lead: Default::default(),
            leads: 0,
            span: 0..0,
            advisory: false,
            with_hold: false,
            into_temp: false,
        }
    }

    /// A statement of no tokens.
    fn is_empty(&self) -> bool {
        self.leads == 0
    }
}

/// Reads the next statement into `st` (what was there before is
/// forgotten; the room is reused, so no statement is moved), feeding its
/// tokens also to `class` when there is one. True when a `;` followed.
fn next_statement<'a>(
    lx: &mut Lexer<'a>,
    mut class: Option<&mut Classified>,
    st: &mut Statement<'a>,
) -> bool {
    st.leads = 0;
    (st.advisory, st.with_hold, st.into_temp) = (false, false, false);
    let mut depth = 0u32;
    let mut prev = Kw::Other;
    loop {
        let Some(tok) = lx.next() else { return false };
        let span = lx.span();
        if tok == Token::Semicolon && depth == 0 {
            return true;
        }
        let word = match tok {
            Token::Word(w) => Some(w),
            Token::Open => {
                depth += 1;
                None
            }
            Token::Close => {
                depth = depth.saturating_sub(1);
                None
            }
            _ => None,
        };
        if st.leads == 0 {
            st.span.start = span.start;
        }
        st.span.end = span.end;
        // Past the lead the count stays: only whether it is 0 matters.
        if let Some(slot) = st.lead.get_mut(st.leads) {
            *slot = (word, span);
            st.leads += 1;
        }
        let kw = word.map_or(Kw::Other, keyword);
        if let Some(class) = class.as_deref_mut() {
            class.token(tok, kw);
        }
        match (prev, kw) {
            (_, Kw::AdvisoryLock) => st.advisory = true,
            (Kw::With, Kw::Hold) => st.with_hold = true,
            (Kw::Into, Kw::Temp) => st.into_temp = true,
            _ => {}
        }
        prev = kw;
    }
}

fn is(w: &[u8], k: &str) -> bool {
    w.eq_ignore_ascii_case(k.as_bytes())
}

impl Statement<'_> {
    fn lead(&self, i: usize) -> Option<&Lead<'_>> {
        self.lead.get(i).filter(|_| i < self.leads)
    }

    fn word(&self, i: usize) -> Option<&[u8]> {
        self.lead(i).and_then(|(w, _)| *w)
    }

    fn word_is(&self, i: usize, k: &str) -> bool {
        self.word(i).is_some_and(|w| is(w, k))
    }

    fn apply(&self, sql: &[u8], index: usize, out: &mut Effects) {
        let first = self.word(0).unwrap_or_default();
        out.ends_transaction |= self.ends_transaction(first);
        if self.advisory {
            out.pin = Some(Pin::AdvisoryLock);
        }
        if self.into_temp {
            out.pin = Some(Pin::TempObject);
        }
        if is(first, "listen") {
            out.pin = Some(Pin::Listen);
        } else if is(first, "create") && self.creates_temp() {
            out.pin = Some(Pin::TempObject);
        } else if is(first, "declare") && self.with_hold {
            out.pin = Some(Pin::HoldCursor);
        } else if is(first, "set") {
            self.set(sql, out);
        } else if is(first, "reset") {
            self.reset(sql, out);
        } else if is(first, "discard") && self.word_is(1, "all") {
            out.discard_all = true;
        } else if let Some(command) = self.prepared(sql) {
            out.prepared.push(PreparedAt {
                index,
                span: self.span.clone(),
                command,
            });
        }
    }

    fn ends_transaction(&self, first: &[u8]) -> bool {
        let rolls_back = (is(first, "rollback") || is(first, "abort")) && !self.word_is(1, "to");
        is(first, "commit")
            || is(first, "end")
            || rolls_back
            || (is(first, "prepare") && self.word_is(1, "transaction"))
    }

    /// `CREATE [OR REPLACE] [GLOBAL | LOCAL] TEMP[ORARY] ...`.
    fn creates_temp(&self) -> bool {
        for i in 1..LEAD {
            if self.word_is(i, "temp") || self.word_is(i, "temporary") {
                return true;
            }
            if !["or", "replace", "global", "local"]
                .iter()
                .any(|k| self.word_is(i, k))
            {
                return false;
            }
        }
        false
    }

    fn set(&self, sql: &[u8], out: &mut Effects) {
        let mut i = 1;
        if self.word_is(1, "session") {
            if self.word_is(2, "authorization") {
                out.pin = Some(Pin::Role);
                return;
            }
            if self.word_is(2, "characteristics") {
                for name in [
                    "default_transaction_isolation",
                    "default_transaction_read_only",
                    "default_transaction_deferrable",
                ] {
                    out.settings.push(name.to_string());
                }
                return;
            }
            i = 2;
        }
        if ["local", "transaction", "constraints"]
            .iter()
            .any(|k| self.word_is(1, k))
        {
            return;
        }
        if self.word_is(i, "role") {
            out.pin = Some(Pin::Role);
            return;
        }
        if let Some(name) = self.setting_name(sql, i) {
            out.reset.retain(|n| *n != name);
            out.settings.push(name);
        }
    }

    fn reset(&self, sql: &[u8], out: &mut Effects) {
        if self.word_is(1, "all") {
            out.reset_all = true;
        } else if !self.word_is(1, "role") && !self.word_is(1, "session") {
            if let Some(name) = self.setting_name(sql, 1) {
                out.reset.push(name.clone());
                out.settings.push(name);
            }
        }
    }

    /// The parameter a SET/RESET names at lead token `i`.
    fn setting_name(&self, sql: &[u8], i: usize) -> Option<String> {
        let special = [
            ("time", "timezone"),
            ("names", "client_encoding"),
            ("schema", "search_path"),
            ("xml", "xmloption"),
        ];
        if let Some((_, name)) = special.iter().find(|(k, _)| self.word_is(i, k)) {
            // `SET TIME ZONE`, but a parameter may be called `time...`.
            let next_ok = *name != "timezone" || self.word_is(i + 1, "zone");
            if next_ok {
                return Some((*name).to_string());
            }
        }
        let (_, span) = self.lead(i)?;
        let raw = sql.get(span.start..)?;
        let name: Vec<u8> = if raw.first() == Some(&b'"') {
            raw.get(1..span.len().saturating_sub(1))?.to_vec()
        } else {
            raw.iter()
                .take_while(|&&c| {
                    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'$') || c >= 0x80
                })
                .copied()
                .collect()
        };
        let name = String::from_utf8_lossy(&name).to_lowercase();
        (!name.is_empty()).then_some(name)
    }

    fn prepared(&self, sql: &[u8]) -> Option<Prepared> {
        let first = self.word(0)?;
        let name_at = |i: usize| {
            let w = self.word(i)?;
            Some((
                String::from_utf8_lossy(w).to_lowercase(),
                self.lead(i)?.1.clone(),
            ))
        };
        if is(first, "prepare") {
            // `PREPARE TRANSACTION 'id'` is two-phase commit.
            let two_phase =
                self.word_is(1, "transaction") && self.lead(2).is_some_and(|(w, _)| w.is_none());
            let (name, at) = name_at(1).filter(|_| !two_phase)?;
            let body = at.end..self.span.end.max(at.end);
            return (body.end <= sql.len()).then_some(Prepared::Prepare { name, body });
        }
        if is(first, "execute") {
            let (name, at) = name_at(1)?;
            return Some(Prepared::Execute { name, at });
        }
        if is(first, "deallocate") {
            let i = if self.word_is(1, "prepare") { 2 } else { 1 };
            if self.word_is(i, "all") {
                return Some(Prepared::Deallocate { name: None });
            }
            let (name, _) = name_at(i)?;
            return Some(Prepared::Deallocate { name: Some(name) });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(sql: &str) -> Option<Pin> {
        effects(sql.as_bytes()).pin
    }

    fn settings(sql: &str) -> Vec<String> {
        effects(sql.as_bytes()).settings
    }

    #[test]
    fn pins() {
        assert_eq!(pin("LISTEN jobs"), Some(Pin::Listen));
        assert_eq!(pin("select pg_advisory_lock(42)"), Some(Pin::AdvisoryLock));
        assert_eq!(
            pin("SELECT pg_try_advisory_lock_shared(1, 2)"),
            Some(Pin::AdvisoryLock)
        );
        assert_eq!(pin("select pg_advisory_xact_lock(42)"), None);
        assert_eq!(pin("CREATE TEMP TABLE t (a int)"), Some(Pin::TempObject));
        assert_eq!(
            pin("create global temporary table t (a int)"),
            Some(Pin::TempObject)
        );
        assert_eq!(
            pin("CREATE OR REPLACE TEMP VIEW v AS SELECT 1"),
            Some(Pin::TempObject)
        );
        assert_eq!(pin("select * into temp t from x"), Some(Pin::TempObject));
        assert_eq!(pin("CREATE TABLE temp (a int)"), None);
        assert_eq!(
            pin("DECLARE c CURSOR WITH HOLD FOR SELECT 1"),
            Some(Pin::HoldCursor)
        );
        assert_eq!(pin("DECLARE c CURSOR FOR SELECT 1"), None);
        assert_eq!(pin("SET ROLE admin"), Some(Pin::Role));
        assert_eq!(pin("set session authorization bob"), Some(Pin::Role));
        assert_eq!(pin("select 'listen', 'pg_advisory_lock(1)'"), None);
        assert_eq!(pin("select 1; listen x"), Some(Pin::Listen));
    }

    #[test]
    fn settings_changed() {
        assert_eq!(settings("SET search_path TO a, b"), ["search_path"]);
        assert_eq!(settings("set session TimeZone = 'UTC'"), ["timezone"]);
        assert_eq!(settings("SET TIME ZONE 'Europe/Paris'"), ["timezone"]);
        assert_eq!(settings("SET NAMES 'UTF8'"), ["client_encoding"]);
        assert_eq!(settings("SET SCHEMA 'x'"), ["search_path"]);
        assert_eq!(settings("set app.tenant_id = '7'"), ["app.tenant_id"]);
        assert_eq!(settings("SET \"TimeZone\" = 'UTC'"), ["timezone"]);
        assert_eq!(
            settings("RESET work_mem; SET LOCAL statement_timeout = 1"),
            ["work_mem"]
        );
        assert_eq!(
            effects(b"RESET work_mem; RESET a; SET a = 1").reset,
            ["work_mem"]
        );
        assert_eq!(
            settings("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
            Vec::<String>::new()
        );
        assert_eq!(
            settings("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY").len(),
            3
        );
        assert!(effects(b"RESET ALL").reset_all);
        assert!(effects(b"discard all").discard_all);
        assert!(!effects(b"discard plans").discard_all);
        assert!(effects(b"select 1").is_empty());
    }

    #[test]
    fn statement_spans() {
        let sql = "CREATE INDEX CONCURRENTLY i ON t (a);\n-- c\n; SELECT ';' ; ";
        let spans: Vec<&str> = statements(sql.as_bytes())
            .into_iter()
            .map(|r| &sql[r])
            .collect();
        assert_eq!(
            spans,
            ["CREATE INDEX CONCURRENTLY i ON t (a)", "SELECT ';'"]
        );
    }

    #[test]
    fn prepared_statements() {
        let sql =
            "PREPARE q1 (int) AS SELECT $1; EXECUTE Q1(2); DEALLOCATE q1; DEALLOCATE PREPARE ALL";
        let e = effects(sql.as_bytes());
        assert_eq!(e.statements, 4);
        let body = match &e.prepared[0].command {
            Prepared::Prepare { name, body } => {
                assert_eq!(name, "q1");
                body.clone()
            }
            other => panic!("not a PREPARE: {other:?}"),
        };
        assert_eq!(&sql[body], " (int) AS SELECT $1");
        assert_eq!(
            &sql[e.prepared[0].span.clone()],
            "PREPARE q1 (int) AS SELECT $1"
        );
        match &e.prepared[1].command {
            Prepared::Execute { name, at } => {
                assert_eq!(name, "q1");
                assert_eq!(&sql[at.clone()], "Q1");
            }
            other => panic!("not an EXECUTE: {other:?}"),
        }
        assert_eq!(e.prepared[1].index, 1);
        assert_eq!(
            e.prepared[2].command,
            Prepared::Deallocate {
                name: Some("q1".into())
            }
        );
        assert_eq!(e.prepared[3].command, Prepared::Deallocate { name: None });
        assert!(effects(b"PREPARE TRANSACTION 'gid'").prepared.is_empty());
    }

    #[test]
    fn statements_that_need_a_database_to_themselves() {
        let db = |sql: &str| exclusive_database(sql.as_bytes());
        assert_eq!(db("DROP DATABASE testdb"), Some("testdb".into()));
        assert_eq!(db("  drop database if exists Foo;"), Some("foo".into()));
        assert_eq!(
            db("DROP DATABASE \"My \"\"db\"\"\" WITH (FORCE)"),
            Some("My \"db\"".into())
        );
        assert_eq!(db("/* x */ ALTER DATABASE a RENAME TO b"), Some("a".into()));
        assert_eq!(db("ALTER DATABASE a SET work_mem = '1MB'"), None);
        assert_eq!(db("CREATE DATABASE b TEMPLATE a"), Some("a".into()));
        assert_eq!(
            db("create database b with owner x template = \"A\""),
            Some("A".into())
        );
        assert_eq!(db("CREATE DATABASE b"), None);
        assert_eq!(db("DROP TABLE t"), None);
        assert_eq!(db("SELECT 1"), None);
        assert_eq!(db("DROP DATABASE"), None);
        assert_eq!(db(""), None);
        assert_eq!(db("-- why\n\tDrop Database old"), Some("old".into()));
        assert_eq!(db("\r\n\x0cCREATE DATABASE b TEMPLATE a"), Some("a".into()));
        assert_eq!(db("dropped database x"), None);
    }
}
