//! HTTP endpoints: /metrics parses as Prometheus text and moves under
//! load, /readyz follows the nodes, /status and /healthz answer.

mod common;
use common::*;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET over a plain HTTP/1.0 connection: (status code, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect HTTP");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
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
