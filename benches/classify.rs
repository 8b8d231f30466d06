//! The statement classifier on typical statements (target: ≤ 1 µs each).

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use pgheal_protocol::classify::classify;

const STATEMENTS: [(&str, &str); 5] = [
    ("pgbench select", "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"),
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
}

criterion_group!(benches, bench);
criterion_main!(benches);
