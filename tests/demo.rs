//! `pgheal demo` as a person would use it: start it, copy the URL, run
//! psql, press Ctrl-C, and find nothing left behind.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_prints_a_working_url_and_cleans_up_on_ctrl_c() {
    let port = pgheal::testkit::localpg::free_port().unwrap();
    let mut demo = Command::new(env!("CARGO_BIN_EXE_pgheal"))
        .args(["demo", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = demo.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let done = line.starts_with("Press Ctrl-C");
            seen.push(line);
            if done {
                break;
            }
        }
        seen
    });
    let lines = tokio::time::timeout(Duration::from_secs(120), lines)
        .await
        .expect("demo started")
        .unwrap();
    let url = lines
        .iter()
        .find_map(|l| l.strip_prefix("DATABASE_URL="))
        .unwrap_or_else(|| panic!("no DATABASE_URL in {lines:?}"))
        .to_string();
    let pg_addrs: Vec<String> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("PostgreSQL "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    assert_eq!(pg_addrs.len(), 2, "a primary and a replica: {lines:?}");

    let out = psql(
        &url,
        &[
            "-c",
            "CREATE TABLE t(x int)",
            "-c",
            "INSERT INTO t VALUES (42)",
            "-c",
            "SELECT x FROM t",
        ],
        None,
    )
    .await;
    assert_eq!(text(&out.stdout).trim(), "42", "{}", text(&out.stderr));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(demo.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = demo.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "demo did not exit after Ctrl-C"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    // Its PostgreSQL nodes are gone too.
    for addr in &pg_addrs {
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "PostgreSQL still listening on {addr}"
        );
    }
}
