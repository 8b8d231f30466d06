//! Micro benchmarks: scanning a server response stream by headers, and
//! parsing startup packets.

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use pgheal_protocol::build;
use pgheal_protocol::frame::{Scanner, Step};
use pgheal_protocol::startup;

/// A typical `pgbench -S`-like answer repeated: RowDescription, DataRow,
/// CommandComplete, ReadyForQuery; plus a 100-row result.
fn response_stream() -> Vec<u8> {
    let mut out = Vec::new();
    let msg = |out: &mut Vec<u8>, tag: u8, body: &[u8]| {
        out.push(tag);
        out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        out.extend_from_slice(body);
    };
    for _ in 0..100 {
        msg(
            &mut out,
            b'T',
            b"\0\x01abalance\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
        );
        msg(&mut out, b'D', b"\0\x01\0\0\0\x041234");
        msg(&mut out, b'C', b"SELECT 1\0");
        msg(&mut out, b'Z', b"I");
    }
    for i in 0..100u32 {
        let v = format!("row number {i} with some text");
        let mut body = vec![0, 1];
        body.extend_from_slice(&(v.len() as i32).to_be_bytes());
        body.extend_from_slice(v.as_bytes());
        msg(&mut out, b'D', &body);
    }
    out
}

fn scan_all(data: &[u8], chunk: usize) -> usize {
    let mut sc = Scanner::new(1 << 30);
    let mut pos = 0;
    let mut ready = 0;
    let whole = |t| t == b'Z' || t == b'S' || t == b'E';
    for end in (chunk..data.len() + chunk).step_by(chunk) {
        let end = end.min(data.len());
        loop {
            match sc.next(&data[pos..end], whole) {
                Ok(Step::NeedMore) | Err(_) => break,
                Ok(step) => {
                    if let Step::Whole { tag: b'Z', .. } = step {
                        ready += 1;
                    }
                    pos += step.consumed();
                }
            }
        }
    }
    ready
}

fn framing(c: &mut Criterion) {
    let data = response_stream();
    let mut g = c.benchmark_group("scanner");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("server stream, 16 KiB reads", |b| {
        b.iter(|| scan_all(black_box(&data), 16 * 1024))
    });
    g.bench_function("server stream, 1 KiB reads", |b| {
        b.iter(|| scan_all(black_box(&data), 1024))
    });
    g.finish();
}

fn startup_parse(c: &mut Criterion) {
    let mut buf = BytesMut::new();
    build::startup_message(
        &mut buf,
        &[
            ("user", "app"),
            ("database", "app"),
            ("application_name", "pgbench"),
            ("client_encoding", "UTF8"),
            ("options", "-c search_path=public"),
        ],
    );
    c.bench_function("startup packet", |b| {
        b.iter(|| startup::parse(black_box(&buf)))
    });
}

criterion_group!(benches, framing, startup_parse);
criterion_main!(benches);
