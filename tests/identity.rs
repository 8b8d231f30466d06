//! Backend identity and ended sessions, as drivers see them: the pid in
//! BackendKeyData, notifications' pids, a server session ended by an
//! administrator.

mod common;
use common::*;

use std::time::Duration;

use pgheal::server::Running;

async fn proxy_for_raw(node: &pgheal::testkit::PgNode, mode: &str) -> Running {
    start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\npool_mode = \"{mode}\"\n\
         [[users]]\nname = \"raw\"\nauth = \"trust\"\n\
         [databases.app]\nnodes = [\"{}\"]\nuser = \"app\"\npassword = \"{APP_PASSWORD}\"\n",
        node.addr()
    ))
    .await
}

/// Logs in and returns the client with the pid its BackendKeyData gave.
async fn login(proxy: &Running) -> (Raw, i32) {
    let mut raw = Raw::connect(proxy).await;
    let mut out = bytes::BytesMut::new();
    pgheal_protocol::build::startup_message(&mut out, &[("user", "raw"), ("database", "app")]);
    raw.send(&out).await;
    let welcome = raw.read_until(b'Z').await;
    let (_, key) = welcome
        .iter()
        .find(|(tag, _)| *tag == b'K')
        .expect("BackendKeyData");
    let pid = i32::from_be_bytes([key[0], key[1], key[2], key[3]]);
    (raw, pid)
}

async fn query(raw: &mut Raw, sql: &str) -> Vec<(u8, Vec<u8>)> {
    let mut q = bytes::BytesMut::new();
    pgheal_protocol::build::query(&mut q, sql);
    raw.send(&q).await;
    raw.read_until(b'Z').await
}

fn first_value(messages: &[(u8, Vec<u8>)]) -> String {
    let (_, row) = messages.iter().find(|(t, _)| *t == b'D').expect("a row");
    let columns = pgheal_protocol::backend::data_row(row).expect("DataRow");
    text(columns[0].expect("not null"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_gives_the_real_pid_and_ends_with_the_servers_fatal() {
    let node = app_node().await;
    let proxy = proxy_for_raw(&node, "session").await;
    let (mut raw, pid) = login(&proxy).await;
    let backend = first_value(&query(&mut raw, "SELECT pg_backend_pid()").await);
    assert_eq!(
        backend,
        pid.to_string(),
        "BackendKeyData names the server session"
    );

    // An administrator ends it, as on a direct connection: FATAL, closed.
    node.sql("postgres", &format!("SELECT pg_terminate_backend({pid})"))
        .await
        .expect("terminate");
    let codes = tokio::time::timeout(Duration::from_secs(30), raw.error_codes_until_closed())
        .await
        .expect("closed within 30 s");
    assert_eq!(codes, vec!["57P01"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_own_notifications_carry_its_pid_in_transaction_mode() {
    let node = app_node().await;
    let proxy = proxy_for_raw(&node, "transaction").await;
    let (mut raw, pid) = login(&proxy).await;
    let answer = query(&mut raw, "LISTEN jobs; NOTIFY jobs, 'mine'").await;
    let (_, note) = answer
        .iter()
        .find(|(t, _)| *t == b'A')
        .expect("its own notification");
    assert_eq!(
        i32::from_be_bytes([note[0], note[1], note[2], note[3]]),
        pid
    );

    // Another session's notification keeps that session's pid.
    node.sql("app", "NOTIFY jobs, 'theirs'")
        .await
        .expect("notify");
    let (tag, note) = raw.next().await.expect("a notification");
    assert_eq!(tag, b'A');
    let from = i32::from_be_bytes([note[0], note[1], note[2], note[3]]);
    assert_ne!(from, pid);
    assert!(note.ends_with(b"theirs\0"));
}

/// Transaction mode: a notification another pgheal client sent names that
/// client by the pid its own BackendKeyData gave it, as PostgreSQL names
/// the sending session (asyncpg's listeners compare it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_clients_notification_carries_that_clients_pid() {
    let node = app_node().await;
    let proxy = proxy_for_raw(&node, "transaction").await;
    let (mut listener, _) = login(&proxy).await;
    let (mut sender, sender_pid) = login(&proxy).await;
    query(&mut listener, "LISTEN jobs").await;
    for n in 0..3 {
        let from = notify(&mut sender, &mut listener, &format!("first {n}")).await;
        assert_eq!(from, sender_pid, "notification {n}");
    }
    // A server session the first sender used, now another client's (the
    // pool hands out its most recently returned one): named by that one.
    let (mut second, second_pid) = login(&proxy).await;
    drop(sender);
    for n in 0..3 {
        let from = notify(&mut second, &mut listener, &format!("second {n}")).await;
        assert_eq!(from, second_pid, "second sender's notification {n}");
    }
}

/// `sender` notifies channel `jobs` with `payload`; the pid `listener`'s
/// notification names its sender by.
async fn notify(sender: &mut Raw, listener: &mut Raw, payload: &str) -> i32 {
    query(sender, &format!("NOTIFY jobs, '{payload}'")).await;
    let (tag, note) = listener.next().await.expect("a notification");
    assert_eq!(tag, b'A');
    assert!(
        note.ends_with(format!("{payload}\0").as_bytes()),
        "{payload}"
    );
    i32::from_be_bytes([note[0], note[1], note[2], note[3]])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_ended_by_an_administrator_is_not_run_again() {
    let node = app_node().await;
    let proxy = proxy(&node).await;
    let (client, _h) = connect(&app_url(&proxy)).await;
    let started = std::time::Instant::now();
    let sleeper = tokio::spawn(async move {
        let r = client.simple_query("SELECT pg_sleep(60)").await;
        (client, r)
    });
    let (admin, _a) = connect(&format!("postgres://postgres:postgres@{}/app", node.addr())).await;
    let running = "SELECT pid FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'";
    eventually(Duration::from_secs(30), "the read to run", || async {
        !admin
            .query(running, &[])
            .await
            .expect("activity")
            .is_empty()
    })
    .await;
    let pid: i32 = admin.query_one(running, &[]).await.expect("pid").get(0);
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate");
    let (client, result) = sleeper.await.expect("task");
    let e = result.expect_err("the read was ended, not run again");
    assert_eq!(code(&e), "57P01");
    assert!(started.elapsed() < Duration::from_secs(60), "not re-run");
    assert!(
        admin
            .query(running, &[])
            .await
            .expect("activity")
            .is_empty(),
        "no second pg_sleep anywhere"
    );
    assert_eq!(
        first_value_of(&client).await,
        "1",
        "the connection stays usable"
    );
}

async fn first_value_of(client: &tokio_postgres::Client) -> String {
    common::first_value(client, "SELECT 1")
        .await
        .expect("SELECT 1")
}
