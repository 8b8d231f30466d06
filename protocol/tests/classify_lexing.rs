//! Classifier: comments, quoting and dollar quoting hide keywords.
use pgheal_protocol::classify::{classify, Class};
use proptest::prelude::*;

fn c(sql: &str) -> Class {
    classify(sql.as_bytes())
}

#[test]
fn keywords_inside_literals_and_comments_do_not_count() {
    for sql in [
        "SELECT 'DELETE FROM t'",
        "SELECT 'it''s; DELETE FROM t'",
        "SELECT E'\\' ; DELETE FROM t'",
        "SELECT \"update\" FROM t",
        "SELECT $$ INSERT INTO t $$",
        "SELECT $body$ ; UPDATE x $body$",
        "SELECT 1 -- ; DELETE FROM t",
        "SELECT /* ; DELETE /* nested */ FROM t */ 1",
        "/* leading */ SELECT 1",
        "-- leading\nSELECT 1",
        "SELECT $1::int",
    ] {
        assert_eq!(c(sql), Class::Read, "{sql}");
    }
}

#[test]
fn statements_after_a_closed_literal_count() {
    assert_eq!(c("SELECT 'x'; DELETE FROM t"), Class::Write);
    assert_eq!(c("SELECT $$x$$; DELETE FROM t"), Class::Write);
    assert_eq!(c("/* c */ DELETE FROM t"), Class::Write);
    // An unreserved keyword used as a column is not provably a read.
    assert_eq!(c("SELECT update FROM t"), Class::Write);
}

#[test]
fn unterminated_input_is_not_a_problem() {
    for sql in [
        "SELECT 'abc",
        "SELECT $$abc",
        "SELECT /* abc",
        "SELECT \"abc",
        "SELECT E'\\",
    ] {
        let _ = c(sql);
    }
}

proptest! {
    #[test]
    fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = classify(&data);
    }
}
