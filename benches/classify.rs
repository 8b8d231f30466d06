//! What every Query costs before it is sent on: the statement classifier
//! (routing), the session-effects scan (pinning, SET carry, prepared
//! statements), and "per query": both in one pass (`analyze`, what a
//! session runs on a request's first Query) plus the exclusive-database
//! check, on typical statements (target: ≤ 1 µs each); and "statement
//! again": a Parse text pgheal has seen before (`backend::analysis`).

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use pgheal_protocol::classify::classify;
use pgheal_protocol::effects::{analyze, effects, exclusive_database};

const STATEMENTS: [(&str, &str); 6] = [
    ("pgbench select", "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"),
    (
        "pgbench -S simple",
        "SELECT abalance FROM pgbench_accounts WHERE aid = 812345;",
    ),
    (
        "pgbench update",
        "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;",
    ),
    (
        "orm select",
        "SELECT \"users\".\"id\", \"users\".\"email\", \"users\".\"created_at\" FROM \"users\" \
         WHERE \"users\".\"org_id\" = $1 AND \"users\".\"deleted_at\" IS NULL ORDER BY \"users\".\"id\" LIMIT 50",
    ),
    (
        "cte with comment",
        "/* dashboard */ WITH recent AS (SELECT * FROM orders WHERE created > now() - interval '1 day') \
         SELECT count(*), sum(total) FROM recent WHERE status = 'paid'",
    ),
    ("begin read only", "BEGIN READ ONLY"),
];

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("classify");
    for (name, sql) in STATEMENTS {
        g.bench_function(name, |b| b.iter(|| classify(black_box(sql.as_bytes()))));
    }
    g.finish();
    let mut g = c.benchmark_group("effects");
    for (name, sql) in STATEMENTS {
        g.bench_function(name, |b| b.iter(|| effects(black_box(sql.as_bytes()))));
    }
    g.finish();
    let mut g = c.benchmark_group("per query");
    for (name, sql) in STATEMENTS {
        g.bench_function(name, |b| {
            b.iter(|| {
                let sql = black_box(sql.as_bytes());
                (analyze(sql), exclusive_database(sql))
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("statement again");
    for (name, sql) in STATEMENTS {
        pgheal::backend::analysis::statement(sql.as_bytes());
        g.bench_function(name, |b| {
            b.iter(|| pgheal::backend::analysis::statement(black_box(sql.as_bytes())))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
