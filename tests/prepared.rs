//! Named prepared statements in transaction mode: protocol-level (Parse /
//! Bind / Close, as tokio-postgres and sqlx send them) and SQL-level
//! (PREPARE / EXECUTE / DEALLOCATE), with clients moving between servers.

mod common;
use common::*;

use bytes::BytesMut;
use pgheal::server::Running;
use pgheal::testkit::localpg::PgNode;
use pgheal_protocol::build;

/// Transaction mode, `pool_size` servers, user `raw` (trust) for the raw
/// protocol client; `pool` goes into `[pool]`.
async fn proxy_tx(node: &PgNode, pool_size: usize, pool: &str) -> Running {
    start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\npool_mode = \"transaction\"\n[pool]\n{pool}\n\
         [[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n\
         [[users]]\nname = \"raw\"\nauth = \"trust\"\n\
         [databases.app]\nnodes = [\"{}\"]\nuser = \"app\"\npassword = \"{APP_PASSWORD}\"\npool_size = {pool_size}\n",
        node.addr()
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_statements_follow_clients_across_servers() {
    let node = app_node().await;
    let proxy = proxy_tx(&node, 2, "").await;
    let url = app_url(&proxy);
    let mut tasks = Vec::new();
    for k in 0..8i32 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let (mut client, _conn) = connect(&url).await;
            // The same text in every client (shared on each server), and
            // one statement of its own.
            let add = client
                .prepare("SELECT $1::int + $2::int")
                .await
                .expect("prepare");
            let own = client
                .prepare(&format!("SELECT $1::int * {k}"))
                .await
                .expect("prepare own");
            for i in 0..40i32 {
                let row = client.query_one(&add, &[&i, &k]).await.expect("add");
                assert_eq!(row.get::<_, i32>(0), i + k);
                let tx = client.transaction().await.expect("begin");
                let row = tx.query_one(&own, &[&i]).await.expect("own");
                assert_eq!(row.get::<_, i32>(0), i * k);
                tx.commit().await.expect("commit");
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_statement_cache_on_a_small_pool() {
    use sqlx::postgres::PgPoolOptions;
    use sqlx::Row;
    let node = app_node().await;
    let proxy = proxy_tx(&node, 2, "").await;
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&app_url(&proxy))
        .await
        .expect("sqlx pool");
    sqlx::query("CREATE TABLE counters (id int PRIMARY KEY, n int NOT NULL)")
        .execute(&pool)
        .await
        .expect("create");
    sqlx::query("INSERT INTO counters SELECT i, 0 FROM generate_series(0, 7) i")
        .execute(&pool)
        .await
        .expect("insert");
    let mut tasks = Vec::new();
    for k in 0..8i32 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..30i32 {
                let row = sqlx::query("SELECT $1::int4 * 2 + $2::int4")
                    .bind(i)
                    .bind(k)
                    .fetch_one(&pool)
                    .await
                    .expect("select");
                assert_eq!(row.get::<i32, _>(0), i * 2 + k);
                let mut tx = pool.begin().await.expect("begin");
                sqlx::query("UPDATE counters SET n = n + 1 WHERE id = $1")
                    .bind(k)
                    .execute(&mut *tx)
                    .await
                    .expect("update");
                tx.commit().await.expect("commit");
            }
        }));
    }
    for t in tasks {
        t.await.expect("sqlx task");
    }
    let total: i64 = sqlx::query_scalar("SELECT sum(n) FROM counters")
        .fetch_one(&pool)
        .await
        .expect("sum");
    assert_eq!(total, 8 * 30);
    pool.close().await;
}

/// A statement prepared on a server before a schema change gets a plan of
/// the old shape; pgheal prepares it afresh and runs the read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_change_does_not_break_a_shared_statement() {
    let node = app_node().await;
    let proxy = proxy_tx(&node, 1, "").await;
    let url = app_url(&proxy);
    let (first, _c1) = connect(&url).await;
    first
        .batch_execute("CREATE TABLE t (a int); INSERT INTO t VALUES (1)")
        .await
        .expect("setup");
    let stmt = first.prepare("SELECT * FROM t").await.expect("prepare");
    assert_eq!(first.query(&stmt, &[]).await.expect("select").len(), 1);
    first
        .batch_execute("ALTER TABLE t ADD COLUMN b int DEFAULT 2")
        .await
        .expect("alter");
    // A new client prepares the same text after the change, as it would
    // directly; the only server still holds the old statement.
    let (second, _c2) = connect(&url).await;
    let stmt2 = second
        .prepare("SELECT * FROM t")
        .await
        .expect("prepare again");
    assert_eq!(stmt2.columns().len(), 2);
    let rows = second
        .query(&stmt2, &[])
        .await
        .expect("select after the change");
    assert_eq!(rows[0].get::<_, i32>(1), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_prepare_execute_deallocate_move_with_the_client() {
    let node = app_node().await;
    let proxy = proxy_tx(&node, 2, "").await;
    let url = app_url(&proxy);
    let mut tasks = Vec::new();
    for k in 0..4i64 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let (client, _conn) = connect(&url).await;
            client
                .simple_query(&format!("PREPARE times (int) AS SELECT $1 * {k}"))
                .await
                .expect("PREPARE");
            for i in 0..30i64 {
                let v = first_value(&client, &format!("EXECUTE times({i})"))
                    .await
                    .expect("EXECUTE");
                assert_eq!(v, (i * k).to_string());
            }
            // Same name again: refused, as PostgreSQL does.
            let dup = client
                .simple_query("PREPARE times (int) AS SELECT 0")
                .await
                .expect_err("duplicate PREPARE");
            assert_eq!(code(&dup), "42P05");
            client
                .simple_query("DEALLOCATE times")
                .await
                .expect("DEALLOCATE");
            let gone = client
                .simple_query("EXECUTE times(1)")
                .await
                .expect_err("EXECUTE after DEALLOCATE");
            assert_eq!(code(&gone), "26000");
            client
                .simple_query("PREPARE times (int) AS SELECT $1 + 1000")
                .await
                .expect("PREPARE again");
            let v = first_value(&client, "EXECUTE times(1)")
                .await
                .expect("EXECUTE");
            assert_eq!(v, "1001");
            client
                .simple_query("DEALLOCATE ALL")
                .await
                .expect("DEALLOCATE ALL");
            let gone = client
                .simple_query("EXECUTE times(1)")
                .await
                .expect_err("EXECUTE after DEALLOCATE ALL");
            assert_eq!(code(&gone), "26000");
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_server_keeps_at_most_max_prepared_statements() {
    let node = app_node().await;
    let proxy = proxy_tx(&node, 1, "max_prepared_statements = 4").await;
    let (client, _conn) = connect(&app_url(&proxy)).await;
    let mut stmts = Vec::new();
    for i in 0..10i32 {
        stmts.push(
            client
                .prepare(&format!("SELECT $1::int + {i}"))
                .await
                .expect("prepare"),
        );
    }
    for round in 0..3i32 {
        for (i, s) in stmts.iter().enumerate() {
            let row = client.query_one(s, &[&round]).await.expect("execute");
            assert_eq!(row.get::<_, i32>(0), round + i as i32);
        }
    }
    // One server: what it holds is what this query sees.
    let held: i64 = first_value(&client, COUNT_OURS)
        .await
        .expect("count")
        .parse()
        .expect("a number");
    assert!((1..=4).contains(&held), "server holds {held} statements");
}

/// Protocol cases drivers do not produce on purpose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_names_close_and_unknown_statements() {
    let node = app_node().await;
    let proxy = proxy_tx(&node, 2, "").await;
    let mut raw = Raw::login(&proxy, "raw", "app").await;
    let mut out = BytesMut::new();
    build::parse(&mut out, b"s1", b"SELECT 1", b"\0\0");
    build::sync(&mut out);
    build::parse(&mut out, b"s1", b"SELECT 2", b"\0\0");
    build::sync(&mut out);
    raw.send(&out).await;
    assert_eq!(tags(&raw.read_until(b'Z').await), "1Z");
    let second = raw.read_until(b'Z').await;
    assert_eq!(tags(&second), "EZ");
    assert_eq!(error_code(&second[0].1), "42P05");

    // s1 is still the first statement.
    raw.send(&bind_execute_sync(b"s1")).await;
    let answer = raw.read_until(b'Z').await;
    assert_eq!(tags(&answer), "2DCZ");
    assert_eq!(&answer[1].1[6..], b"1");

    let mut out = BytesMut::new();
    build::close(&mut out, b'S', b"s1");
    build::sync(&mut out);
    raw.send(&out).await;
    assert_eq!(tags(&raw.read_until(b'Z').await), "3Z");
    raw.send(&bind_execute_sync(b"s1")).await;
    let answer = raw.read_until(b'Z').await;
    assert_eq!(tags(&answer), "EZ");
    assert_eq!(error_code(&answer[0].1), "26000");

    // After the error the connection is in step: a new statement works.
    let mut out = BytesMut::new();
    build::parse(&mut out, b"s2", b"SELECT 'two'", b"\0\0");
    out.extend_from_slice(&bind_execute_sync(b"s2"));
    raw.send(&out).await;
    let answer = raw.read_until(b'Z').await;
    assert_eq!(tags(&answer), "12DCZ");
}

/// Statements pgheal prepared on the server this query runs on.
const COUNT_OURS: &str = "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'pgheal\\_%'";

fn bind_execute_sync(statement: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    build::bind(&mut out, b"", statement, b"\0\0\0\0\0\0");
    build::execute(&mut out, b"", 0);
    build::sync(&mut out);
    out
}

fn tags(messages: &[(u8, Vec<u8>)]) -> String {
    messages.iter().map(|(t, _)| char::from(*t)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_tracking_can_be_turned_off() {
    let node = app_node().await;
    let proxy = proxy_tx(&node, 1, "max_prepared_statements = 0").await;
    // Passed through untouched: the client's own name is on the server.
    let (client, _conn) = connect(&app_url(&proxy)).await;
    let stmt = client.prepare("SELECT 42").await.expect("prepare");
    assert_eq!(
        client
            .query_one(&stmt, &[])
            .await
            .expect("run")
            .get::<_, i32>(0),
        42
    );
    assert_eq!(first_value(&client, COUNT_OURS).await.expect("count"), "0");
}

/// A second Parse of a name the client already uses is refused with 42P05,
/// as PostgreSQL refuses it, even when the statement is the same; the first
/// statement stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_parse_of_one_name_gets_42p05() {
    let node = app_node().await;
    let proxy = proxy_tx(&node, 1, "").await;
    let mut raw = Raw::login(&proxy, "raw", "app").await;
    let mut out = BytesMut::new();
    build::parse(&mut out, b"foobar", b"SELECT 1", b"\0\0");
    build::sync(&mut out);
    raw.send(&out).await;
    let first = raw.read_until(b'Z').await;
    assert_eq!(first.first().map(|m| m.0), Some(b'1'), "{first:?}");
    raw.send(&out).await;
    let second = raw.read_until(b'Z').await;
    let codes: Vec<String> = second
        .iter()
        .filter(|m| m.0 == b'E')
        .map(|m| error_code(&m.1))
        .collect();
    assert_eq!(codes, ["42P05"], "{second:?}");
    let mut run = BytesMut::new();
    build::bind(&mut run, b"", b"foobar", b"\0\0\0\0\0\0");
    build::execute(&mut run, b"", 0);
    build::sync(&mut run);
    raw.send(&run).await;
    let answer = raw.read_until(b'Z').await;
    assert!(answer.iter().any(|m| m.0 == b'D'), "{answer:?}");
}

/// A statement prepared with the protocol (Parse) is visible to SQL
/// `EXECUTE` under the client's name, as on a direct connection, wherever
/// the client's transaction lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_statement_runs_with_sql_execute() {
    let node = app_node().await;
    let proxy = proxy_tx(&node, 2, "").await;
    let mut raw = Raw::login(&proxy, "raw", "app").await;
    let mut out = BytesMut::new();
    build::parse(&mut out, b"foobar", b"SELECT $1::int + 1", b"\0\0");
    build::sync(&mut out);
    raw.send(&out).await;
    raw.read_until(b'Z').await;
    // Another client holds one server, so the EXECUTE may land on either.
    let (other, _h) = connect(&app_url(&proxy)).await;
    other.batch_execute("BEGIN").await.expect("begin");
    for n in [41, 1] {
        let mut q = BytesMut::new();
        build::query(&mut q, &format!("EXECUTE foobar({n})"));
        raw.send(&q).await;
        let answer = raw.read_until(b'Z').await;
        let rows: Vec<&Vec<u8>> = answer
            .iter()
            .filter(|m| m.0 == b'D')
            .map(|m| &m.1)
            .collect();
        assert_eq!(rows.len(), 1, "{answer:?}");
        let expected = (n + 1).to_string();
        assert!(rows[0].ends_with(expected.as_bytes()), "{answer:?}");
        assert!(answer.iter().all(|m| m.0 != b'E'), "{answer:?}");
    }
    other.batch_execute("COMMIT").await.expect("commit");
}

/// What a client learnt of its statement stays true on every server: a
/// server that prepares it only after a schema change (the client's next
/// transaction lands there) refuses it with PostgreSQL's own 0A000, as a
/// direct connection does, instead of rows in a shape the driver did not
/// learn; and a client preparing it afresh learns the new parameter type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_run_on_another_server_after_a_schema_change_is_refused_as_directly() {
    let node = app_node().await;
    let proxy = proxy_tx(&node, 2, "").await;
    let direct = format!(
        "postgres://app:{APP_PASSWORD}@{}/app?sslmode=disable",
        node.addr()
    );
    let (admin, _a) = connect(&direct).await;
    admin
        .batch_execute("CREATE TABLE t (a int, b int); INSERT INTO t VALUES (1, 2)")
        .await
        .expect("setup");
    for url in [direct.clone(), app_url(&proxy)] {
        admin
            .batch_execute("ALTER TABLE t ALTER COLUMN a TYPE int, ALTER COLUMN b TYPE int USING 2")
            .await
            .expect("reset");
        let (holder, _h) = connect(&url).await;
        let (client, _c) = connect(&url).await;
        // The holder keeps one server busy: the client prepares on the other.
        holder.batch_execute("BEGIN").await.expect("begin");
        let stmt = client
            .prepare("SELECT * FROM t WHERE a = $1")
            .await
            .expect("prepare");
        let row = client.query_one(&stmt, &[&1i32]).await.expect("select");
        assert_eq!(row.get::<_, i32>(1), 2);
        // Released last, the holder's server is the client's next one.
        holder.batch_execute("COMMIT").await.expect("commit");
        admin
            .batch_execute("ALTER TABLE t ALTER COLUMN b TYPE real")
            .await
            .expect("alter");
        let err = client
            .query_one(&stmt, &[&1i32])
            .await
            .expect_err("rows in the old shape");
        assert_eq!(err.code().map(|c| c.code()), Some("0A000"), "{url}: {err}");
        let stmt = client
            .prepare("SELECT * FROM t WHERE a = $1")
            .await
            .expect("again");
        let row = client
            .query_one(&stmt, &[&1i32])
            .await
            .expect("select again");
        assert_eq!(row.get::<_, f32>(1), 2.0, "{url}");
        // A parameter's type changed: a client preparing now is told so.
        admin
            .batch_execute("ALTER TABLE t ALTER COLUMN a TYPE bigint")
            .await
            .expect("alter a");
        let (fresh, _f) = connect(&url).await;
        let stmt = fresh
            .prepare("SELECT * FROM t WHERE a = $1")
            .await
            .expect("fresh");
        assert_eq!(stmt.params(), [tokio_postgres::types::Type::INT8], "{url}");
        let row = fresh.query_one(&stmt, &[&1i64]).await.expect("select int8");
        assert_eq!(row.get::<_, f32>(1), 2.0, "{url}");
    }
}

/// `EXECUTE name` sent with the extended protocol (asyncpg's `fetchval`)
/// runs the client's protocol statement, even one whose Parse gave
/// parameter type OIDs, on whichever server the request lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_execute_in_an_extended_query_runs_a_protocol_statement() {
    let node = app_node().await;
    let proxy = proxy_tx(&node, 2, "").await;
    let mut raw = Raw::login(&proxy, "raw", "app").await;
    let mut out = BytesMut::new();
    // One int4 parameter, given by OID.
    build::parse(&mut out, b"foobar", b"SELECT $1 + 1", b"\0\x01\0\0\0\x17");
    build::sync(&mut out);
    raw.send(&out).await;
    raw.read_until(b'Z').await;
    let (other, _h) = connect(&app_url(&proxy)).await;
    other.batch_execute("BEGIN").await.expect("begin");
    for n in [41, 1] {
        let mut q = BytesMut::new();
        build::parse(
            &mut q,
            b"",
            format!("EXECUTE foobar({n})").as_bytes(),
            b"\0\0",
        );
        q.extend_from_slice(&bind_execute_sync(b""));
        raw.send(&q).await;
        let answer = raw.read_until(b'Z').await;
        assert_eq!(tags(&answer), "12DCZ", "{answer:?}");
        let row = answer.iter().find(|m| m.0 == b'D').expect("a row");
        assert!(
            row.1.ends_with((n + 1).to_string().as_bytes()),
            "{answer:?}"
        );
    }
    other.batch_execute("COMMIT").await.expect("commit");
}
