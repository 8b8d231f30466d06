//! Session state through pgheal: startup parameters follow a client across
//! servers in transaction mode; session mode keeps one server and resets it.

mod common;
use common::*;

async fn show(client: &tokio_postgres::Client, name: &str) -> String {
    let row = client
        .query_one(&format!("SHOW {name}"), &[])
        .await
        .expect("SHOW");
    row.get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_follow_each_client_in_transaction_mode() {
    let node = app_node().await;
    // One server connection shared by both clients.
    let proxy = proxy_with(&node, "", "pool_size = 1").await;
    let base = app_url(&proxy);
    let a_url = format!("{base}&application_name=alpha&options=-c%20TimeZone%3DAsia/Tokyo%20-c%20search_path%3Dalpha");
    let b_url = format!("{base}&application_name=beta");
    let (a, _ha) = connect(&a_url).await;
    let (b, _hb) = connect(&b_url).await;
    for _ in 0..5 {
        assert_eq!(show(&a, "application_name").await, "alpha");
        assert_eq!(show(&b, "application_name").await, "beta");
        assert_eq!(show(&a, "TimeZone").await, "Asia/Tokyo");
        assert_eq!(
            show(&b, "TimeZone").await,
            show_default(&node, "TimeZone").await
        );
        assert_eq!(show(&a, "search_path").await, "alpha");
        assert_eq!(show(&b, "search_path").await, "\"$user\", public");
    }
    let pid_a: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let pid_b: i32 = b
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pid_a, pid_b, "both clients share the single server");
}

async fn show_default(node: &pgheal::testkit::localpg::PgNode, name: &str) -> String {
    let url = format!("postgres://postgres:postgres@{}/postgres", node.addr());
    let (c, _h) = connect(&url).await;
    show(&c, name).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sees_parameter_status_of_its_settings() {
    let node = app_node().await;
    let proxy = proxy(&node).await;
    let url = format!("{}&application_name=watcher", app_url(&proxy));
    let out = psql(
        &url,
        &[
            "-c",
            "SHOW application_name",
            "-c",
            "SELECT current_setting('DateStyle')",
        ],
        None,
    )
    .await;
    assert_eq!(
        text(&out.stdout).lines().collect::<Vec<_>>(),
        vec!["watcher", "ISO, MDY"]
    );
    // An invalid startup value is refused as PostgreSQL would refuse it.
    let bad = format!("{}&options=-c%20DateStyle%3Dnonsense", app_url(&proxy));
    let err = tokio_postgres::connect(&bad, tokio_postgres::NoTls)
        .await
        .err()
        .expect("refused");
    assert_eq!(code(&err), "22023", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_keeps_state_and_discards_it_afterwards() {
    let node = app_node().await;
    let proxy = proxy_with(&node, "pool_mode = \"session\"", "pool_size = 1").await;
    let url = app_url(&proxy);
    {
        let (c, _h) = connect(&url).await;
        c.batch_execute("SET search_path = elsewhere; CREATE TEMP TABLE mine(x int)")
            .await
            .unwrap();
        // Session state lasts across transactions on the same client.
        assert_eq!(show(&c, "search_path").await, "elsewhere");
        c.batch_execute("INSERT INTO mine VALUES (1)")
            .await
            .unwrap();
    }
    // The next client gets the same server (pool_size = 1), reset.
    let (c, _h) = connect(&url).await;
    let rows = c
        .query("SELECT 1 FROM pg_class WHERE relname = 'mine'", &[])
        .await
        .unwrap();
    assert!(rows.is_empty(), "temp table survived DISCARD ALL");
    assert_eq!(show(&c, "search_path").await, "\"$user\", public");
}
