//! Schema migrations against a real PostgreSQL: applied once by two
//! pgheal processes at the same moment, an edited file stops startup, a
//! failing file leaves the schema as it was, on_error = "serve" serves.

mod common;
use common::*;

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use pgheal::testkit::localpg::PgNode;

struct Setup {
    dir: tempfile::TempDir,
    port: u16,
}

impl Setup {
    fn new(node_addr: &str, extra: &str, files: &[(&str, &str)]) -> Setup {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        std::fs::create_dir(dir.path().join("migrations")).expect("mkdir");
        for (name, sql) in files {
            std::fs::write(dir.path().join("migrations").join(name), sql).expect("write migration");
        }
        std::fs::write(
            dir.path().join("pgheal.toml"),
            format!(
                "[proxy]\nlisten = \"127.0.0.1:{port}\"\n{extra}\n\
                 [migrations]\ndir = \"migrations\"\nwait = \"2s\"\n\
                 [[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n\
                 [databases.app]\nnodes = [\"{node_addr}\"]\nuser = \"app\"\npassword = \"{APP_PASSWORD}\"\n"
            ),
        )
        .expect("write config");
        Setup { dir, port }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("pgheal.toml")
    }

    fn migration(&self, name: &str) -> PathBuf {
        self.dir.path().join("migrations").join(name)
    }

    async fn pgheal(&self, args: &[&str]) -> Output {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.push("--config".into());
        all.push(self.config().display().to_string());
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgheal"));
        cmd.args(&all);
        output_async(cmd, None, Duration::from_secs(60)).await
    }
}

async fn rows(node: &PgNode, sql: &str) -> Vec<Vec<Option<String>>> {
    node.superuser_conn("app")
        .await
        .expect("direct connection")
        .query_rows(sql)
        .await
        .expect("query")
}

const CREATE: &str = "CREATE TABLE items (id int);\nINSERT INTO items VALUES (1);\n";
const INDEX: &str = "-- pgheal:no-transaction\nCREATE INDEX CONCURRENTLY items_id ON items (id);\n";
const MORE: &str = "INSERT INTO items VALUES (2);\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_at_once_apply_each_migration_once() {
    let node = app_node().await;
    let s = Setup::new(
        &node.addr(),
        "",
        &[
            ("0001_create.sql", CREATE),
            ("0002_index.sql", INDEX),
            ("0003_more.sql", MORE),
        ],
    );
    let (a, b) = tokio::join!(s.pgheal(&["migrate"]), s.pgheal(&["migrate"]));
    for out in [&a, &b] {
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let applied = format!("{}{}", text(&a.stdout), text(&b.stdout));
    assert_eq!(
        applied.matches("applied  0001_create.sql").count(),
        1,
        "{applied}"
    );
    assert_eq!(
        applied.matches("applied  0003_more.sql").count(),
        1,
        "{applied}"
    );
    assert_eq!(
        rows(&node, "SELECT count(*) FROM items").await[0][0].as_deref(),
        Some("2")
    );
    let recorded = rows(
        &node,
        "SELECT version, name FROM pgheal_schema_migrations ORDER BY version",
    )
    .await;
    assert_eq!(recorded.len(), 3);
    assert_eq!(recorded[1][1].as_deref(), Some("index"));
    let index = rows(
        &node,
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'items_id'::regclass",
    )
    .await;
    assert_eq!(index[0][0].as_deref(), Some("t"));

    let status = s.pgheal(&["migrate", "status"]).await;
    assert!(status.status.success());
    assert!(
        text(&status.stdout).contains("3 already applied"),
        "{}",
        text(&status.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_or_missing_file_stops_startup() {
    let node = app_node().await;
    let s = Setup::new(
        &node.addr(),
        "",
        &[("0001_create.sql", CREATE), ("0003_more.sql", MORE)],
    );
    assert!(s.pgheal(&["migrate"]).await.status.success());
    std::fs::write(
        s.migration("0001_create.sql"),
        format!("{CREATE}-- edited\n"),
    )
    .expect("edit");
    let out = s.pgheal(&[]).await;
    assert!(
        !out.status.success(),
        "pgheal served with an edited migration"
    );
    let err = text(&out.stderr);
    assert!(
        err.contains("0001_create.sql was changed after it was applied"),
        "{err}"
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", s.port)).is_err());

    std::fs::write(s.migration("0001_create.sql"), CREATE).expect("restore");
    std::fs::remove_file(s.migration("0003_more.sql")).expect("remove");
    let out = s.pgheal(&["migrate"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("migration 3 (more) was applied but is missing"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_migration_leaves_the_schema_unchanged() {
    let node = app_node().await;
    let bad = "CREATE TABLE half (a int);\nINSERT INTO nowhere VALUES (1);\n";
    let s = Setup::new(
        &node.addr(),
        "",
        &[("0001_create.sql", CREATE), ("0002_bad.sql", bad)],
    );
    let out = s.pgheal(&["migrate"]).await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("0002_bad.sql failed at line 2 and was rolled back"),
        "{err}"
    );
    assert!(err.contains("nowhere"), "{err}");
    let half = rows(&node, "SELECT to_regclass('half') IS NULL").await;
    assert_eq!(
        half[0][0].as_deref(),
        Some("t"),
        "the failed file left a table"
    );
    let recorded = rows(&node, "SELECT version FROM pgheal_schema_migrations").await;
    assert_eq!(recorded, vec![vec![Some("1".to_string())]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_error_serve_serves_and_reports_in_readyz() {
    let node = app_node().await;
    let http = free_port();
    let bad = "SELECT 1/0;\n";
    let s = Setup::new(
        &node.addr(),
        &format!("http_listen = \"127.0.0.1:{http}\""),
        &[("0001_bad.sql", bad)],
    );
    let config = std::fs::read_to_string(s.config()).expect("config");
    std::fs::write(
        s.config(),
        config.replace("wait = \"2s\"", "wait = \"2s\"\non_error = \"serve\""),
    )
    .expect("config");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgheal"))
        .arg("--config")
        .arg(s.config())
        .kill_on_drop(true)
        .spawn()
        .expect("start pgheal");
    let url = format!("postgres://app:{APP_PASSWORD}@127.0.0.1:{}/app", s.port);
    // Serving despite the failure.
    wait_accepting(&url).await;
    let body = http_get(http, "/readyz").await;
    assert!(body.starts_with("HTTP/1.0 503"), "{body}");
    assert!(
        body.contains("migrations failed") && body.contains("0001_bad.sql"),
        "{body}"
    );
    // For alerts and for the operator's timeline.
    let metrics = http_get(http, "/metrics").await;
    assert!(
        metrics.contains("\npgheal_migrations_failed 1\n"),
        "{metrics}"
    );
    let events = http_get(http, "/events").await;
    assert!(
        events.contains("\"event\":\"migrations failed\""),
        "{events}"
    );
    assert!(events.contains("0001_bad.sql"), "{events}");
    let _ = child.start_kill();
}

async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    text(&out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_primary_migrate_waits_then_fails() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        l.local_addr().expect("addr").to_string()
    };
    let s = Setup::new(&closed, "", &[("0001_create.sql", CREATE)]);
    let out = s.pgheal(&["migrate"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no primary became reachable within 2s"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serving_instances_started_together_migrate_once() {
    let node = app_node().await;
    let s = Setup::new(
        &node.addr(),
        "",
        &[("0001_create.sql", CREATE), ("0003_more.sql", MORE)],
    );
    let other_port = free_port();
    let second = s.dir.path().join("second.toml");
    let text_one = std::fs::read_to_string(s.config()).expect("config");
    std::fs::write(
        &second,
        text_one.replace(&format!(":{}\"", s.port), &format!(":{other_port}\"")),
    )
    .expect("second config");
    let spawn = |config: PathBuf| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_pgheal"))
            .arg("--config")
            .arg(config)
            .kill_on_drop(true)
            .spawn()
            .expect("start pgheal")
    };
    let (_a, _b) = (spawn(s.config()), spawn(second));
    for port in [s.port, other_port] {
        let url = format!("postgres://app:{APP_PASSWORD}@127.0.0.1:{port}/app");
        wait_accepting(&url).await;
    }
    assert_eq!(
        rows(&node, "SELECT count(*) FROM items").await[0][0].as_deref(),
        Some("2")
    );
    assert_eq!(
        rows(&node, "SELECT count(*) FROM pgheal_schema_migrations").await[0][0].as_deref(),
        Some("2")
    );
}

/// After startup migrations, replicas serve reads only once they have
/// replayed them: a replica that has not (its replay paused here, but
/// current by every other measure) gets no reads, so the first query of
/// the new table never meets "relation does not exist".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_get_reads_only_once_they_have_the_migrations() {
    let primary = app_node().await;
    let replica = PgNode::start_replica_of(&primary).await.expect("replica");
    let (paused, _hp) = connect(&format!(
        "postgres://postgres:postgres@{}/app",
        replica.addr()
    ))
    .await;
    paused
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .expect("pause replay");
    let http = free_port();
    let s = Setup::new(
        &primary.addr(),
        &format!("http_listen = \"127.0.0.1:{http}\"\n[health]\ninterval = \"200ms\""),
        &[("0001_create.sql", CREATE), ("0003_more.sql", MORE)],
    );
    let config = std::fs::read_to_string(s.config()).expect("config");
    let both = format!("nodes = [\"{}\", \"{}\"]", primary.addr(), replica.addr());
    let config = config.replace(&format!("nodes = [\"{}\"]", primary.addr()), &both)
        + "read_routing = true\nmax_replica_lag = \"1h\"\n";
    std::fs::write(s.config(), config).expect("config");
    let _pgheal = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgheal"))
        .arg("--config")
        .arg(s.config())
        .kill_on_drop(true)
        .spawn()
        .expect("start pgheal");
    let url = format!("postgres://app:{APP_PASSWORD}@127.0.0.1:{}/app", s.port);
    wait_accepting(&url).await;
    eventually(
        Duration::from_secs(30),
        "the replica to be known",
        || async {
            http_get(http, "/status")
                .await
                .contains("\"role\":\"replica\"")
        },
    )
    .await;
    let (reader, _hr) = connect(&url).await;
    for _ in 0..3 {
        assert_eq!(
            first_value(&reader, "SELECT count(*) FROM items")
                .await
                .expect("items"),
            "2"
        );
        assert_eq!(
            first_value(&reader, "SELECT pg_is_in_recovery()::text")
                .await
                .unwrap(),
            "false"
        );
    }
    paused
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .expect("resume replay");
    eventually(
        Duration::from_secs(30),
        "the replica to serve reads",
        || async {
            first_value(&reader, "SELECT pg_is_in_recovery()::text")
                .await
                .unwrap()
                == "true"
        },
    )
    .await;
    assert_eq!(
        first_value(&reader, "SELECT count(*) FROM items")
            .await
            .unwrap(),
        "2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_shows_each_file_as_it_runs_on_a_terminal_only() {
    let node = app_node().await;
    let s = Setup::new(
        &node.addr(),
        "",
        &[("0001_create.sql", CREATE), ("0002_more.sql", MORE)],
    );
    let config = s.config().display().to_string();
    let args = ["migrate", "--config", &config].map(String::from);
    let shown = text(&pgheal_on_a_terminal(&args[..]).await.stdout);
    for file in ["0001_create.sql", "0002_more.sql"] {
        let line = shown.lines().find(|l| l.contains(file)).unwrap_or_default();
        assert!(
            line.contains(&format!("applying {file} ... done in ")),
            "{shown}"
        );
    }
    // Piped: the summary only.
    let piped = text(&s.pgheal(&["migrate"]).await.stdout);
    assert!(!piped.contains("applying"), "{piped}");
    assert!(piped.contains("2 already applied"), "{piped}");
}
