//! The startup phase answers as PostgreSQL does: the same bytes sent to a
//! server directly and through pgheal get the same severity, SQLSTATE and
//! close, and garbage before a startup packet a silent close.

mod common;
use common::*;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What a peer answered before closing: nothing, or the first message's
/// tag with (severity, SQLSTATE) when it was a v3 ErrorResponse.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    SilentClose,
    Error { severity: String, code: String },
    Other(u8),
}

async fn answer_to(addr: &str, bytes: &[u8]) -> Answer {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("send");
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut got))
        .await
        .expect("the peer closes within 15 s")
        .ok();
    match got.first() {
        None => Answer::SilentClose,
        Some(b'E') => {
            match pgheal_protocol::backend::ErrorFields::parse(got.get(5..).unwrap_or_default()) {
                Ok(f) if !f.code.is_empty() => Answer::Error {
                    severity: text(f.severity),
                    code: text(f.code),
                },
                // Protocol 2 clients get the old error format: no fields.
                _ => Answer::Other(b'E'),
            }
        }
        Some(&tag) => Answer::Other(tag),
    }
}

fn startup_packet(major: u16, minor: u16, params: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&((8 + params.len()) as i32).to_be_bytes());
    out.extend_from_slice(&major.to_be_bytes());
    out.extend_from_slice(&minor.to_be_bytes());
    out.extend_from_slice(params);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_failures_match_a_direct_connection() {
    let node = app_node().await;
    let proxy = proxy(&node).await;
    let through = proxy.addr.to_string();
    let cancel_too_long = {
        let mut b = vec![0, 0, 0, 20, 0x04, 0xd2, 0x16, 0x2e];
        b.extend_from_slice(&[0; 12]);
        b
    };
    let cases: Vec<(&str, Vec<u8>, Answer)> = vec![
        (
            "a query before the startup packet",
            b"Q\0\0\0\x0dSELECT 1\0".to_vec(),
            Answer::SilentClose,
        ),
        ("a length of 4", vec![0, 0, 0, 4], Answer::SilentClose),
        (
            "a 20-byte cancel request",
            cancel_too_long,
            Answer::SilentClose,
        ),
        (
            "protocol 4.0",
            startup_packet(4, 0, b"user\0app\0\0"),
            Answer::Error {
                severity: "FATAL".into(),
                code: "0A000".into(),
            },
        ),
        (
            "no terminator",
            startup_packet(3, 0, b"user\0app\0"),
            Answer::Error {
                severity: "FATAL".into(),
                code: "08P01".into(),
            },
        ),
        (
            "no user",
            startup_packet(3, 0, b"database\0app\0\0"),
            Answer::Error {
                severity: "FATAL".into(),
                code: "28000".into(),
            },
        ),
        (
            "protocol 2.0",
            startup_packet(2, 0, b"user\0app\0\0"),
            Answer::Other(b'E'),
        ),
    ];
    for (what, bytes, expected) in cases {
        let direct = answer_to(&node.addr(), &bytes).await;
        let proxied = answer_to(&through, &bytes).await;
        assert_eq!(direct, expected, "{what}: PostgreSQL itself");
        assert_eq!(proxied, direct, "{what}: pgheal differs from PostgreSQL");
    }
}

/// Message tags of a trust login from the start to the end of the stream
/// or the first ReadyForQuery, with each error's SQLSTATE.
async fn login_answer(addr: &str, user: &str, database: &str) -> Vec<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut out = bytes::BytesMut::new();
    let params = [("user", user), ("database", database)];
    pgheal_protocol::build::startup_message(&mut out, &params);
    s.write_all(&out).await.expect("send");
    let mut buf = bytes::BytesMut::new();
    let mut seen = Vec::new();
    loop {
        while let Some(m) = pgheal_protocol::frame::message(&buf, 1 << 20).expect("framing") {
            let entry = match m.tag {
                b'E' => {
                    let f = pgheal_protocol::backend::ErrorFields::parse(m.body).expect("error");
                    format!("E {}", text(f.code))
                }
                b'R' => format!("R {:?}", m.body),
                tag => (tag as char).to_string(),
            };
            let (done, len) = (m.tag == b'Z', m.len);
            seen.push(entry);
            let _ = buf.split_to(len);
            if done {
                return seen;
            }
        }
        let read = tokio::time::timeout(Duration::from_secs(15), s.read_buf(&mut buf));
        match read.await.expect("an answer within 15 s") {
            Ok(0) | Err(_) => return seen,
            Ok(_) => {}
        }
    }
}

/// pgheal sends AuthenticationOk together with what follows it; the
/// client still sees PostgreSQL's sequence: AuthenticationOk, then the
/// welcome, or then the error when the database does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_authentication_the_messages_match_a_direct_connection() {
    let node = app_node().await;
    node.sql("postgres", "CREATE ROLE tr LOGIN")
        .await
        .expect("role");
    node.prepend_hba("host all tr 127.0.0.1/32 trust")
        .await
        .expect("hba");
    let proxy = start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\
         [[users]]\nname = \"tr\"\nauth = \"trust\"\n\
         [databases.app]\nnodes = [\"{}\"]\nuser = \"app\"\npassword = \"{APP_PASSWORD}\"\n",
        node.addr()
    ))
    .await;
    let through = proxy.addr.to_string();

    let direct = login_answer(&node.addr(), "tr", "nosuchdb").await;
    assert_eq!(direct, ["R [0, 0, 0, 0]", "E 3D000"], "PostgreSQL itself");
    assert_eq!(login_answer(&through, "tr", "nosuchdb").await, direct);

    let direct = login_answer(&node.addr(), "tr", "app").await;
    let proxied = login_answer(&through, "tr", "app").await;
    let shape = |seen: &[String]| {
        let mut kinds: Vec<String> = seen.to_vec();
        kinds.dedup_by(|a, b| a == "S" && b == "S");
        kinds
    };
    assert_eq!(
        shape(&direct),
        ["R [0, 0, 0, 0]", "S", "K", "Z"],
        "PostgreSQL itself"
    );
    assert_eq!(shape(&proxied), shape(&direct));
}

/// pgheal does not carry the replication protocol: a replication
/// connection is refused with 0A000 before authentication, and
/// `replication=off` (what some drivers send) is an ordinary login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replication_connection_is_refused_and_replication_off_is_not() {
    let node = app_node().await;
    let proxy = proxy(&node).await;
    let through = proxy.addr.to_string();
    let refused = startup_packet(3, 0, b"user\0app\0replication\0database\0\0");
    assert_eq!(
        answer_to(&through, &refused).await,
        Answer::Error {
            severity: "FATAL".into(),
            code: "0A000".into(),
        }
    );
    let plain = startup_packet(3, 0, b"user\0app\0replication\0off\0database\0app\0\0");
    let mut s = tokio::net::TcpStream::connect(&through)
        .await
        .expect("connect");
    s.write_all(&plain).await.expect("send");
    let mut first = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(15), s.read_exact(&mut first))
        .await
        .expect("an answer within 15 s")
        .expect("read");
    assert_eq!(first[0], b'R', "asked to authenticate");
}
