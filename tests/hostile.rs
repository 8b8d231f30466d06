//! Hostile clients while pgbench runs through pgheal: garbage, handshakes
//! that never finish, 1 GB message headers, a client that never reads its
//! result. pgbench must see no failure, memory must stay bounded, and
//! every hostile connection must be closed by pgheal.

mod common;
use common::*;

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// Reads until pgheal closes the connection; true if it did within `within`.
async fn closed_by_peer(stream: &mut TcpStream, within: Duration) -> bool {
    let mut sink = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

async fn garbage(addr: std::net::SocketAddr, i: usize) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return true;
    };
    let junk: Vec<u8> = (0..200).map(|k| (k * 31 + i * 7) as u8).collect();
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let _ = s.write_all(&junk).await;
    closed_by_peer(&mut s, Duration::from_secs(30)).await
}

async fn never_finishes(addr: std::net::SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return true;
    };
    // Half a startup packet, then silence.
    let _ = s.write_all(&[0, 0, 0, 40, 0, 3]).await;
    closed_by_peer(&mut s, Duration::from_secs(30)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_do_not_hurt_pgbench() {
    let node = app_node().await;
    let proxy = start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nlogin_timeout = \"2s\"\n\
         [[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n\
         [[users]]\nname = \"raw\"\nauth = \"trust\"\n\
         [databases.app]\nnodes = [\"{}\"]\nuser = \"app\"\npassword = \"{APP_PASSWORD}\"\npool_size = 6\n",
        node.addr()
    ))
    .await;
    let url = app_url(&proxy);
    pgbench_init(&url).await;
    let addr = proxy.addr;
    let rss_before = rss_kib();

    // A client that asks for ~100 MB and never reads it.
    let mut sleeper = Raw::login(&proxy, "raw", "app").await;
    let mut q = BytesMut::new();
    pgheal_protocol::build::query(
        &mut q,
        "SELECT repeat('x', 1000) FROM generate_series(1, 100000)",
    );
    sleeper.send(&q).await;

    let bench = tokio::spawn(run(
        "pgbench",
        vec![
            "-S".into(),
            "-c".into(),
            "8".into(),
            "-j".into(),
            "2".into(),
            "-T".into(),
            "8".into(),
            url.clone(),
        ],
        None,
    ));

    let mut hostile = Vec::new();
    for i in 0..500 {
        hostile.push(tokio::spawn(garbage(addr, i)));
    }
    for _ in 0..200 {
        hostile.push(tokio::spawn(never_finishes(addr)));
    }
    // Logged-in clients announcing a 1 GB message.
    for _ in 0..20 {
        hostile.push(tokio::spawn({
            let proxy_addr = addr;
            async move {
                let Ok(mut s) = TcpStream::connect(proxy_addr).await else {
                    return true;
                };
                let mut out = BytesMut::new();
                pgheal_protocol::build::startup_message(
                    &mut out,
                    &[("user", "raw"), ("database", "app")],
                );
                out.extend_from_slice(&[b'Q', 0x40, 0, 0, 0]);
                out.extend_from_slice(&[b'x'; 1024]);
                let _ = s.write_all(&out).await;
                closed_by_peer(&mut s, Duration::from_secs(30)).await
            }
        }));
    }
    let mut open = 0;
    for h in hostile {
        if !h.await.expect("hostile task") {
            open += 1;
        }
    }
    assert_eq!(open, 0, "hostile connections left open by pgheal");

    let out = bench.await.expect("pgbench task");
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench: {stdout}\n{}",
        text(&out.stderr)
    );
    assert!(
        stdout.contains("number of failed transactions: 0 "),
        "{stdout}"
    );
    let processed: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("processed count");
    assert!(processed > 100, "{stdout}");

    // The non-reader's 100 MB stayed in PostgreSQL and the kernel, not in
    // pgheal: back-pressure, not buffering.
    let grown = rss_kib().saturating_sub(rss_before);
    assert!(grown < 64 * 1024, "RSS grew by {grown} KiB");
    println!("RSS before {rss_before} KiB, after {} KiB", rss_kib());
    drop(sleeper);
}
