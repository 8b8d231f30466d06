//! Users and databases that are not listed: `[auth] query` looks a user's
//! SCRAM secret up on the server, and `[databases."*"]` serves any
//! database name, both for roles and databases made after pgheal started.

mod common;

use common::*;
use pgheal::testkit::localpg::{SUPERUSER, SUPERUSER_PASSWORD};
use std::time::Duration;

async fn connect_as(
    proxy: &pgheal::server::Running,
    user: &str,
    password: &str,
    db: &str,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
    let (client, conn) =
        tokio_postgres::connect(&url(proxy, user, password, db), tokio_postgres::NoTls).await?;
    Ok((
        client,
        tokio::spawn(async move {
            let _ = conn.await;
        }),
    ))
}

/// pgheal in transaction mode with idle_timeout 1 s and `[auth]` looking
/// users up as the superuser, then `rest` (users and databases).
async fn proxy_with_lookup(rest: &str) -> pgheal::server::Running {
    start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\npool_mode = \"transaction\"\n[pool]\nidle_timeout = \"1s\"\n[health]\ntimeout = \"5s\"\n\
         [auth]\nuser = \"{SUPERUSER}\"\npassword = \"{SUPERUSER_PASSWORD}\"\n{rest}"
    ))
    .await
}

async fn one(client: &tokio_postgres::Client, sql: &str) -> String {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_and_databases_made_after_start_are_served() {
    let node = app_node().await;
    let addr = node.addr();
    let proxy = proxy_with_lookup(&format!(
        "[[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n\
         [databases.app]\nnodes = [\"{addr}\"]\n\
         [databases.\"*\"]\nnodes = [\"{addr}\"]\nmax_databases = 1\n"
    ))
    .await;
    // Made after pgheal started: a role (SCRAM, PostgreSQL's default) and
    // a database.
    node.sql("postgres", "CREATE ROLE late LOGIN PASSWORD 'latepw'")
        .await
        .expect("create role");
    node.sql("postgres", "CREATE DATABASE later OWNER late")
        .await
        .expect("create database");

    let (client, _h) = connect_as(&proxy, "late", "latepw", "app")
        .await
        .expect("a role the server knows logs in through [auth] query");
    assert_eq!(one(&client, "SELECT current_user::text").await, "late");
    // Later transactions log in upstream again with the keys it proved.
    for _ in 0..3 {
        assert_eq!(one(&client, "SELECT 1::text").await, "1");
    }

    let (later, _h2) = connect_as(&proxy, "late", "latepw", "later")
        .await
        .expect("a database without a section is served through \"*\"");
    assert_eq!(
        one(&later, "SELECT current_database()::text").await,
        "later"
    );

    for (user, password, what) in [
        ("late", "wrong", "a wrong password"),
        ("nobody", "x", "an unknown user"),
    ] {
        let e = connect_as(&proxy, user, password, "app")
            .await
            .map(|_| ())
            .expect_err(what);
        assert_eq!(code(&e), "28P01", "{what}: {e}");
    }
    // "*" serves at most max_databases names at once.
    node.sql("postgres", "CREATE DATABASE later2 OWNER late")
        .await
        .expect("create database");
    let e = connect_as(&proxy, "late", "latepw", "later2")
        .await
        .map(|_| ())
        .expect_err("max_databases = 1");
    assert_eq!(code(&e), "53300", "{e}");
    // Without clients for idle_timeout, "later" is closed and frees its
    // place.
    drop(later);
    eventually(
        std::time::Duration::from_secs(30),
        "later closed",
        || async { proxy.app.target("later").is_none() },
    )
    .await;
    let (later2, _h3) = connect_as(&proxy, "late", "latepw", "later2")
        .await
        .expect("served once later was closed");
    assert_eq!(
        one(&later2, "SELECT current_database()::text").await,
        "later2"
    );
    // No plaintext is kept: pgheal never learnt one.
    let shown = format!("{:?}", proxy.app.config());
    assert!(!shown.contains("latepw"), "{shown}");
}

/// A password changed on the server while pgheal serves the role: a login
/// with the new password works (pgheal looks the secret up again after a
/// refusal at the latest), and the connections pgheal opens afterwards
/// log in with the keys of the new password, not those it first learnt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_changed_on_the_server_is_used_for_new_server_connections() {
    let node = app_node().await;
    let addr = node.addr();
    let proxy = proxy_with_lookup(&format!("[databases.app]\nnodes = [\"{addr}\"]\n")).await;
    node.sql("postgres", "CREATE ROLE rotated LOGIN PASSWORD 'before'")
        .await
        .expect("create role");
    let (client, _h) = connect_as(&proxy, "rotated", "before", "app")
        .await
        .expect("the first password");
    assert_eq!(one(&client, "SELECT current_user::text").await, "rotated");
    node.sql("postgres", "ALTER ROLE rotated PASSWORD 'after'")
        .await
        .expect("new password");
    // Its server connection, logged in with the first password's keys,
    // closes after idle_timeout: the next transaction needs a new one.
    let (direct, _hd) = connect(&format!(
        "postgres://{SUPERUSER}:{SUPERUSER_PASSWORD}@{addr}/app"
    ))
    .await;
    let sql = "SELECT count(*)::text FROM pg_stat_activity WHERE usename = 'rotated'";
    eventually(
        Duration::from_secs(20),
        "pgheal's idle connection closed",
        || async { first_value(&direct, sql).await.is_ok_and(|n| n == "0") },
    )
    .await;
    eventually(
        Duration::from_secs(20),
        "a login with the new password",
        || async { connect_as(&proxy, "rotated", "after", "app").await.is_ok() },
    )
    .await;
    let (client, _h) = connect_as(&proxy, "rotated", "after", "app")
        .await
        .expect("the new password");
    assert_eq!(one(&client, "SELECT current_user::text").await, "rotated");
    let e = connect_as(&proxy, "rotated", "before", "app")
        .await
        .map(|_| ())
        .expect_err("the old password");
    assert_eq!(code(&e), "28P01", "{e}");
}
