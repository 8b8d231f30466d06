//! Parameters on the data path and at login.
//!
//! The settings check at every checkout in transaction mode: is the server
//! already set to the client's startup parameters? Clients that logged in
//! with the same parameters share one map (interned), so the usual answer
//! is a pointer comparison; an equal map of its own is walked.
//!
//! A login: its parameter set found by the startup packet's text (what
//! every login after the first of an application does) against made and
//! interned; the welcome's ParameterStatus messages,
//! kept with the server's set against written out.

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use pgheal::backend::params::{Interned, Params};
use pgheal_protocol::build;
use pgheal_protocol::startup::{self, StartupMessage, StartupPacket};

const SETTINGS: [(&str, &str); 5] = [
    ("application_name", "web"),
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, MDY"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "3"),
];

fn startup() -> Params {
    Params::from_startup(SETTINGS).expect("valid")
}

fn checkout(c: &mut Criterion) {
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

fn parse(packet: &[u8]) -> StartupMessage {
    match startup::parse(packet) {
        Ok(Some((StartupPacket::Startup(m), _))) => m,
        other => panic!("not a startup message: {other:?}"),
    }
}

fn login(c: &mut Criterion) {
    let mut packet = BytesMut::new();
    let mut pairs = vec![("user", "app"), ("database", "app")];
    pairs.extend(SETTINGS);
    build::startup_message(&mut packet, &pairs);
    let interned = Interned::default();
    let mut g = c.benchmark_group("login");
    let msg = parse(&packet);
    interned.from_startup(&msg).expect("valid");
    g.bench_function("parameters found by the packet's text", |b| {
        b.iter(|| interned.from_startup(black_box(&msg)))
    });
    g.bench_function("parameters made and interned", |b| {
        b.iter(|| interned.intern(Params::from_startup(black_box(&msg).params()).expect("valid")))
    });
    let mut reported = Params::default();
    for (name, value) in SETTINGS.iter().chain(&[
        ("server_version", "15.4"),
        ("server_encoding", "UTF8"),
        ("integer_datetimes", "on"),
        ("IntervalStyle", "postgres"),
        ("is_superuser", "off"),
        ("session_authorization", "app"),
        ("standard_conforming_strings", "on"),
        ("in_hot_standby", "off"),
    ]) {
        reported.set(name, value);
    }
    g.bench_function("welcome's ParameterStatus, kept", |b| {
        b.iter(|| black_box(&reported).status_messages().len())
    });
    g.bench_function("welcome's ParameterStatus, written", |b| {
        b.iter(|| {
            let mut out = BytesMut::with_capacity(512);
            for (name, value) in black_box(&reported).iter() {
                build::parameter_status(&mut out, name.as_bytes(), value.as_bytes());
            }
            out.len()
        })
    });
    g.finish();
}

criterion_group!(benches, checkout, login);
criterion_main!(benches);
