//! The settings check at every checkout in transaction mode: is the server
//! already set to the client's startup parameters? Clients that logged in
//! with the same parameters share one map (interned), so the usual answer
//! is a pointer comparison; an equal map of its own is walked.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use pgheal::backend::params::{Interned, Params};

fn startup() -> Params {
    let list: Vec<(String, String)> = [
        ("application_name", "web"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("TimeZone", "UTC"),
        ("extra_float_digits", "3"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Params::from_startup(&list).expect("valid")
}

fn bench(c: &mut Criterion) {
    let interned = Interned::default();
    let client = interned.intern(startup());
    let server_shared = interned.intern(startup());
    let server_own = startup();
    let mut g = c.benchmark_group("checkout settings check");
    g.bench_function("same parameters, shared map", |b| {
        b.iter(|| black_box(&server_shared).diff_sql(black_box(&client)))
    });
    g.bench_function("same parameters, a map of its own", |b| {
        b.iter(|| black_box(&server_own).diff_sql(black_box(&client)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
