//! tokio-postgres through pgheal: extended protocol, pipelining, cancel.

mod common;
use common::*;
use futures_util::future::join_all;
use std::time::{Duration, Instant};

async fn pipelined_queries(client: &tokio_postgres::Client) {
    let stmt = client
        .prepare("SELECT $1::int * 2, repeat('x', $1::int)")
        .await
        .unwrap();
    // All 200 executions are written before the first answer is read.
    let futures = (0..200).map(|i| {
        let stmt = stmt.clone();
        async move {
            let row = client.query_one(&stmt, &[&i]).await.unwrap();
            let doubled: i32 = row.get(0);
            let s: String = row.get(1);
            assert_eq!((doubled, s.len()), (i * 2, i as usize));
        }
    });
    join_all(futures).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_with_pipelining_in_session_mode() {
    let node = app_node().await;
    let proxy = proxy_with(&node, "pool_mode = \"session\"", "").await;
    let (client, _h) = connect(&app_url(&proxy)).await;
    pipelined_queries(&client).await;
    // Errors in the middle of a pipeline stay with their own query.
    let stmt = client.prepare("SELECT 10 / $1::int").await.unwrap();
    let results = join_all((0..6).map(|i| {
        let stmt = stmt.clone();
        let client = &client;
        async move { client.query_one(&stmt, &[&(i % 3)]).await }
    }))
    .await;
    for (i, r) in results.iter().enumerate() {
        match i % 3 {
            0 => assert_eq!(code(r.as_ref().unwrap_err()), "22012"),
            d => assert_eq!(r.as_ref().unwrap().get::<_, i32>(0), 10 / d as i32),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_inside_transactions_in_transaction_mode() {
    let node = app_node().await;
    let proxy = proxy_with(&node, "", "pool_size = 2").await;
    let url = app_url(&proxy);
    let (setup, _h) = connect(&url).await;
    setup
        .batch_execute("CREATE TABLE items(id int primary key, v text)")
        .await
        .unwrap();
    let tasks = (0..8).map(|n| {
        let url = url.clone();
        tokio::spawn(async move {
            let (mut client, _h) = connect(&url).await;
            for round in 0..10 {
                let tx = client.transaction().await.unwrap();
                let stmt = tx
                    .prepare("INSERT INTO items VALUES ($1, $2)")
                    .await
                    .unwrap();
                let rows: Vec<(i32, String)> = (0..5)
                    .map(|k| n * 1000 + round * 10 + k)
                    .map(|id| (id, format!("v{id}")))
                    .collect();
                let params: Vec<[&(dyn tokio_postgres::types::ToSql + Sync); 2]> =
                    rows.iter().map(|(id, v)| [id as _, v as _]).collect();
                let inserted = join_all(params.iter().map(|p| tx.execute(&stmt, p))).await;
                assert!(inserted.iter().all(|r| matches!(r, Ok(1))), "{inserted:?}");
                tx.commit().await.unwrap();
            }
        })
    });
    for t in join_all(tasks).await {
        t.unwrap();
    }
    // Simple protocol: a named statement prepared outside a transaction may
    // land on another server (prepared-statement tracking is its own issue).
    let rows = setup
        .simple_query("SELECT count(*) FROM items")
        .await
        .unwrap();
    let n = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(n.as_deref(), Some("400"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_server_running_the_query() {
    let node = app_node().await;
    let proxy = proxy(&node).await;
    let (client, _h) = connect(&app_url(&proxy)).await;
    let token = client.cancel_token();
    let started = Instant::now();
    let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
    // Cancel once the query is running on the server.
    let (watch, _h2) = connect(&app_url(&proxy)).await;
    eventually(Duration::from_secs(10), "pg_sleep to start", || async {
        let rows = watch
            .query("SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'", &[])
            .await
            .unwrap();
        !rows.is_empty()
    })
    .await;
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("send cancel");
    let err = sleeper
        .await
        .unwrap()
        .expect_err("query should be cancelled");
    assert_eq!(code(&err), "57014", "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "the sleep ran to completion"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_with_a_wrong_key_cancels_nothing() {
    let node = app_node().await;
    let proxy = proxy(&node).await;
    let (client, _h) = connect(&app_url(&proxy)).await;
    let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(1.5)").await });
    let (watch, _h2) = connect(&app_url(&proxy)).await;
    eventually(Duration::from_secs(10), "pg_sleep to start", || async {
        let rows = watch
            .query("SELECT 1 FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%' AND state = 'active'", &[])
            .await
            .unwrap();
        !rows.is_empty()
    })
    .await;
    for key in [(1, 1), (0, 0), (-1, 12345)] {
        let mut raw = Raw::connect(&proxy).await;
        let mut out = bytes::BytesMut::new();
        pgheal_protocol::build::cancel_request(
            &mut out,
            pgheal_protocol::startup::CancelKey {
                pid: key.0,
                secret: key.1,
            },
        );
        raw.send(&out).await;
        assert!(
            raw.next().await.is_none(),
            "a cancel request gets no answer"
        );
    }
    sleeper.await.unwrap().expect("the query was not cancelled");
}
