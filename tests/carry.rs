//! Session state in transaction mode: settings follow each client to
//! whatever server runs its next transaction, and what cannot move (LISTEN,
//! advisory locks, temporary tables) pins the client to its server.

mod common;
use common::*;

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use pgheal::server::Running;

async fn pinned(proxy: &Running) -> usize {
    proxy.app.counters.pinned_clients.load(Ordering::Relaxed)
}

async fn show(client: &tokio_postgres::Client, name: &str) -> String {
    first_value(client, &format!("SHOW {name}"))
        .await
        .expect("SHOW")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_keeps_its_own_settings_across_servers() {
    let node = app_node().await;
    let proxy = proxy_with(&node, "pool_mode = \"transaction\"", "pool_size = 2").await;
    let url = app_url(&proxy);
    let mut tasks = Vec::new();
    for k in 0..6 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let (client, _conn) = connect(&url).await;
            client
                .batch_execute(&format!(
                    "SET search_path TO s{k}, public; SET TIME ZONE 'Etc/GMT+{k}'; SET application_name = 'c{k}'"
                ))
                .await
                .expect("SET");
            for _ in 0..20 {
                assert_eq!(show(&client, "search_path").await, format!("s{k}, public"));
                assert_eq!(show(&client, "TimeZone").await, format!("Etc/GMT+{k}"));
                assert_eq!(show(&client, "application_name").await, format!("c{k}"));
                // SET LOCAL lasts for its transaction only.
                client
                    .batch_execute("BEGIN; SET LOCAL search_path TO elsewhere")
                    .await
                    .expect("SET LOCAL");
                assert_eq!(show(&client, "search_path").await, "elsewhere");
                client.batch_execute("COMMIT").await.expect("COMMIT");
            }
            // A SET rolled back is not kept.
            client
                .batch_execute("BEGIN; SET TIME ZONE 'UTC'; ROLLBACK")
                .await
                .expect("rolled back SET");
            for _ in 0..5 {
                assert_eq!(show(&client, "TimeZone").await, format!("Etc/GMT+{k}"));
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_reset_all_and_discard_all() {
    let node = app_node().await;
    let proxy = proxy_with(&node, "pool_mode = \"transaction\"", "pool_size = 2").await;
    let url = format!("{}&options=-c%20work_mem%3D5MB", app_url(&proxy));
    let (client, _conn) = connect(&url).await;
    let (other, _c) = connect(&app_url(&proxy)).await;
    assert_eq!(show(&client, "work_mem").await, "5MB");
    client
        .batch_execute("SET work_mem = '7MB'")
        .await
        .expect("SET");
    assert_eq!(show(&client, "work_mem").await, "7MB");
    // Another client on the same servers keeps the server default.
    assert_eq!(show(&other, "work_mem").await, "4MB");
    client.batch_execute("RESET work_mem").await.expect("RESET");
    assert_eq!(show(&client, "work_mem").await, "5MB");
    client
        .batch_execute("SET work_mem = '9MB'")
        .await
        .expect("SET");
    client.batch_execute("RESET ALL").await.expect("RESET ALL");
    assert_eq!(show(&client, "work_mem").await, "5MB");
    client
        .batch_execute("SET work_mem = '9MB'")
        .await
        .expect("SET");
    client
        .batch_execute("DISCARD ALL")
        .await
        .expect("DISCARD ALL");
    for _ in 0..4 {
        assert_eq!(show(&client, "work_mem").await, "5MB");
        assert_eq!(show(&other, "work_mem").await, "4MB");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_pins_the_client_and_notifications_arrive() {
    let node = app_node().await;
    let proxy = proxy_with(&node, "pool_mode = \"transaction\"", "pool_size = 2").await;
    let url = app_url(&proxy);
    let (listener, mut conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    assert_eq!(pinned(&proxy).await, 0);
    listener.batch_execute("LISTEN jobs").await.expect("LISTEN");
    assert_eq!(pinned(&proxy).await, 1);

    // Other clients keep the other server busy meanwhile.
    let (notifier, _c) = connect(&url).await;
    for i in 0..5 {
        notifier
            .batch_execute(&format!("NOTIFY jobs, 'job {i}'"))
            .await
            .expect("NOTIFY");
        let got = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("notification within 30 s");
        assert_eq!(got.as_deref(), Some(format!("job {i}").as_str()));
        // The pinned client still runs queries on its server.
        assert_eq!(
            first_value(&listener, "SELECT 1").await.expect("query"),
            "1"
        );
    }
    drop(listener);
    eventually(Duration::from_secs(10), "the pin to end", || async {
        pinned(&proxy).await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advisory_lock_and_temp_table_stay_with_their_client() {
    let node = app_node().await;
    let proxy = proxy_with(&node, "pool_mode = \"transaction\"", "pool_size = 3").await;
    let url = app_url(&proxy);
    let (holder, _c1) = connect(&url).await;
    let (rival, _c2) = connect(&url).await;
    let (temp, _c3) = connect(&url).await;
    holder
        .batch_execute("SELECT pg_advisory_lock(42)")
        .await
        .expect("lock");
    temp.batch_execute("CREATE TEMP TABLE scratch (v int); INSERT INTO scratch VALUES (1)")
        .await
        .expect("temp table");
    assert_eq!(pinned(&proxy).await, 2);
    for i in 0..10 {
        let mine =
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()";
        assert_eq!(first_value(&holder, mine).await.expect("own lock"), "1");
        let taken = first_value(&rival, "SELECT pg_try_advisory_xact_lock(42)")
            .await
            .expect("rival");
        assert_eq!(taken, "f", "round {i}: the lock moved away from its holder");
        temp.batch_execute(&format!("INSERT INTO scratch VALUES ({i})"))
            .await
            .expect("temp insert");
    }
    assert_eq!(
        first_value(&temp, "SELECT count(*) FROM scratch")
            .await
            .expect("temp rows"),
        "11"
    );
    holder
        .batch_execute("SELECT pg_advisory_unlock(42)")
        .await
        .expect("unlock");
    let taken = first_value(&rival, "SELECT pg_try_advisory_xact_lock(42)")
        .await
        .expect("rival");
    assert_eq!(taken, "t");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_client_whose_server_session_ends_hears_its_fatal_and_is_closed() {
    let node = app_node().await;
    let proxy = proxy_with(&node, "pool_mode = \"transaction\"", "pool_size = 2").await;
    let (client, conn) = tokio_postgres::connect(&app_url(&proxy), tokio_postgres::NoTls)
        .await
        .expect("connect");
    let conn = tokio::spawn(conn);
    client.batch_execute("LISTEN jobs").await.expect("LISTEN");
    let pid = first_value(&client, "SELECT pg_backend_pid()")
        .await
        .expect("pid");
    assert_eq!(pinned(&proxy).await, 1);
    node.sql("postgres", &format!("SELECT pg_terminate_backend({pid})"))
        .await
        .expect("terminate");
    // What a direct connection shows: the server's FATAL, then the end.
    let ended = tokio::time::timeout(Duration::from_secs(30), conn)
        .await
        .expect("closed within 30 s")
        .expect("connection task");
    let e = ended.expect_err("the session ended with an error");
    assert_eq!(code(&e), "57P01");
    assert!(client.is_closed());
    eventually(
        Duration::from_secs(30),
        "the pin to be released",
        || async { pinned(&proxy).await == 0 },
    )
    .await;
    // A new connection works.
    let (again, _h) = connect(&app_url(&proxy)).await;
    assert_eq!(first_value(&again, "SELECT 1").await.expect("works"), "1");
}

/// Values pgheal writes into SQL (set_config) hold backslashes and quotes
/// whatever `standard_conforming_strings` says, and cannot break out of
/// their literal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_with_backslashes_and_quotes_under_both_string_settings() {
    let node = app_node().await;
    let proxy = proxy_with(&node, "pool_mode = \"transaction\"", "pool_size = 1").await;
    let hostile = r"a\b'c\'; SELECT 1; --";
    let mut clients = Vec::new();
    for (k, scs) in ["off", "on"].iter().enumerate() {
        let mut config: tokio_postgres::Config = app_url(&proxy).parse().expect("url");
        config
            .application_name(format!("{hostile}{k}"))
            .options(format!("-c standard_conforming_strings={scs}"));
        let (client, conn) = config
            .connect(tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        clients.push((client, *scs, k));
    }
    // One server for both: each transaction re-applies its client's values.
    for round in 0..3 {
        for (client, scs, k) in &clients {
            assert_eq!(
                show(client, "application_name").await,
                format!("{hostile}{k}"),
                "round {round}, standard_conforming_strings={scs}"
            );
            assert_eq!(show(client, "standard_conforming_strings").await, *scs);
        }
    }
    // A value set with SET is read back and carried the same way.
    let (off, _, _) = &clients[0];
    off.batch_execute(r"SET application_name = 'x\\y''z'")
        .await
        .expect("SET with scs off");
    for _ in 0..3 {
        assert_eq!(show(off, "application_name").await, r"x\y'z");
        assert_eq!(
            show(&clients[1].0, "application_name").await,
            format!("{hostile}1")
        );
    }
}
