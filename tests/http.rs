//! HTTP endpoints: /metrics parses as Prometheus text and moves under
//! load, /readyz follows the nodes, /status and /healthz answer.

mod common;
use common::*;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET over a plain HTTP/1.0 connection: (status code, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    get_with(addr, path, "").await
}

/// GET with extra header lines (each ending in \r\n).
async fn get_with(addr: SocketAddr, path: &str, headers: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect HTTP");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n{headers}\r\n").as_bytes())
        .await
        .expect("request");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw))
        .await
        .expect("HTTP answer within 30 s")
        .expect("read");
    let raw = text(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP head and body");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    (code, body.to_string())
}

fn sample(metrics: &str, name: &str) -> f64 {
    let lines = metrics.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text parses");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_under_load_and_readyz_follows_the_node() {
    let mut node = app_node().await;
    let proxy = start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n\
         [health]\ninterval = \"100ms\"\ntimeout = \"1s\"\n\
         [[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n\
         [databases.app]\nnodes = [\"{}\"]\nuser = \"app\"\npassword = \"{APP_PASSWORD}\"\npool_size = 4\n",
        node.addr()
    ))
    .await;
    let http = proxy.http_addr.expect("HTTP address");
    assert_eq!(get(http, "/healthz").await.0, 200);
    eventually(Duration::from_secs(10), "ready", || async {
        get(http, "/readyz").await.0 == 200
    })
    .await;
    let (code, status) = get(http, "/status").await;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    assert_eq!(status["databases"]["app"]["mode"], "read-write");
    assert_eq!(status["databases"]["app"]["nodes"][0]["role"], "primary");

    let before = get(http, "/metrics").await.1;
    let url = app_url(&proxy);
    pgbench_init(&url).await;
    let bench = run(
        "pgbench",
        ["-S", "-c", "4", "-t", "200", "-n"]
            .iter()
            .map(|s| s.to_string())
            .chain([url])
            .collect(),
        None,
    )
    .await;
    assert!(bench.status.success(), "{}", text(&bench.stderr));
    let after = get(http, "/metrics").await.1;
    let moved = |name: &str| sample(&after, name) - sample(&before, name);
    assert!(moved("pgheal_transactions_total") >= 800.0, "{after}");
    assert!(moved("pgheal_queries_total") >= 800.0);
    assert!(moved("pgheal_transaction_duration_seconds_count") >= 800.0);
    assert_eq!(sample(&after, "pgheal_node_up"), 1.0);
    assert!(after.contains("pgheal_pool_servers{"), "{after}");

    // Wrong passwords count as auth failures.
    let bad = url_with(&proxy, "nope");
    assert!(tokio_postgres::connect(&bad, tokio_postgres::NoTls)
        .await
        .is_err());
    let now = get(http, "/metrics").await.1;
    assert!(sample(&now, "pgheal_auth_failures_total") >= 1.0);

    // All nodes down: not ready, with the reason; back when it returns.
    node.stop().await;
    eventually(Duration::from_secs(15), "503 from /readyz", || async {
        get(http, "/readyz").await.0 == 503
    })
    .await;
    let (_, body) = get(http, "/readyz").await;
    assert!(body.contains("no node is up for database(s) app"), "{body}");
    node.start().await.expect("start node");
    eventually(Duration::from_secs(20), "200 from /readyz", || async {
        get(http, "/readyz").await.0 == 200
    })
    .await;
}

fn url_with(proxy: &pgheal::server::Running, password: &str) -> String {
    url(proxy, "app", password, "app")
}

/// The events after `since`, as (seq, event, details).
async fn events(http: SocketAddr, since: u64) -> Vec<(u64, String, String)> {
    let (code, body) = get(http, &format!("/events?since={since}")).await;
    assert_eq!(code, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("events JSON");
    json["events"]
        .as_array()
        .expect("an events array")
        .iter()
        .map(|e| {
            let field = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (
                e["seq"].as_u64().unwrap_or(0),
                field("event"),
                field("details"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_timeline_follows_a_node_down_and_back_and_an_operator() {
    let mut node = app_node().await;
    let proxy = start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n\
         [health]\ninterval = \"100ms\"\ntimeout = \"1s\"\n\
         [[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n\
         [[users]]\nname = \"ops\"\npassword = \"opspw\"\nadmin = true\n\
         [databases.app]\nnodes = [\"{}\"]\nuser = \"app\"\npassword = \"{APP_PASSWORD}\"\n",
        node.addr()
    ))
    .await;
    let http = proxy.http_addr.expect("HTTP address");
    let has = |all: &[(u64, String, String)], event: &str, details: &str| {
        all.iter()
            .any(|(_, e, d)| e == event && d.contains(details))
    };
    eventually(Duration::from_secs(10), "the node seen up", || async {
        has(&events(http, 0).await, "mode changed", "down -> read-write")
    })
    .await;
    let all = events(http, 0).await;
    assert!(has(&all, "node up", "unknown -> primary"), "{all:?}");
    let seen = all.last().map_or(0, |e| e.0);

    node.stop().await;
    eventually(Duration::from_secs(15), "the node seen down", || async {
        let newer = events(http, seen).await;
        has(&newer, "node down", "primary -> down")
            && has(&newer, "mode changed", "read-write -> down")
    })
    .await;
    node.start().await.expect("start node");
    eventually(Duration::from_secs(20), "the node seen back", || async {
        has(
            &events(http, seen).await,
            "mode changed",
            "down -> read-write",
        )
    })
    .await;
    // A cursor past everything gives nothing; a bad one is refused.
    let last = events(http, 0).await.last().map_or(0, |e| e.0);
    assert!(events(http, last).await.is_empty());
    assert_eq!(get(http, "/events?since=x").await.0, 400);

    // What an operator does is there too, and in SHOW EVENTS.
    let console = url(&proxy, "ops", "opspw", "pgheal");
    for command in ["PAUSE app", "RESUME app"] {
        let out = psql(&console, &["-c", command], None).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let newer = events(http, last).await;
    assert!(has(&newer, "paused", "wait until RESUME"), "{newer:?}");
    assert!(has(&newer, "resumed", ""), "{newer:?}");
    let out = psql(&console, &["-c", "SHOW EVENTS"], None).await;
    let shown = text(&out.stdout);
    let first = shown.lines().next().unwrap_or_default();
    assert!(first.contains("|resumed|app|"), "newest first: {shown}");
    assert!(
        shown.contains("|mode changed|app||read-write -> down"),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_auth_asks_for_the_token_except_on_probes() {
    let node = app_node().await;
    std::env::set_var("PGHEAL_TEST_HTTP_TOKEN", "s3cret-token");
    let proxy = start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n\
         http_auth = \"bearer:${{PGHEAL_TEST_HTTP_TOKEN}}\"\n\
         [[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n\
         [databases.app]\nnodes = [\"{}\"]\nuser = \"app\"\npassword = \"{APP_PASSWORD}\"\n",
        node.addr()
    ))
    .await;
    let http = proxy.http_addr.expect("HTTP address");
    for path in ["/", "/status", "/events", "/metrics"] {
        let (code, body) = get(http, path).await;
        assert_eq!(code, 401, "{path}: {body}");
        assert!(!body.contains("s3cret"), "{body}");
        let wrong = get_with(http, path, "Authorization: Bearer nope\r\n").await;
        assert_eq!(wrong.0, 401, "{path}");
        let right = get_with(http, path, "Authorization: Bearer s3cret-token\r\n").await;
        assert_eq!(right.0, 200, "{path}: {}", right.1);
    }
    assert_eq!(get(http, "/healthz").await.0, 200);
    eventually(
        Duration::from_secs(10),
        "/readyz open and ready",
        || async { get(http, "/readyz").await.0 == 200 },
    )
    .await;
    let bad = pgheal::config::Config::parse(
        "[proxy]\nhttp_auth = \"token\"\n[[users]]\nname = \"a\"\npassword = \"b\"\n\
         [databases.app]\nnodes = [\"127.0.0.1:5432\"]\n",
    )
    .expect_err("not bearer:");
    assert!(bad.to_string().contains("proxy.http_auth"), "{bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_tls_serves_the_endpoints_over_tls_only() {
    let node = app_node().await;
    let ca = TestCa::new();
    let proxy = start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nhttp_tls = true\n\
         http_auth = \"bearer:t0ken\"\n{}\n\
         [[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n\
         [databases.app]\nnodes = [\"{}\"]\nuser = \"app\"\npassword = \"{APP_PASSWORD}\"\n",
        ca.section("prefer"),
        node.addr()
    ))
    .await;
    let http = proxy.http_addr.expect("HTTP address");
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca.path("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let get_tls = |path: &'static str, token: &'static str| {
        let (connector, name) = (connector.clone(), name.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(http).await.expect("connect");
            let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
            let auth = format!("Authorization: Bearer {token}\r\n");
            let request = format!("GET {path} HTTP/1.0\r\nHost: x\r\n{auth}\r\n");
            tls.write_all(request.as_bytes()).await.expect("request");
            let mut raw = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut raw)).await;
            text(&raw)
        }
    };
    let healthz = get_tls("/healthz", "").await;
    assert!(healthz.starts_with("HTTP/1.0 200"), "{healthz}");
    let status = get_tls("/status", "t0ken").await;
    assert!(
        status.starts_with("HTTP/1.0 200") && status.contains("\"databases\""),
        "{status}"
    );
    assert!(get_tls("/status", "wrong")
        .await
        .starts_with("HTTP/1.0 401"));
    // Plain HTTP gets no answer.
    let mut plain = tokio::net::TcpStream::connect(http).await.expect("connect");
    plain
        .write_all(b"GET /healthz HTTP/1.0\r\n\r\n")
        .await
        .expect("request");
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), plain.read_to_end(&mut raw)).await;
    assert!(!text(&raw).contains("200"), "{}", text(&raw));
    let bad = pgheal::config::Config::parse(
        "[proxy]\nhttp_tls = true\n[[users]]\nname = \"a\"\npassword = \"b\"\n\
         [databases.app]\nnodes = [\"127.0.0.1:5432\"]\n",
    )
    .expect_err("http_tls without [tls]");
    assert!(bad.to_string().contains("proxy.http_tls"), "{bad}");
}
