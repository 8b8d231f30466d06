//! Backups: taken from a replica, restorable with pg_restore; retention
//! over several scheduled runs; a failed dump leaves nothing behind.

mod common;
use common::*;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use pgheal::testkit::localpg::{find_bin_dir, PgNode, SUPERUSER_PASSWORD};

fn config_text(nodes: &[&PgNode], dir: &Path, password: &str, extra: &str) -> String {
    let list: Vec<String> = nodes.iter().map(|n| format!("\"{}\"", n.addr())).collect();
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\
         [backup]\ndir = \"{}\"\n{extra}\n\
         [[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n\
         [databases.app]\nnodes = [{}]\nuser = \"app\"\npassword = \"{password}\"\n",
        dir.display(),
        list.join(", ")
    )
}

async fn pgheal_backup(config: &Path, action: &str) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgheal"));
    cmd.args(["backup", action, "--config"]).arg(config);
    output_async(cmd, None, SUBPROCESS_DEADLINE).await
}

/// Every file in the backup directory but the lock files.
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.retain(|n| !n.starts_with(".pgheal-backup-"));
    names.sort();
    names
}

/// The dumps, each checked to have its manifest beside it.
fn dumps(dir: &Path) -> Vec<String> {
    let all = files(dir);
    let dumps: Vec<String> = all
        .iter()
        .filter(|n| !n.ends_with(".dump.json"))
        .cloned()
        .collect();
    for d in dumps.iter().filter(|d| !d.starts_with('.')) {
        assert!(
            all.contains(&format!("{d}.json")),
            "no manifest beside {d}: {all:?}"
        );
    }
    dumps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_from_the_replica_restores_with_its_rows() {
    let primary = app_node().await;
    let replica = PgNode::start_replica_of(&primary).await.expect("replica");
    let (client, _c) = connect(&format!(
        "postgres://app:{APP_PASSWORD}@127.0.0.1:{}/app",
        primary.port
    ))
    .await;
    client
        .batch_execute(
            "CREATE TABLE kept (id int); INSERT INTO kept SELECT generate_series(1, 500)",
        )
        .await
        .expect("data");
    eventually(
        Duration::from_secs(20),
        "the replica to have the rows",
        || async {
            let mut conn = replica.superuser_conn("app").await.expect("replica");
            let rows = conn.query_rows("SELECT count(*) FROM kept").await;
            matches!(rows.as_deref(), Ok([r]) if r[0].as_deref() == Some("500"))
        },
    )
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("pgheal.toml");
    let backups = dir.path().join("backups");
    std::fs::write(
        &config,
        config_text(
            &[&primary, &replica],
            &backups,
            APP_PASSWORD,
            "every = \"1h\"",
        ),
    )
    .expect("config");
    let out = pgheal_backup(&config, "now").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains(&format!("from {}", replica.addr())), "{said}");
    // Piped: no progress line.
    assert!(
        !said.contains('\r') && !said.contains("written"),
        "{said:?}"
    );
    let files = dumps(&backups);
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        files[0].starts_with("app-") && files[0].ends_with("Z.dump"),
        "{files:?}"
    );
    let listed = text(&pgheal_backup(&config, "list").await.stdout);
    assert!(listed.contains(&files[0]), "{listed}");

    // Restore into a fresh database.
    primary
        .sql("postgres", "CREATE DATABASE restored")
        .await
        .expect("createdb");
    let restore = find_bin_dir().expect("bin").join("pg_restore");
    let mut cmd = std::process::Command::new(restore);
    cmd.args([
        "--no-owner",
        "-h",
        "127.0.0.1",
        "-p",
        &primary.port.to_string(),
        "-U",
        "postgres",
        "-d",
        "restored",
    ])
    .arg(backups.join(&files[0]))
    .env("PGPASSWORD", SUPERUSER_PASSWORD);
    let out = output_async(cmd, None, SUBPROCESS_DEADLINE).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows = primary
        .superuser_conn("restored")
        .await
        .expect("restored db")
        .query_rows("SELECT count(*) FROM kept")
        .await
        .expect("count");
    assert_eq!(rows[0][0].as_deref(), Some("500"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_exactly_keep_last_across_runs() {
    let node = app_node().await;
    let dir = tempfile::tempdir().expect("dir");
    let backups = dir.path().join("backups");
    let proxy = start(&config_text(
        &[&node],
        &backups,
        APP_PASSWORD,
        "every = \"1s\"\nkeep_last = 2",
    ))
    .await;
    let scheduler = tokio::spawn(pgheal::ops::backup::schedule(proxy.app.clone()));
    let mut seen = BTreeSet::new();
    eventually(Duration::from_secs(60), "five scheduled backups", || {
        // Finished dumps only: a run in progress also shows its hidden
        // `.app-….dump.tmp` and `.app-….dump.json.tmp`.
        seen.extend(dumps(&backups).into_iter().filter(|d| !d.starts_with('.')));
        let enough = seen.len() >= 5;
        async move { enough }
    })
    .await;
    // Stops between runs: a run in progress finishes with its retention.
    proxy.app.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), scheduler)
        .await
        .expect("the scheduler stops")
        .expect("scheduler task");
    let kept = dumps(&backups);
    assert_eq!(kept.len(), 2, "keep_last = 2: {kept:?}");
    assert_eq!(
        files(&backups).len(),
        4,
        "the pruned dumps' manifests go too"
    );
    // The timeline has them; the schedule is exported for alerts.
    let events = proxy.app.events.since(0);
    let count = |kind: &str| events.iter().filter(|e| e.kind.as_str() == kind).count();
    let (taken, pruned) = (count("backup taken"), count("backup pruned"));
    assert!(pruned >= 1 && taken == pruned + kept.len(), "{events:?}");
    let metrics = pgheal::admin::gauges::render(&proxy.app);
    assert!(
        metrics.contains("pgheal_backup_interval_seconds{database=\"app\"} 1\n"),
        "{metrics}"
    );
    let all: Vec<&String> = seen.iter().collect();
    assert!(kept.iter().all(|k| !k.starts_with('.')), "{kept:?}");
    assert!(all.len() >= 5);
    assert!(
        kept.last() >= Some(all[all.len() - 1]),
        "the newest is kept: {kept:?} of {all:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_dump_leaves_no_file_and_is_reported() {
    let node = app_node().await;
    let dir = tempfile::tempdir().expect("dir");
    let backups = dir.path().join("backups");
    let config = dir.path().join("pgheal.toml");

    // Wrong credentials.
    std::fs::write(
        &config,
        config_text(&[&node], &backups, "wrong", "every = \"1h\""),
    )
    .expect("config");
    let out = pgheal_backup(&config, "now").await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("backup app failed"),
        "{}",
        text(&out.stderr)
    );
    assert!(files(&backups).is_empty(), "{:?}", files(&backups));

    // pg_dump itself failing half way.
    let fake = dir.path().join("pg_dump");
    std::fs::write(&fake, "#!/bin/sh\nfor a; do out=$a; done\necho partial > \"$out\"\necho 'pg_dump: error: out of luck' >&2\nexit 1\n").expect("fake");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let extra = format!("every = \"1h\"\npg_dump = \"{}\"", fake.display());
    std::fs::write(
        &config,
        config_text(&[&node], &backups, APP_PASSWORD, &extra),
    )
    .expect("config");
    let out = pgheal_backup(&config, "now").await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("out of luck"),
        "{}",
        text(&out.stderr)
    );
    assert!(files(&backups).is_empty(), "{:?}", files(&backups));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_now_shows_progress_and_the_size_on_a_terminal() {
    let node = app_node().await;
    // Enough rows for the dump to take a few progress ticks.
    node.sql(
        "app",
        "CREATE TABLE big AS SELECT g, md5(g::text) FROM generate_series(1, 300000) g; \
         ALTER TABLE big OWNER TO app",
    )
    .await
    .expect("rows");
    let dir = tempfile::tempdir().expect("dir");
    let backups = dir.path().join("backups");
    let config = dir.path().join("pgheal.toml");
    std::fs::write(
        &config,
        config_text(&[&node], &backups, APP_PASSWORD, "every = \"1h\""),
    )
    .expect("config");
    let args = ["backup", "now", "--config", &config.display().to_string()].map(String::from);
    let out = pgheal_on_a_terminal(&args[..]).await;
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("backup: "), "no progress line: {shown:?}");
    let file = dumps(&backups).pop().expect("a dump");
    let size = std::fs::metadata(backups.join(&file)).expect("dump").len();
    assert!(
        shown.contains(&format!("({size} bytes)")),
        "final size: {shown:?}"
    );
    assert!(shown.contains("took "), "{shown:?}");
}
