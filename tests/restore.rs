//! Recovering from backups: `pgheal backup restore` brings a dropped table
//! back with the rows it had, refuses to overwrite a database unless told,
//! leaves nothing behind when the dump is bad; restore drills prove the
//! newest dump on a schedule without touching a user database that has
//! the drill's name.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::time::Duration;

use pgheal::testkit::localpg::PgNode;

fn config_text(nodes: &[&PgNode], dir: &Path, listen_port: u16, extra: &str) -> String {
    let list: Vec<String> = nodes.iter().map(|n| format!("\"{}\"", n.addr())).collect();
    format!(
        "[proxy]\nlisten = \"127.0.0.1:{listen_port}\"\n\
         [backup]\ndir = \"{}\"\nevery = \"1h\"\n{extra}\n\
         [[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n\
         [[users]]\nname = \"ops\"\npassword = \"opspw\"\nadmin = true\n\
         [databases.app]\nnodes = [{}]\nuser = \"app\"\n",
        dir.display(),
        list.join(", ")
    )
}

/// Restores app's newest dump into a new database `recovered`.
const LATEST_INTO_RECOVERED: [&str; 6] = [
    "backup",
    "restore",
    "--latest",
    "app",
    "--database",
    "recovered",
];

async fn pgheal(config: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgheal"));
    cmd.args(args).arg("--config").arg(config);
    output_async(cmd, None, SUBPROCESS_DEADLINE).await
}

async fn count(node: &PgNode, db: &str, table: &str) -> Option<String> {
    let mut conn = node.superuser_conn(db).await.ok()?;
    let rows = conn
        .query_rows(&format!("SELECT count(*) FROM {table}"))
        .await
        .ok()?;
    rows.first()?.first()?.clone()
}

async fn database_exists(node: &PgNode, name: &str) -> bool {
    let mut conn = node.superuser_conn("postgres").await.expect("postgres");
    let rows = conn
        .query_rows(&format!(
            "SELECT count(*) FROM pg_database WHERE datname = '{name}'"
        ))
        .await
        .expect("pg_database");
    rows[0][0].as_deref() == Some("1")
}

/// A primary with two tables (500 and 3 rows) owned by app, a replica that
/// has them, and one backup taken through the CLI (from the replica).
async fn backed_up() -> (PgNode, PgNode, tempfile::TempDir, PathBuf, u16) {
    let primary = app_node().await;
    let replica = PgNode::start_replica_of(&primary).await.expect("replica");
    primary
        .sql(
            "app",
            "CREATE TABLE kept (id int PRIMARY KEY, note text); \
             INSERT INTO kept SELECT g, md5(g::text) FROM generate_series(1, 500) g; \
             CREATE TABLE \"Odd Name\" (v int); INSERT INTO \"Odd Name\" VALUES (1), (2), (3); \
             ALTER TABLE kept OWNER TO app; ALTER TABLE \"Odd Name\" OWNER TO app",
        )
        .await
        .expect("data");
    eventually(
        Duration::from_secs(30),
        "the replica to have the rows",
        || async { count(&replica, "app", "kept").await.as_deref() == Some("500") },
    )
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("pgheal.toml");
    let port = free_port();
    let backups = dir.path().join("backups");
    std::fs::write(
        &config,
        config_text(&[&primary, &replica], &backups, port, ""),
    )
    .expect("config");
    let out = pgheal(&config, &["backup", "now"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("from {}", replica.addr())));
    (primary, replica, dir, config, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_table_comes_back_with_its_rows() {
    let (primary, _replica, dir, config, _port) = backed_up().await;
    // The manifest beside the dump has the counts under the dump's snapshot.
    let backups = dir.path().join("backups");
    let manifest = std::fs::read_dir(&backups)
        .expect("backups")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".dump.json"))
        .expect("a manifest beside the dump");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).expect("read")).expect("json");
    let tables = json["tables"].as_array().expect("tables");
    let rows = |name: &str| {
        tables
            .iter()
            .find(|t| t["name"] == name)
            .map(|t| t["rows"].clone())
    };
    assert_eq!(rows("kept"), Some(500.into()), "{json}");
    assert_eq!(rows("Odd Name"), Some(3.into()), "{json}");

    primary
        .sql("app", "DROP TABLE kept")
        .await
        .expect("lose it");
    // app may not create databases: a clear error, nothing made.
    let args = LATEST_INTO_RECOVERED;
    let out = pgheal(&config, &args).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("needs CREATEDB"),
        "{}",
        text(&out.stderr)
    );
    assert!(!database_exists(&primary, "recovered").await);

    primary
        .sql("postgres", "ALTER ROLE app CREATEDB")
        .await
        .expect("grant");
    let out = pgheal(&config, &args).await;
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    assert!(
        said.contains("public.kept: 500 rows (500 when dumped)"),
        "{said}"
    );
    assert!(said.contains("row counts match"), "{said}");
    assert!(!said.contains('\r'), "piped: no progress line: {said:?}");
    assert_eq!(
        count(&primary, "recovered", "kept").await.as_deref(),
        Some("500")
    );
    assert_eq!(
        count(&primary, "recovered", "\"Odd Name\"")
            .await
            .as_deref(),
        Some("3")
    );
    // The restored table is the user's to copy back.
    let owner = primary
        .superuser_conn("recovered")
        .await
        .expect("recovered")
        .query_rows("SELECT tableowner FROM pg_tables WHERE tablename = 'kept'")
        .await
        .expect("owner");
    assert_eq!(owner[0][0].as_deref(), Some("app"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_database_is_replaced_only_when_told() {
    let (primary, _replica, _dir, config, port) = backed_up().await;
    primary
        .sql("postgres", "ALTER ROLE app CREATEDB")
        .await
        .expect("grant");
    primary
        .sql("postgres", "CREATE DATABASE recovered OWNER app")
        .await
        .expect("createdb");
    primary
        .sql(
            "recovered",
            "CREATE TABLE precious (v int); INSERT INTO precious VALUES (7)",
        )
        .await
        .expect("precious");
    let restore = LATEST_INTO_RECOVERED;
    let out = pgheal(&config, &restore).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("already exists"),
        "{}",
        text(&out.stderr)
    );
    // --replace off a terminal needs --yes.
    let out = pgheal(&config, &[&restore[..], &["--replace"]].concat()).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--yes"), "{}", text(&out.stderr));
    assert_eq!(
        count(&primary, "recovered", "precious").await.as_deref(),
        Some("1")
    );
    // On a terminal it asks for the database's name.
    let on_terminal: Vec<String> = [&restore[..], &["--replace", "--config"]]
        .concat()
        .into_iter()
        .map(String::from)
        .chain([config.display().to_string()])
        .collect();
    let out = pgheal_on_a_terminal_typing(&on_terminal, Some(b"app\n")).await;
    let shown = text(&out.stdout);
    assert!(!out.status.success(), "{shown}");
    assert!(shown.contains("type its name"), "{shown}");
    assert!(
        shown.contains("not replaced: the name typed was not its name"),
        "{shown}"
    );
    assert_eq!(
        count(&primary, "recovered", "precious").await.as_deref(),
        Some("1")
    );
    let out = pgheal_on_a_terminal_typing(&on_terminal, Some(b"recovered\n")).await;
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains("restore: "),
        "progress on a terminal: {shown:?}"
    );
    assert!(shown.contains("public.kept: 500 rows"), "{shown}");
    assert_eq!(count(&primary, "recovered", "precious").await, None);
    primary
        .sql("recovered", "CREATE TABLE precious (v int)")
        .await
        .expect("precious again");

    // pgheal serves the database being replaced: its client waits while the
    // restore runs and carries on with the restored database afterwards.
    let mut toml = std::fs::read_to_string(&config).expect("config");
    toml.push_str(&format!(
        "[databases.recovered]\nnodes = [\"{}\"]\nuser = \"app\"\n",
        primary.addr()
    ));
    std::fs::write(&config, &toml).expect("config");
    let proxy = start(&toml).await;
    assert_eq!(proxy.addr.port(), port);
    let (client, _c) = connect(&url(&proxy, "app", APP_PASSWORD, "recovered")).await;
    eventually(
        Duration::from_secs(30),
        "pgheal to serve recovered",
        || async { client.simple_query("SELECT 1").await.is_ok() },
    )
    .await;
    let out = pgheal(&config, &[&restore[..], &["--replace", "--yes"]].concat()).await;
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    assert!(said.contains("pgheal: paused recovered"), "{said}");
    assert_eq!(count(&primary, "recovered", "precious").await, None);
    assert_eq!(
        count(&primary, "recovered", "kept").await.as_deref(),
        Some("500")
    );
    let rows = client
        .simple_query("SELECT count(*) FROM kept")
        .await
        .expect("the same client, after the restore");
    let n = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(n.as_deref(), Some("500"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_dump_fails_clearly_and_leaves_no_database() {
    let (primary, _replica, dir, config, _port) = backed_up().await;
    primary
        .sql("postgres", "ALTER ROLE app CREATEDB")
        .await
        .expect("grant");
    let backups = dir.path().join("backups");
    let dump = std::fs::read_dir(&backups)
        .expect("backups")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".dump"))
        .expect("a dump");

    // Not a dump at all: refused before anything is created.
    let garbage = dir.path().join("app-20260101T000000Z.dump");
    std::fs::write(&garbage, b"this is not a dump").expect("garbage");
    let g = garbage.display().to_string();
    let out = pgheal(&config, &["backup", "restore", &g, "--database", "broken"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("is not a readable dump"),
        "{}",
        text(&out.stderr)
    );
    assert!(!database_exists(&primary, "broken").await);

    // Cut in the middle of its data: fails while restoring, names the
    // object, and drops what it made; --keep-failed keeps it.
    let bytes = std::fs::read(&dump).expect("dump");
    let cut = dir.path().join("app-20260101T000001Z.dump");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).expect("cut");
    let c = cut.display().to_string();
    let out = pgheal(&config, &["backup", "restore", &c, "--database", "broken"]).await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    // The object it was reading and pg_restore's own words.
    assert!(err.contains("restore failed: restoring \"public."), "{err}");
    assert!(err.contains("end of file"), "{err}");
    assert!(!database_exists(&primary, "broken").await, "{err}");
    let keep = [
        "backup",
        "restore",
        &c,
        "--database",
        "broken",
        "--keep-failed",
    ];
    let out = pgheal(&config, &keep).await;
    assert!(!out.status.success());
    assert!(
        database_exists(&primary, "broken").await,
        "--keep-failed keeps it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_drills_prove_the_newest_dump_on_schedule() {
    let (primary, replica, dir, _config, port) = backed_up().await;
    primary
        .sql("postgres", "ALTER ROLE app CREATEDB")
        .await
        .expect("grant");
    // A user database with the drill's name: never touched.
    primary
        .sql("postgres", "CREATE DATABASE pgheal_restore_check_app")
        .await
        .expect("createdb");
    primary
        .sql(
            "pgheal_restore_check_app",
            "CREATE TABLE mine (v int); INSERT INTO mine VALUES (1)",
        )
        .await
        .expect("mine");
    let backups = dir.path().join("backups");
    let extra = format!(
        "restore_check_every = \"1s\"\nrestore_target = \"{}\"",
        primary.addr()
    );
    let proxy = start(&config_text(&[&primary, &replica], &backups, port, &extra)).await;
    let drills = tokio::spawn(pgheal::ops::drill::schedule(proxy.app.clone()));
    eventually(Duration::from_secs(90), "a passed restore check", || {
        let metrics = pgheal::admin::gauges::render(&proxy.app);
        async move {
            metrics.contains(
                "pgheal_backup_last_restore_check_success_timestamp_seconds{database=\"app\"}",
            )
        }
    })
    .await;
    // The dump's manifest has the outcome: SHOW BACKUPS shows it.
    let admin = url(&proxy, "ops", "opspw", "pgheal");
    eventually(Duration::from_secs(30), "SHOW BACKUPS to say so", || {
        let admin = admin.clone();
        async move {
            let shown = text(&psql(&admin, &["-c", "SHOW BACKUPS"], None).await.stdout);
            shown.contains("|ok at 20")
        }
    })
    .await;
    // A newest dump that does not restore: the drill fails, says so.
    let garbage = backups.join("app-20991231T000000Z.dump");
    std::fs::write(&garbage, b"not a dump").expect("garbage");
    eventually(Duration::from_secs(90), "a failed restore check", || {
        let metrics = pgheal::admin::gauges::render(&proxy.app);
        async move {
            metrics.contains(
                "pgheal_backup_last_restore_check_failure_timestamp_seconds{database=\"app\"}",
            )
        }
    })
    .await;
    let failed = proxy.app.events.since(0);
    let failed = failed
        .iter()
        .find(|e| e.kind.as_str() == "restore check failed")
        .expect("a failure event");
    assert!(
        failed.details.contains("is not a readable dump"),
        "{failed:?}"
    );
    let config = text(&psql(&admin, &["-c", "SHOW CONFIG"], None).await.stdout);
    assert!(config.contains("backup.restore_check_every|1s"), "{config}");
    assert!(
        config.contains(&format!("backup.restore_target|{}", primary.addr())),
        "{config}"
    );
    proxy.app.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), drills)
        .await
        .expect("the drills stop")
        .expect("drill task");
    assert_eq!(
        count(&primary, "pgheal_restore_check_app", "mine")
            .await
            .as_deref(),
        Some("1"),
        "the user's database is untouched"
    );
    assert!(!database_exists(&primary, "pgheal_restore_check_app_1").await);
    let events = proxy.app.events.since(0);
    assert!(
        events
            .iter()
            .any(|e| e.kind.as_str() == "restore check passed"),
        "{events:?}"
    );
}
