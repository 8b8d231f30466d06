//! The admin console through psql: admins only, every SHOW parses as a
//! result set with its columns and sane values under load, and
//! unknown commands get an error without a disconnect.

mod common;
use common::*;

use pgheal::server::Running;

async fn proxy_with_admin(node: &pgheal::testkit::localpg::PgNode) -> Running {
    start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\
         [[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n\
         [[users]]\nname = \"ops\"\npassword = \"opspw\"\nadmin = true\n\
         [databases.app]\nnodes = [\"{}\"]\nuser = \"app\"\npassword = \"{APP_PASSWORD}\"\npool_size = 4\n",
        node.addr()
    ))
    .await
}

/// Runs admin commands with psql (`-A -F '|'`, with headers); one output
/// per command: the header line, then the rows.
async fn admin(proxy: &Running, sql: &str) -> (bool, Vec<String>, String) {
    let url = url(proxy, "ops", "opspw", "pgheal");
    let out = run(
        "psql",
        vec![
            url,
            "-X".into(),
            "-q".into(),
            "-A".into(),
            "-F".into(),
            "|".into(),
            "--pset=footer=off".into(),
            "-c".into(),
            sql.into(),
        ],
        None,
    )
    .await;
    let lines = text(&out.stdout).lines().map(str::to_string).collect();
    (out.status.success(), lines, text(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_answers_show_commands_during_load() {
    let node = app_node().await;
    let proxy = proxy_with_admin(&node).await;
    let url = app_url(&proxy);
    // Four clients under load until the checks are done (a timed pgbench
    // run could end, and its clients leave, before the last check).
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (url, stop) = (url.clone(), stop_rx.clone());
            tokio::spawn(async move {
                let (client, _h) = connect(&url).await;
                while !*stop.borrow() {
                    client.simple_query("SELECT 1").await.expect("load query");
                }
            })
        })
        .collect();
    eventually(
        std::time::Duration::from_secs(20),
        "load running through pgheal",
        || async {
            proxy.app.metrics.transactions.get() > 100
                && proxy
                    .app
                    .clients
                    .list()
                    .iter()
                    .filter(|c| &*c.database == "app")
                    .count()
                    == 4
        },
    )
    .await;

    let (ok, lines, err) = admin(&proxy, "SHOW POOLS").await;
    assert!(ok, "{err}");
    assert_eq!(
        lines[0],
        "database|user|node|clients_active|clients_idle|clients_pinned|clients_waiting|server_active|server_idle|pool_size"
    );
    let row: Vec<&str> = lines[1].split('|').collect();
    let n = |i: usize| row[i].parse::<usize>().expect("a count");
    assert_eq!(row[0], "app");
    assert_eq!(row[2], node.addr());
    assert_eq!(n(3) + n(4) + n(5), 4, "the four load clients: {lines:?}");
    assert!(n(6) <= 4);
    assert!((1..=4).contains(&(n(7) + n(8))), "{lines:?}");
    assert_eq!(row[9], "4");

    let (ok, lines, _) = admin(&proxy, "SHOW CLIENTS").await;
    assert!(ok);
    assert_eq!(
        lines[0],
        "id|user|database|address|state|tls|connected_seconds"
    );
    let app_clients = lines
        .iter()
        .filter(|l| l.contains("|app|app|127.0.0.1:"))
        .count();
    assert_eq!(app_clients, 4, "the four load clients: {lines:?}");
    assert!(lines[1..]
        .iter()
        .all(|l| ["|idle|", "|active|"].iter().any(|s| l.contains(s))));

    let (ok, lines, _) = admin(&proxy, "SHOW SERVERS").await;
    assert!(ok);
    assert_eq!(lines[0], "database|user|node|state|backend_pid|age_seconds");
    assert!(
        (2..=5).contains(&lines.len()),
        "one to four servers: {lines:?}"
    );
    for l in &lines[1..] {
        let f: Vec<&str> = l.split('|').collect();
        assert!(f[4].parse::<i32>().expect("pid") > 0, "{l}");
    }

    let (ok, lines, _) = admin(&proxy, "show nodes;").await;
    assert!(ok);
    assert_eq!(
        lines[0],
        "database|node|role|up|lsn|lag_bytes|replay_lag_seconds|timeline|streaming|consecutive_failures|next_retry_seconds|last_error"
    );
    assert!(
        lines[1].starts_with(&format!("app|{}|primary|true|", node.addr())),
        "{lines:?}"
    );

    let (ok, lines, _) = admin(&proxy, "SHOW STATS").await;
    assert!(ok);
    let stat = |name: &str| -> f64 {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{name}|")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {lines:?}"))
    };
    assert!(stat("transactions") > 0.0);
    assert!(stat("queries") >= stat("transactions"));
    assert!(stat("bytes_from_clients") > 0.0 && stat("bytes_to_clients") > 0.0);
    assert!(stat("avg_transaction_ms") > 0.0);
    assert!(stat("p99_transaction_ms") >= stat("avg_transaction_ms") / 2.0);
    assert!(stat("client_connections") >= 4.0);

    let (ok, lines, _) = admin(&proxy, "SHOW CONFIG").await;
    assert!(ok);
    assert!(
        lines.iter().any(|l| l == "users.app.password|********"),
        "{lines:?}"
    );
    assert!(!lines
        .iter()
        .any(|l| l.contains(APP_PASSWORD) || l.contains("opspw")));

    let (ok, lines, _) = admin(&proxy, "SHOW VERSION").await;
    assert!(ok);
    assert!(lines[1].starts_with("pgheal "), "{lines:?}");

    // Unknown commands: an error, and the console keeps answering.
    let (ok, _, err) = admin(&proxy, "SHOW NONSENSE; SHOW VERSION").await;
    assert!(!ok);
    assert!(err.contains("unknown admin command"), "{err}");
    let (client, _c) = connect(&url_for(&proxy)).await;
    let e = client.simple_query("FLY AWAY").await.expect_err("unknown");
    assert_eq!(code(&e), "42601");
    let v = first_value(&client, "SHOW VERSION")
        .await
        .expect("still answering");
    assert!(v.starts_with("pgheal "));

    stop_tx.send(true).expect("stop");
    for task in load {
        task.await.expect("no load query failed");
    }
}

fn url_for(proxy: &Running) -> String {
    url(proxy, "ops", "opspw", "pgheal")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admins_open_the_console() {
    let node = app_node().await;
    let proxy = proxy_with_admin(&node).await;
    let e = tokio_postgres::connect(
        &url(&proxy, "app", APP_PASSWORD, "pgheal"),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("not an admin");
    assert_eq!(code(&e), "28000");
    let e = tokio_postgres::connect(
        &url(&proxy, "ops", "wrong", "pgheal"),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("wrong password");
    assert_eq!(code(&e), "28P01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_new_transactions_and_resume_releases_them() {
    let node = app_node().await;
    let proxy = proxy_with_admin(&node).await;
    let (console, _c) = connect(&url_for(&proxy)).await;
    let (client, _h) = connect(&app_url(&proxy)).await;
    // A transaction already running finishes during the pause.
    client.batch_execute("BEGIN").await.expect("begin");
    console.simple_query("PAUSE app").await.expect("PAUSE");
    client
        .batch_execute("SELECT 1; COMMIT")
        .await
        .expect("the running transaction finishes");
    // A new one waits.
    let waiting = tokio::spawn(async move {
        first_value(&client, "SELECT 42")
            .await
            .expect("after RESUME")
    });
    let metrics = &proxy.app.metrics;
    let before = metrics.queries.get();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "a new transaction ran while paused");
    assert_eq!(metrics.queries.get(), before);
    console.simple_query("RESUME").await.expect("RESUME");
    let v = tokio::time::timeout(std::time::Duration::from_secs(30), waiting)
        .await
        .expect("released by RESUME")
        .expect("task");
    assert_eq!(v, "42");
    let e = console
        .simple_query("PAUSE nosuchdb")
        .await
        .expect_err("unknown db");
    assert_eq!(code(&e), "3D000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_closes_the_idle_server_connections_of_a_database() {
    let node = app_node().await;
    let proxy = proxy_with_admin(&node).await;
    let (console, _c) = connect(&url_for(&proxy)).await;
    let (client, _h) = connect(&app_url(&proxy)).await;
    let before = backend_pid(&client).await;
    assert_eq!(
        backend_pid(&client).await,
        before,
        "the idle connection is reused"
    );
    console
        .simple_query("RECONNECT app")
        .await
        .expect("RECONNECT");
    eventually(
        std::time::Duration::from_secs(10),
        "a new server connection",
        || async { backend_pid(&client).await != before },
    )
    .await;
    let e = console
        .simple_query("RECONNECT nosuchdb")
        .await
        .expect_err("unknown db");
    assert_eq!(code(&e), "3D000");
}

/// Database names keep their case in PAUSE, RESUME and RECONNECT (a name
/// typed in another case still finds the one database it can mean).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_commands_find_a_database_named_with_capitals() {
    let node = app_node().await;
    let proxy = start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\
         [[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n\
         [[users]]\nname = \"ops\"\npassword = \"opspw\"\nadmin = true\n\
         [databases.Shop]\nnodes = [\"{}\"]\ndbname = \"app\"\nuser = \"app\"\n",
        node.addr()
    ))
    .await;
    let (console, _c) = connect(&url_for(&proxy)).await;
    for command in [
        "PAUSE Shop",
        "RESUME Shop",
        "RECONNECT Shop",
        "PAUSE shop",
        "RESUME SHOP",
    ] {
        console.simple_query(command).await.expect(command);
    }
    let shop = proxy.app.target("Shop").expect("Shop");
    assert!(!*shop.paused.borrow(), "RESUME SHOP resumed Shop");
    console.simple_query("PAUSE Shop").await.expect("pause");
    assert!(*shop.paused.borrow());
    console.simple_query("RESUME").await.expect("resume all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_a_node_and_refuses_a_broken_file() {
    let primary = app_node().await;
    let replica = pgheal::testkit::localpg::PgNode::start_replica_of(&primary)
        .await
        .expect("replica");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("pgheal.toml");
    let file = |nodes: &str, extra: &str| {
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n[health]\ninterval = \"200ms\"\n\
             [[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n\
             [[users]]\nname = \"ops\"\npassword = \"opspw\"\nadmin = true\n\
             [databases.app]\nnodes = [{nodes}]\nuser = \"app\"\npassword = \"{APP_PASSWORD}\"\n\
             read_routing = true\n{extra}"
        )
    };
    let one = format!("\"{}\"", primary.addr());
    std::fs::write(&path, file(&one, "")).expect("write config");
    let config = pgheal::config::Config::load(&path).expect("valid config");
    let proxy = pgheal::server::start(config).await.expect("start");
    proxy.app.set_config_path(path.clone());
    let (console, _c) = connect(&url_for(&proxy)).await;
    let in_recovery = "SELECT pg_is_in_recovery()";
    let (before, _b) = connect(&app_url(&proxy)).await;
    assert_eq!(first_value(&before, in_recovery).await.expect("read"), "f");

    // The replica joins the node list.
    let both = format!("{one}, \"{}\"", replica.addr());
    std::fs::write(&path, file(&both, "")).expect("write config");
    let rows = console.simple_query("RELOAD").await.expect("RELOAD");
    let applied: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert!(
        applied
            .iter()
            .any(|a| a == "databases.app: applied (nodes changed)"),
        "{applied:?}"
    );
    eventually(
        std::time::Duration::from_secs(20),
        "reads on the added replica",
        || {
            let url = app_url(&proxy);
            async move {
                let (c, _h) = connect(&url).await;
                first_value(&c, in_recovery).await.ok().as_deref() == Some("t")
            }
        },
    )
    .await;
    // A client connected before the reload keeps working.
    assert_eq!(
        first_value(&before, "SELECT 1").await.expect("old client"),
        "1"
    );

    // A broken file is refused whole and changes nothing.
    std::fs::write(&path, file(&one, "bogus_key = 1\npool_size = 0\n")).expect("write config");
    let e = console.simple_query("RELOAD").await.expect_err("refused");
    assert_eq!(code(&e), "F0000");
    let message = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("databases.app.bogus_key"), "{message}");
    assert!(message.contains("databases.app.pool_size"), "{message}");
    let rows = console.simple_query("SHOW CONFIG").await.expect("config");
    let listed = rows.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r)
        if r.get(0) == Some("databases.app.nodes") && r.get(1).is_some_and(|v| v.contains(&replica.addr()))));
    assert!(listed, "the running config still has both nodes");
}
