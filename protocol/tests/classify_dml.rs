//! Classifier: statements that change data or schema.
use pgheal_protocol::classify::{classify, Class};

#[test]
fn writes_and_ddl() {
    for sql in [
        "INSERT INTO t VALUES (1)",
        "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 1",
        "DELETE FROM t",
        "MERGE INTO t USING s ON true WHEN NOT MATCHED THEN INSERT VALUES (1)",
        "CREATE TABLE t (x int)",
        "ALTER TABLE t ADD COLUMN y int",
        "DROP TABLE t",
        "TRUNCATE t",
        "VACUUM t",
        "ANALYZE t",
        "GRANT SELECT ON t TO u",
        "CALL proc()",
        "DO $$ BEGIN END $$",
        "LOCK TABLE t",
        "LISTEN ch",
        "NOTIFY ch",
        "PREPARE p AS SELECT 1",
        "EXECUTE p",
        "DEALLOCATE p",
        "DECLARE c CURSOR FOR SELECT 1",
        "REFRESH MATERIALIZED VIEW v",
        "something unknown",
    ] {
        assert_eq!(classify(sql.as_bytes()), Class::Write, "{sql}");
    }
}
