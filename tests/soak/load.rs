//! The soak's clients, all through pgheal at once: pgbench tpcb-like with
//! prepared statements, ledger writers that read their own writes back,
//! readers, connection churn, idle clients, LISTEN/NOTIFY, pinned sessions
//! with SET and advisory locks, and TLS clients. Each records its
//! operations and every error it is told.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_postgres::{AsyncMessage, Client};
use tokio_util::sync::CancellationToken;

use crate::record::Recorder;

/// What every client needs.
pub struct Ctx {
    pub port: u16,
    pub password: String,
    pub tls: tokio_postgres_rustls::MakeRustlsConnect,
    pub rec: Arc<Recorder>,
    pub stop: CancellationToken,
    /// Ledger ids whose INSERT was acknowledged, and those whose outcome
    /// the writer was not told (an error).
    pub acked: Mutex<Vec<i64>>,
    pub unknown: Mutex<Vec<i64>>,
    pub notified: AtomicU64,
    pub notifications: AtomicU64,
    pub pgbench_transactions: AtomicU64,
}

impl Ctx {
    fn url(&self, tls: bool) -> String {
        let mode = if tls { "require" } else { "disable" };
        format!(
            "postgres://app:{}@127.0.0.1:{}/app?sslmode={mode}&connect_timeout=30",
            self.password, self.port
        )
    }

    async fn connect(&self, tls: bool) -> Result<Client, tokio_postgres::Error> {
        let url = self.url(tls);
        if tls {
            let (client, conn) = tokio_postgres::connect(&url, self.tls.clone()).await?;
            tokio::spawn(conn);
            Ok(client)
        } else {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            Ok(client)
        }
    }
}

/// The SQLSTATE of an error, "closed" for a connection that closed.
pub fn classify(e: &tokio_postgres::Error) -> String {
    match e.code() {
        Some(c) => c.code().to_string(),
        None if e.is_closed() => "closed".into(),
        None => "io".into(),
    }
}

/// Sleeps `d` unless the soak stops first; false when it stopped.
async fn pause(ctx: &Ctx, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = ctx.stop.cancelled() => false,
    }
}

/// Runs `body` every `pace` on one connection, reconnecting after the
/// connection closes, until the soak stops. `setup` runs once per
/// connection.
async fn session<S, SF, B, BF>(
    ctx: Arc<Ctx>,
    name: &'static str,
    tls: bool,
    pace: Duration,
    setup: S,
    mut body: B,
) where
    S: Fn(Arc<Ctx>, Arc<Client>) -> SF,
    SF: Future<Output = Result<(), tokio_postgres::Error>>,
    B: FnMut(Arc<Ctx>, Arc<Client>, u64) -> BF,
    BF: Future<Output = Result<(), tokio_postgres::Error>>,
{
    let mut n = 0u64;
    while !ctx.stop.is_cancelled() {
        let client = match ctx.connect(tls).await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                ctx.rec.error(name, &classify(&e), format!("connect: {e}"));
                pause(&ctx, Duration::from_millis(500)).await;
                continue;
            }
        };
        if let Err(e) = setup(ctx.clone(), client.clone()).await {
            ctx.rec.error(name, &classify(&e), format!("setup: {e}"));
            pause(&ctx, Duration::from_millis(200)).await;
            continue;
        }
        while !client.is_closed() {
            let t = ctx.rec.now();
            let started = Instant::now();
            match body(ctx.clone(), client.clone(), n).await {
                Ok(()) => ctx.rec.op(t, started.elapsed().as_secs_f64() * 1e3),
                Err(e) => ctx.rec.error(name, &classify(&e), e.to_string()),
            }
            n += 1;
            if !pause(&ctx, pace).await {
                return;
            }
        }
    }
}

async fn no_setup(_: Arc<Ctx>, _: Arc<Client>) -> Result<(), tokio_postgres::Error> {
    Ok(())
}

/// Inserts uniquely numbered ledger rows; each acknowledged one is read
/// back on the same connection (read-your-writes through read routing).
pub async fn ledger_writer(ctx: Arc<Ctx>, writer: i32, writers: i32) {
    let body = move |ctx: Arc<Ctx>, client: Arc<Client>, n: u64| async move {
        let id = i64::from(writer) + n as i64 * i64::from(writers);
        let inserted = client
            .execute(
                "INSERT INTO ledger (id, writer) VALUES ($1, $2)",
                &[&id, &writer],
            )
            .await;
        if let Err(e) = inserted {
            ctx.unknown.lock().unwrap().push(id);
            return Err(e);
        }
        ctx.acked.lock().unwrap().push(id);
        let row = client
            .query_one(
                "SELECT coalesce(max(id), 0) FROM ledger WHERE writer = $1",
                &[&writer],
            )
            .await?;
        let seen: i64 = row.get(0);
        if seen < id {
            ctx.rec.violation(format!(
                "read-your-writes: writer {writer} wrote id {id}, then read max {seen}"
            ));
        }
        Ok(())
    };
    session(
        ctx,
        "ledger",
        false,
        Duration::from_millis(25),
        no_setup,
        body,
    )
    .await;
}

/// Point reads, routed to the replicas.
pub async fn reader(ctx: Arc<Ctx>, tls: bool) {
    let name = if tls { "tls reader" } else { "reader" };
    let body = |_: Arc<Ctx>, client: Arc<Client>, n: u64| async move {
        let aid = (n % 100_000) as i32 + 1;
        client
            .query_opt(
                "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
                &[&aid],
            )
            .await
            .map(drop)
    };
    session(ctx, name, tls, Duration::from_millis(20), no_setup, body).await;
}

/// A new connection for every query.
pub async fn churn(ctx: Arc<Ctx>) {
    while !ctx.stop.is_cancelled() {
        let t = ctx.rec.now();
        let started = Instant::now();
        match ctx.connect(false).await {
            Ok(client) => match client.simple_query("SELECT 1").await {
                Ok(_) => ctx.rec.op(t, started.elapsed().as_secs_f64() * 1e3),
                Err(e) => ctx.rec.error("churn", &classify(&e), e.to_string()),
            },
            Err(e) => ctx
                .rec
                .error("churn", &classify(&e), format!("connect: {e}")),
        }
        if !pause(&ctx, Duration::from_millis(100)).await {
            return;
        }
    }
}

/// A session pinned by SET, taking and releasing an advisory lock; its
/// setting must still be there on every round.
pub async fn pinned(ctx: Arc<Ctx>, k: i64) {
    let setup = move |_: Arc<Ctx>, client: Arc<Client>| async move {
        client
            .batch_execute(&format!("SET application_name = 'soak-pinned-{k}'"))
            .await
    };
    let body = move |ctx: Arc<Ctx>, client: Arc<Client>, _| async move {
        client
            .query_one("SELECT pg_advisory_lock($1)", &[&k])
            .await?;
        let name: String = client
            .query_one("SELECT current_setting('application_name')", &[])
            .await?
            .get(0);
        let unlocked: bool = client
            .query_one("SELECT pg_advisory_unlock($1)", &[&k])
            .await?
            .get(0);
        if name != format!("soak-pinned-{k}") || !unlocked {
            ctx.rec.violation(format!(
                "pinned session {k} lost its state without an error: application_name {name:?}, unlocked {unlocked}"
            ));
        }
        Ok(())
    };
    session(
        ctx,
        "pinned",
        false,
        Duration::from_millis(100),
        setup,
        body,
    )
    .await;
}

/// NOTIFY on one connection, LISTEN on another.
pub async fn notifier(ctx: Arc<Ctx>) {
    let body = |ctx: Arc<Ctx>, client: Arc<Client>, n: u64| async move {
        client
            .execute("SELECT pg_notify('soak', $1)", &[&n.to_string()])
            .await?;
        ctx.notified.fetch_add(1, Ordering::Relaxed);
        Ok(())
    };
    session(
        ctx,
        "notify",
        false,
        Duration::from_millis(200),
        no_setup,
        body,
    )
    .await;
}

pub async fn listener(ctx: Arc<Ctx>) {
    while !ctx.stop.is_cancelled() {
        let url = ctx.url(false);
        let (client, mut conn) = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            Ok(pair) => pair,
            Err(e) => {
                ctx.rec
                    .error("listen", &classify(&e), format!("connect: {e}"));
                pause(&ctx, Duration::from_millis(500)).await;
                continue;
            }
        };
        let counter = ctx.clone();
        let reader = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(m) = messages.next().await {
                match m {
                    Ok(AsyncMessage::Notification(_)) => {
                        counter.notifications.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(e) => return Some(e),
                }
            }
            None
        });
        if let Err(e) = client.batch_execute("LISTEN soak").await {
            // Not listening: a new connection tries again.
            ctx.rec.error("listen", &classify(&e), e.to_string());
            reader.abort();
            pause(&ctx, Duration::from_millis(200)).await;
            continue;
        }
        tokio::select! {
            ended = reader => {
                if let Ok(Some(e)) = ended {
                    ctx.rec.error("listen", &classify(&e), e.to_string());
                }
            }
            _ = ctx.stop.cancelled() => return,
        }
    }
}

/// Rounds of `pgbench -M prepared` (tpcb-like) at a fixed rate; every
/// aborted client is an error, classified by its message.
pub async fn pgbench(ctx: Arc<Ctx>, rate: u32) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    while !ctx.stop.is_cancelled() {
        let mut child = tokio::process::Command::new("pgbench")
            .args([
                "-n", "-M", "prepared", "-c", "4", "-j", "2", "-T", "10", "-P", "1",
            ])
            .args([
                "-R",
                &rate.to_string(),
                "-h",
                "127.0.0.1",
                "-p",
                &ctx.port.to_string(),
            ])
            .args(["-U", "app", "app"])
            .env("PGPASSWORD", &ctx.password)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("pgbench");
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let rec = ctx.rec.clone();
        let ctx2 = ctx.clone();
        let stdout = tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(n) = line
                    .strip_prefix("number of transactions actually processed: ")
                    .and_then(|r| r.split('/').next())
                    .and_then(|n| n.trim().parse::<u64>().ok())
                {
                    ctx2.pgbench_transactions.fetch_add(n, Ordering::Relaxed);
                }
            }
        });
        let mut lines = BufReader::new(err).lines();
        let read = async {
            while let Ok(Some(line)) = lines.next_line().await {
                pgbench_line(&rec, &line);
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(90), read).await;
        let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
        let _ = stdout.await;
    }
}

fn pgbench_line(rec: &Recorder, line: &str) {
    if line.contains("Run was aborted") {
        // The summary of the aborted clients reported line by line.
        return;
    }
    if let Some(rest) = line.strip_prefix("progress: ") {
        let tps = rest
            .split(", ")
            .find_map(|p| p.strip_suffix(" tps"))
            .and_then(|t| t.parse::<f64>().ok());
        if let Some(tps) = tps {
            rec.pgbench_tps(rec.now(), tps);
        }
    } else if line.contains("aborted") || line.contains("error") {
        let code = if line.contains("read-only transaction") {
            "25006"
        } else if line.contains("outcome is unknown") || line.contains("server connection lost") {
            "08006"
        } else if line.contains("current transaction is aborted") {
            "25P02"
        } else if line.contains("terminating connection") {
            "57P01"
        } else if line.contains("closed the connection") || line.contains("backend died") {
            "closed"
        } else {
            "pgbench: other"
        };
        rec.error("pgbench", code, line.to_string());
    }
}

/// `n` clients that log in, run one query, and stay idle until the end.
pub async fn idle_clients(ctx: &Ctx, n: usize) -> Vec<Client> {
    let mut out = Vec::with_capacity(n);
    let mut batch = Vec::new();
    for i in 0..n {
        batch.push(async {
            let client = ctx.connect(false).await.expect("idle client connects");
            client
                .simple_query("SELECT 1")
                .await
                .expect("idle client's query");
            client
        });
        if batch.len() == 25 || i + 1 == n {
            out.extend(futures_util::future::join_all(batch.drain(..)).await);
        }
    }
    out
}
