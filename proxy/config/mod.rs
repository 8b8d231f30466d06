//! The TOML configuration, read key by key into a validated runtime type.
//!
//! Reading does not stop at the first problem: every unknown key, wrong type,
//! bad duration or missing value is collected with its key path, so
//! `pgheal check` can report them all at once.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use toml::{Table, Value};

use std::sync::Arc;

mod never_replayed;

pub use never_replayed::{NeverReplayed, NEVER_REPLAYED};

use crate::auth::ScramVerifier;
use crate::net::tls::{ClientMode, ClientTls, ClientTlsConfig, UpstreamMode, UpstreamTls};

/// The database name that opens the admin console.
pub const ADMIN_DATABASE: &str = "pgheal";

/// `max_replica_lag_bytes` unless set: one WAL segment.
pub const DEFAULT_MAX_LAG_BYTES: u64 = 16 * 1024 * 1024;

/// The whole configuration, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub pool: PoolTimeouts,
    pub health: HealthConfig,
    pub failover: FailoverConfig,
    pub users: Vec<User>,
    pub databases: BTreeMap<String, Database>,
    /// `[tls]`: TLS with clients, when configured.
    pub tls: Option<Arc<ClientTls>>,
    /// `[migrations]`, when configured.
    pub migrations: Option<MigrationsConfig>,
    /// `[backup]`, when configured.
    pub backup: Option<BackupConfig>,
    /// `[auth]`: users not in `[[users]]` are looked up on the server.
    pub auth: Option<AuthQuery>,
}

/// The section name of the database that serves any name without a section
/// of its own.
pub const ANY_DATABASE: &str = "*";

/// `[auth]`: how to look up a user that is not in `[[users]]`.
#[derive(Clone)]
pub struct AuthQuery {
    pub user: String,
    pub password: Option<String>,
    /// Run with `$1` = the user name; returns (name, secret).
    pub query: String,
    /// Where the lookup runs.
    pub database: String,
}

impl fmt::Debug for AuthQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthQuery")
            .field("user", &self.user)
            .field("query", &self.query)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// The databases with a section of their own (not `"*"`): the ones
    /// migrations and backups cover.
    pub fn named_databases(&self) -> impl Iterator<Item = &Database> {
        self.databases.values().filter(|d| d.name != ANY_DATABASE)
    }

    /// Whether clients may ask for `name`: a database of its own, or one
    /// `"*"` serves (what `database_for` would find, without a copy).
    pub fn serves(&self, name: &str) -> bool {
        (name != ANY_DATABASE && self.databases.contains_key(name))
            || self.databases.contains_key(ANY_DATABASE)
    }

    /// The database a client asking for `name` gets: its own section, else
    /// `"*"` serving `name`.
    pub fn database_for(&self, name: &str) -> Option<Database> {
        if let Some(db) = self.databases.get(name).filter(|_| name != ANY_DATABASE) {
            return Some(db.clone());
        }
        let any = self.databases.get(ANY_DATABASE)?;
        Some(Database {
            name: name.to_string(),
            dbname: name.to_string(),
            ..any.clone()
        })
    }
}

/// When backups run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    Every(Duration),
    /// Daily at this UTC time.
    DailyAt {
        hour: u8,
        minute: u8,
    },
}

/// Scheduled backups with retention.
#[derive(Debug, Clone)]
pub struct BackupConfig {
    pub dir: std::path::PathBuf,
    pub schedule: Schedule,
    /// Dump from a replica when one is up (else the primary).
    pub from_replica: bool,
    pub keep_last: usize,
    /// 0: no age limit.
    pub keep_days: u32,
    /// pg_dump to run; `None`: found on PATH or under
    /// /usr/lib/postgresql when a backup runs.
    pub pg_dump: Option<std::path::PathBuf>,
    /// Who dumps and restores; `None`: the database's own user.
    pub user: Option<String>,
    pub password: Option<String>,
    /// The pg_restore options `pgheal backup restore` passes.
    pub restore_args: Vec<String>,
    /// Scheduled restore drills, off unless `restore_check_every` is set.
    pub restore_check: Option<RestoreCheck>,
}

/// `[backup] restore_check_every` / `restore_target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreCheck {
    pub every: Duration,
    pub target: RestoreTarget,
}

/// Where restore drills restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreTarget {
    /// The database's current primary (chosen explicitly only).
    Primary,
    /// A scratch server, `host:port`.
    Server(String),
}

/// pg_restore options that pgheal sets itself and a configuration may not.
const RESTORE_ARGS_OWN: &[&str] = &[
    "-d",
    "--dbname",
    "-h",
    "--host",
    "-p",
    "--port",
    "-U",
    "--username",
    "-f",
    "--file",
    "-l",
    "--list",
    "-C",
    "--create",
    "-c",
    "--clean",
    "-W",
    "--password",
];

/// Schema migrations applied before pgheal serves.
#[derive(Debug, Clone)]
pub struct MigrationsConfig {
    pub dir: std::path::PathBuf,
    /// The configured database they run on (default: the first).
    pub database: Option<String>,
    /// How long to wait for a primary at startup.
    pub wait: Duration,
    /// On failure: refuse to start, or serve and report it.
    pub serve_on_error: bool,
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub pool_mode: PoolMode,
    pub login_timeout: Duration,
    pub max_message_size: usize,
    /// Clients beyond this many get FATAL 53300 at once.
    pub max_client_connections: usize,
    /// On SIGTERM, how long running transactions may take to finish.
    pub shutdown_timeout: Duration,
    /// Where /metrics, /healthz, /readyz and /status are served, if set.
    pub http_listen: Option<SocketAddr>,
    /// `http_auth = "bearer:<token>"`: the token every HTTP request but
    /// /healthz and /readyz must carry (`Authorization: Bearer <token>`).
    pub http_token: Option<String>,
    /// Serve the HTTP endpoints over TLS with the `[tls]` certificate.
    pub http_tls: bool,
    /// Reload when the configuration file's content changes (a mounted
    /// Kubernetes ConfigMap), as SIGHUP does.
    pub watch_config: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    Session,
    Transaction,
}

#[derive(Debug, Clone)]
pub struct PoolTimeouts {
    pub connect_timeout: Duration,
    pub checkout_timeout: Duration,
    pub idle_timeout: Duration,
    pub server_lifetime: Duration,
    /// Named prepared statements kept per server connection in transaction
    /// mode; the least recently used beyond it are closed. 0 turns
    /// statement tracking off (statements pass through unchanged).
    pub max_prepared_statements: usize,
}

/// What happens while no primary is reachable.
#[derive(Debug, Clone)]
pub struct FailoverConfig {
    /// How long a write waits for a primary before it gets 25006.
    pub write_wait: Duration,
    /// Transactions whose server died before their COMMIT was sent run
    /// again, unseen, on the primary (see `frontend::session::replay`).
    pub replay: bool,
    /// The most client bytes one transaction may send and still replay.
    pub replay_buffer: usize,
    /// The most bytes all clients' replayable transactions may hold.
    pub replay_memory: usize,
    /// How long a replay may take to reproduce what the client already saw.
    pub replay_timeout: Duration,
    /// Functions whose effects outlive a rollback: a transaction whose SQL
    /// names one is never replayed (added to [`NEVER_REPLAYED`]).
    pub replay_never: Vec<String>,
    /// Finds those names (and [`NEVER_REPLAYED`]) in SQL.
    pub never_replayed: NeverReplayed,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        let write_wait = Duration::from_secs(2);
        FailoverConfig {
            write_wait,
            replay: true,
            replay_buffer: 256 * 1024,
            replay_memory: 64 * 1024 * 1024,
            replay_timeout: write_wait,
            replay_never: Vec::new(),
            never_replayed: NeverReplayed::new(&[])
                .unwrap_or_else(|e| unreachable!("the built-in function names always build: {e}")),
        }
    }
}

/// How nodes are probed for health and role.
#[derive(Clone, PartialEq)]
pub struct HealthConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub backoff_multiplier: f64,
    /// Who the health checks log in as; default: the `user` of the first
    /// database listing the node.
    pub user: Option<String>,
    pub password: Option<String>,
    /// Where the health checks log in: one maintenance database per node,
    /// never one of the databases served (which could then not be dropped
    /// or used as a template).
    pub database: String,
}

impl fmt::Debug for HealthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthConfig")
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .field("backoff_multiplier", &self.backoff_multiplier)
            .field("user", &self.user)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_millis(500),
            timeout: Duration::from_secs(1),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            backoff_multiplier: 2.0,
            user: None,
            password: None,
            database: "postgres".to_string(),
        }
    }
}

#[derive(Clone)]
pub struct User {
    pub name: String,
    pub auth: AuthMethod,
    /// The plain password, when the file gives one.
    pub password: Option<String>,
    /// What SCRAM checks against: from `scram_secret` or made from `password`.
    pub scram: Option<ScramVerifier>,
    /// `scram_secret` as written, so a reload can tell it changed (a
    /// verifier made from a password has a random salt).
    pub scram_secret: Option<String>,
    pub admin: bool,
}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("auth", &self.auth)
            .field("admin", &self.admin)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    ScramSha256,
    Md5,
    Trust,
}

#[derive(Clone)]
pub struct Database {
    pub name: String,
    pub nodes: Vec<String>,
    pub dbname: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub pool_size: usize,
    pub min_idle: usize,
    /// Send autocommit reads and `BEGIN READ ONLY` to replicas.
    pub read_routing: bool,
    /// A replica further behind than this gets no reads.
    pub max_replica_lag: Duration,
    /// A replica more WAL bytes behind the primary than this gets no reads.
    pub max_replica_lag_bytes: u64,
    /// TLS to this database's servers (health checks included).
    pub tls: UpstreamTls,
    /// `"*"` only: how many database names it serves at once.
    pub max_databases: usize,
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database")
            .field("name", &self.name)
            .field("nodes", &self.nodes)
            .field("dbname", &self.dbname)
            .field("user", &self.user)
            .field("pool_size", &self.pool_size)
            .field("min_idle", &self.min_idle)
            .field("read_routing", &self.read_routing)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl Config {
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError::new(
                "",
                format!("cannot read {}: {e}", path.display()),
            )])
        })?;
        Config::parse(&text)
    }

    /// This configuration with `[migrations] dir` and `[backup] dir` made
    /// relative to the directory of `file` (the file it was read from).
    pub fn relative_to(mut self, file: Option<&Path>) -> Config {
        if let Some(m) = self.migrations.as_mut() {
            m.dir = relative(&m.dir, file);
        }
        if let Some(b) = self.backup.as_mut() {
            b.dir = relative(&b.dir, file);
        }
        self
    }

    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let table: Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigErrors(vec![ConfigError::new("", e.to_string())])
        })?;
        let mut r = Reader::default();
        let config = read_config(&mut r, &table);
        if r.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(r.errors))
        }
    }
}

/// `dir` relative to the config file's directory, unless absolute.
pub fn relative(dir: &Path, config_file: Option<&Path>) -> std::path::PathBuf {
    match config_file.and_then(Path::parent) {
        Some(base) if dir.is_relative() => base.join(dir),
        _ => dir.to_path_buf(),
    }
}

/// One problem in the file, with the dotted path of the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    fn new(path: &str, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.to_string(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

fn read_config(r: &mut Reader, root: &Table) -> Config {
    r.known_keys(
        root,
        "",
        &[
            "proxy",
            "pool",
            "health",
            "failover",
            "users",
            "databases",
            "tls",
            "migrations",
            "backup",
            "auth",
        ],
    );
    let empty = Table::new();
    let proxy = r.table(root, "proxy", "").unwrap_or(&empty);
    let pool = r.table(root, "pool", "").unwrap_or(&empty);
    let health = r.table(root, "health", "").unwrap_or(&empty);
    let failover = r.table(root, "failover", "").unwrap_or(&empty);
    let config = Config {
        proxy: read_proxy(r, proxy),
        pool: read_pool(r, pool),
        health: read_health(r, health),
        failover: read_failover(r, failover),
        users: read_users(r, root),
        databases: read_databases(r, root),
        tls: r.table(root, "tls", "").and_then(|t| read_tls(r, t)),
        migrations: r
            .table(root, "migrations", "")
            .and_then(|t| read_migrations(r, t)),
        backup: r.table(root, "backup", "").and_then(|t| read_backup(r, t)),
        auth: r.table(root, "auth", "").and_then(|t| read_auth(r, t)),
    };
    if let Some(m) = &config.migrations {
        if let Some(db) = m
            .database
            .as_ref()
            .filter(|d| !config.databases.contains_key(*d))
        {
            r.error(
                "migrations.database",
                format!("no database \"{db}\" is configured"),
            );
        }
    }
    if config.databases.is_empty() {
        r.error("databases", "at least one database must be configured");
    }
    if config.proxy.http_tls && config.tls.is_none() {
        r.error("proxy.http_tls", "needs a [tls] section with cert and key");
    }
    check_node_tls(r, &config.databases);
    config
}

/// Each node is probed once, with the TLS settings of the first database
/// listing it: two databases that reach one node differently are an error.
fn check_node_tls(r: &mut Reader, databases: &BTreeMap<String, Database>) {
    let mut first: Vec<(&str, &Database)> = Vec::new();
    for db in databases.values() {
        for node in &db.nodes {
            match first.iter().find(|(n, _)| n == node) {
                Some((_, other)) if other.tls != db.tls => r.error(
                    &format!("databases.{}.tls", db.name),
                    format!(
                        "node {node} is also a node of database \"{}\" with other TLS settings ({:?} there, {:?} here); \
                         a node is reached one way",
                        other.name, other.tls, db.tls
                    ),
                ),
                Some(_) => {}
                None => first.push((node, db)),
            }
        }
    }
}

fn read_backup(r: &mut Reader, t: &Table) -> Option<BackupConfig> {
    let p = "backup";
    let keys = [
        "dir",
        "schedule",
        "every",
        "source",
        "keep_last",
        "keep_days",
        "pg_dump",
        "user",
        "password",
        "restore_args",
        "restore_check_every",
        "restore_target",
    ];
    r.known_keys(t, p, &keys);
    let schedule = read_schedule(r, t)?;
    let from_replica = match r.get(t, p, "source", "replica".to_string()).as_str() {
        "replica" => true,
        "primary" => false,
        other => {
            r.error(
                "backup.source",
                format!("expected \"replica\" or \"primary\", found \"{other}\""),
            );
            true
        }
    };
    let keep_last = r.get(t, p, "keep_last", 7usize);
    if keep_last == 0 {
        r.error("backup.keep_last", "must be at least 1");
    }
    let keep_days = r.get(t, p, "keep_days", 0usize);
    let pg_dump = r.opt::<String>(t, p, "pg_dump").map(Into::into);
    let restore_args = read_restore_args(r, t);
    let restore_check = read_restore_check(r, t);
    let Some(dir) = r.opt::<String>(t, p, "dir") else {
        r.error("backup.dir", "missing: where the dumps go");
        return None;
    };
    Some(BackupConfig {
        dir: dir.into(),
        schedule,
        from_replica,
        keep_last,
        keep_days: u32::try_from(keep_days).unwrap_or(u32::MAX),
        pg_dump,
        user: r.opt(t, p, "user"),
        password: r.opt(t, p, "password"),
        restore_args,
        restore_check,
    })
}

fn read_schedule(r: &mut Reader, t: &Table) -> Option<Schedule> {
    let p = "backup";
    match (
        r.opt::<String>(t, p, "schedule"),
        r.opt::<Duration>(t, p, "every"),
    ) {
        (Some(s), None) => parse_daily(&s)
            .map_err(|e| r.error("backup.schedule", e))
            .ok(),
        (None, Some(d)) if !d.is_zero() => Some(Schedule::Every(d)),
        (None, Some(_)) => {
            r.error("backup.every", "must be more than 0");
            None
        }
        _ => {
            r.error(
                p,
                "needs exactly one of schedule = \"daily@HH:MM\" or every = \"6h\"",
            );
            None
        }
    }
}

fn read_restore_args(r: &mut Reader, t: &Table) -> Vec<String> {
    let default = vec!["--no-owner".to_string(), "--exit-on-error".to_string()];
    let args = r.get(t, "backup", "restore_args", default);
    for arg in &args {
        let name = arg.split('=').next().unwrap_or(arg);
        if !arg.starts_with('-') {
            r.error(
                "backup.restore_args",
                format!("\"{arg}\" is not an option (options start with -)"),
            );
        } else if RESTORE_ARGS_OWN.contains(&name) {
            r.error(
                "backup.restore_args",
                format!("\"{arg}\" is set by pgheal itself"),
            );
        }
    }
    args
}

fn read_restore_check(r: &mut Reader, t: &Table) -> Option<RestoreCheck> {
    let p = "backup";
    let every = r.opt::<Duration>(t, p, "restore_check_every");
    let target = r.opt::<String>(t, p, "restore_target");
    match (every, target) {
        (None, None) => None,
        (Some(d), _) if d.is_zero() => {
            r.error("backup.restore_check_every", "must be more than 0");
            None
        }
        (Some(every), Some(target)) => {
            let target = match target.as_str() {
                "primary" => RestoreTarget::Primary,
                addr if addr
                    .rsplit_once(':')
                    .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok()) =>
                {
                    RestoreTarget::Server(addr.to_string())
                }
                other => {
                    r.error(
                        "backup.restore_target",
                        format!("expected \"host:port\" of a scratch server or \"primary\", found \"{other}\""),
                    );
                    return None;
                }
            };
            Some(RestoreCheck { every, target })
        }
        (Some(_), None) => {
            r.error(
                "backup.restore_target",
                "missing: where restore drills restore (\"host:port\" of a scratch server, or \"primary\")",
            );
            None
        }
        (None, Some(_)) => {
            r.error(
                "backup.restore_check_every",
                "missing: restore_target is set but no drill schedule (e.g. \"7d\")",
            );
            None
        }
    }
}

/// `daily@HH:MM` (UTC).
fn parse_daily(s: &str) -> Result<Schedule, String> {
    let bad = || format!("expected \"daily@HH:MM\" (UTC), found \"{s}\"");
    let (h, m) = s
        .strip_prefix("daily@")
        .and_then(|t| t.split_once(':'))
        .ok_or_else(bad)?;
    let hour: u8 = h.parse().map_err(|_| bad())?;
    let minute: u8 = m.parse().map_err(|_| bad())?;
    if hour > 23 || minute > 59 {
        return Err(bad());
    }
    Ok(Schedule::DailyAt { hour, minute })
}

fn read_migrations(r: &mut Reader, t: &Table) -> Option<MigrationsConfig> {
    let p = "migrations";
    r.known_keys(t, p, &["dir", "database", "wait", "on_error"]);
    let serve_on_error = match r.get(t, p, "on_error", "exit".to_string()).as_str() {
        "exit" => false,
        "serve" => true,
        other => {
            r.error(
                "migrations.on_error",
                format!("expected \"exit\" or \"serve\", found \"{other}\""),
            );
            false
        }
    };
    let Some(dir) = r.opt::<String>(t, p, "dir") else {
        r.error(
            "migrations.dir",
            "missing: the directory of NNNN_name.sql files",
        );
        return None;
    };
    Some(MigrationsConfig {
        dir: dir.into(),
        database: r.opt(t, p, "database"),
        wait: r.get(t, p, "wait", Duration::from_secs(30)),
        serve_on_error,
    })
}

fn read_tls(r: &mut Reader, t: &Table) -> Option<Arc<ClientTls>> {
    let p = "tls";
    r.known_keys(t, p, &["cert", "key", "ca", "mode"]);
    let cert: Option<String> = r.opt(t, p, "cert");
    let key: Option<String> = r.opt(t, p, "key");
    let mode = match r.get(t, p, "mode", "prefer".to_string()).as_str() {
        "prefer" => ClientMode::Prefer,
        "require" => ClientMode::Require,
        other => {
            r.error(
                "tls.mode",
                format!("expected \"prefer\" or \"require\", found \"{other}\""),
            );
            ClientMode::Prefer
        }
    };
    let ca: Option<String> = r.opt(t, p, "ca");
    let (Some(cert), Some(key)) = (cert, key) else {
        r.error(p, "needs both cert and key (PEM files)");
        return None;
    };
    let config = ClientTlsConfig {
        cert: cert.into(),
        key: key.into(),
        ca: ca.map(Into::into),
        mode,
    };
    ClientTls::load(&config)
        .map_err(|e| r.error(p, e.to_string()))
        .ok()
        .map(Arc::new)
}

fn read_proxy(r: &mut Reader, t: &Table) -> ProxyConfig {
    let p = "proxy";
    r.known_keys(
        t,
        p,
        &[
            "listen",
            "pool_mode",
            "login_timeout",
            "max_message_size",
            "max_client_connections",
            "shutdown_timeout",
            "http_listen",
            "http_auth",
            "http_tls",
            "watch_config",
        ],
    );
    let default_listen = SocketAddr::from(([127, 0, 0, 1], 6432));
    let max_message_size = r.get(t, p, "max_message_size", 256 * 1024 * 1024usize);
    if max_message_size < 1024 {
        r.error("proxy.max_message_size", "must be at least 1024 bytes");
    }
    ProxyConfig {
        listen: r.get(t, p, "listen", default_listen),
        pool_mode: r.get(t, p, "pool_mode", PoolMode::Transaction),
        login_timeout: r.get(t, p, "login_timeout", Duration::from_secs(10)),
        max_message_size,
        max_client_connections: r.get(t, p, "max_client_connections", 10_000usize),
        shutdown_timeout: r.get(t, p, "shutdown_timeout", Duration::from_secs(30)),
        http_listen: r.opt(t, p, "http_listen"),
        http_token: read_http_auth(r, t),
        http_tls: r.get(t, p, "http_tls", false),
        watch_config: r.get(t, p, "watch_config", false),
    }
}

/// `[proxy] http_auth = "bearer:<token>"`.
fn read_http_auth(r: &mut Reader, t: &Table) -> Option<String> {
    let value: String = r.opt(t, "proxy", "http_auth")?;
    match value.strip_prefix("bearer:") {
        Some(token) if !token.trim().is_empty() => Some(token.to_string()),
        _ => {
            let message = "expected \"bearer:<token>\" with a token that is not empty";
            r.error("proxy.http_auth", message);
            None
        }
    }
}

fn read_pool(r: &mut Reader, t: &Table) -> PoolTimeouts {
    let p = "pool";
    let keys = [
        "connect_timeout",
        "checkout_timeout",
        "idle_timeout",
        "server_lifetime",
        "max_prepared_statements",
    ];
    r.known_keys(t, p, &keys);
    PoolTimeouts {
        connect_timeout: r.get(t, p, "connect_timeout", Duration::from_secs(3)),
        checkout_timeout: r.get(t, p, "checkout_timeout", Duration::from_secs(5)),
        idle_timeout: r.get(t, p, "idle_timeout", Duration::from_secs(600)),
        server_lifetime: r.get(t, p, "server_lifetime", Duration::from_secs(3600)),
        max_prepared_statements: r.get(t, p, "max_prepared_statements", 512usize),
    }
}

fn read_failover(r: &mut Reader, t: &Table) -> FailoverConfig {
    let p = "failover";
    r.known_keys(
        t,
        p,
        &[
            "write_wait",
            "replay",
            "replay_buffer",
            "replay_memory",
            "replay_timeout",
            "replay_never_functions",
        ],
    );
    let d = FailoverConfig::default();
    let write_wait = r.get(t, p, "write_wait", d.write_wait);
    let mut out = FailoverConfig {
        write_wait,
        replay: r.get(t, p, "replay", d.replay),
        replay_buffer: r.get(t, p, "replay_buffer", Size(d.replay_buffer)).0,
        replay_memory: r.get(t, p, "replay_memory", Size(d.replay_memory)).0,
        replay_timeout: r.get(t, p, "replay_timeout", write_wait),
        replay_never: r.get(t, p, "replay_never_functions", d.replay_never),
        never_replayed: d.never_replayed,
    };
    match NeverReplayed::new(&out.replay_never) {
        Ok(m) => out.never_replayed = m,
        Err(e) => r.error("failover.replay_never_functions", &e),
    }
    out
}

fn read_auth(r: &mut Reader, t: &Table) -> Option<AuthQuery> {
    let p = "auth";
    r.known_keys(t, p, &["user", "password", "query", "database"]);
    let Some(user) = r.opt(t, p, "user") else {
        r.error("auth.user", "missing: who runs the lookup");
        return None;
    };
    let query: String = r.get(
        t,
        p,
        "query",
        "SELECT usename, passwd FROM pg_shadow WHERE usename = $1".to_string(),
    );
    if !query.contains("$1") {
        r.error("auth.query", "must use $1 for the user name");
    }
    Some(AuthQuery {
        user,
        password: r.opt(t, p, "password"),
        query,
        database: r.get(t, p, "database", "postgres".to_string()),
    })
}

fn read_health(r: &mut Reader, t: &Table) -> HealthConfig {
    let p = "health";
    let keys = [
        "interval",
        "timeout",
        "backoff_initial",
        "backoff_max",
        "backoff_multiplier",
        "user",
        "password",
        "database",
    ];
    r.known_keys(t, p, &keys);
    let d = HealthConfig::default();
    let h = HealthConfig {
        interval: r.get(t, p, "interval", d.interval),
        timeout: r.get(t, p, "timeout", d.timeout),
        backoff_initial: r.get(t, p, "backoff_initial", d.backoff_initial),
        backoff_max: r.get(t, p, "backoff_max", d.backoff_max),
        backoff_multiplier: r.get(t, p, "backoff_multiplier", d.backoff_multiplier),
        user: r.opt(t, p, "user"),
        password: r.opt(t, p, "password"),
        database: r.get(t, p, "database", d.database.clone()),
    };
    if h.backoff_multiplier < 1.0 {
        r.error("health.backoff_multiplier", "must be at least 1.0");
    }
    if h.interval.is_zero() || h.timeout.is_zero() {
        r.error("health", "interval and timeout must be above zero");
    }
    h
}

fn read_users(r: &mut Reader, root: &Table) -> Vec<User> {
    let Some(v) = root.get("users") else {
        return Vec::new();
    };
    let Some(list) = v.as_array() else {
        r.error(
            "users",
            format!("expected an array of tables, found {}", v.type_str()),
        );
        return Vec::new();
    };
    let mut users: Vec<User> = Vec::new();
    for (i, item) in list.iter().enumerate() {
        let path = format!("users[{i}]");
        let Some(t) = item.as_table() else {
            r.error(
                &path,
                format!("expected a table, found {}", item.type_str()),
            );
            continue;
        };
        if let Some(u) = read_user(r, t, &path) {
            if users.iter().any(|o| o.name == u.name) {
                r.error(
                    &format!("{path}.name"),
                    format!("user `{}` is listed twice", u.name),
                );
            }
            users.push(u);
        }
    }
    users
}

fn read_user(r: &mut Reader, t: &Table, p: &str) -> Option<User> {
    r.known_keys(t, p, &["name", "password", "scram_secret", "auth", "admin"]);
    let name: Option<String> = r.opt(t, p, "name");
    let password: Option<String> = r.opt(t, p, "password");
    let secret: Option<String> = r.opt(t, p, "scram_secret");
    let auth = r.get(t, p, "auth", AuthMethod::ScramSha256);
    let admin = r.get(t, p, "admin", false);
    let Some(name) = name else {
        r.error(&format!("{p}.name"), "missing: every user needs a name");
        return None;
    };
    let scram = match (&secret, &password) {
        (Some(s), _) => ScramVerifier::parse(s)
            .map_err(|e| r.error(&format!("{p}.scram_secret"), e.to_string()))
            .ok(),
        (None, Some(pw)) if auth == AuthMethod::ScramSha256 => {
            Some(ScramVerifier::from_password(pw))
        }
        _ => None,
    };
    match auth {
        AuthMethod::ScramSha256 if scram.is_none() && secret.is_none() => {
            r.error(
                &format!("{p}.password"),
                "missing: scram-sha-256 needs password or scram_secret",
            );
        }
        AuthMethod::Md5 if password.is_none() => {
            r.error(
                &format!("{p}.password"),
                "missing: md5 needs the plain password",
            );
        }
        _ => {}
    }
    Some(User {
        name,
        auth,
        password,
        scram,
        scram_secret: secret,
        admin,
    })
}

fn read_databases(r: &mut Reader, root: &Table) -> BTreeMap<String, Database> {
    let mut out = BTreeMap::new();
    let Some(dbs) = r.table(root, "databases", "") else {
        return out;
    };
    for (name, v) in dbs {
        let path = format!("databases.{name}");
        let Some(t) = v.as_table() else {
            r.error(&path, format!("expected a table, found {}", v.type_str()));
            continue;
        };
        out.insert(name.clone(), read_database(r, name, t, &path));
    }
    out
}

fn read_database(r: &mut Reader, name: &str, t: &Table, p: &str) -> Database {
    if name == ADMIN_DATABASE {
        r.error(p, "the name is reserved for the admin console");
    }
    let keys = [
        "nodes",
        "dbname",
        "user",
        "password",
        "pool_size",
        "min_idle",
        "read_routing",
        "max_replica_lag",
        "max_replica_lag_bytes",
        "tls",
        "tls_ca",
        "max_databases",
    ];
    r.known_keys(t, p, &keys);
    let max_databases = r.get(t, p, "max_databases", 100usize);
    if name != ANY_DATABASE && t.contains_key("max_databases") {
        r.error(
            &format!("{p}.max_databases"),
            "only the \"*\" database takes max_databases",
        );
    }
    let nodes: Vec<String> = r.get(t, p, "nodes", Vec::new());
    if nodes.is_empty() {
        r.error(
            &format!("{p}.nodes"),
            "must list at least one node (\"host:port\")",
        );
    }
    for (i, n) in nodes.iter().enumerate() {
        if let Err(e) = check_node_address(n) {
            r.error(&format!("{p}.nodes[{i}]"), e);
        }
    }
    let pool_size = r.get(t, p, "pool_size", 20usize);
    let min_idle = r.get(t, p, "min_idle", 0usize);
    if pool_size == 0 {
        r.error(&format!("{p}.pool_size"), "must be at least 1");
    }
    if min_idle > pool_size {
        r.error(&format!("{p}.min_idle"), "must not exceed pool_size");
    }
    Database {
        name: name.to_string(),
        dbname: r.get(t, p, "dbname", name.to_string()),
        user: r.opt(t, p, "user"),
        password: r.opt(t, p, "password"),
        read_routing: r.get(t, p, "read_routing", false),
        max_replica_lag: r.get(t, p, "max_replica_lag", Duration::from_secs(1)),
        max_replica_lag_bytes: r.get(
            t,
            p,
            "max_replica_lag_bytes",
            DEFAULT_MAX_LAG_BYTES as usize,
        ) as u64,
        tls: read_upstream_tls(r, t, p),
        nodes,
        pool_size,
        min_idle,
        max_databases,
    }
}

fn read_upstream_tls(r: &mut Reader, t: &Table, p: &str) -> UpstreamTls {
    let text = r.get(t, p, "tls", "disable".to_string());
    let Some(mode) = UpstreamMode::parse(&text) else {
        r.error(
            &format!("{p}.tls"),
            format!(
                "expected disable, prefer, require, verify-ca or verify-full, found \"{text}\""
            ),
        );
        return UpstreamTls::default();
    };
    let ca: Option<String> = r.opt(t, p, "tls_ca");
    UpstreamTls::new(mode, ca.as_deref().map(Path::new))
        .map_err(|e| r.error(&format!("{p}.tls"), e.to_string()))
        .unwrap_or_default()
}

fn check_node_address(n: &str) -> Result<(), String> {
    let (host, port) = n
        .rsplit_once(':')
        .ok_or_else(|| format!("`{n}` is not \"host:port\""))?;
    if host.is_empty() {
        return Err(format!("`{n}` has no host"));
    }
    port.parse::<u16>()
        .map(|_| ())
        .map_err(|_| format!("`{n}` has no valid port"))
}

/// Collects errors while reading values out of TOML tables.
#[derive(Default)]
struct Reader {
    errors: Vec<ConfigError>,
}

impl Reader {
    fn error(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError::new(path, message));
    }

    fn known_keys(&mut self, t: &Table, path: &str, known: &[&str]) {
        for key in t.keys().filter(|k| !known.contains(&k.as_str())) {
            let full = join(path, key);
            self.error(
                &full,
                format!("unknown key (expected one of: {})", known.join(", ")),
            );
        }
    }

    fn table<'t>(&mut self, t: &'t Table, key: &str, path: &str) -> Option<&'t Table> {
        let v = t.get(key)?;
        let table = v.as_table();
        if table.is_none() {
            self.error(
                &join(path, key),
                format!("expected a table, found {}", v.type_str()),
            );
        }
        table
    }

    fn opt<T: FromToml>(&mut self, t: &Table, path: &str, key: &str) -> Option<T> {
        let v = t.get(key)?;
        T::from_toml(v)
            .map_err(|e| self.error(&join(path, key), e))
            .ok()
    }

    fn get<T: FromToml>(&mut self, t: &Table, path: &str, key: &str, default: T) -> T {
        self.opt(t, path, key).unwrap_or(default)
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A value type that can be read from one TOML value.
trait FromToml: Sized {
    fn from_toml(v: &Value) -> Result<Self, String>;
}

fn expected(what: &str, v: &Value) -> String {
    format!("expected {what}, found {}", v.type_str())
}

impl FromToml for String {
    fn from_toml(v: &Value) -> Result<Self, String> {
        let s = v.as_str().ok_or_else(|| expected("a string", v))?;
        expand_env(s, |name| std::env::var(name).ok())
    }
}

/// Replaces each `${NAME}` with the environment variable's value, so that
/// secrets need not sit in the file. `$$` stands for `$`.
fn expand_env(s: &str, var: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('{') {
            let end = inner
                .find('}')
                .ok_or_else(|| "unterminated ${...}".to_string())?;
            let name = &inner[..end];
            let value =
                var(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
            out.push_str(&value);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

impl FromToml for bool {
    fn from_toml(v: &Value) -> Result<Self, String> {
        v.as_bool().ok_or_else(|| expected("a boolean", v))
    }
}

impl FromToml for usize {
    fn from_toml(v: &Value) -> Result<Self, String> {
        let i = v.as_integer().ok_or_else(|| expected("an integer", v))?;
        usize::try_from(i).map_err(|_| format!("must not be negative, found {i}"))
    }
}

/// A size in bytes: an integer, or a string with a unit ("256KiB",
/// "64MiB", "1GB"; kB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024).
struct Size(usize);

impl FromToml for Size {
    fn from_toml(v: &Value) -> Result<Self, String> {
        if let Some(i) = v.as_integer() {
            return usize::try_from(i)
                .map(Size)
                .map_err(|_| format!("must not be negative, found {i}"));
        }
        let s = v
            .as_str()
            .ok_or_else(|| expected("a size like 262144 or \"256KiB\"", v))?;
        parse_size(s).map(Size)
    }
}

fn parse_size(s: &str) -> Result<usize, String> {
    let digits = s.trim().trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = s.trim()[digits.len()..].trim_start();
    let scale: usize = match unit {
        "" | "B" => 1,
        "kB" | "KB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1000 * 1000,
        "MiB" => 1 << 20,
        "GB" => 1000 * 1000 * 1000,
        "GiB" => 1 << 30,
        _ => {
            return Err(format!(
                "invalid size \"{s}\": unknown unit \"{unit}\" (B, kB, KiB, MB, MiB, GB, GiB)"
            ))
        }
    };
    let n: usize = digits
        .trim()
        .parse()
        .map_err(|_| format!("invalid size \"{s}\": expected a whole number and a unit"))?;
    n.checked_mul(scale)
        .ok_or_else(|| format!("invalid size \"{s}\": too large"))
}

impl FromToml for f64 {
    fn from_toml(v: &Value) -> Result<Self, String> {
        match v {
            Value::Float(f) => Ok(*f),
            Value::Integer(i) => Ok(*i as f64),
            _ => Err(expected("a number", v)),
        }
    }
}

impl FromToml for Duration {
    fn from_toml(v: &Value) -> Result<Self, String> {
        let s = v
            .as_str()
            .ok_or_else(|| expected("a duration like \"500ms\" or \"10s\"", v))?;
        humantime::parse_duration(s).map_err(|e| format!("invalid duration \"{s}\": {e}"))
    }
}

impl FromToml for SocketAddr {
    fn from_toml(v: &Value) -> Result<Self, String> {
        let s = String::from_toml(v)?;
        s.parse()
            .map_err(|_| format!("invalid address \"{s}\": expected \"ip:port\""))
    }
}

impl FromToml for Vec<String> {
    fn from_toml(v: &Value) -> Result<Self, String> {
        let items = v
            .as_array()
            .ok_or_else(|| expected("an array of strings", v))?;
        items.iter().map(String::from_toml).collect()
    }
}

impl FromToml for PoolMode {
    fn from_toml(v: &Value) -> Result<Self, String> {
        match String::from_toml(v)?.as_str() {
            "session" => Ok(PoolMode::Session),
            "transaction" => Ok(PoolMode::Transaction),
            other => Err(format!(
                "unknown pool mode \"{other}\" (expected \"session\" or \"transaction\")"
            )),
        }
    }
}

impl FromToml for AuthMethod {
    fn from_toml(v: &Value) -> Result<Self, String> {
        match String::from_toml(v)?.as_str() {
            "scram-sha-256" => Ok(AuthMethod::ScramSha256),
            "md5" => Ok(AuthMethod::Md5),
            "trust" => Ok(AuthMethod::Trust),
            other => Err(format!(
                "unknown auth method \"{other}\" (expected \"scram-sha-256\", \"md5\" or \"trust\")"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_take_a_unit() {
        assert_eq!(parse_size("256KiB"), Ok(256 * 1024));
        assert_eq!(parse_size("64 MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("12 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_size("KiB").unwrap_err().contains("whole number"));
        assert!(parse_size("99999999999999GiB")
            .unwrap_err()
            .contains("too large"));
    }
}
