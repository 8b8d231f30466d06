//! What a client sees when its server dies (DESIGN.md, failure semantics).

mod common;
use common::*;
use std::time::Duration;

async fn terminate(node: &pgheal::testkit::localpg::PgNode, pid: i32) {
    let (admin, _h) = connect(&format!(
        "postgres://postgres:postgres@{}/postgres",
        node.addr()
    ))
    .await;
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the backend to exit", || async {
        admin
            .query("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .await
            .unwrap()
            .is_empty()
    })
    .await;
}

fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_lost_inside_a_transaction_gives_08006_then_25p02_until_rollback() {
    let node = app_node().await;
    let proxy = proxy(&node).await;
    let (client, _h) = connect(&app_url(&proxy)).await;
    client.batch_execute("CREATE TABLE t(x int)").await.unwrap();
    client
        .batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let pid = backend_pid(&client).await;
    terminate(&node, pid).await;

    let err = client
        .batch_execute("INSERT INTO t VALUES (2)")
        .await
        .expect_err("server gone");
    assert!(["08006", "57P01"].contains(&code(&err).as_str()), "{err}");
    for _ in 0..2 {
        let err = client
            .batch_execute("SELECT 1")
            .await
            .expect_err("transaction is aborted");
        assert_eq!(code(&err), "25P02", "{}", message(&err));
        // The extended protocol is answered the same way.
        let err = client
            .query("SELECT $1::int", &[&1i32])
            .await
            .expect_err("still aborted");
        assert_eq!(code(&err), "25P02", "{}", message(&err));
    }
    client
        .batch_execute("ROLLBACK")
        .await
        .expect("ROLLBACK ends it");
    client
        .batch_execute("BEGIN; INSERT INTO t VALUES (3); COMMIT")
        .await
        .expect("next transaction works");
    let rows = client.simple_query("SELECT count(*) FROM t").await.unwrap();
    let n = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(n.as_deref(), Some("1"), "only the committed row is there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_of_a_lost_transaction_answers_rollback() {
    let node = app_node().await;
    let proxy = proxy(&node).await;
    let (client, _h) = connect(&app_url(&proxy)).await;
    client.batch_execute("BEGIN").await.unwrap();
    let pid = backend_pid(&client).await;
    terminate(&node, pid).await;
    assert!(client.batch_execute("SELECT 1").await.is_err());
    let rows = client
        .simple_query("COMMIT")
        .await
        .expect("COMMIT is answered");
    let tag = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
        _ => None,
    });
    assert!(tag.is_some());
    let v = client
        .simple_query("SELECT 1")
        .await
        .expect("back to normal");
    assert!(!v.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_lost_during_an_autocommit_write_says_the_outcome_is_unknown() {
    let node = app_node().await;
    let proxy = proxy_with(&node, "", "pool_size = 2").await;
    let (client, _h) = connect(&app_url(&proxy)).await;
    client.batch_execute("CREATE TABLE t(x int)").await.unwrap();
    let direct = format!("postgres://postgres:postgres@{}/app", node.addr());
    let (admin, _ha) = connect(&direct).await;
    admin.batch_execute("BEGIN; LOCK TABLE t").await.unwrap();
    // pg_stat_activity is read from another session: inside the admin's
    // open transaction it would be one snapshot, taken maybe before the
    // insert started waiting, and never change.
    let (watcher, _hw) = connect(&direct).await;
    // The write blocks on the lock; its server is then killed.
    let writer = tokio::spawn(async move {
        let r = client.batch_execute("INSERT INTO t VALUES (1)").await;
        (client, r)
    });
    let waiting = "SELECT pid FROM pg_stat_activity \
                   WHERE query = 'INSERT INTO t VALUES (1)' AND wait_event_type = 'Lock'";
    eventually(
        Duration::from_secs(10),
        "the insert to wait on the lock",
        || async { !watcher.query(waiting, &[]).await.unwrap().is_empty() },
    )
    .await;
    let blocked: i32 = watcher.query_one(waiting, &[]).await.unwrap().get(0);
    watcher
        .execute("SELECT pg_terminate_backend($1)", &[&blocked])
        .await
        .unwrap();
    let (client, result) = writer.await.unwrap();
    let err = result.expect_err("the write's server died");
    if code(&err) == "08006" {
        assert!(
            message(&err).contains("outcome is unknown"),
            "{}",
            message(&err)
        );
    } else {
        // PostgreSQL's own FATAL may come first; ours follows it.
        assert_eq!(code(&err), "57P01", "{err}");
    }
    admin.batch_execute("ROLLBACK").await.unwrap();
    assert!(
        client.simple_query("SELECT 1").await.is_ok(),
        "the connection stays usable"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_server_connection_breaks_runs_again_unseen() {
    let node = app_node().await;
    // The network path to the node breaks; the node itself stays up.
    let relay = Relay::start(node.addr()).await;
    let proxy = start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n\
         [databases.app]\nnodes = [\"{}\"]\n",
        relay.addr()
    ))
    .await;
    let (client, _h) = connect(&app_url(&proxy)).await;
    let first = backend_pid(&client).await;
    let reader = tokio::spawn(async move {
        let r = first_value(&client, "SELECT pg_sleep(1)::text || '42'").await;
        (client, r)
    });
    let (admin, _ha) = connect(&format!(
        "postgres://postgres:postgres@{}/postgres",
        node.addr()
    ))
    .await;
    let running = "SELECT pid FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(1)%' AND state = 'active'";
    eventually(Duration::from_secs(10), "the read to start", || async {
        !admin.query(running, &[]).await.unwrap().is_empty()
    })
    .await;
    relay.cut();
    let (client, result) = reader.await.unwrap();
    assert_eq!(
        result.expect("the client sees only the second run's answer"),
        "42"
    );
    assert_ne!(backend_pid(&client).await, first);
}
