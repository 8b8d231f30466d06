//! Bad input, slow clients, exhausted pools and servers that vanish while
//! idle: each gets a clear answer, and nobody else notices.

mod common;
use common::*;
use std::time::Duration;

const TRUST: &str = r#"
[[users]]
name = "raw"
auth = "trust"
"#;

async fn proxy_with_trust(
    node: &pgheal::testkit::localpg::PgNode,
    top: &str,
    db: &str,
) -> pgheal::server::Running {
    start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n{top}\n[[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n{TRUST}\n\
         [databases.app]\nnodes = [\"{}\"]\nuser = \"app\"\npassword = \"{APP_PASSWORD}\"\n{db}",
        node.addr()
    ))
    .await
}

/// Queries in a loop on a well-behaved client until told to stop; returns
/// how many succeeded. Any error fails the test.
fn bystander(
    url: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<u32> {
    tokio::spawn(async move {
        let (client, _h) = connect(&url).await;
        let mut ok = 0;
        while ok == 0 || !*stop.borrow() {
            // Simple protocol: named statements across transactions need
            // prepared-statement tracking, which is its own issue.
            let rows = client
                .simple_query("SELECT 7")
                .await
                .expect("bystander query");
            let seven = rows.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            });
            assert_eq!(seven.as_deref(), Some("7"));
            ok += 1;
        }
        ok
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_closes_only_that_client() {
    let node = app_node().await;
    let proxy = proxy_with_trust(&node, "", "").await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let calm = bystander(app_url(&proxy), stop_rx);

    // Garbage instead of a startup packet: closed without a word, as
    // PostgreSQL does (tests/startup.rs compares the two).
    let mut raw = Raw::connect(&proxy).await;
    raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(raw.error_codes_until_closed().await, Vec::<String>::new());

    // Logged-in clients sending impossible lengths.
    for header in [
        [b'Q', 0xff, 0xff, 0xff, 0xff],
        [b'Q', 0x7f, 0xff, 0xff, 0xff],
        [b'P', 0, 0, 0, 2],
    ] {
        let mut raw = Raw::login(&proxy, "raw", "app").await;
        raw.send(&header).await;
        assert_eq!(
            raw.error_codes_until_closed().await,
            vec!["08P01"],
            "header {header:?}"
        );
    }

    // A message cut off, then the connection closed.
    let mut raw = Raw::login(&proxy, "raw", "app").await;
    raw.send(&[b'Q', 0, 0, 0, 100, b'S', b'E', b'L']).await;
    drop(raw);

    // A startup packet cut off, then closed; an unknown protocol version.
    let mut raw = Raw::connect(&proxy).await;
    raw.send(&[0, 0, 0, 40, 0, 3, 0, 0]).await;
    drop(raw);
    // Protocol 2 is refused in protocol 2's own error format, as
    // PostgreSQL refuses it.
    let mut raw = Raw::connect(&proxy).await;
    raw.send(&[0, 0, 0, 8, 0, 2, 0, 0]).await;
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut raw.stream, &mut answer),
    )
    .await
    .expect("closed within 10 s")
    .expect("read");
    assert!(
        answer.starts_with(b"EFATAL:  unsupported frontend protocol 2.0"),
        "{}",
        text(&answer)
    );

    // The raw client still works when it behaves.
    let mut raw = Raw::login(&proxy, "raw", "app").await;
    let mut q = bytes::BytesMut::new();
    pgheal_protocol::build::query(&mut q, "SELECT 1");
    raw.send(&q).await;
    let msgs = raw.read_until(b'Z').await;
    assert!(
        msgs.iter().any(|(t, b)| *t == b'D' && b.ends_with(b"1")),
        "{msgs:?}"
    );

    stop_tx.send(true).unwrap();
    assert!(calm.await.expect("bystander saw no error") > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_is_refused_and_newer_protocol_is_negotiated() {
    let node = app_node().await;
    let proxy = proxy_with_trust(&node, "", "").await;
    let mut raw = Raw::connect(&proxy).await;
    raw.send(&[0, 0, 0, 8, 4, 210, 22, 47]).await;
    let mut answer = [0u8; 1];
    tokio::io::AsyncReadExt::read_exact(&mut raw.stream, &mut answer)
        .await
        .unwrap();
    assert_eq!(&answer, b"N");
    let mut out = bytes::BytesMut::new();
    pgheal_protocol::build::startup_message_version(
        &mut out,
        2,
        &[("user", "raw"), ("database", "app"), ("_pq_.future", "1")],
    );
    raw.send(&out).await;
    let msgs = negotiated(&mut raw).await;
    assert!(
        msgs.iter().any(|(t, _)| *t == b'K'),
        "BackendKeyData is sent"
    );

    // psql's default sslmode=prefer falls back to plain text.
    let url = format!(
        "postgres://app:{APP_PASSWORD}@127.0.0.1:{}/app?sslmode=prefer",
        proxy.addr.port()
    );
    let out = psql(&url, &["-c", "SELECT 'plain'"], None).await;
    assert_eq!(text(&out.stdout).trim(), "plain", "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_are_closed_after_the_login_timeout() {
    let node = app_node().await;
    let proxy = proxy_with_trust(&node, "login_timeout = \"300ms\"", "").await;
    let mut silent = Raw::connect(&proxy).await;
    assert_eq!(silent.next().await, None, "closed without a word");
    // Half a startup packet is no better.
    let mut slow = Raw::connect(&proxy).await;
    slow.send(&[0, 0, 0, 30, 0, 3]).await;
    assert_eq!(slow.next().await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pool_answers_53300_and_recovers() {
    let node = app_node().await;
    let proxy = proxy_with_trust(
        &node,
        "",
        "pool_size = 1\n[pool]\ncheckout_timeout = \"300ms\"",
    )
    .await;
    let (holder, _h1) = connect(&app_url(&proxy)).await;
    let (waiter, _h2) = connect(&app_url(&proxy)).await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let err = waiter
        .simple_query("SELECT 2")
        .await
        .expect_err("pool is exhausted");
    assert_eq!(code(&err), "53300", "{err}");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("pool_size 1"), "{message}");
    // The extended protocol gets the same answer, and the connection stays usable.
    let err = waiter
        .query_one("SELECT $1::int", &[&3i32])
        .await
        .expect_err("still exhausted");
    assert_eq!(code(&err), "53300", "{err}");
    holder.batch_execute("COMMIT").await.unwrap();
    let v: i32 = waiter
        .query_one("SELECT $1::int", &[&4i32])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_server_killed_behind_the_pool_is_replaced() {
    let node = app_node().await;
    let proxy = proxy_with_trust(&node, "", "pool_size = 1").await;
    let (client, _h) = connect(&app_url(&proxy)).await;
    let before: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    node.sql(
        "postgres",
        &format!("SELECT pg_terminate_backend({before})"),
    )
    .await
    .unwrap();
    let (admin, _h2) = connect(&format!(
        "postgres://postgres:postgres@{}/postgres",
        node.addr()
    ))
    .await;
    eventually(Duration::from_secs(10), "the backend to exit", || async {
        admin
            .query("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&before])
            .await
            .unwrap()
            .is_empty()
    })
    .await;
    let after: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("no error for the client")
        .get(0);
    assert_ne!(before, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_query_gives_08006_and_the_client_carries_on() {
    let node = app_node().await;
    let proxy = proxy_with_trust(&node, "", "pool_size = 2").await;
    let (client, _h) = connect(&app_url(&proxy)).await;
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // Not a plain read (those are run again): a transaction, whose fate is the server's.
    let sleeper = tokio::spawn(async move {
        let r = client
            .simple_query("BEGIN; SELECT pg_sleep(20); COMMIT")
            .await;
        (client, r)
    });
    let (admin, _h2) = connect(&format!(
        "postgres://postgres:postgres@{}/postgres",
        node.addr()
    ))
    .await;
    eventually(Duration::from_secs(10), "pg_sleep to start", || async {
        !admin
            .query(
                "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active'",
                &[&pid],
            )
            .await
            .unwrap()
            .is_empty()
    })
    .await;
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let (client, result) = sleeper.await.unwrap();
    let err = result.expect_err("the server went away");
    // pgheal answers for the lost server (its FATAL is not passed on).
    assert_eq!(code(&err), "08006", "{err}");
    let v: i32 = client
        .query_one("SELECT 5", &[])
        .await
        .expect("same connection works")
        .get(0);
    assert_eq!(v, 5);
}

/// Protocol 3.0 with a `_pq_.` option: still told what pgheal speaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_option_alone_is_negotiated() {
    let node = app_node().await;
    let proxy = proxy_with_trust(&node, "", "").await;
    let mut raw = Raw::connect(&proxy).await;
    let mut out = bytes::BytesMut::new();
    pgheal_protocol::build::startup_message(
        &mut out,
        &[("user", "raw"), ("_pq_.future", "1"), ("database", "app")],
    );
    raw.send(&out).await;
    negotiated(&mut raw).await;
}

/// The login's answer up to ReadyForQuery, which starts by telling the
/// client pgheal speaks 3.0 and not `_pq_.future`.
async fn negotiated(raw: &mut Raw) -> Vec<(u8, Vec<u8>)> {
    let msgs = raw.read_until(b'Z').await;
    let (tag, body) = &msgs[0];
    assert_eq!(*tag, b'v');
    assert_eq!(&body[..8], &[0, 3, 0, 0, 0, 0, 0, 1]);
    assert_eq!(&body[8..], b"_pq_.future\0");
    msgs
}
