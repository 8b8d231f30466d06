//! Drivers from other ecosystems through pgheal in transaction mode with
//! fewer server connections than clients, each using named prepared
//! statements across many transactions (scripts in tests/drivers/). The
//! drivers are installed by scripts/test; JDBC runs when Java is present.

mod common;
use common::*;

use std::path::Path;
use std::process::Command;

use pgheal::server::Running;
use pgheal::testkit::localpg::PgNode;

/// A node and pgheal (transaction mode, pool_size 2) with table `items`:
/// ids 1..=100 named `item-<id>`, counter `n` at 0.
async fn setup() -> (PgNode, Running) {
    let node = app_node().await;
    let proxy = proxy_with(&node, "pool_mode = \"transaction\"", "pool_size = 2").await;
    let out = psql(
        &app_url(&proxy),
        &[
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, n int NOT NULL DEFAULT 0)",
            "-c",
            "INSERT INTO items (id, name) SELECT i, 'item-' || i FROM generate_series(1, 100) i",
        ],
        None,
    )
    .await;
    assert!(out.status.success(), "setup: {}", text(&out.stderr));
    (node, proxy)
}

/// Runs a driver script with DATABASE_URL set and asserts it succeeded.
async fn script(proxy: &Running, program: &str, args: &[&str], dir: &str) {
    script_with(&app_url(proxy), &[], program, args, dir).await;
}

/// Runs a driver script with DATABASE_URL = `url` and `env`, and asserts it
/// succeeded.
async fn script_with(url: &str, env: &[(&str, &str)], program: &str, args: &[&str], dir: &str) {
    let (program, dir) = (program.to_string(), dir.to_string());
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let shown = format!("{program} {} (DATABASE_URL={url})", args.join(" "));
    let mut cmd = Command::new(&program);
    cmd.args(&args).current_dir(&dir).env("DATABASE_URL", url);
    cmd.envs(env.iter().copied());
    let out = output_async(cmd, None, SUBPROCESS_DEADLINE).await;
    assert!(
        out.status.success(),
        "{shown} failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    println!("{}", text(&out.stdout));
}

fn drivers_dir() -> String {
    format!("{}/tests/drivers", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_with_every_statement_prepared() {
    let (_node, proxy) = setup().await;
    script(&proxy, "python3", &["psycopg_prepared.py"], &drivers_dir()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_statement_cache_and_pool() {
    let (_node, proxy) = setup().await;
    script(&proxy, "python3", &["asyncpg_prepared.py"], &drivers_dir()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_named_queries() {
    let dir = format!("{}/node", drivers_dir());
    assert!(
        Path::new(&dir).join("node_modules/pg").exists(),
        "node-postgres is not installed: run `npm install --prefix tests/drivers/node` (scripts/test does)"
    );
    let (_node, proxy) = setup().await;
    script(&proxy, "node", &["named_queries.js"], &dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jdbc_with_prepare_threshold_one() {
    let jar = "/usr/share/java/postgresql.jar";
    let java = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("java").is_file()));
    if !java || !Path::new(jar).exists() {
        eprintln!("skipped: Java or {jar} (libpostgresql-jdbc-java) is not installed");
        return;
    }
    let (_node, proxy) = setup().await;
    let url = format!(
        "jdbc:postgresql://127.0.0.1:{}/app?sslmode=disable",
        proxy.addr.port()
    );
    script(
        &proxy,
        "java",
        &["-cp", jar, "JdbcPrepared.java", &url, "app", APP_PASSWORD],
        &drivers_dir(),
    )
    .await;
}

/// asyncpg's statement cache across schema changes made by another session:
/// the script's expectations hold on a direct connection, and then through
/// pgheal (transaction mode, statements shared between clients).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_sees_schema_changes_as_postgresql_shows_them() {
    let (node, proxy) = setup().await;
    // Schema changes come from a direct session of the table's owner.
    let direct = format!(
        "postgres://app:{APP_PASSWORD}@{}/app?sslmode=disable",
        node.addr()
    );
    let admin = direct.clone();
    for url in [direct, app_url(&proxy)] {
        let env = [("ADMIN_URL", admin.as_str())];
        script_with(
            &url,
            &env,
            "python3",
            &["asyncpg_schema_change.py"],
            &drivers_dir(),
        )
        .await;
    }
}

/// A timed-out query's cancel reaches the server before the driver goes
/// on, so the next query is never the one cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_command_timeouts_cancel_only_their_query() {
    let (_node, proxy) = setup().await;
    script_with(
        &app_url(&proxy),
        &[],
        "python3",
        &["asyncpg_timeouts.py"],
        &drivers_dir(),
    )
    .await;
}
