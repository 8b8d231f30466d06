//! Transaction replay: transactions whose server died before their end
//! run again on the new primary, unseen; those that cannot be told apart
//! from a retry fail as before. Real primary, real streaming replica,
//! kill -9 of the primary's postmaster and promotion of the replica.

mod common;
use common::*;
use pgheal::metrics::Reason;
use pgheal::server::Running;
use pgheal::testkit::localpg::PgNode;
use std::time::Duration;

/// A primary and its streaming replica; with `sync`, commits wait for the
/// replica (set on the primary only, so the promoted replica does not wait
/// for a standby it does not have).
async fn cluster(sync: bool) -> (PgNode, PgNode) {
    let primary = app_node().await;
    let replica = PgNode::start_replica_of(&primary).await.expect("replica");
    if sync {
        for sql in [
            "ALTER SYSTEM SET synchronous_standby_names = '*'",
            "SELECT pg_reload_conf()",
        ] {
            primary.sql("postgres", sql).await.expect(sql);
        }
        eventually(Duration::from_secs(30), "a synchronous standby", || async {
            sync_state(&primary).await.as_deref() == Some("sync")
        })
        .await;
    }
    (primary, replica)
}

async fn sync_state(primary: &PgNode) -> Option<String> {
    let mut conn = primary.superuser_conn("postgres").await.ok()?;
    let rows = conn
        .query_rows("SELECT sync_state FROM pg_stat_replication")
        .await
        .ok()?;
    conn.terminate().await;
    rows.into_iter().next()?.into_iter().next()?
}

/// pgheal over both nodes; writes wait long enough for the promotion.
async fn proxy_over(primary: &PgNode, replica: &PgNode, failover: &str) -> Running {
    start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[health]\ninterval = \"200ms\"\ntimeout = \"2s\"\n\
         [failover]\nwrite_wait = \"30s\"\n{failover}\n\
         [[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n\
         [databases.app]\nnodes = [\"{}\", \"{}\"]\npool_size = 8\n",
        primary.addr(),
        replica.addr()
    ))
    .await
}

/// The primary's postmaster is killed; the replica is promoted.
async fn fail_over(primary: &mut PgNode, replica: &PgNode) {
    primary.kill9().await;
    replica.promote().await.expect("promote");
}

fn refused(proxy: &Running, reason: &'static str) -> u64 {
    proxy
        .app
        .metrics
        .replay_refused
        .get_or_create(&Reason { reason })
        .get()
}

fn replayed(proxy: &Running) -> u64 {
    proxy.app.metrics.transactions_replayed.get()
}

fn mismatches(proxy: &Running) -> u64 {
    proxy.app.metrics.replay_mismatches.get()
}

/// Rows of a one-column query on `node`, as text.
async fn column(node: &PgNode, sql: &str) -> Vec<String> {
    let mut conn = node.superuser_conn("app").await.expect("connect");
    let rows = conn.query_rows(sql).await.expect(sql);
    conn.terminate().await;
    rows.into_iter()
        .map(|r| r.into_iter().next().flatten().unwrap_or_default())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_cut_by_a_failover_carry_on_or_fail_as_before() {
    let (mut primary, replica) = cluster(false).await;
    let proxy = proxy_over(&primary, &replica, "replay_buffer = \"4KiB\"").await;
    let url = app_url(&proxy);
    let (setup, _h) = connect(&url).await;
    setup
        .batch_execute(
            "CREATE TABLE ledger(id int, note text); CREATE SEQUENCE s;\
             INSERT INTO ledger VALUES (0, 'before')",
        )
        .await
        .unwrap();

    // One client per case, each inside a transaction at the kill.
    let (mut plain, _h1) = connect(&url).await;
    let (mut clock, _h2) = connect(&url).await;
    let (mut sequence, _h3) = connect(&url).await;
    let (mut large, _h4) = connect(&url).await;
    let plain_tx = plain.transaction().await.unwrap();
    let insert = "INSERT INTO ledger VALUES ($1, $2)";
    plain_tx.execute(insert, &[&1i32, &"plain"]).await.unwrap();
    let seen: i64 = plain_tx
        .query_one("SELECT count(*) FROM ledger", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 2);
    let clock_tx = clock.transaction().await.unwrap();
    clock_tx.batch_execute("SELECT now()").await.unwrap();
    let sequence_tx = sequence.transaction().await.unwrap();
    sequence_tx
        .batch_execute("SELECT setval('s', 42)")
        .await
        .unwrap();
    let large_tx = large.transaction().await.unwrap();
    let note = "x".repeat(8 * 1024);
    large_tx.execute(insert, &[&3i32, &note]).await.unwrap();

    fail_over(&mut primary, &replica).await;
    eventually(
        Duration::from_secs(30),
        "every transaction handled",
        || async {
            replayed(&proxy)
                + mismatches(&proxy)
                + refused(&proxy, "function")
                + refused(&proxy, "buffer")
                >= 4
        },
    )
    .await;

    // The plain transaction carries on, on the new primary, unaware.
    plain_tx.execute(insert, &[&2i32, &"plain"]).await.unwrap();
    plain_tx.commit().await.unwrap();
    assert_eq!(replayed(&proxy), 1);
    // The one that read the clock saw another time on replay: as before,
    // 08006, then 25P02 until it rolls back.
    let e = clock_tx.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "08006", "{e}");
    let e = clock_tx.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "25P02", "{e}");
    clock_tx.rollback().await.unwrap();
    assert_eq!(mismatches(&proxy), 1);
    // setval outlives a rollback; a transaction larger than replay_buffer
    // is not kept: neither runs again.
    for (tx, reason) in [(sequence_tx, "function"), (large_tx, "buffer")] {
        let e = tx.batch_execute("SELECT 1").await.unwrap_err();
        assert_eq!(code(&e), "08006", "{reason}: {e}");
        assert_eq!(refused(&proxy, reason), 1, "{reason}");
    }
    assert_eq!(
        column(&replica, "SELECT id || ':' || note FROM ledger ORDER BY id").await,
        ["0:before", "1:plain", "2:plain"]
    );
    // The clients that failed go on as usual.
    for client in [&clock, &sequence] {
        assert_eq!(
            first_value(client, "SELECT count(*) FROM ledger")
                .await
                .unwrap(),
            "3"
        );
    }
}
