//! TLS with clients (psql, tokio-postgres) and with servers, with a test
//! CA made here.

mod common;
use common::*;

use pgheal::server::Running;
use pgheal::testkit::localpg::PgNode;

async fn psql_conninfo(conninfo: &str, sql: &str) -> std::process::Output {
    run(
        "psql",
        vec![
            conninfo.to_string(),
            "-X".into(),
            "-qAt".into(),
            "-c".into(),
            sql.into(),
        ],
        None,
    )
    .await
}

fn conninfo(proxy: &Running, extra: &str) -> String {
    format!(
        "host=localhost port={} user=app password={APP_PASSWORD} dbname=app {extra}",
        proxy.addr.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_over_tls_require_and_verify_full() {
    let ca = TestCa::new();
    let node = app_node().await;
    let proxy = proxy_with(&node, &format!("\n{}", ca.section("prefer")), "").await;

    let out = psql_conninfo(&conninfo(&proxy, "sslmode=require"), "SELECT 1").await;
    assert_eq!(text(&out.stdout).trim(), "1", "{}", text(&out.stderr));

    let verify = format!("sslmode=verify-full sslrootcert={}", ca.path("ca.pem"));
    let out = psql_conninfo(&conninfo(&proxy, &verify), "SELECT 2").await;
    assert_eq!(text(&out.stdout).trim(), "2", "{}", text(&out.stderr));

    // prefer: a plain client is still welcome.
    let out = psql_conninfo(&conninfo(&proxy, "sslmode=disable"), "SELECT 3").await;
    assert_eq!(text(&out.stdout).trim(), "3", "{}", text(&out.stderr));

    // The certificate's expiry is exported for alerts.
    let metrics = pgheal::admin::gauges::render(&proxy.app);
    let line = metrics
        .lines()
        .find(|l| l.starts_with("pgheal_tls_certificate_expiry_timestamp_seconds{"))
        .unwrap_or_else(|| panic!("no expiry in {metrics}"));
    let expiry: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(expiry > now + 365.0 * 86400.0, "{line}");

    // A CA that did not sign pgheal's certificate is refused by psql.
    let other = TestCa::new();
    let wrong = format!("sslmode=verify-full sslrootcert={}", other.path("ca.pem"));
    let out = psql_conninfo(&conninfo(&proxy, &wrong), "SELECT 4").await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("SSL"), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_mode_refuses_plain_clients() {
    let ca = TestCa::new();
    let node = app_node().await;
    let proxy = proxy_with(&node, &format!("\n{}", ca.section("require")), "").await;
    let out = psql_conninfo(&conninfo(&proxy, "sslmode=disable"), "SELECT 1").await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("accepts only TLS connections"), "{err}");
    let (_client, e) = tokio_postgres::connect(&app_url(&proxy), tokio_postgres::NoTls)
        .await
        .map(|(c, _)| (c, ()))
        .err()
        .map(|e| ((), e))
        .expect("a plain tokio-postgres client is refused");
    assert_eq!(code(&e), "28000");
    let out = psql_conninfo(&conninfo(&proxy, "sslmode=require"), "SELECT 1").await;
    assert_eq!(text(&out.stdout).trim(), "1", "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_over_tls_many_queries() {
    let ca = TestCa::new();
    let node = app_node().await;
    let proxy = proxy_with(
        &node,
        &format!("pool_mode = \"transaction\"\n{}", ca.section("require")),
        "pool_size = 2",
    )
    .await;
    let url = format!(
        "postgres://app:{APP_PASSWORD}@localhost:{}/app?sslmode=require",
        proxy.addr.port()
    );
    let mut tasks = Vec::new();
    for k in 0..4i32 {
        let (url, tls) = (url.clone(), ca.rustls_client());
        tasks.push(tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, tls)
                .await
                .expect("TLS connect");
            tokio::spawn(conn);
            let stmt = client.prepare("SELECT $1::int * 3").await.expect("prepare");
            for i in 0..50 {
                let row = client.query_one(&stmt, &[&(i + k)]).await.expect("query");
                assert_eq!(row.get::<_, i32>(0), (i + k) * 3);
            }
            // 1 MB back through TLS.
            let big = first_value(&client, "SELECT repeat('x', 1000000)")
                .await
                .expect("big");
            assert_eq!(big.len(), 1_000_000);
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
}

/// A node that takes `app` only over TLS.
async fn ssl_only_node(ca: &TestCa) -> PgNode {
    let node = app_node().await;
    node.enable_ssl(&ca.cert_pem, &ca.key_pem)
        .await
        .expect("enable ssl");
    node.prepend_hba(
        "hostssl all app 127.0.0.1/32 scram-sha-256\nhostnossl all app 127.0.0.1/32 reject",
    )
    .await
    .expect("hba");
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_verify_full_and_refusals() {
    let ca = TestCa::new();
    let node = ssl_only_node(&ca).await;
    // A node is reached one way (health checks included), so each
    // database names the node by another address of it.
    let port = node
        .addr()
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_string();
    let db = |tls: &str, ca_path: &str, host: &str| {
        format!(
            "[databases.{tls_name}]\nnodes = [\"{host}:{port}\"]\ndbname = \"app\"\nuser = \"app\"\npassword = \"{APP_PASSWORD}\"\ntls = \"{tls}\"\ntls_ca = \"{ca_path}\"\n",
            tls_name = tls.replace('-', "_"),
        )
    };
    let other = TestCa::new();
    let proxy = start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n{}{}{}",
        db("verify-full", &ca.path("ca.pem"), "127.0.0.1"),
        db("require", &other.path("ca.pem"), "localhost"),
        db("disable", &ca.path("ca.pem"), "127.1"),
    ))
    .await;
    let ssl_sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    for database in ["verify_full", "require"] {
        let (client, _c) = connect(&url(&proxy, "app", APP_PASSWORD, database)).await;
        assert_eq!(first_value(&client, ssl_sql).await.expect(database), "t");
    }
    // Health checks use TLS too: the node's role is found.
    let target = proxy.app.target("verify_full").expect("target");
    eventually(
        std::time::Duration::from_secs(10),
        "the primary found over TLS",
        || {
            let t = target.clone();
            async move { t.cluster.snapshot().primary().is_some() }
        },
    )
    .await;
    // Without TLS the node refuses app: the client hears why.
    let e = tokio_postgres::connect(
        &url(&proxy, "app", APP_PASSWORD, "disable"),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("refused without TLS");
    let message = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("no encryption"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_verify_full_with_the_wrong_ca_fails_clearly() {
    let ca = TestCa::new();
    let node = ssl_only_node(&ca).await;
    let other = TestCa::new();
    let proxy = proxy_with(
        &node,
        "",
        &format!(
            "user = \"app\"\npassword = \"{APP_PASSWORD}\"\ntls = \"verify-full\"\ntls_ca = \"{}\"",
            other.path("ca.pem")
        ),
    )
    .await;
    let e = tokio_postgres::connect(&app_url(&proxy), tokio_postgres::NoTls)
        .await
        .err()
        .expect("no server can be reached");
    let message = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert_eq!(code(&e), "08001", "{message}");
    assert!(message.contains("TLS"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_read_again_on_reload() {
    let ca = TestCa::new();
    let node = app_node().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("pgheal.toml");
    let toml = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n{}\n[[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n\
         [databases.app]\nnodes = [\"{}\"]\n",
        ca.section("require"),
        node.addr()
    );
    std::fs::write(&path, toml).expect("write config");
    let config = pgheal::config::Config::load(&path).expect("valid config");
    let proxy = pgheal::server::start(config).await.expect("start");
    proxy.app.set_config_path(path.clone());
    let verify = |ca: &TestCa| format!("sslmode=verify-full sslrootcert={}", ca.path("ca.pem"));
    let out = psql_conninfo(&conninfo(&proxy, &verify(&ca)), "SELECT 1").await;
    assert_eq!(text(&out.stdout).trim(), "1", "{}", text(&out.stderr));

    // New files from another CA in the same places, then what SIGHUP does.
    let next = TestCa::new();
    std::fs::write(ca.path("cert.pem"), &next.cert_pem).expect("replace cert");
    std::fs::write(ca.path("key.pem"), &next.key_pem).expect("replace key");
    let changes = proxy.app.reload().expect("reload");
    assert!(
        changes.iter().any(|c| c.to_string().starts_with("tls:")),
        "{changes:?}"
    );
    let out = psql_conninfo(&conninfo(&proxy, &verify(&next)), "SELECT 2").await;
    assert_eq!(text(&out.stdout).trim(), "2", "{}", text(&out.stderr));
    let out = psql_conninfo(&conninfo(&proxy, &verify(&ca)), "SELECT 3").await;
    assert!(!out.status.success(), "the old CA no longer matches");

    // A broken file is refused and the running certificate stays.
    std::fs::write(ca.path("key.pem"), "not a key").expect("break key");
    assert!(proxy.app.reload().is_err());
    let out = psql_conninfo(&conninfo(&proxy, &verify(&next)), "SELECT 4").await;
    assert_eq!(text(&out.stdout).trim(), "4", "{}", text(&out.stderr));
}
