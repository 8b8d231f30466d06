//! Reloading the configuration as operators do it: `kill -HUP` of the real
//! binary, a Kubernetes-style ConfigMap swap with `watch_config`, and
//! what a reload lists and removes.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::Child;

/// A configuration serving `app`, optionally also `extra_db` (another name
/// for the same database), with `app`'s password `password`.
fn config_text(port: u16, node: &str, password: &str, extra_db: bool, top: &str) -> String {
    let mut text = format!(
        "[proxy]\nlisten = \"127.0.0.1:{port}\"\n{top}\n[health]\ninterval = \"200ms\"\n\
         [[users]]\nname = \"app\"\npassword = \"{password}\"\n\
         [databases.app]\nnodes = [\"{node}\"]\nuser = \"app\"\npassword = \"{APP_PASSWORD}\"\n"
    );
    if extra_db {
        text.push_str(&format!(
            "[databases.bench2]\nnodes = [\"{node}\"]\ndbname = \"app\"\nuser = \"app\"\npassword = \"{APP_PASSWORD}\"\n"
        ));
    }
    text
}

/// The pgheal binary serving `config`, its log in `log`.
fn start_binary(config: &Path, log: &Path) -> Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_pgheal"))
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("start pgheal")
}

fn db_url(port: u16, password: &str, db: &str) -> String {
    format!("postgres://app:{password}@127.0.0.1:{port}/{db}?sslmode=disable")
}

async fn can_query(url: &str) -> Result<(), String> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| code(&e))?;
    let handle = tokio::spawn(conn);
    let result = client.simple_query("SELECT 1").await.map_err(|e| code(&e));
    drop(client);
    let _ = handle.await;
    result.map(|_| ())
}

async fn wait_for(url: &str, want_ok: bool, what: &str) {
    eventually(Duration::from_secs(20), what, || async {
        can_query(url).await.is_ok() == want_ok
    })
    .await;
}

fn hangup(child: &Child) {
    let pid = Pid::from_raw(child.id().expect("pid") as i32);
    kill(pid, Signal::SIGHUP).expect("SIGHUP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_file_like_reload_and_refuses_a_broken_one() {
    let node = app_node().await;
    let port = free_port();
    let dir = tempfile::tempdir().expect("temp dir");
    let (config, log) = (
        dir.path().join("pgheal.toml"),
        dir.path().join("pgheal.log"),
    );
    std::fs::write(&config, config_text(port, &node.addr(), "pw1", false, "")).expect("write");
    let child = start_binary(&config, &log);
    let app = db_url(port, "pw1", "app");
    wait_accepting(&app).await;
    let (kept, _k) = connect(&app).await;
    assert_eq!(
        can_query(&db_url(port, "pw1", "bench2")).await,
        Err("3D000".into())
    );

    // A new database and a new password, applied by SIGHUP.
    std::fs::write(&config, config_text(port, &node.addr(), "pw2", true, "")).expect("write");
    hangup(&child);
    wait_for(
        &db_url(port, "pw2", "bench2"),
        true,
        "bench2 served after SIGHUP",
    )
    .await;
    assert_eq!(
        can_query(&db_url(port, "pw1", "app")).await,
        Err("28P01".into())
    );
    assert_eq!(first_value(&kept, "SELECT 2").await.expect("kept"), "2");

    // A broken file is refused whole: everything keeps working as it was.
    std::fs::write(
        &config,
        "[proxy]\nbogus = 1\n[databases.x]\npool_size = 0\n",
    )
    .expect("write");
    hangup(&child);
    eventually(
        Duration::from_secs(10),
        "the refusal to be logged",
        || async {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("configuration not reloaded"))
        },
    )
    .await;
    can_query(&db_url(port, "pw2", "bench2"))
        .await
        .expect("still served");
    assert_eq!(first_value(&kept, "SELECT 3").await.expect("kept"), "3");
    let logged = std::fs::read_to_string(&log).expect("log");
    for key in ["proxy.bogus", "databases.x.pool_size", "databases.x.nodes"] {
        assert!(
            logged.contains(key),
            "every error is logged ({key}):\n{logged}"
        );
    }
    assert!(!logged.contains("\u{1b}["), "no colour codes in a log file");
    drop(child);
}

/// Kubernetes mounts a ConfigMap as `..data -> ..2026_..` with the file a
/// symlink through `..data`, and swaps `..data` atomically.
fn configmap_swap(dir: &Path, generation: u32, text: &str) -> PathBuf {
    let data = dir.join(format!("..gen{generation}"));
    std::fs::create_dir(&data).expect("generation dir");
    std::fs::write(data.join("pgheal.toml"), text).expect("write");
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(data.file_name().expect("name"), &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap");
    let file = dir.join("pgheal.toml");
    if !file.exists() {
        std::os::unix::fs::symlink("..data/pgheal.toml", &file).expect("file link");
    }
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_config_follows_a_configmap_swap_without_a_signal() {
    let node = app_node().await;
    let port = free_port();
    let dir = tempfile::tempdir().expect("temp dir");
    let top = "watch_config = true";
    let config = configmap_swap(
        dir.path(),
        1,
        &config_text(port, &node.addr(), "pw1", false, top),
    );
    let child = start_binary(&config, &dir.path().join("pgheal.log"));
    wait_accepting(&db_url(port, "pw1", "app")).await;
    let bench2 = db_url(port, "pw1", "bench2");
    assert_eq!(can_query(&bench2).await, Err("3D000".into()));
    configmap_swap(
        dir.path(),
        2,
        &config_text(port, &node.addr(), "pw1", true, top),
    );
    wait_for(&bench2, true, "bench2 served after the ConfigMap swap").await;
    configmap_swap(
        dir.path(),
        3,
        &config_text(port, &node.addr(), "pw1", false, top),
    );
    wait_for(&bench2, false, "bench2 gone after the next swap").await;
    drop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_lists_tls_ca_and_password_changes_and_drops_removed_series() {
    let primary = app_node().await;
    let replica = pgheal::testkit::PgNode::start_replica_of(&primary)
        .await
        .expect("replica");
    let (ca1, ca2) = (TestCa::new(), TestCa::new());
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("pgheal.toml");
    let file = |nodes: &str, ca: &TestCa, password: &str| {
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n\
             [health]\ninterval = \"200ms\"\n\
             [[users]]\nname = \"app\"\npassword = \"{password}\"\n\
             [databases.app]\nnodes = [{nodes}]\nuser = \"app\"\npassword = \"{APP_PASSWORD}\"\n\
             tls = \"prefer\"\ntls_ca = \"{}\"\n",
            ca.path("ca.pem")
        )
    };
    let both = format!("\"{}\", \"{}\"", primary.addr(), replica.addr());
    std::fs::write(&path, file(&both, &ca1, "pw1")).expect("write");
    let config = pgheal::config::Config::load(&path).expect("valid");
    let proxy = pgheal::server::start(config).await.expect("start");
    proxy.app.set_config_path(path.clone());
    let http = proxy.http_addr.expect("http");
    let replica_series = format!("node=\"{}\"", replica.addr());
    eventually(Duration::from_secs(20), "the replica's series", || async {
        metrics_text(http).await.contains(&replica_series)
    })
    .await;

    std::fs::write(&path, file(&both, &ca2, "pw2")).expect("write");
    let changes: Vec<String> = proxy
        .app
        .reload()
        .expect("reload")
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        changes.contains(&"databases.app: applied (tls_ca changed)".to_string()),
        "{changes:?}"
    );
    assert!(
        changes.contains(&"users.app: changed".to_string()),
        "{changes:?}"
    );
    assert_eq!(can_query(&url(&proxy, "app", "pw2", "app")).await, Ok(()));
    assert_eq!(
        can_query(&url(&proxy, "app", "pw1", "app")).await,
        Err("28P01".into())
    );

    // The replica leaves the list: its series leave /metrics.
    let one = format!("\"{}\"", primary.addr());
    std::fs::write(&path, file(&one, &ca2, "pw2")).expect("write");
    proxy.app.reload().expect("reload");
    let metrics = metrics_text(http).await;
    assert!(!metrics.contains(&replica_series), "{metrics}");
    assert!(
        metrics.contains(&format!("node=\"{}\"", primary.addr())),
        "{metrics}"
    );
}

async fn metrics_text(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .expect("request");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw))
        .await
        .expect("answer within 30 s")
        .expect("read");
    text(&raw)
}

/// pgheal's pooled connections on the node, as the node counts them.
async fn pooled(node: &pgheal::testkit::PgNode) -> u64 {
    let mut conn = node.superuser_conn("postgres").await.expect("node");
    let rows = conn
        .query_rows(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' \
             AND backend_type = 'client backend' AND application_name NOT LIKE 'pgheal %'",
        )
        .await
        .expect("pg_stat_activity");
    rows[0][0]
        .as_deref()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Found by the soak: a RELOAD that lowered pool_size made a new pool
/// beside the old one, which the connected clients kept using, so the node
/// saw both pools' connections. Now the pool is resized in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_pool_size_bounds_the_connections_of_clients_already_connected() {
    let node = app_node().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("pgheal.toml");
    let file = |size: u32| {
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n[health]\ntimeout = \"5s\"\n\
             [[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n\
             [databases.app]\nnodes = [\"{}\"]\npool_size = {size}\n",
            node.addr()
        )
    };
    std::fs::write(&path, file(6)).expect("write");
    let config = pgheal::config::Config::load(&path).expect("valid");
    let proxy = pgheal::server::start(config).await.expect("start");
    proxy.app.set_config_path(path.clone());
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(connect(&app_url(&proxy)).await);
    }
    // Six transactions at once: six server connections.
    for (c, _) in &clients {
        c.batch_execute("BEGIN; SELECT 1").await.expect("begin");
    }
    assert_eq!(pooled(&node).await, 6);
    std::fs::write(&path, file(2)).expect("write");
    let changes: Vec<String> = proxy
        .app
        .reload()
        .expect("reload")
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        changes.iter().any(|c| c.contains("pool_size")),
        "{changes:?}"
    );
    for (c, _) in &clients {
        c.batch_execute("COMMIT").await.expect("commit");
    }
    eventually(
        Duration::from_secs(10),
        "the pool to shrink to 2",
        || async { pooled(&node).await <= 2 },
    )
    .await;
    // The same clients, all at once: never more than two servers.
    let mut running = Vec::new();
    for (c, _) in &clients {
        running.push(c.simple_query("SELECT pg_sleep(0.3)"));
    }
    let watcher = async {
        let mut most = 0;
        for _ in 0..10 {
            most = most.max(pooled(&node).await);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        most
    };
    let (results, most) = tokio::join!(futures_util::future::join_all(running), watcher);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert!(most <= 2, "{most} server connections with pool_size 2");
    // Raised again: more run at once.
    std::fs::write(&path, file(6)).expect("write");
    proxy.app.reload().expect("reload");
    for (c, _) in &clients {
        c.batch_execute("BEGIN; SELECT 1").await.expect("begin");
    }
    assert_eq!(pooled(&node).await, 6);
}

/// A client connected before a RELOAD gets the reloaded settings from its
/// next transaction on: here read routing turned on sends its reads to the
/// replica, and the pools it used before are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connected_clients_follow_a_reload_at_their_next_transaction() {
    let primary = app_node().await;
    let replica = pgheal::testkit::PgNode::start_replica_of(&primary)
        .await
        .expect("replica");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("pgheal.toml");
    let file = |routing: bool| {
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n[health]\ntimeout = \"5s\"\ninterval = \"200ms\"\n\
             [[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n\
             [databases.app]\nnodes = [\"{}\", \"{}\"]\nread_routing = {routing}\n",
            primary.addr(),
            replica.addr()
        )
    };
    std::fs::write(&path, file(false)).expect("write");
    let config = pgheal::config::Config::load(&path).expect("valid");
    let proxy = pgheal::server::start(config).await.expect("start");
    proxy.app.set_config_path(path.clone());
    let (client, _c) = connect(&app_url(&proxy)).await;
    let on_replica = || async {
        first_value(&client, "SELECT pg_is_in_recovery()")
            .await
            .expect("query")
            == "t"
    };
    for _ in 0..5 {
        assert!(!on_replica().await, "read routing is off");
    }
    std::fs::write(&path, file(true)).expect("write");
    proxy.app.reload().expect("reload");
    eventually(
        Duration::from_secs(20),
        "the same client's reads on the replica",
        on_replica,
    )
    .await;
    // The old settings' pool closed its idle connection to the primary;
    // the client reads on the replica now, so none is open there.
    eventually(
        Duration::from_secs(10),
        "no pgheal connection left on the primary",
        || async { pooled(&primary).await == 0 },
    )
    .await;
}
