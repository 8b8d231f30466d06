//! The admin console: `psql -U <admin user> pgheal`. Users with
//! `admin = true` only; simple queries only; every command answers as an
//! ordinary result set, and an unknown one gets an error, not a disconnect.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use pgheal_protocol::backend::TxStatus;
use pgheal_protocol::build::{self, Severity};
use pgheal_protocol::sqlstate::{self, SqlState};
use pgheal_protocol::{frame, frontend};
use tokio::io::AsyncReadExt;

use crate::backend::cluster::Role;
use crate::events::{At, Kind, Level};
use crate::frontend::clients::ClientState;
use crate::frontend::error::ClientError;
use crate::frontend::login::LoggedIn;
use crate::frontend::App;

const COMMANDS: &str = "SHOW POOLS, SHOW NODES, SHOW CLIENTS, SHOW SERVERS, SHOW STATS, \
                        SHOW BACKUPS, SHOW EVENTS, SHOW CONFIG, SHOW VERSION, SHOW HELP, RELOAD, \
                        PAUSE [db], RESUME [db], RECONNECT [db]";

pub async fn serve(app: Arc<App>, client: Box<LoggedIn>) -> Result<(), ClientError> {
    let LoggedIn {
        mut stream,
        mut buf,
        user,
        ..
    } = *client;
    let mut out = BytesMut::new();
    // The login's AuthenticationOk goes out with the welcome.
    build::auth_ok(&mut out);
    for (name, value) in [
        ("server_version", "15.0 (pgheal admin console)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        build::parameter_status(&mut out, name.as_bytes(), value.as_bytes());
    }
    build::backend_key_data(&mut out, crate::frontend::cancel::random_key(None));
    build::ready_for_query(&mut out, TxStatus::Idle);
    stream.send(&out).await.map_err(ClientError::ClientIo)?;
    tracing::info!(%user, "admin console opened");
    loop {
        while let Some(m) = frame::message(&buf, 1 << 20)? {
            let (tag, len) = (m.tag, m.len);
            out.clear();
            match tag {
                frontend::QUERY => {
                    let sql =
                        frontend::query(m.body).map_err(|_| ClientError::Malformed("Query"))?;
                    let sql = String::from_utf8_lossy(sql).into_owned();
                    tracing::info!(%user, command = %sql.trim(), "admin command");
                    answer(&app, &sql, &mut out).await;
                    build::ready_for_query(&mut out, TxStatus::Idle);
                }
                frontend::TERMINATE => return Ok(()),
                frontend::SYNC => build::ready_for_query(&mut out, TxStatus::Idle),
                _ => error(
                    &mut out,
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "the admin console takes simple queries only",
                ),
            }
            buf.advance(len);
            stream.send(&out).await.map_err(ClientError::ClientIo)?;
        }
        if stream
            .read_buf(&mut buf)
            .await
            .map_err(ClientError::ClientIo)?
            == 0
        {
            return Ok(());
        }
    }
}

fn error(out: &mut BytesMut, code: SqlState, message: &str) {
    build::error_response(out, Severity::Error, code, message, None);
}

/// One command's answer (without the ReadyForQuery).
async fn answer(app: &Arc<App>, sql: &str, out: &mut BytesMut) {
    let words: Vec<String> = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .map(str::to_ascii_lowercase)
        .collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    // A database name as typed: names are case-sensitive (see `named`).
    let arg = sql
        .split_whitespace()
        .nth(1)
        .map(|w| w.trim_end_matches(';'));
    let table = match words.as_slice() {
        [] => {
            build::empty_query_response(out);
            return;
        }
        ["show", "pools"] => pools(app),
        ["show", "nodes"] => nodes(app),
        ["show", "stats"] => stats(app),
        ["show", "config"] => config(app),
        ["show", "version"] => Table::new(&["version"]).row(vec![version()]),
        ["show", "help"] => Table::new(&["commands"]).row(vec![COMMANDS.to_string()]),
        ["pause" | "resume", rest @ ..] if rest.len() <= 1 => {
            let database = arg.filter(|_| !rest.is_empty());
            pause(app, words[0] == "pause", database, out);
            return;
        }
        ["reconnect", rest @ ..] if rest.len() <= 1 => {
            reconnect(app, arg.filter(|_| !rest.is_empty()), out);
            return;
        }
        ["reload"] => match crate::admin::reload::reload(app).await {
            Ok(changes) => changes
                .iter()
                .fold(Table::new(&["applied"]), |t, c| t.row(vec![c.to_string()])),
            Err(e) => {
                error(out, sqlstate::CONFIG_FILE_ERROR, &e.to_string());
                return;
            }
        },
        ["show", "clients"] => clients(app),
        ["show", "backups"] => backups(app).await,
        ["show", "events"] => events(app),
        ["show", "servers"] => servers(app),
        _ => {
            let message = format!("unknown admin command \"{}\"; try SHOW HELP", sql.trim());
            error(out, sqlstate::SYNTAX_ERROR, &message);
            return;
        }
    };
    table.write(out);
}

/// PAUSE / RESUME one database, or all of them.
/// Whether `name` is the one `typed` means: the same, or the same but
/// for case when no database is named exactly as typed.
fn named(app: &App, typed: &str, name: &str) -> bool {
    name == typed
        || (name.eq_ignore_ascii_case(typed)
            && !app.config().databases.contains_key(typed)
            && !app.targets().iter().any(|(n, _)| n == typed))
}

fn pause(app: &App, on: bool, database: Option<&str>, out: &mut BytesMut) {
    let mut found = false;
    for (name, target) in app.targets() {
        if database.is_none_or(|typed| named(app, typed, &name)) {
            target.paused.send_replace(on);
            found = true;
        }
    }
    let command = if on { "PAUSE" } else { "RESUME" };
    match (found, database) {
        (false, Some(d)) => error(
            out,
            sqlstate::INVALID_CATALOG_NAME,
            &format!("database \"{d}\" does not exist"),
        ),
        _ => {
            let kind = if on { Kind::Paused } else { Kind::Resumed };
            let at = At {
                database,
                node: None,
            };
            let details = match on {
                true => "new transactions wait until RESUME",
                false => "new transactions run again",
            };
            app.events.record(Level::Warn, kind, at, details);
            build::command_complete(out, command);
        }
    }
}

/// RECONNECT one database, or all: pgheal's server connections to it
/// close, the idle ones now and the others as they are given back (for
/// 5 s), as before a statement that needs the database to itself.
fn reconnect(app: &App, database: Option<&str>, out: &mut BytesMut) {
    let config = app.config();
    let chosen: Vec<&str> = config
        .named_databases()
        .filter(|d| database.is_none_or(|typed| named(app, typed, &d.name)))
        .map(|d| d.dbname.as_str())
        .collect();
    match (chosen.is_empty(), database) {
        (true, Some(d)) => error(
            out,
            sqlstate::INVALID_CATALOG_NAME,
            &format!("database \"{d}\" does not exist"),
        ),
        _ => {
            for dbname in chosen {
                app.release_database(dbname);
            }
            build::command_complete(out, "RECONNECT");
        }
    }
}

fn version() -> String {
    format!("pgheal {}", env!("CARGO_PKG_VERSION"))
}

/// A result set of text columns.
struct Table {
    columns: &'static [&'static str],
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(columns: &'static [&'static str]) -> Table {
        Table {
            columns,
            rows: Vec::new(),
        }
    }

    fn row(mut self, values: Vec<String>) -> Table {
        self.rows.push(values);
        self
    }

    fn write(&self, out: &mut BytesMut) {
        build::row_description_text(out, self.columns);
        for row in &self.rows {
            let values: Vec<Option<&str>> = row.iter().map(|v| Some(v.as_str())).collect();
            build::data_row(out, &values);
        }
        build::command_complete(out, &format!("SHOW {}", self.rows.len()));
    }
}

fn pools(app: &App) -> Table {
    let mut t = Table::new(&[
        "database",
        "user",
        "node",
        "clients_active",
        "clients_idle",
        "clients_pinned",
        "clients_waiting",
        "server_active",
        "server_idle",
        "pool_size",
    ]);
    // Each client's state is read once, so a client moving from active to
    // idle while the table is built is counted in one column, not two.
    let clients = app.clients.list();
    let states: Vec<(&str, ClientState)> =
        clients.iter().map(|c| (&*c.database, c.state())).collect();
    let count = |db: &str, state: ClientState| {
        states
            .iter()
            .filter(|(d, s)| *d == db && *s == state)
            .count()
            .to_string()
    };
    let mut pools = app.pools();
    pools.sort_by(|a, b| (&a.database, a.addr()).cmp(&(&b.database, b.addr())));
    for p in pools {
        let (idle, busy) = p.counts();
        t = t.row(vec![
            p.database.clone(),
            p.user().to_string(),
            p.addr().to_string(),
            count(&p.database, ClientState::Active),
            count(&p.database, ClientState::Idle),
            count(&p.database, ClientState::Pinned),
            p.waiting().to_string(),
            busy.to_string(),
            idle.to_string(),
            p.size().to_string(),
        ]);
    }
    t
}

async fn backups(app: &App) -> Table {
    let mut t = Table::new(&[
        "database",
        "taken_at",
        "size_bytes",
        "restore_checked",
        "file",
    ]);
    let config = app.config();
    let Some(b) = &config.backup else {
        return t;
    };
    for backup in crate::ops::backup::list_all(&config, &b.dir).await {
        let checked = crate::ops::backup::restore_checked(&backup);
        t = t.row(vec![
            backup.database,
            backup.taken_at,
            backup.size.to_string(),
            checked,
            backup.path.display().to_string(),
        ]);
    }
    t
}

/// The event timeline, newest first.
fn events(app: &App) -> Table {
    let mut t = Table::new(&[
        "seq", "time", "level", "event", "database", "node", "details",
    ]);
    for e in app.events.since(0).into_iter().rev() {
        t = t.row(vec![
            e.seq.to_string(),
            e.time(),
            e.level.as_str().to_string(),
            e.kind.as_str().to_string(),
            e.database.unwrap_or_default(),
            e.node.unwrap_or_default(),
            e.details,
        ]);
    }
    t
}

fn clients(app: &App) -> Table {
    let mut t = Table::new(&[
        "id",
        "user",
        "database",
        "address",
        "state",
        "tls",
        "connected_seconds",
    ]);
    for c in app.clients.list() {
        t = t.row(vec![
            c.id.to_string(),
            c.user.to_string(),
            c.database.to_string(),
            c.peer.to_string(),
            c.state().as_str().to_string(),
            c.tls.to_string(),
            c.since.elapsed().as_secs().to_string(),
        ]);
    }
    t
}

fn servers(app: &App) -> Table {
    let mut t = Table::new(&[
        "database",
        "user",
        "node",
        "state",
        "backend_pid",
        "age_seconds",
    ]);
    for p in app.pools() {
        let mut servers = p.servers();
        servers.sort_by_key(|s| s.1);
        for (active, pid, age) in servers {
            t = t.row(vec![
                p.database.clone(),
                p.user().to_string(),
                p.addr().to_string(),
                if active { "active" } else { "idle" }.to_string(),
                pid.to_string(),
                age.as_secs().to_string(),
            ]);
        }
    }
    t
}

fn nodes(app: &App) -> Table {
    let mut t = Table::new(&[
        "database",
        "node",
        "role",
        "up",
        "lsn",
        "lag_bytes",
        "replay_lag_seconds",
        "timeline",
        "streaming",
        "consecutive_failures",
        "next_retry_seconds",
        "last_error",
    ]);
    for (name, target) in app.targets() {
        let topology = target.cluster.snapshot();
        for n in &topology.nodes {
            let up = matches!(n.role, Role::Primary | Role::Replica);
            let lag_bytes = match (n.role, n.lag_bytes) {
                (Role::Replica, Some(b)) => b.to_string(),
                (Role::Primary, _) => "0".to_string(),
                _ => String::new(),
            };
            let streaming = match n.role {
                Role::Replica => n.streaming.to_string(),
                _ => String::new(),
            };
            let retry = n
                .retry_at
                .map(|at| {
                    format!(
                        "{:.1}",
                        at.saturating_duration_since(Instant::now()).as_secs_f64()
                    )
                })
                .unwrap_or_default();
            t = t.row(vec![
                name.clone(),
                n.addr.to_string(),
                n.role.as_str().to_string(),
                up.to_string(),
                format!("{:X}/{:X}", n.lsn >> 32, n.lsn & 0xffff_ffff),
                lag_bytes,
                format!("{:.3}", n.replay_lag.as_secs_f64()),
                n.timeline.map(|t| t.to_string()).unwrap_or_default(),
                streaming,
                n.failures.to_string(),
                retry,
                n.last_error.clone().unwrap_or_default(),
            ]);
        }
    }
    t
}

fn stats(app: &App) -> Table {
    let m = &app.metrics;
    let c = &app.counters;
    let failovers: u64 = app
        .targets()
        .iter()
        .map(|(_, t)| t.cluster.failovers())
        .sum();
    let mut t = Table::new(&["name", "value"]);
    for (name, value) in [
        ("transactions", m.transactions.get().to_string()),
        ("queries", m.queries.get().to_string()),
        ("bytes_from_clients", m.bytes_in.get().to_string()),
        ("bytes_to_clients", m.bytes_out.get().to_string()),
        (
            "avg_transaction_ms",
            format!("{:.3}", m.average_transaction_ms()),
        ),
        (
            "p99_transaction_ms",
            format!("{:.1}", m.p99_transaction_ms()),
        ),
        ("rejected_writes", m.rejected_total().to_string()),
        ("retried_reads", m.retried_total().to_string()),
        (
            "transactions_replayed",
            m.transactions_replayed.get().to_string(),
        ),
        ("replay_mismatches", m.replay_mismatches.get().to_string()),
        ("replay_refused", m.replay_refused_total().to_string()),
        ("failovers", failovers.to_string()),
        ("auth_failures", m.auth_failures.get().to_string()),
        ("tls_failures", m.tls_failures.get().to_string()),
        (
            "client_connections",
            c.client_connections.load(Ordering::Relaxed).to_string(),
        ),
        (
            "active_clients",
            c.active_clients.load(Ordering::Relaxed).to_string(),
        ),
        (
            "pinned_clients",
            c.pinned_clients.load(Ordering::Relaxed).to_string(),
        ),
        (
            "resting_clients",
            c.resting_clients.load(Ordering::Relaxed).to_string(),
        ),
        (
            "migration_error",
            app.migration_failure().unwrap_or_default(),
        ),
    ] {
        t = t.row(vec![name.to_string(), value]);
    }
    t
}

/// The running configuration; passwords and secrets are masked.
fn config(app: &App) -> Table {
    let c = app.config();
    let mask = |set: bool| if set { "********" } else { "" }.to_string();
    let mut t = Table::new(&["key", "value"]);
    let mut add = |k: String, v: String| t.rows.push(vec![k, v]);
    add("proxy.listen".into(), c.proxy.listen.to_string());
    add(
        "proxy.pool_mode".into(),
        format!("{:?}", c.proxy.pool_mode).to_lowercase(),
    );
    add(
        "proxy.max_client_connections".into(),
        c.proxy.max_client_connections.to_string(),
    );
    add(
        "proxy.login_timeout".into(),
        format!("{:?}", c.proxy.login_timeout),
    );
    add(
        "proxy.shutdown_timeout".into(),
        format!("{:?}", c.proxy.shutdown_timeout),
    );
    add(
        "pool.max_prepared_statements".into(),
        c.pool.max_prepared_statements.to_string(),
    );
    add(
        "failover.write_wait".into(),
        format!("{:?}", c.failover.write_wait),
    );
    add("failover.replay".into(), c.failover.replay.to_string());
    add(
        "failover.replay_timeout".into(),
        format!("{:?}", c.failover.replay_timeout),
    );
    add("health.interval".into(), format!("{:?}", c.health.interval));
    for u in &c.users {
        add(
            format!("users.{}.auth", u.name),
            format!("{:?}", u.auth).to_lowercase(),
        );
        add(
            format!("users.{}.password", u.name),
            mask(u.password.is_some() || u.scram.is_some()),
        );
        add(format!("users.{}.admin", u.name), u.admin.to_string());
    }
    for (name, db) in &c.databases {
        add(format!("databases.{name}.nodes"), db.nodes.join(", "));
        add(
            format!("databases.{name}.pool_size"),
            db.pool_size.to_string(),
        );
        add(
            format!("databases.{name}.read_routing"),
            db.read_routing.to_string(),
        );
        add(
            format!("databases.{name}.password"),
            mask(db.password.is_some()),
        );
        add(format!("databases.{name}.tls"), format!("{:?}", db.tls));
    }
    if let Some(b) = &c.backup {
        t.rows
            .extend(backup_config(b).into_iter().map(|(k, v)| vec![k, v]));
    }
    t
}

/// SHOW CONFIG's `[backup]` rows, the password masked.
fn backup_config(b: &crate::config::BackupConfig) -> Vec<(String, String)> {
    let schedule = match b.schedule {
        crate::config::Schedule::Every(d) => format!("every {d:?}"),
        crate::config::Schedule::DailyAt { hour, minute } => format!("daily@{hour:02}:{minute:02}"),
    };
    let (every, target) = match &b.restore_check {
        Some(r) => (
            format!("{:?}", r.every),
            match &r.target {
                crate::config::RestoreTarget::Primary => "primary".to_string(),
                crate::config::RestoreTarget::Server(addr) => addr.clone(),
            },
        ),
        None => (String::new(), String::new()),
    };
    let password = if b.password.is_some() { "********" } else { "" };
    [
        ("dir", b.dir.display().to_string()),
        ("schedule", schedule),
        ("keep_last", b.keep_last.to_string()),
        ("keep_days", b.keep_days.to_string()),
        ("user", b.user.clone().unwrap_or_default()),
        ("password", password.to_string()),
        ("restore_args", b.restore_args.join(" ")),
        ("restore_check_every", every),
        ("restore_target", target),
    ]
    .into_iter()
    .map(|(k, v)| (format!("backup.{k}"), v))
    .collect()
}
