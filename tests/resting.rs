//! Idle transaction-mode clients rest without a task after a second (see
//! `session::rest`): what they see is exactly what a client that never
//! rested sees. Prepared statements, settings and the connection itself
//! survive a rest; many clients waking at once all get their answers; a
//! client that leaves while resting is gone from every list; a pinned
//! client never rests.

mod common;
use common::*;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use pgheal::server::Running;

const WITHIN: Duration = Duration::from_secs(30);

async fn transaction_proxy(node: &pgheal::testkit::localpg::PgNode, top: &str) -> Running {
    proxy_with(
        node,
        &format!("pool_mode = \"transaction\"\n{top}"),
        &format!("user = \"app\"\npassword = \"{APP_PASSWORD}\"\npool_size = 4"),
    )
    .await
}

fn resting(proxy: &Running) -> usize {
    proxy.app.counters.resting_clients.load(Relaxed)
}

async fn until_resting(proxy: &Running, n: usize) {
    eventually(WITHIN, &format!("{n} resting clients"), || async {
        resting(proxy) == n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rested_client_keeps_its_prepared_statements_and_settings() {
    let node = app_node().await;
    let proxy = transaction_proxy(&node, "").await;
    let (client, _conn) = connect(&app_url(&proxy)).await;
    let add = client.prepare("SELECT $1::int + 1").await.expect("prepare");
    client
        .batch_execute("SET application_name = 'rested'")
        .await
        .expect("SET");
    for round in 0..3 {
        until_resting(&proxy, 1).await;
        let row = client.query_one(&add, &[&round]).await.expect("prepared");
        assert_eq!(row.get::<_, i32>(0), round + 1);
        let name = first_value(&client, "SHOW application_name").await;
        assert_eq!(name.expect("SHOW"), "rested", "round {round}");
        assert_eq!(proxy.app.clients.list().len(), 1, "still listed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_rested_clients_waking_at_once_all_get_their_answers() {
    let node = app_node().await;
    let proxy = transaction_proxy(&node, "").await;
    let url = app_url(&proxy);
    let mut clients = Vec::new();
    for _ in 0..40 {
        let (client, conn) = connect(&url).await;
        client.simple_query("SELECT 1").await.expect("first query");
        clients.push((client, conn));
    }
    until_resting(&proxy, 40).await;
    let answers = clients.iter().enumerate().map(|(i, (c, _))| async move {
        let row = c
            .query_one("SELECT $1::int * 2", &[&(i as i32)])
            .await
            .expect("query after a rest");
        row.get::<_, i32>(0)
    });
    let got = futures_util::future::join_all(answers).await;
    let want: Vec<i32> = (0..40).map(|i| i * 2).collect();
    assert_eq!(got, want);
    until_resting(&proxy, 40).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_resting_is_gone_from_every_list() {
    let node = app_node().await;
    let proxy = transaction_proxy(&node, "").await;
    let (client, conn) = connect(&app_url(&proxy)).await;
    client.simple_query("SELECT 1").await.expect("query");
    until_resting(&proxy, 1).await;
    drop(client);
    let _ = conn.await;
    eventually(WITHIN, "the client gone from the lists", || async {
        proxy.app.clients.list().is_empty()
            && proxy.app.counters.client_connections.load(Relaxed) == 0
            && resting(&proxy) == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_rests_and_wakes() {
    let ca = TestCa::new();
    let node = app_node().await;
    let proxy = transaction_proxy(&node, &ca.section("require")).await;
    let url = format!(
        "postgres://app:{APP_PASSWORD}@localhost:{}/app?sslmode=require",
        proxy.addr.port()
    );
    let (client, conn) = tokio_postgres::connect(&url, ca.rustls_client())
        .await
        .expect("TLS connect");
    tokio::spawn(conn);
    let stmt = client.prepare("SELECT $1::int * 3").await.expect("prepare");
    for i in 0..3 {
        until_resting(&proxy, 1).await;
        let row = client.query_one(&stmt, &[&i]).await.expect("query");
        assert_eq!(row.get::<_, i32>(0), i * 3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_client_does_not_rest() {
    let node = app_node().await;
    let proxy = transaction_proxy(&node, "").await;
    let url = app_url(&proxy);
    let (pinned, _p) = connect(&url).await;
    pinned
        .simple_query("SELECT pg_advisory_lock(7)")
        .await
        .expect("lock");
    assert_eq!(proxy.app.counters.pinned_clients.load(Relaxed), 1);
    // Idle since before the other client's query: had it been able to
    // rest, it would have by the time the other one does.
    let (other, _o) = connect(&url).await;
    other.simple_query("SELECT 1").await.expect("query");
    let newest = || {
        let mut list = proxy.app.clients.list();
        list.sort_by_key(|c| c.id);
        list
    };
    eventually(WITHIN, "the unpinned client resting", || async {
        newest().last().is_some_and(|c| c.is_resting())
    })
    .await;
    let list = newest();
    assert!(!list[0].is_resting(), "the pinned client rests");
    assert_eq!(resting(&proxy), 1);
    let held = first_value(
        &pinned,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted",
    )
    .await;
    assert_eq!(held.expect("pg_locks"), "1", "the lock is still held");
}
