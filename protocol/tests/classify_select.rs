//! Classifier: queries that read, and the ones that only look like it.
use pgheal_protocol::classify::{classify, Class};

fn c(sql: &str) -> Class {
    classify(sql.as_bytes())
}

#[test]
fn plain_reads() {
    for sql in [
        "SELECT 1",
        "select * from accounts where id = $1",
        "  \n\tSELECT abalance FROM pgbench_accounts WHERE aid = 42;",
        "VALUES (1), (2)",
        "TABLE pgbench_branches",
        "WITH t AS (SELECT 1) SELECT * FROM t",
        "SELECT my_function()", // other side effects: the replica's 25006 shows them
        "SELECT pg_advisory_xact_lock(42)",
        "SELECT currval('s')",
        "SELECT 'nextval(1)', \"pg_notify\" FROM t", // a literal and a quoted column
        "(SELECT 1) UNION (SELECT 2)",
        "",
        ";",
    ] {
        assert_eq!(c(sql), Class::Read, "{sql}");
    }
}

#[test]
fn locking_and_into_are_writes() {
    for sql in [
        "SELECT * FROM t FOR UPDATE",
        "SELECT * FROM t FOR NO KEY UPDATE SKIP LOCKED",
        "SELECT * FROM t FOR SHARE",
        "select * from t for key share nowait",
        "SELECT * INTO new_table FROM t",
        "WITH x AS (SELECT 1) SELECT * INTO y FROM x",
        // A session-level advisory lock pins the client: on the primary.
        "SELECT pg_advisory_lock(42)",
        "select pg_try_advisory_lock_shared(1, 2)",
        // Well-known writing functions go to the primary at once.
        "SELECT nextval('s')",
        "select setval('s', 10)",
        "SELECT pg_notify('channel', 'payload')",
        "SELECT id, NEXTVAL('s') FROM t",
    ] {
        assert_eq!(c(sql), Class::Write, "{sql}");
    }
}

#[test]
fn data_modifying_ctes_are_writes() {
    for sql in [
        "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
        "WITH u AS (UPDATE t SET x = 1 RETURNING *) SELECT count(*) FROM u",
        "with i as (insert into t values (1) returning id) select id from i",
        "WITH m AS (MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE) SELECT 1",
    ] {
        assert_eq!(c(sql), Class::Write, "{sql}");
    }
}

#[test]
fn show_is_a_read() {
    assert_eq!(c("SHOW search_path"), Class::Show);
    assert!(c("show all").is_read());
}
