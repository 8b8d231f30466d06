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
