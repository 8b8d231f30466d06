//! Classifier: SET/RESET, COPY direction, EXPLAIN [ANALYZE].
use pgheal_protocol::classify::{classify, Class};

fn c(sql: &str) -> Class {
    classify(sql.as_bytes())
}

#[test]
fn settings() {
    assert_eq!(c("SET search_path = a"), Class::Set { local: false });
    assert_eq!(
        c("set local statement_timeout = 5"),
        Class::Set { local: true }
    );
    assert_eq!(c("RESET ALL"), Class::Set { local: false });
    assert_eq!(
        c("SET SESSION TimeZone TO 'UTC'"),
        Class::Set { local: false }
    );
}

#[test]
fn copy_direction() {
    assert_eq!(c("COPY t TO STDOUT"), Class::Read);
    assert_eq!(
        c("COPY (SELECT * FROM t) TO STDOUT WITH (FORMAT csv)"),
        Class::Read
    );
    assert_eq!(c("COPY t FROM STDIN"), Class::Write);
    assert_eq!(c("COPY t (a, b) FROM STDIN"), Class::Write);
    assert_eq!(
        c("COPY (DELETE FROM t RETURNING *) TO STDOUT"),
        Class::Write
    );
}

#[test]
fn explain() {
    assert_eq!(c("EXPLAIN SELECT 1"), Class::Read);
    assert_eq!(c("EXPLAIN UPDATE t SET x = 1"), Class::Read, "plans only");
    assert_eq!(c("EXPLAIN ANALYZE SELECT 1"), Class::Read);
    assert_eq!(c("EXPLAIN ANALYZE UPDATE t SET x = 1"), Class::Write);
    assert_eq!(c("EXPLAIN (ANALYZE, BUFFERS) DELETE FROM t"), Class::Write);
}
