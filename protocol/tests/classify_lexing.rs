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

#[test]
fn a_word_right_after_digits_still_counts() {
    // PostgreSQL before 15 reads `1into` as `1 into`, and before 16
    // `1_000` as `1 _000`: the word after the digits is a word.
    assert_eq!(c("SELECT 1INTO t"), Class::Write);
    assert_eq!(c("SELECT 1.5e3, 0x1F, 12345 FROM t"), Class::Read);
    assert_eq!(c("SELECT 2FOR UPDATE"), Class::Write);
    assert_eq!(c("SELECT 12345nextval('s')"), Class::Write);
    assert_eq!(c("SELECT 1_000"), Class::Read);
}

#[test]
fn keywords_in_any_case_and_of_any_length() {
    assert_eq!(c("sElEcT pg_TRY_advisory_LOCK_shared(1)"), Class::Write);
    assert_eq!(c("select pg_advisory_xact_lock(1)"), Class::Read);
    assert_eq!(
        c("StArT tRaNsAcTiOn ReAd OnLy"),
        Class::Begin { read_only: true }
    );
    assert_eq!(
        c("SELECT abalance FROM pgbench_accounts WHERE aid = 812345;"),
        Class::Read
    );
    assert_eq!(c("COMMIT PREPARED 'x'"), Class::Write);
    assert_eq!(c("select * from t for share"), Class::Write);
    assert_eq!(c("select share, update_count from t"), Class::Read);
}

/// Words and pieces SQL is made of, keywords of every kind among them.
const PIECES: &[&str] = &[
    "select",
    "SELECT",
    "with",
    "values",
    "show",
    "explain",
    "analyze",
    "copy",
    "to",
    "from",
    "set",
    "SET",
    "reset",
    "local",
    "session",
    "role",
    "time",
    "zone",
    "begin",
    "start",
    "transaction",
    "read",
    "only",
    "write",
    "commit",
    "end",
    "rollback",
    "abort",
    "prepared",
    "savepoint",
    "release",
    "insert",
    "update",
    "delete",
    "merge",
    "into",
    "temp",
    "temporary",
    "for",
    "no",
    "key",
    "share",
    "hold",
    "declare",
    "cursor",
    "listen",
    "create",
    "or",
    "replace",
    "discard",
    "all",
    "prepare",
    "execute",
    "deallocate",
    "pg_advisory_lock",
    "pg_try_advisory_lock_shared",
    "nextval",
    "t",
    "x",
    "42",
    "1into",
    "$1",
    "'a;b'",
    "\"q\"",
    "$$;$$",
    "-- c\n",
    "/* ; */",
    ";",
    "(",
    ")",
    "=",
    ",",
    " ",
    " ",
    "\n",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// The one-pass analysis a session runs on a request's first Query
    /// answers as the classifier and the effects scan do apart.
    #[test]
    fn analyze_agrees_with_classify_and_effects(
        picks in proptest::collection::vec(0..PIECES.len(), 0..16)
    ) {
        let sql: String = picks.iter().map(|&i| PIECES[i]).collect::<Vec<_>>().join(" ");
        let (class, effects) = pgheal_protocol::effects::analyze(sql.as_bytes());
        prop_assert_eq!(class, c(&sql), "{}", sql);
        prop_assert_eq!(effects, pgheal_protocol::effects::effects(sql.as_bytes()), "{}", sql);
    }
}
