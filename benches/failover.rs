//! Failover run (a benchmark, not a test): steady reads and writes through
//! pgheal, `kill -9` of the primary, promotion of the replica, then `kill
//! -9` of the new primary and its restart in place. Prints failed reads,
//! rejected writes by SQLSTATE, time from the kill to the first 25006, time
//! from the promotion to the first successful write, time from the
//! restarted primary being back to the first successful write, and client
//! connections lost. Transaction clients (`BEGIN; INSERT; pause; UPDATE;
//! COMMIT`) run alongside: for the kill and promotion, the errors they saw,
//! the transactions pgheal replayed, and the longest a statement of theirs
//! waited.
//!
//!     cargo bench --bench failover

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgheal::backend::cluster::Role;
use pgheal::config::Config;
use pgheal::testkit::localpg::PgNode;

const CLIENTS: usize = 8;
const TX_CLIENTS: usize = 4;

/// What the transaction clients saw.
#[derive(Default)]
struct TxLog {
    committed: u64,
    errors: BTreeMap<String, u64>,
    longest_stall: Duration,
}

/// Runs `sql`, noting how long it took.
async fn timed(
    client: &tokio_postgres::Client,
    sql: &str,
    log: &Mutex<TxLog>,
) -> Result<(), tokio_postgres::Error> {
    let start = Instant::now();
    let result = client.batch_execute(sql).await;
    let mut log = log.lock().unwrap();
    log.longest_stall = log.longest_stall.max(start.elapsed());
    result
}

async fn tx_client(
    url: String,
    me: usize,
    log: Arc<Mutex<TxLog>>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    while !*stop.borrow() {
        let result = async {
            timed(&client, "BEGIN; INSERT INTO w VALUES (2)", &log).await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
            let update = format!("UPDATE t SET n = n + 1 WHERE id = {me}; COMMIT");
            timed(&client, &update, &log).await
        }
        .await;
        match result {
            Ok(()) => log.lock().unwrap().committed += 1,
            Err(e) => {
                let code = e.code().map_or("none".into(), |c| c.code().to_string());
                *log.lock().unwrap().errors.entry(code).or_default() += 1;
                let _ = client.batch_execute("ROLLBACK").await;
            }
        }
    }
}

#[derive(Default)]
struct Log {
    reads_ok: u64,
    reads_failed: BTreeMap<String, u64>,
    writes_ok: u64,
    writes_failed: BTreeMap<String, u64>,
    first_25006: Option<Instant>,
    writes_ok_at: Vec<Instant>,
}

async fn client(
    url: String,
    writer: bool,
    log: Arc<Mutex<Log>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> bool {
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    while !*stop.borrow() {
        let sql = if writer {
            "INSERT INTO w VALUES (1)"
        } else {
            "SELECT count(*) FROM pg_class"
        };
        let result = client.simple_query(sql).await;
        let now = Instant::now();
        {
            let mut log = log.lock().unwrap();
            match (writer, result) {
                (false, Ok(_)) => log.reads_ok += 1,
                (true, Ok(_)) => {
                    log.writes_ok += 1;
                    log.writes_ok_at.push(now);
                }
                (w, Err(e)) => {
                    let code = e
                        .code()
                        .map_or("none".to_string(), |c| c.code().to_string());
                    if code == "25006" && log.first_25006.is_none() {
                        log.first_25006 = Some(now);
                    }
                    let map = if w {
                        &mut log.writes_failed
                    } else {
                        &mut log.reads_failed
                    };
                    *map.entry(code).or_default() += 1;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    client.is_closed()
}

async fn roles(proxy: &pgheal::server::Running) -> Vec<Role> {
    proxy.app.target("app").expect("target").cluster.roles()
}

async fn wait_roles(proxy: &pgheal::server::Running, want: &[Role]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while roles(proxy).await != want {
        assert!(Instant::now() < deadline, "roles never became {want:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` and the bench listing
    }
    // pgheal's own log on stderr when RUST_LOG asks for it.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let mut primary = PgNode::start_new().await.expect("primary");
    primary
        .sql(
            "postgres",
            "CREATE ROLE app LOGIN SUPERUSER PASSWORD 'apppw'",
        )
        .await
        .unwrap();
    primary
        .sql("postgres", "CREATE DATABASE app OWNER app")
        .await
        .unwrap();
    primary
        .sql(
            "app",
            "CREATE TABLE w(x int); CREATE TABLE t(id int, n int);\
             INSERT INTO t SELECT g, 0 FROM generate_series(0, 9) g",
        )
        .await
        .unwrap();
    let mut replica = PgNode::start_replica_of(&primary).await.expect("replica");
    let config = Config::parse(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[[users]]\nname = \"app\"\npassword = \"apppw\"\n\
         [failover]\nwrite_wait = \"5s\"\n\
         [databases.app]\nnodes = [\"{}\", \"{}\"]\nuser = \"app\"\npassword = \"apppw\"\nread_routing = true\n",
        primary.addr(),
        replica.addr()
    ))
    .expect("config");
    let proxy = pgheal::server::start(config).await.expect("pgheal");
    wait_roles(&proxy, &[Role::Primary, Role::Replica]).await;
    let url = format!("postgres://app:apppw@{}/app", proxy.addr);

    let log = Arc::new(Mutex::new(Log::default()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| {
            tokio::spawn(client(
                url.clone(),
                i % 2 == 1,
                log.clone(),
                stop_rx.clone(),
            ))
        })
        .collect();
    let tx_log = Arc::new(Mutex::new(TxLog::default()));
    let tx_tasks: Vec<_> = (0..TX_CLIENTS)
        .map(|i| tokio::spawn(tx_client(url.clone(), i, tx_log.clone(), stop_rx.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;

    let killed = Instant::now();
    primary.kill9().await;
    wait_roles(&proxy, &[Role::Down, Role::Replica]).await;
    let detected = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    replica.promote().await.expect("promote");
    let promoted = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The new primary crashes and comes back in place a few seconds later
    // (what Patroni does with a postmaster that died). It is the only node
    // left: while it is down nothing can serve, so what clients see from
    // here on is reported apart.
    let failover_phase = {
        let log = log.lock().unwrap();
        (log.reads_failed.clone(), log.writes_failed.clone())
    };
    let tx_phase = {
        let t = tx_log.lock().unwrap();
        (t.committed, t.errors.clone(), t.longest_stall)
    };
    let m = &proxy.app.metrics;
    let refused: Vec<String> = pgheal::metrics::ReplayRefusal::ALL
        .iter()
        .map(|&reason| (reason.as_str(), m.replay_refused(reason)))
        .filter(|(_, n)| *n > 0)
        .map(|(reason, n)| format!("{reason}: {n}"))
        .collect();
    let replays = (
        m.transactions_replayed.get(),
        m.replay_mismatches.get(),
        refused.join(", "),
    );
    replica.kill9().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    replica.start().await.expect("restart in place");
    let back = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_tx.send(true).unwrap();
    let mut lost = 0;
    for t in tasks {
        lost += usize::from(t.await.unwrap());
    }
    for t in tx_tasks {
        t.await.unwrap();
    }

    let log = log.lock().unwrap();
    let first_write_after = log
        .writes_ok_at
        .iter()
        .find(|t| **t > promoted)
        .map(|t| *t - promoted);
    println!("failover run: {CLIENTS} clients (half readers, half writers) and {TX_CLIENTS} transaction clients, read_routing on, write_wait 5s, promotion 1 s after the kill is seen, defaults otherwise");
    println!(
        "failover (kill, promotion): reads failed {:?}, writes rejected {:?}",
        failover_phase.0, failover_phase.1
    );
    println!(
        "whole run, the only node's crash and restart included: reads ok {}, failed {:?}; writes ok {}, rejected {:?}",
        log.reads_ok, log.reads_failed, log.writes_ok, log.writes_failed
    );
    println!("kill -> primary seen down: {:?}", detected - killed);
    println!(
        "kill -> first 25006: {:?}",
        log.first_25006.map(|t| t - killed)
    );
    println!("promotion done -> first successful write: {first_write_after:?}");
    println!(
        "transactions through the kill and promotion: committed {}, errors seen by clients {:?}, replayed {}, replay mismatches {}, not replayed (autocommit writes included) {{{}}}, longest statement wait {:?}",
        tx_phase.0, tx_phase.1, replays.0, replays.1, replays.2, tx_phase.2
    );
    let first_write_back = log
        .writes_ok_at
        .iter()
        .find(|t| **t > back)
        .map(|t| *t - back);
    println!("restarted primary back -> first successful write: {first_write_back:?}");
    println!("client connections lost: {lost}");
}
