//! The check every Query of a recorded transaction goes through: does its
//! SQL name a function whose effects survive a rollback (`setval`,
//! `dblink`, ...)? The tpcb-like statements, and one long statement.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use pgheal::config::NeverReplayed;

const TPCB: [&str; 3] = [
    "UPDATE pgbench_accounts SET abalance = abalance + -3456 WHERE aid = 123456;",
    "SELECT abalance FROM pgbench_accounts WHERE aid = 123456;",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) \
     VALUES (42, 7, 123456, -3456, CURRENT_TIMESTAMP);",
];

fn bench(c: &mut Criterion) {
    let names = NeverReplayed::new(&["audit_me".into()]).expect("names");
    let long = format!("SELECT {} FROM t", "coalesce(a, b), ".repeat(60));
    let mut g = c.benchmark_group("never replayed");
    for (i, sql) in TPCB.iter().enumerate() {
        g.bench_function(format!("tpcb statement {i}"), |b| {
            b.iter(|| black_box(&names).found_in(black_box(sql.as_bytes())))
        });
    }
    g.bench_function("1 KiB statement", |b| {
        b.iter(|| black_box(&names).found_in(black_box(long.as_bytes())))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
