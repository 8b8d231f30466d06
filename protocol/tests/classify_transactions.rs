//! Classifier: transaction control and savepoints.
use pgheal_protocol::classify::{classify, Class};

fn c(sql: &str) -> Class {
    classify(sql.as_bytes())
}

#[test]
fn begin_and_its_modes() {
    assert_eq!(c("BEGIN"), Class::Begin { read_only: false });
    assert_eq!(c("begin transaction"), Class::Begin { read_only: false });
    assert_eq!(c("BEGIN READ ONLY"), Class::Begin { read_only: true });
    assert_eq!(
        c("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"),
        Class::Begin { read_only: true }
    );
    assert_eq!(
        c("BEGIN ISOLATION LEVEL READ COMMITTED"),
        Class::Begin { read_only: false }
    );
    assert_eq!(c("BEGIN READ WRITE"), Class::Begin { read_only: false });
}

#[test]
fn endings_and_savepoints() {
    assert_eq!(c("COMMIT"), Class::Commit);
    assert_eq!(c("END"), Class::Commit);
    assert_eq!(c("ROLLBACK"), Class::Rollback);
    assert_eq!(c("abort"), Class::Rollback);
    assert_eq!(c("SAVEPOINT a"), Class::Savepoint);
    assert_eq!(c("RELEASE SAVEPOINT a"), Class::Savepoint);
    assert_eq!(c("ROLLBACK TO SAVEPOINT a"), Class::Savepoint);
    assert_eq!(c("COMMIT PREPARED 'x'"), Class::Write);
    assert_eq!(c("ROLLBACK PREPARED 'x'"), Class::Write);
    assert_eq!(c("PREPARE TRANSACTION 'x'"), Class::Write);
}

#[test]
fn several_statements() {
    assert_eq!(c("SELECT 1; SELECT 2"), Class::Read);
    assert_eq!(c("SELECT 1; SHOW x;"), Class::Read);
    assert_eq!(c("BEGIN; SELECT 1; COMMIT"), Class::Write);
    assert_eq!(c("SELECT 1; INSERT INTO t VALUES (1)"), Class::Write);
    assert_eq!(c("COMMIT;"), Class::Commit);
}

#[test]
fn where_a_query_begins_and_ends_a_transaction() {
    use pgheal_protocol::effects::effects;
    let ends = |sql: &str| effects(sql.as_bytes()).ends_transaction;
    for ending in [
        "COMMIT",
        "end",
        "ROLLBACK",
        "abort",
        "PREPARE TRANSACTION 'x'",
        "BEGIN; INSERT INTO t VALUES (1); COMMIT",
        "update t set x = 1; end;",
    ] {
        assert!(ends(ending), "{ending}");
    }
    for not_ending in [
        "ROLLBACK TO SAVEPOINT a",
        "BEGIN; UPDATE t SET x = 1",
        "SELECT CASE WHEN x THEN 1 END FROM t",
        "SELECT 'commit'",
        "PREPARE p AS SELECT 1",
        "SELECT 1 -- COMMIT",
        "(SELECT 1)",
        "",
    ] {
        assert!(!ends(not_ending), "{not_ending}");
    }
}

#[test]
fn a_transaction_start_is_seen_from_the_first_words() {
    use pgheal_protocol::classify::starts_transaction;
    for yes in [
        "BEGIN",
        "begin;",
        " /* x */ Start Transaction read only",
        "BEGIN; SELECT 1",
        "-- note\n\tbegin",
        "\r\n\x0cBEGIN",
    ] {
        assert!(starts_transaction(yes.as_bytes()), "{yes}");
    }
    for no in [
        "SELECT 1; BEGIN",
        "START",
        "start replication",
        "'begin'",
        "",
        "beginning",
        "  started",
        "\"begin\"",
    ] {
        assert!(!starts_transaction(no.as_bytes()), "{no}");
    }
}
