//! Health checks per node: one connection per node, on the maintenance
//! database, never on a database pgheal serves.

mod common;

use std::time::Duration;

use common::*;
use pgheal::backend::cluster::Role;
use pgheal::testkit::localpg::PgNode;

const HEALTH: &str = "pgheal health check";

/// The databases pgheal's health connections are on, one row each.
async fn health_sessions(node: &PgNode) -> Vec<(String, String)> {
    let mut conn = node.superuser_conn("postgres").await.expect("superuser");
    let rows = conn
        .query_rows(&format!(
            "SELECT datname, pid::text FROM pg_stat_activity \
             WHERE application_name = '{HEALTH}' ORDER BY 1"
        ))
        .await
        .expect("pg_stat_activity");
    rows.into_iter()
        .map(|r| {
            let mut r = r.into_iter().map(Option::unwrap_or_default);
            (r.next().unwrap_or_default(), r.next().unwrap_or_default())
        })
        .collect()
}

fn roles(proxy: &pgheal::server::Running, database: &str) -> Vec<Role> {
    proxy
        .app
        .target(database)
        .map(|t| t.cluster.roles())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_databases_can_be_dropped_used_as_templates_and_created_later() {
    let node = app_node().await;
    node.sql("postgres", "CREATE DATABASE spare OWNER app")
        .await
        .expect("create spare");
    let addr = node.addr();
    let extra = format!(
        "[databases.spare]\nnodes = [\"{addr}\"]\n\
         [databases.tpl]\nnodes = [\"{addr}\"]\ndbname = \"template1\"\n\
         [databases.later]\nnodes = [\"{addr}\"]\n"
    );
    let proxy = proxy_with(&node, "", &extra).await;
    for db in ["app", "spare", "tpl", "later"] {
        eventually(
            Duration::from_secs(30),
            &format!("{db} sees a primary"),
            || async { roles(&proxy, db) == [Role::Primary] },
        )
        .await;
    }
    // Four databases on one node: one health connection, on `postgres`.
    let sessions = health_sessions(&node).await;
    assert_eq!(
        sessions.iter().map(|(d, _)| d.as_str()).collect::<Vec<_>>(),
        ["postgres"],
        "{sessions:?}"
    );
    node.sql("postgres", "DROP DATABASE spare")
        .await
        .expect("a configured database nobody uses can be dropped");
    node.sql("postgres", "CREATE DATABASE copy TEMPLATE template1")
        .await
        .expect("a configured template can be copied");
    node.sql("postgres", "CREATE DATABASE later OWNER app")
        .await
        .expect("create later");
    // Served at once: the node was never taken for down.
    let (client, _h) = connect(&url(&proxy, "app", APP_PASSWORD, "later")).await;
    let row = client
        .query_one("SELECT current_database()", &[])
        .await
        .expect("a database created after pgheal started is served");
    assert_eq!(row.get::<_, String>(0), "later");
    // Asking for the dropped one gets PostgreSQL's own error.
    let err = tokio_postgres::connect(
        &url(&proxy, "app", APP_PASSWORD, "spare"),
        tokio_postgres::NoTls,
    )
    .await
    .map(|_| ())
    .expect_err("spare is gone");
    assert_eq!(code(&err), "3D000", "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_health_connection_reconnects_without_taking_the_node_down() {
    let node = app_node().await;
    let proxy = proxy(&node).await;
    eventually(Duration::from_secs(30), "a primary", || async {
        roles(&proxy, "app") == [Role::Primary]
    })
    .await;
    let cluster = proxy.app.target("app").expect("app").cluster.clone();
    for round in 0..3 {
        let before = health_sessions(&node).await;
        assert_eq!(before.len(), 1, "round {round}: {before:?}");
        node.sql(
            "postgres",
            &format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = '{HEALTH}'"
            ),
        )
        .await
        .expect("terminate");
        eventually(
            Duration::from_secs(30),
            "a new health connection",
            || async {
                let now = health_sessions(&node).await;
                now.len() == 1 && now != before
            },
        )
        .await;
    }
    // A node that went down and came back counts as a failover.
    assert_eq!(cluster.failovers(), 0, "the node was taken for down");
    assert_eq!(roles(&proxy, "app"), [Role::Primary]);
    let status = &cluster.snapshot().nodes[0];
    assert_eq!(status.failures, 0, "{status:?}");
}

/// A database clients used through pgheal can be dropped through pgheal
/// once they left, as without a pooler: pgheal's idle pooled connections
/// to it close first (and those given back in the next seconds), in both
/// pool modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_its_clients_left_can_be_dropped_through_pgheal() {
    let node = app_node().await;
    let addr = node.addr();
    for mode in ["session", "transaction"] {
        node.sql("postgres", "CREATE DATABASE gone OWNER app")
            .await
            .expect("create gone");
        let extra = format!("[databases.gone]\nnodes = [\"{addr}\"]\n");
        let top = format!("pool_mode = \"{mode}\"\n");
        let proxy = proxy_with(&node, &top, &extra).await;
        {
            let (client, handle) = connect(&url(&proxy, "app", APP_PASSWORD, "gone")).await;
            client
                .batch_execute("CREATE TABLE t (a int)")
                .await
                .expect("use gone");
            drop(client);
            let _ = handle.await;
        }
        let (admin, _h) = connect(&app_url(&proxy)).await;
        admin
            .batch_execute("DROP DATABASE gone")
            .await
            .unwrap_or_else(|e| panic!("{mode}: DROP DATABASE through pgheal: {e}"));
    }
}
