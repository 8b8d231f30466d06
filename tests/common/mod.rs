//! Test harness: real PostgreSQL nodes (see `pgheal::testkit::localpg`), pgheal in
//! the same process on a free port, and the real client programs.
#![allow(dead_code)]

use std::process::{Command, Output};
use std::time::Duration;

use pgheal::config::Config;
use pgheal::server::{self, Running};
use pgheal::testkit::localpg::PgNode;

pub const APP_PASSWORD: &str = "apppw";

/// A node with role `app` (password `apppw`) owning database `app`.
pub async fn app_node() -> PgNode {
    let node = PgNode::start_new().await.expect("start PostgreSQL");
    node.sql(
        "postgres",
        &format!("CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'"),
    )
    .await
    .expect("create role");
    node.sql("postgres", "CREATE DATABASE app OWNER app")
        .await
        .expect("create database");
    node
}

/// pgheal with `[[users]] app/apppw` and `[databases.app]` on `node`;
/// `extra` is appended to `[databases.app]`, `top` goes before it.
pub async fn proxy_with(node: &PgNode, top: &str, extra: &str) -> Running {
    // Probes get more than the default second: on 2 busy cores a probe
    // can take longer, and a node taken for down refuses writes. Failures
    // the tests cause are seen by refused connections, not timeouts.
    let health = if top.contains("[health]") || extra.contains("[health]") {
        ""
    } else {
        "[health]\ntimeout = \"5s\"\n"
    };
    let text = format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
{top}
{health}

[[users]]
name = "app"
password = "{APP_PASSWORD}"

[databases.app]
nodes = ["{addr}"]
{extra}
"#,
        addr = node.addr()
    );
    start(&text).await
}

pub async fn proxy(node: &PgNode) -> Running {
    proxy_with(node, "", "").await
}

pub async fn start(toml: &str) -> Running {
    // pgheal's own log at info unless RUST_LOG says otherwise: it is
    // captured per test and shown only when the test fails.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("pgheal=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_test_writer()
        .try_init();
    let config = Config::parse(toml).unwrap_or_else(|e| panic!("test config is invalid:\n{e}"));
    server::start(config).await.expect("start pgheal")
}

pub fn url(proxy: &Running, user: &str, password: &str, db: &str) -> String {
    format!(
        "postgres://{user}:{password}@127.0.0.1:{}/{db}?sslmode=disable",
        proxy.addr.port()
    )
}

pub fn app_url(proxy: &Running) -> String {
    url(proxy, "app", APP_PASSWORD, "app")
}

/// How long any client program a test runs may take.
pub const SUBPROCESS_DEADLINE: Duration = Duration::from_secs(180);

/// Runs `cmd` to completion, feeding it `stdin`, within `limit`. Past the
/// limit the process is killed and the test fails with what it printed so
/// far, so a hung program never stalls the suite.
pub fn output_within(mut cmd: Command, stdin: Option<Vec<u8>>, limit: Duration) -> Output {
    use std::io::{Read, Write};
    let shown = format!("{cmd:?}");
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let mut input = child.stdin.take().expect("stdin");
    let feed = std::thread::spawn(move || {
        if let Some(bytes) = stdin {
            let _ = input.write_all(&bytes);
        }
    });
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut all = Vec::new();
            let _ = r.read_to_end(&mut all);
            all
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let (o, e) = (
                out.join().unwrap_or_default(),
                err.join().unwrap_or_default(),
            );
            panic!(
                "{shown} did not finish within {limit:?}\nstdout:\n{}\nstderr:\n{}",
                text(&o),
                text(&e)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = feed.join();
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// [`output_within`] off the async runtime's threads.
pub async fn output_async(cmd: Command, stdin: Option<Vec<u8>>, limit: Duration) -> Output {
    tokio::task::spawn_blocking(move || output_within(cmd, stdin, limit))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Runs a client program (psql, pgbench) to completion within
/// [`SUBPROCESS_DEADLINE`].
pub async fn run(program: &str, args: Vec<String>, stdin: Option<Vec<u8>>) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(&args).env("PGCONNECT_TIMEOUT", "10");
    output_async(cmd, stdin, SUBPROCESS_DEADLINE).await
}

/// psql with `-X -q -v ON_ERROR_STOP=0 -At` and the given extra arguments.
pub async fn psql(url: &str, extra: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut args = vec![
        url.to_string(),
        "-X".into(),
        "-qAt".into(),
        "-v".into(),
        "ON_ERROR_STOP=0".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    run("psql", args, stdin.map(<[u8]>::to_vec)).await
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub async fn connect(url: &str) -> (tokio_postgres::Client, tokio::task::JoinHandle<()>) {
    let (client, conn) = tokio::time::timeout(
        Duration::from_secs(30),
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await
    .expect("connect timed out")
    .expect("connect through pgheal");
    let handle = tokio::spawn(async move {
        let _ = conn.await;
    });
    (client, handle)
}

/// The SQLSTATE of a tokio-postgres error.
pub fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no code: {e}"))
}

/// A client that speaks the wire protocol by hand, for the cases real
/// drivers never produce.
pub struct Raw {
    pub stream: tokio::net::TcpStream,
    buf: bytes::BytesMut,
}

impl Raw {
    pub async fn connect(proxy: &Running) -> Raw {
        let stream = tokio::net::TcpStream::connect(proxy.addr)
            .await
            .expect("connect");
        Raw {
            stream,
            buf: bytes::BytesMut::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await.expect("send");
    }

    /// Sends a StartupMessage for a trust user and reads up to ReadyForQuery.
    pub async fn login(proxy: &Running, user: &str, db: &str) -> Raw {
        let mut raw = Raw::connect(proxy).await;
        let mut out = bytes::BytesMut::new();
        pgheal_protocol::build::startup_message(&mut out, &[("user", user), ("database", db)]);
        raw.send(&out).await;
        raw.read_until(b'Z').await;
        raw
    }

    /// The next whole message as (tag, body), or None at end of stream.
    /// Panics if nothing arrives within 20 s.
    pub async fn next(&mut self) -> Option<(u8, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        loop {
            let found = pgheal_protocol::frame::message(&self.buf, 1 << 30).expect("framing");
            if let Some(m) = found {
                let (msg, len) = ((m.tag, m.body.to_vec()), m.len);
                let _ = self.buf.split_to(len);
                return Some(msg);
            }
            let read =
                tokio::time::timeout(Duration::from_secs(20), self.stream.read_buf(&mut self.buf));
            match read.await.expect("no answer from pgheal within 20 s") {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Reads messages up to and including one with `tag`; returns them all.
    pub async fn read_until(&mut self, tag: u8) -> Vec<(u8, Vec<u8>)> {
        let mut seen = Vec::new();
        while let Some(m) = self.next().await {
            let done = m.0 == tag;
            seen.push(m);
            if done {
                return seen;
            }
        }
        panic!("stream ended before {:?}; saw {:?}", tag as char, seen);
    }

    /// Reads to the end of the stream; returns the SQLSTATEs of any errors.
    pub async fn error_codes_until_closed(&mut self) -> Vec<String> {
        let mut codes = Vec::new();
        while let Some((tag, body)) = self.next().await {
            if tag == b'E' {
                let f = pgheal_protocol::backend::ErrorFields::parse(&body).expect("error fields");
                codes.push(text(f.code));
            }
        }
        codes
    }
}

/// SQLSTATE of an ErrorResponse body.
pub fn error_code(body: &[u8]) -> String {
    text(
        pgheal_protocol::backend::ErrorFields::parse(body)
            .expect("error fields")
            .code,
    )
}

/// The least time [`eventually`] waits: under coverage instrumentation,
/// with every test of a file running at once on 2 cores, a step that takes
/// milliseconds alone can take seconds. A passing test never waits it out.
pub const MIN_DEADLINE: Duration = Duration::from_secs(30);

/// Waits up to `within` (at least [`MIN_DEADLINE`]) for `check` to hold,
/// polling.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let within = within.max(MIN_DEADLINE);
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {within:?} waiting for {what}");
}

/// A TCP relay in front of a node that can stop forwarding without
/// closing anything, as a blackholed network does, or cut every connection
/// through it at once, as a broken network path does. `hold` stops
/// forwarding without losing bytes (they wait in the sockets' buffers, as
/// TCP retransmits through a network outage) until `release`.
pub struct Relay {
    pub port: u16,
    blackholed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    held: tokio::sync::watch::Sender<bool>,
    cuts: tokio::sync::watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: String) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let port = listener.local_addr().unwrap().port();
        let blackholed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (cuts, _) = tokio::sync::watch::channel(0u64);
        let (held, _) = tokio::sync::watch::channel(false);
        let flag = blackholed.clone();
        let (cut, hold) = (cuts.clone(), held.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let flag = flag.clone();
                let target = target.clone();
                let (up_cut, down_cut) = (cut.subscribe(), cut.subscribe());
                let (up_hold, down_hold) = (hold.subscribe(), hold.subscribe());
                tokio::spawn(async move {
                    let mut wait = down_hold.clone();
                    let _ = wait.wait_for(|held| !held).await;
                    let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(Relay::pipe(cr, sw, flag.clone(), up_cut, up_hold));
                    Relay::pipe(sr, cw, flag, down_cut, down_hold).await;
                });
            }
        });
        Relay {
            port,
            blackholed,
            held,
            cuts,
            accept,
        }
    }

    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        blackholed: std::sync::Arc<std::sync::atomic::AtomicBool>,
        mut cut: tokio::sync::watch::Receiver<u64>,
        mut held: tokio::sync::watch::Receiver<bool>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            tokio::select! {
                _ = held.wait_for(|held| !held) => {}
                _ = cut.changed() => return,
            }
            let n = tokio::select! {
                read = from.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
                // Both halves dropped: the peers see the connection close.
                _ = cut.changed() => return,
            };
            if blackholed.load(std::sync::atomic::Ordering::SeqCst) {
                continue; // dropped on the floor, nothing closed
            }
            // Read before a hold began: kept until it ends, like the rest.
            tokio::select! {
                _ = held.wait_for(|held| !held) => {}
                _ = cut.changed() => return,
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn blackhole(&self) {
        self.blackholed
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stops forwarding, holding the bytes, until [`Relay::release`].
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    pub fn release(&self) {
        self.held.send_replace(false);
    }

    /// Closes every connection through the relay; new ones still pass.
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// The first column of the first row of a simple query, as text.
pub async fn first_value(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Result<String, tokio_postgres::Error> {
    let rows = client.simple_query(sql).await?;
    Ok(rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_default())
}

/// The server process a client's next statement runs on.
pub async fn backend_pid(client: &tokio_postgres::Client) -> i32 {
    first_value(client, "SELECT pg_backend_pid()")
        .await
        .expect("pg_backend_pid()")
        .parse()
        .expect("a pid")
}

/// A test certificate authority and a server certificate it signed for
/// `localhost` and `127.0.0.1`, as PEM, written to a temporary directory.
pub struct TestCa {
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new() -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "pgheal test CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = params
            .signed_by(&key, &ca, &ca_key)
            .expect("server certificate");
        let dir = tempfile::tempdir().expect("temp dir");
        let t = TestCa {
            dir,
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        for (name, text) in [
            ("ca.pem", &t.ca_pem),
            ("cert.pem", &t.cert_pem),
            ("key.pem", &t.key_pem),
        ] {
            std::fs::write(t.path(name), text).expect("write PEM");
        }
        t
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// A tokio-postgres TLS connector that trusts this CA.
    pub fn rustls_client(&self) -> tokio_postgres_rustls::MakeRustlsConnect {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(cert.expect("CA PEM")).expect("CA certificate");
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_postgres_rustls::MakeRustlsConnect::new(config)
    }

    /// A `[tls]` section for pgheal with this certificate.
    pub fn section(&self, mode: &str) -> String {
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\nmode = \"{mode}\"\n",
            self.path("cert.pem"),
            self.path("key.pem")
        )
    }
}

/// A TCP port free on 127.0.0.1, outside the range the kernel hands out
/// for outgoing connections (see `pgheal::testkit::free_port`).
pub fn free_port() -> u16 {
    pgheal::testkit::free_port().expect("free port")
}

/// `pgbench -i -s 1 -q` against `url`; panics if it fails.
pub async fn pgbench_init(url: &str) {
    let args = ["-i", "-s", "1", "-q", url]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let init = run("pgbench", args, None).await;
    assert!(init.status.success(), "pgbench -i: {}", text(&init.stderr));
}

/// Waits up to 30 s until a client can log in at `url`.
pub async fn wait_accepting(url: &str) {
    eventually(Duration::from_secs(30), "pgheal to accept clients", || {
        let url = url.to_string();
        async move {
            tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .is_ok()
        }
    })
    .await;
}

/// Runs pgheal with `args` on a pseudo-terminal (util-linux `script`), as a
/// person at a terminal would: what it printed there.
pub async fn pgheal_on_a_terminal(args: &[String]) -> Output {
    pgheal_on_a_terminal_typing(args, None).await
}

/// [`pgheal_on_a_terminal`], with `typed` as what the person types.
pub async fn pgheal_on_a_terminal_typing(args: &[String], typed: Option<&[u8]>) -> Output {
    let line = std::iter::once(env!("CARGO_BIN_EXE_pgheal").to_string())
        .chain(args.iter().cloned())
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = Command::new("script");
    cmd.args(["-qefc", &line, "/dev/null"]);
    output_async(cmd, typed.map(<[u8]>::to_vec), SUBPROCESS_DEADLINE).await
}
