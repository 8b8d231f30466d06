//! Transaction mode: what the client sent, made right for the server it
//! landed on. Named statements get their server names and are prepared on
//! demand; the replies pgheal causes are noted in `expect` so that the
//! client sees exactly the replies it asked for, in order.

use std::sync::Arc;

use bytes::BytesMut;
use pgheal_protocol::backend::TxStatus;
use pgheal_protocol::build;
use pgheal_protocol::effects::{self, Effects, Prepared};
use pgheal_protocol::frame::{self, Step, HEADER_LEN};
use pgheal_protocol::frontend::{self, STATEMENT};

use super::check::Ready;
use super::replies::Expect;
use super::Session;
use crate::backend::conn::ServerConn;
use crate::backend::params::quote_literal;
use crate::backend::statements::{ServerName, Source, Statement, FAIL, NONE};
use crate::frontend::error::ClientError;

/// Client messages read whole: their statement names may change.
pub(super) fn whole(tag: u8) -> bool {
    matches!(
        tag,
        frontend::PARSE | frontend::BIND | frontend::DESCRIBE | frontend::CLOSE | frontend::QUERY
    )
}

impl Session {
    /// Moves what `scan_up` framed from `up` to `wire`, rewritten for
    /// `conn`.
    pub(super) fn translate(&mut self, conn: &mut ServerConn) -> Result<(), ClientError> {
        if self.up.scanned == 0 {
            return Ok(());
        }
        self.wire.reserve();
        let buf = std::mem::take(&mut self.up.buf);
        let mut at = 0;
        let result = loop {
            if self.flight.checking {
                // The rest waits for pgheal's Describe (see `check`).
                break Ok(());
            }
            let step = match self.xl.next(&buf[at..self.up.scanned], whole) {
                Ok(step) => step,
                Err(e) => break Err(e.into()),
            };
            match step {
                Step::NeedMore => break Ok(()),
                Step::Whole { tag, len } => {
                    match self.translate_message(conn, tag, &buf[at..at + len]) {
                        Ok(Ready::Go) => {}
                        // Translated again once the server answered.
                        Ok(Ready::Wait) => break Ok(()),
                        Err(e) => break Err(e),
                    }
                }
                Step::Header { tag, .. } => {
                    if matches!(tag, frontend::SYNC | frontend::FUNCTION_CALL) {
                        self.expect.push_back(Expect::ready());
                    }
                    self.wire.buf.extend_from_slice(&buf[at..at + HEADER_LEN]);
                }
                Step::Body(n) => self.wire.buf.extend_from_slice(&buf[at..at + n]),
            }
            at += step.consumed();
        };
        self.up.buf = buf;
        self.up.advance(at);
        self.wire.scanned = self.wire.buf.len();
        result
    }

    fn translate_message(
        &mut self,
        conn: &mut ServerConn,
        tag: u8,
        msg: &[u8],
    ) -> Result<Ready, ClientError> {
        let body = &msg[HEADER_LEN..];
        let malformed = |what| ClientError::Malformed(what);
        match tag {
            frontend::PARSE => {
                let parse = frontend::parse(body).map_err(|_| malformed("Parse"))?;
                self.translate_parse(conn, msg, parse);
            }
            frontend::BIND => {
                let bind = frontend::bind(body).map_err(|_| malformed("Bind"))?;
                match self.statements.get(bind.statement).cloned() {
                    Some(stmt) if self.app.epochs.is_stale(&stmt) => self.refuse_stale(),
                    Some(stmt) => {
                        self.note_use(bind.statement, &stmt);
                        self.note_statement(&stmt);
                        if self.prepare_on(conn, bind.statement, &stmt) == Ready::Wait {
                            return Ok(Ready::Wait);
                        }
                        let name = stmt.server.as_bytes();
                        build::bind(&mut self.wire.buf, bind.portal, name, bind.rest);
                    }
                    None => self.wire.buf.extend_from_slice(msg),
                }
            }
            frontend::DESCRIBE => {
                let (kind, name) = frontend::target(body).map_err(|_| malformed("Describe"))?;
                match self
                    .statements
                    .get(name)
                    .cloned()
                    .filter(|_| kind == STATEMENT)
                {
                    Some(stmt) if self.app.epochs.is_stale(&stmt) => self.refuse_stale(),
                    Some(stmt) => {
                        self.note_use(name, &stmt);
                        if self.prepare_on(conn, name, &stmt) == Ready::Wait {
                            return Ok(Ready::Wait);
                        }
                        build::describe(&mut self.wire.buf, kind, stmt.server.as_bytes());
                    }
                    None => self.wire.buf.extend_from_slice(msg),
                }
            }
            frontend::CLOSE => {
                let (kind, name) = frontend::target(body).map_err(|_| malformed("Close"))?;
                if kind == STATEMENT && !name.is_empty() {
                    // The server keeps it for others; the client forgets it.
                    self.statements_mut().remove(name);
                    build::close(&mut self.wire.buf, STATEMENT, NONE);
                } else {
                    self.wire.buf.extend_from_slice(msg);
                }
                self.expect.push_back(Expect::close(false));
            }
            _ => {
                let sql = frontend::query(body).map_err(|_| malformed("Query"))?;
                self.translate_query(conn, msg, sql);
            }
        }
        Ok(Ready::Go)
    }

    /// Records a client's named Parse. `Err` carries the error for a
    /// name already taken, as PostgreSQL refuses a second Parse of one
    /// name (42P05).
    fn register(&mut self, p: &frontend::Parse<'_>) -> Result<Arc<Statement>, BytesMut> {
        if self.statements.contains_key(p.name) {
            let name = String::from_utf8_lossy(p.name);
            let mut error = BytesMut::new();
            build::error_response(
                &mut error,
                build::Severity::Error,
                pgheal_protocol::sqlstate::DUPLICATE_PREPARED_STATEMENT,
                &format!("prepared statement \"{name}\" already exists"),
                None,
            );
            return Err(error);
        }
        let effects = effects::effects(p.query);
        self.take_effects(&effects);
        self.note_sql(p.query, &effects);
        let search_path = self.params.get("search_path").unwrap_or_default();
        let base = ServerName::protocol(p.query, p.types, search_path.as_bytes());
        let epoch = self.app.epochs.current(&base);
        let server = if self.unshare {
            base.for_client(self.cancel.key.pid)
        } else {
            base.at_epoch(epoch)
        };
        let source = Source::Protocol {
            query: p.query.into(),
            types: p.types.into(),
        };
        let stmt = Arc::new(Statement::new(server, base, epoch, source));
        self.statements_mut().insert(p.name.into(), stmt.clone());
        self.flight.fresh.push(p.name.into());
        Ok(stmt)
    }

    /// A request uses the client's statement `name`.
    fn note_use(&mut self, name: &[u8], stmt: &Statement) {
        if !self.flight.fresh.iter().any(|n| &**n == name) {
            self.flight.known_shape = true;
        }
        let used = (stmt.base, stmt.epoch);
        if !self.flight.bound.contains(&used) {
            self.flight.bound.push(used);
        }
    }

    /// The client uses a statement that went stale since it prepared it:
    /// PostgreSQL's own answer, `0A000`, by a Parse that fails on purpose
    /// (the server then skips the rest up to the Sync, as after any error).
    fn refuse_stale(&mut self) {
        let error = self.app.epochs.stale_error().unwrap_or_else(|| {
            let mut error = BytesMut::new();
            build::error_response(
                &mut error,
                build::Severity::Error,
                pgheal_protocol::sqlstate::FEATURE_NOT_SUPPORTED,
                super::replies::STALE_PLAN,
                None,
            );
            error.freeze()
        });
        build::parse(
            &mut self.wire.buf,
            FAIL,
            b"pgheal: stale statement",
            b"\0\0",
        );
        self.expect.push_back(Expect::Parse {
            swallow: false,
            server: None,
            client: None,
            error: Some(error),
        });
    }

    /// Takes back what the requests in flight prepared, before they are
    /// run again from the client's bytes.
    pub(super) fn forget_fresh(&mut self) {
        for name in std::mem::take(&mut self.flight.fresh) {
            self.statements_mut().remove(&name);
        }
    }

    /// Answers a request made only of named Parses and a Sync, outside a
    /// transaction, without a server: the statements are prepared where
    /// they first run. A client that prepares while it holds a server in
    /// another connection's transaction (pgbench does) so never waits for
    /// a server it is itself keeping busy.
    pub(super) fn prepare_locally(&mut self) -> Option<BytesMut> {
        if !self.translating || self.flight.tx != TxStatus::Idle || self.flight.pending != 1 {
            return None;
        }
        if self.up.scanned != self.up.buf.len() || !self.up.scanner.at_boundary() {
            return None;
        }
        let buf = std::mem::take(&mut self.up.buf);
        let answer = self.answer_parses(&buf);
        self.up.buf = buf;
        let mut out = answer?;
        build::ready_for_query(&mut out, TxStatus::Idle);
        self.up.clear();
        // No description went out: the statements stay fresh until a
        // request that uses them is answered.
        let fresh = std::mem::take(&mut self.flight.fresh);
        self.flight.reset();
        self.flight.fresh = fresh;
        Some(out)
    }

    /// ParseComplete for each named Parse in `buf` (ending in a Sync), or
    /// `None` when `buf` holds anything else.
    fn answer_parses(&mut self, buf: &[u8]) -> Option<BytesMut> {
        // Most requests are told apart at their first message, before
        // anything is allocated.
        let mut parses = Vec::new();
        if !only_named_parses(buf, |p| parses.push(p)) {
            return None;
        }
        let mut out = BytesMut::new();
        for p in &parses {
            match self.register(p) {
                Ok(_) => build::parse_complete(&mut out),
                Err(error) => {
                    out.extend_from_slice(&error);
                    break;
                }
            }
        }
        Some(out)
    }

    fn translate_parse(&mut self, conn: &mut ServerConn, msg: &[u8], p: frontend::Parse<'_>) {
        if p.name.is_empty() {
            let analysis = crate::backend::analysis::statement(p.query);
            let effects = &analysis.1;
            self.take_effects(effects);
            self.note_sql(p.query, effects);
            match self.rename_executes(conn, p.query, effects) {
                Some(query) => build::parse(&mut self.wire.buf, b"", &query, p.types),
                None => self.wire.buf.extend_from_slice(msg),
            }
            self.expect.push_back(Expect::parse(false));
            return;
        }
        let stmt = match self.register(&p) {
            Ok(stmt) => stmt,
            Err(error) => {
                build::parse(&mut self.wire.buf, FAIL, b"pgheal: duplicate name", b"\0\0");
                self.expect.push_back(Expect::Parse {
                    swallow: false,
                    server: None,
                    client: None,
                    error: Some(error.freeze()),
                });
                return;
            }
        };
        let server = stmt.server;
        if conn.statements.contains(&server) {
            self.flight.shared_fresh = true;
            self.parse_shared(conn, p.name, &stmt);
            return;
        }
        self.make_room(conn);
        build::parse(&mut self.wire.buf, server.as_bytes(), p.query, p.types);
        conn.statements.add(server);
        self.expect.push_back(Expect::Parse {
            swallow: false,
            server: Some(server),
            client: Some(p.name.into()),
            error: None,
        });
        self.describe_check(p.name, &stmt);
    }

    /// Prepares a client's protocol statement on `conn` under its server
    /// name; the ParseComplete is pgheal's, not the client's.
    pub(super) fn parse_on(
        &mut self,
        conn: &mut ServerConn,
        server: ServerName,
        query: &[u8],
        types: &[u8],
    ) {
        self.make_room(conn);
        build::parse(&mut self.wire.buf, server.as_bytes(), query, types);
        conn.statements.add(server);
        self.expect.push_back(Expect::Parse {
            swallow: true,
            server: Some(server),
            client: None,
            error: None,
        });
    }

    /// Closes the least recently used statement when `conn` holds as many
    /// as it may.
    fn make_room(&mut self, conn: &mut ServerConn) {
        let max = self.app.config().pool.max_prepared_statements;
        if let Some(victim) = conn.statements.victim(max) {
            build::close(&mut self.wire.buf, STATEMENT, victim.as_bytes());
            conn.statements.remove(&victim);
            self.expect.push_back(Expect::Close {
                swallow: true,
                evicted: Some(victim),
            });
        }
    }

    fn translate_query(&mut self, conn: &mut ServerConn, msg: &[u8], sql: &[u8]) {
        tracing::debug!(server = %conn.addr, sql = %String::from_utf8_lossy(sql), "query");
        let effects = match self.analyzed.take() {
            Some(found) if found.is_of(sql) => found.effects,
            _ => effects::effects(sql),
        };
        self.take_effects(&effects);
        self.note_sql(sql, &effects);
        if effects.prepared.is_empty() {
            self.wire.buf.extend_from_slice(msg);
            self.expect.push_back(Expect::ready());
            return;
        }
        let rewrite = self.rewrite_prepared(conn, sql, &effects);
        build::query_bytes(&mut self.wire.buf, &rewrite.sql);
        self.expect.push_back(Expect::Ready {
            completes: 0,
            swallow: rewrite.swallow,
            registered: rewrite.registered,
        });
    }
}

/// A query string with its SQL-level prepared statements renamed.
#[derive(Default)]
struct Rewrite {
    sql: Vec<u8>,
    /// Which CommandCompletes (by position) answer statements pgheal added.
    swallow: u64,
    /// Statements were recorded as prepared on the server before it
    /// answered.
    registered: bool,
    /// Statements added so far, shifting the positions of those after.
    added: usize,
}

impl Rewrite {
    /// Adds a statement ahead of the client's statement at `index`, whose
    /// CommandComplete the client does not see. False when positions run
    /// out (the statement then goes as the client wrote it).
    fn add(&mut self, index: usize, sql: &str) -> bool {
        let at = index + self.added;
        if at >= 63 {
            return false;
        }
        self.swallow |= 1 << at;
        self.added += 1;
        self.sql.extend_from_slice(sql.as_bytes());
        self.sql.extend_from_slice(b"; ");
        true
    }
}

impl Session {
    fn rewrite_prepared(
        &mut self,
        conn: &mut ServerConn,
        sql: &[u8],
        effects: &Effects,
    ) -> Rewrite {
        let mut out = Rewrite::default();
        let mut copied = 0;
        for p in &effects.prepared {
            out.sql.extend_from_slice(&sql[copied..p.span.start]);
            copied = p.span.start;
            match &p.command {
                Prepared::Prepare { name, body } => {
                    let body = &sql[body.clone()];
                    if self.sql_prepare(conn, &mut out, p.index, name, body) {
                        copied = p.span.end;
                    }
                }
                Prepared::Execute { name, at } => {
                    let Some(stmt) = self.statements.get(name.as_bytes()).cloned() else {
                        continue;
                    };
                    self.note_statement(&stmt);
                    if !conn.statements.contains(&stmt.server) {
                        if let Some(prepare) = prepare_sql(&stmt) {
                            if !out.add(p.index, &prepare) {
                                continue;
                            }
                            conn.statements.add(stmt.server);
                            out.registered = true;
                        }
                    }
                    conn.statements.touch(&stmt.server);
                    out.sql.extend_from_slice(&sql[copied..at.start]);
                    out.sql.extend_from_slice(stmt.server.as_bytes());
                    copied = at.end;
                }
                Prepared::Deallocate { name: Some(name) } => {
                    if self.statements.contains_key(name.as_bytes())
                        && out.add(p.index, "PREPARE \"pgheal-tmp\" AS SELECT")
                    {
                        // The server keeps it for others; the client
                        // hears DEALLOCATE from a throwaway statement.
                        self.statements_mut().remove(name.as_bytes());
                        out.sql.extend_from_slice(b"DEALLOCATE \"pgheal-tmp\"");
                        copied = p.span.end;
                    }
                }
                Prepared::Deallocate { name: None } => self.statements_mut().clear(),
            }
        }
        out.sql.extend_from_slice(&sql[copied..]);
        out
    }

    /// Rewrites `PREPARE name body` for `conn`; false leaves it as written.
    fn sql_prepare(
        &mut self,
        conn: &mut ServerConn,
        out: &mut Rewrite,
        index: usize,
        name: &str,
        body: &[u8],
    ) -> bool {
        let server = ServerName::sql(body);
        match self.statements.get(name.as_bytes()) {
            Some(s) if s.server == server => {}
            Some(_) => {
                out.sql
                    .extend_from_slice(duplicate_prepare_error(name).as_bytes());
                return true;
            }
            None => {
                let source = Source::Sql { body: body.into() };
                let stmt = Statement::new(server, server, 0, source);
                self.statements
                    .insert(name.as_bytes().into(), Arc::new(stmt));
            }
        }
        let body = String::from_utf8_lossy(body);
        if conn.statements.contains(&server) {
            // Made again, so the client's PREPARE is answered by the server.
            if !out.add(index, &format!("DEALLOCATE {}", server.as_str())) {
                return false;
            }
        } else {
            conn.statements.add(server);
            out.registered = true;
        }
        out.sql
            .extend_from_slice(format!("PREPARE {}{body}", server.as_str()).as_bytes());
        true
    }
}

impl Session {
    /// `sql` of an unnamed Parse with each `EXECUTE` of a client's
    /// statement naming it as on `conn` (prepared there first with a
    /// Parse when it was prepared with the protocol); `None` when nothing
    /// changes.
    fn rename_executes(
        &mut self,
        conn: &mut ServerConn,
        sql: &[u8],
        effects: &Effects,
    ) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let mut copied = 0;
        for p in &effects.prepared {
            let Prepared::Execute { name, at } = &p.command else {
                continue;
            };
            let Some(stmt) = self.statements.get(name.as_bytes()).cloned() else {
                continue;
            };
            self.note_statement(&stmt);
            if !conn.statements.contains(&stmt.server) {
                let Source::Protocol { query, types } = &stmt.source else {
                    continue;
                };
                self.parse_on(conn, stmt.server, query, types);
            }
            conn.statements.touch(&stmt.server);
            out.extend_from_slice(&sql[copied..at.start]);
            out.extend_from_slice(stmt.server.as_bytes());
            copied = at.end;
        }
        if copied == 0 {
            return None;
        }
        out.extend_from_slice(&sql[copied..]);
        Some(out)
    }
}

/// The SQL that prepares `stmt` on a server for an `EXECUTE`: its own
/// `PREPARE` text, or for a statement the client prepared with the protocol,
/// `PREPARE name AS query` (only when the client left the parameter types
/// to the server: a Parse gives types as OIDs, which PREPARE cannot take).
fn prepare_sql(stmt: &Statement) -> Option<String> {
    match &stmt.source {
        Source::Sql { body } => Some(format!(
            "PREPARE {}{}",
            stmt.server.as_str(),
            String::from_utf8_lossy(body)
        )),
        Source::Protocol { query, types } => {
            let unspecified = types.get(2..).unwrap_or_default().iter().all(|&b| b == 0);
            unspecified.then(|| {
                format!(
                    "PREPARE {} AS {}",
                    stmt.server.as_str(),
                    String::from_utf8_lossy(query)
                )
            })
        }
    }
}

/// A statement whose error is PostgreSQL's own for a second PREPARE of
/// `name`, raised by the server so it arrives in order. The name is quoted
/// as a literal and kept out of the dollar-quoted body's delimiter.
fn duplicate_prepare_error(name: &str) -> String {
    let message = quote_literal(&format!("prepared statement \"{name}\" already exists"));
    let mut tag = String::from("$pgheal$");
    while message.contains(&tag) {
        tag.insert(tag.len() - 1, '_');
    }
    format!("DO {tag}BEGIN RAISE EXCEPTION USING ERRCODE = '42P05', MESSAGE = {message}; END{tag}")
}

/// True when `buf` is named Parses and then a Sync that ends it; `each`
/// gets the Parses as they come. A request that starts otherwise, or with
/// the unnamed statement (most drivers' every extended query), leaves at
/// its first message.
fn only_named_parses<'a>(buf: &'a [u8], mut each: impl FnMut(frontend::Parse<'a>)) -> bool {
    let mut at = 0;
    while let Ok(Some(m)) = frame::message(&buf[at..], usize::MAX) {
        at += m.len;
        match m.tag {
            // The unnamed statement: its name is empty (read no further).
            frontend::PARSE if m.body.first() == Some(&0) => return false,
            frontend::PARSE => match frontend::parse(m.body) {
                Ok(p) if !p.name.is_empty() => each(p),
                _ => return false,
            },
            frontend::SYNC => return at == buf.len(),
            _ => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::duplicate_prepare_error;

    #[test]
    fn a_duplicate_name_cannot_break_out_of_its_statement() {
        assert_eq!(
            duplicate_prepare_error("s1"),
            "DO $pgheal$BEGIN RAISE EXCEPTION USING ERRCODE = '42P05', \
             MESSAGE = 'prepared statement \"s1\" already exists'; END$pgheal$"
        );
        let hostile = duplicate_prepare_error("x$pgheal$'\\");
        assert!(hostile.starts_with("DO $pgheal_$"), "{hostile}");
        assert!(hostile.ends_with("END$pgheal_$"), "{hostile}");
        let literal = " E'prepared statement \"x$pgheal$''\\\\\" already exists'";
        assert!(hostile.contains(literal), "{hostile}");
    }
}
