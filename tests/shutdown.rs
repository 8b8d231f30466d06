//! SIGTERM: pgheal stops accepting, idle clients hear 57P01, a running
//! transaction commits, and the process exits 0.

mod common;
use common::*;

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_running_transaction_commit_then_exits_0() {
    let node = app_node().await;
    let port = free_port();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("pgheal.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{port}\"\nshutdown_timeout = \"20s\"\n\
             [[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n\
             [databases.app]\nnodes = [\"{}\"]\nuser = \"app\"\npassword = \"{APP_PASSWORD}\"\n",
            node.addr()
        ),
    )
    .expect("write config");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgheal"))
        .arg("--config")
        .arg(&config)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start pgheal");
    let url = format!("postgres://app:{APP_PASSWORD}@127.0.0.1:{port}/app");
    wait_accepting(&url).await;

    let (writer, _w) = connect(&url).await;
    writer
        .batch_execute("CREATE TABLE t (v int); BEGIN; INSERT INTO t VALUES (1)")
        .await
        .expect("open transaction");
    let (idle, idle_conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("idle client");
    let idle_conn = tokio::spawn(idle_conn);

    let pid = Pid::from_raw(child.id().expect("pid") as i32);
    kill(pid, Signal::SIGTERM).expect("SIGTERM");

    // The idle client is told and let go.
    let ended = tokio::time::timeout(Duration::from_secs(30), idle_conn)
        .await
        .expect("idle client closed within 30 s")
        .expect("connection task");
    let e = ended.expect_err("the idle client's connection ends with an error");
    assert_eq!(code(&e), "57P01");
    assert!(idle.is_closed());
    // No new clients.
    eventually(Duration::from_secs(10), "new connections refused", || {
        let url = url.clone();
        async move {
            tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .is_err()
        }
    })
    .await;
    // The running transaction finishes.
    writer
        .batch_execute("INSERT INTO t VALUES (2); COMMIT")
        .await
        .expect("the transaction commits during shutdown");

    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("pgheal exits once the transaction is done (30 s)")
        .expect("wait");
    assert!(status.success(), "exit status {status}");
    let count = node
        .superuser_conn("app")
        .await
        .expect("direct connection")
        .query_rows("SELECT count(*) FROM t")
        .await
        .expect("count");
    assert_eq!(count[0][0].as_deref(), Some("2"));
}

/// pgheal as its own process in transaction mode with an admin user, a
/// long shutdown_timeout (a test passing within its deadlines never waited
/// for it), and the app URL.
async fn pgheal_process(
    node: &pgheal::testkit::localpg::PgNode,
    dir: &tempfile::TempDir,
) -> (tokio::process::Child, String, u16) {
    let port = free_port();
    let config = dir.path().join("pgheal.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{port}\"\npool_mode = \"transaction\"\n\
             shutdown_timeout = \"120s\"\n\
             [[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n\
             [[users]]\nname = \"ops\"\npassword = \"opspw\"\nadmin = true\n\
             [databases.app]\nnodes = [\"{}\"]\nuser = \"app\"\npassword = \"{APP_PASSWORD}\"\n",
            node.addr()
        ),
    )
    .expect("write config");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgheal"))
        .arg("--config")
        .arg(&config)
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start pgheal");
    let url = format!("postgres://app:{APP_PASSWORD}@127.0.0.1:{port}/app");
    wait_accepting(&url).await;
    (child, url, port)
}

/// SIGTERM; the client's connection ends with 57P01 and pgheal exits 0
/// without waiting out shutdown_timeout.
async fn sigterm_ends(
    mut child: tokio::process::Child,
    conn: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let pid = Pid::from_raw(child.id().expect("pid") as i32);
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let ended = tokio::time::timeout(Duration::from_secs(30), conn)
        .await
        .expect("client closed within 30 s")
        .expect("connection task");
    let e = ended.expect_err("the client's connection ends with an error");
    assert_eq!(code(&e), "57P01");
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("pgheal exits once its clients are gone")
        .expect("wait");
    assert!(status.success(), "exit status {status}");
}

/// A client resting without a task (idle over a moment) hears 57P01 at
/// SIGTERM like any idle client, and pgheal does not wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_reaches_a_resting_client() {
    let node = app_node().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (child, url, port) = pgheal_process(&node, &dir).await;
    let (idle, idle_conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("idle client");
    let idle_conn = tokio::spawn(idle_conn);
    idle.simple_query("SELECT 1").await.expect("query");
    let (admin, _a) = connect(&format!("postgres://ops:opspw@127.0.0.1:{port}/pgheal")).await;
    eventually(Duration::from_secs(30), "the client resting", || async {
        let rows = admin.simple_query("SHOW STATS").await.expect("SHOW STATS");
        rows.iter().any(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                r.get(0) == Some("resting_clients") && r.get(1) == Some("1")
            }
            _ => false,
        })
    })
    .await;
    drop(admin);
    sigterm_ends(child, idle_conn).await;
}

/// A transaction-mode client pinned to its server (an advisory lock) is
/// attached between its transactions: it too hears 57P01 at SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_reaches_a_pinned_client() {
    let node = app_node().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (child, url, _) = pgheal_process(&node, &dir).await;
    let (pinned, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("client");
    let conn = tokio::spawn(conn);
    pinned
        .simple_query("SELECT pg_advisory_lock(1)")
        .await
        .expect("lock");
    pinned.simple_query("SELECT 1").await.expect("query");
    sigterm_ends(child, conn).await;
}
