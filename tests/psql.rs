//! psql through pgheal: what a person at a terminal would try.

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_queries_batches_notices_and_empty_queries() {
    let node = app_node().await;
    let proxy = proxy(&node).await;
    let url = app_url(&proxy);

    let out = psql(&url, &["-c", "SELECT 40 + 2"], None).await;
    assert_eq!(
        text(&out.stdout).trim(),
        "42",
        "stderr: {}",
        text(&out.stderr)
    );

    // One simple Query holding three statements; the second fails, so the
    // batch stops there and nothing of it commits.
    let batch = "CREATE TABLE b(x int); SELECT 1/0; INSERT INTO b VALUES (1);";
    let out = psql(&url, &["-c", batch], None).await;
    assert!(
        text(&out.stderr).contains("division by zero"),
        "{}",
        text(&out.stderr)
    );
    let out = psql(
        &url,
        &["-c", "SELECT count(*) FROM pg_class WHERE relname = 'b'"],
        None,
    )
    .await;
    assert_eq!(text(&out.stdout).trim(), "0");

    // Separate statements keep working after an error on the same connection.
    let script = b"SELECT 1/0;\nSELECT 'after';\n;\nDO $$ BEGIN RAISE NOTICE 'hello notice'; END $$;\nSELECT 'end';\n";
    let out = psql(&url, &[], Some(script)).await;
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("division by zero"), "{stderr}");
    assert!(stderr.contains("hello notice"), "{stderr}");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        vec!["after", "end"],
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out() {
    let node = app_node().await;
    let proxy = proxy(&node).await;
    let url = app_url(&proxy);
    let out = psql(&url, &["-c", "CREATE TABLE c(id int, name text)"], None).await;
    assert!(out.status.success(), "{}", text(&out.stderr));

    let rows: String = (1..=5000).map(|i| format!("{i}\tname {i}\n")).collect();
    let out = psql(&url, &["-c", "COPY c FROM STDIN"], Some(rows.as_bytes())).await;
    assert!(out.status.success(), "{}", text(&out.stderr));

    let out = psql(
        &url,
        &["-c", "COPY (SELECT * FROM c ORDER BY id) TO STDOUT"],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), rows);

    // A COPY that fails part way leaves the connection usable.
    let script = b"COPY c FROM STDIN;\n1\tok\nnot-a-number\tbad\n\\.\nSELECT count(*) FROM c;\n";
    let out = psql(&url, &[], Some(script)).await;
    assert!(
        text(&out.stderr).contains("invalid input syntax"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout).trim(), "5000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabyte_values_pass_both_ways() {
    let node = app_node().await;
    let proxy = proxy(&node).await;
    let url = app_url(&proxy);
    let sql = "CREATE TABLE big(v text); \
               INSERT INTO big SELECT string_agg(md5(i::text), '') FROM generate_series(1, 327680) i;";
    let out = psql(&url, &["-c", sql], None).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = psql(&url, &["-c", "SELECT v FROM big"], None).await;
    let value = text(&out.stdout);
    assert_eq!(value.trim_end().len(), 327680 * 32);

    // And a 10 MB literal sent by the client.
    let literal = "x".repeat(10 * 1024 * 1024);
    let script = format!("SELECT length('{literal}');\n");
    let out = psql(&url, &[], Some(script.as_bytes())).await;
    assert_eq!(
        text(&out.stdout).trim(),
        (10 * 1024 * 1024).to_string(),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_query_gets_empty_query_response() {
    let node = app_node().await;
    let proxy = start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[[users]]\nname = \"raw\"\nauth = \"trust\"\n\
         [databases.app]\nnodes = [\"{}\"]\nuser = \"app\"\npassword = \"{APP_PASSWORD}\"\n",
        node.addr()
    ))
    .await;
    // psql skips empty statements, so speak the protocol by hand.
    let mut raw = Raw::login(&proxy, "raw", "app").await;
    let mut q = bytes::BytesMut::new();
    pgheal_protocol::build::query(&mut q, "");
    pgheal_protocol::build::query(&mut q, "SELECT 3");
    raw.send(&q).await;
    let first: Vec<u8> = raw.read_until(b'Z').await.iter().map(|(t, _)| *t).collect();
    assert_eq!(first, b"IZ", "EmptyQueryResponse, then ReadyForQuery");
    let second: Vec<u8> = raw.read_until(b'Z').await.iter().map(|(t, _)| *t).collect();
    assert_eq!(second, b"TDCZ", "the next query runs as usual");
}
