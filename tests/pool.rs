//! Pool limits over time: warm connections, idle timeout, server lifetime.

mod common;
use common::*;
use std::time::Duration;

/// Server connections the pool holds for role `app`, as PostgreSQL sees them.
async fn app_backends(admin: &tokio_postgres::Client) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND application_name <> $1",
            &[&pgheal::HEALTH_APPLICATION_NAME],
        )
        .await
        .unwrap()
        .get(0)
}

async fn admin(
    node: &pgheal::testkit::localpg::PgNode,
) -> (tokio_postgres::Client, tokio::task::JoinHandle<()>) {
    connect(&format!(
        "postgres://postgres:postgres@{}/postgres",
        node.addr()
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_idle_is_kept_warm_and_extra_idle_connections_time_out() {
    let node = app_node().await;
    let proxy = proxy_with(
        &node,
        "",
        "pool_size = 6\nmin_idle = 2\n[pool]\nidle_timeout = \"1s\"",
    )
    .await;
    let (admin, _h) = admin(&node).await;
    // Five clients in transactions at once open five server connections.
    let mut clients = Vec::new();
    for _ in 0..5 {
        let (c, h) = connect(&app_url(&proxy)).await;
        c.batch_execute("BEGIN; SELECT 1").await.unwrap();
        clients.push((c, h));
    }
    // Five in use; the pool may have opened one more to keep min_idle
    // warm meanwhile, but never more than pool_size.
    let open = app_backends(&admin).await;
    assert!((5..=6).contains(&open), "{open} server connections");
    for (c, _) in &clients {
        c.batch_execute("COMMIT").await.unwrap();
    }
    // Idle beyond idle_timeout: down to min_idle, and no further.
    eventually(
        Duration::from_secs(15),
        "idle connections to close down to min_idle",
        || async { app_backends(&admin).await == 2 },
    )
    .await;
    // Several idle_timeouts later, min_idle connections are still there.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(app_backends(&admin).await, 2, "min_idle connections stay");
    }
    // Queries keep working with the warm connections.
    let (c, _h) = &clients[0];
    let rows = c.simple_query("SELECT 1").await.unwrap();
    assert!(!rows.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_are_replaced_after_their_lifetime() {
    let node = app_node().await;
    let proxy = proxy_with(&node, "", "pool_size = 1\n[pool]\nserver_lifetime = \"1s\"").await;
    let (client, _h) = connect(&app_url(&proxy)).await;
    let first = backend_pid(&client).await;
    eventually(
        Duration::from_secs(15),
        "a new server connection after server_lifetime",
        || {
            let client = &client;
            async move { backend_pid(client).await != first }
        },
    )
    .await;
    // The old server connection was closed, not leaked.
    let (admin, _h2) = admin(&node).await;
    eventually(
        Duration::from_secs(15),
        "the old server connection to close",
        || {
            let admin = &admin;
            async move {
                admin
                    .query("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&first])
                    .await
                    .unwrap()
                    .is_empty()
            }
        },
    )
    .await;
}
