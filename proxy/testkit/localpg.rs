//! Throwaway local PostgreSQL nodes, started from the binaries on this
//! machine: for `pgheal demo` and for the integration tests.
//!
//! Each node lives in its own temporary directory, listens on a free
//! loopback port, and is stopped by the PID of the postmaster it started.
//! When pgheal runs as root, PostgreSQL runs as the `postgres` user.

use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::{Pid, User};
use tokio::process::{Child, Command};

use crate::backend::conn::{ConnectSpec, ServerConn, UpstreamError};

/// The superuser every node is created with.
pub const SUPERUSER: &str = "postgres";
pub const SUPERUSER_PASSWORD: &str = "postgres";

#[derive(Debug, thiserror::Error)]
pub enum LocalPgError {
    #[error(
        "PostgreSQL server binaries not found (looked for initdb on PATH and in \
         /usr/lib/postgresql/*/bin); install them, e.g. `apt-get install postgresql`"
    )]
    NoBinaries,
    #[error("running as root, but there is no `postgres` user to run PostgreSQL as")]
    NoPostgresUser,
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("PostgreSQL on port {port} did not become ready within {waited:?}: {last}")]
    NotReady {
        port: u16,
        waited: Duration,
        last: String,
    },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Finds the directory holding initdb, pg_ctl and postgres.
pub fn find_bin_dir() -> Option<PathBuf> {
    let initdb = crate::ops::find_program("initdb")?;
    let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
    real.parent().map(Path::to_path_buf)
}

/// Ports handed out by [`free_port`]: below Linux's ephemeral range
/// (32768-60999), so no outgoing connection's source port takes one
/// between the check and the bind.
const PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A loopback port free now. Each process walks [`PORTS`] from its own
/// starting point, so concurrent callers (threads or test processes) do
/// not hand out the same port; a node that still loses the race retries
/// with another (see [`PgNode::start_new`]).
pub fn free_port() -> io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(PORTS.end - PORTS.start);
    let offset = std::process::id().wrapping_mul(97) % span;
    for _ in 0..span {
        let n = (offset + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = PORTS.start + n as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(io::Error::new(io::ErrorKind::AddrInUse, "no free port"))
}

/// Who PostgreSQL runs as: the postgres user when we are root.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

fn run_as() -> Result<Option<RunAs>, LocalPgError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let user = User::from_name("postgres")
        .ok()
        .flatten()
        .ok_or(LocalPgError::NoPostgresUser)?;
    Ok(Some(RunAs {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    }))
}

/// One PostgreSQL server in a temporary directory.
pub struct PgNode {
    pub port: u16,
    bin: PathBuf,
    /// Holds the directory; removed on drop.
    dir: tempfile::TempDir,
    run_as: Option<RunAs>,
    child: Option<Child>,
    /// `name=value` settings given at every start, after the defaults.
    options: Vec<String>,
}

impl PgNode {
    /// initdb a new cluster (superuser `postgres`/`postgres`, SCRAM over
    /// TCP) and start it.
    pub async fn start_new() -> Result<PgNode, LocalPgError> {
        Self::start_new_with(&[]).await
    }

    /// [`PgNode::start_new`] with `name=value` settings that override the
    /// defaults (e.g. `full_page_writes=on`, which pg_rewind needs).
    pub async fn start_new_with(options: &[&str]) -> Result<PgNode, LocalPgError> {
        let mut node = Self::create().await?;
        node.options = options.iter().map(|o| o.to_string()).collect();
        node.initdb().await?;
        node.first_start().await?;
        Ok(node)
    }

    /// A streaming replica of `primary`, made with `pg_basebackup -R`, started.
    pub async fn start_replica_of(primary: &PgNode) -> Result<PgNode, LocalPgError> {
        let mut node = Self::create().await?;
        node.options = primary.options.clone();
        let mut cmd = node.command("pg_basebackup");
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &primary.port.to_string(),
            "-U",
            SUPERUSER,
        ])
        .arg("-D")
        .arg(node.data_dir())
        .args(["-R", "-X", "stream", "-c", "fast"])
        .env("PGPASSWORD", SUPERUSER_PASSWORD);
        node.run("pg_basebackup", cmd).await?;
        node.first_start().await?;
        Ok(node)
    }

    /// Turns a stopped former primary into a replica of `source` with
    /// `pg_rewind` (crash recovery first if it was killed; `-R` writes
    /// standby.signal and a primary_conninfo naming `application_name`),
    /// then starts it. Needs `wal_log_hints` (or data checksums).
    pub async fn rewind_from(
        &mut self,
        source: &PgNode,
        application_name: &str,
    ) -> Result<(), LocalPgError> {
        let mut cmd = self.command("pg_rewind");
        cmd.arg("-D").arg(self.data_dir()).arg("-R").arg(format!(
            "--source-server=host=127.0.0.1 port={} user={SUPERUSER} password={SUPERUSER_PASSWORD} \
             dbname=postgres application_name={application_name}",
            source.port
        ));
        self.run("pg_rewind", cmd).await?;
        self.start().await
    }

    /// Promotes a replica and waits until it accepts writes.
    pub async fn promote(&self) -> Result<(), LocalPgError> {
        self.sql("postgres", "SELECT pg_promote(true, 60)").await
    }

    async fn create() -> Result<PgNode, LocalPgError> {
        let bin = find_bin_dir().ok_or(LocalPgError::NoBinaries)?;
        let run_as = run_as()?;
        let dir = tempfile::Builder::new().prefix("pgheal-pg-").tempdir()?;
        if let Some(r) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(r.uid), Some(r.gid))?;
        }
        Ok(PgNode {
            port: free_port()?,
            bin,
            dir,
            run_as,
            child: None,
            options: Vec::new(),
        })
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        if let Some(r) = self.run_as {
            cmd.uid(r.uid).gid(r.gid);
        }
        cmd.current_dir(self.dir.path())
            .env("LC_ALL", "C.UTF-8")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    async fn run(&self, what: &str, mut cmd: Command) -> Result<(), LocalPgError> {
        let out = cmd.output().await?;
        if out.status.success() {
            return Ok(());
        }
        Err(LocalPgError::Command {
            what: what.to_string(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }

    async fn initdb(&self) -> Result<(), LocalPgError> {
        let pwfile = self.dir.path().join("pwfile");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD)?;
        if let Some(r) = self.run_as {
            std::os::unix::fs::chown(&pwfile, Some(r.uid), Some(r.gid))?;
        }
        let mut cmd = self.command("initdb");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-U", SUPERUSER, "-E", "UTF8", "--no-locale", "-N"])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .arg(format!("--pwfile={}", pwfile.display()));
        self.run("initdb", cmd).await?;
        let hba = self.data_dir().join("pg_hba.conf");
        let mut text = std::fs::read_to_string(&hba)?;
        text.push_str("host replication all 127.0.0.1/32 scram-sha-256\n");
        std::fs::write(&hba, text)?;
        Ok(())
    }

    /// Puts `lines` at the top of pg_hba.conf (first match wins) and reloads.
    pub async fn prepend_hba(&self, lines: &str) -> Result<(), LocalPgError> {
        let hba = self.data_dir().join("pg_hba.conf");
        let text = std::fs::read_to_string(&hba)?;
        std::fs::write(&hba, format!("{lines}\n{text}"))?;
        self.signal(Signal::SIGHUP);
        Ok(())
    }

    /// The first start: when another process took the port meanwhile,
    /// starts again on another one.
    async fn first_start(&mut self) -> Result<(), LocalPgError> {
        for _ in 0..5 {
            match self.start().await {
                Err(e) if self.lost_port() => {
                    tracing::info!(port = self.port, error = %e, "port taken; trying another");
                    self.port = free_port()?;
                }
                other => return other,
            }
        }
        self.start().await
    }

    /// The last start failed because the port was in use.
    fn lost_port(&self) -> bool {
        std::fs::read_to_string(self.log_path())
            .is_ok_and(|log| log.contains("Address already in use"))
    }

    /// Starts the postmaster and waits until it accepts logins.
    pub async fn start(&mut self) -> Result<(), LocalPgError> {
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=300", "-c", "shared_buffers=32MB"])
            .args(["-c", "wal_level=replica", "-c", "max_wal_senders=10"])
            .args(self.options.iter().flat_map(|o| ["-c", o.as_str()]))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("postgres.log"))?);
        self.child = Some(cmd.spawn()?);
        self.wait_ready(Duration::from_secs(60)).await
    }

    async fn wait_ready(&mut self, within: Duration) -> Result<(), LocalPgError> {
        let deadline = tokio::time::Instant::now() + within;
        let mut last = String::from("not tried");
        while tokio::time::Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(LocalPgError::Command {
                    what: "postgres".into(),
                    detail: format!("exited with {status}: see {}", self.log_path().display()),
                });
            }
            match self.superuser_conn("postgres").await {
                Ok(conn) => {
                    conn.terminate().await;
                    return Ok(());
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(LocalPgError::NotReady {
            port: self.port,
            waited: within,
            last,
        })
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// A connection as the superuser to `database`.
    pub async fn superuser_conn(&self, database: &str) -> Result<ServerConn, UpstreamError> {
        ServerConn::connect(&ConnectSpec {
            addr: self.addr(),
            user: SUPERUSER.into(),
            password: Some(SUPERUSER_PASSWORD.into()),
            database: database.into(),
            connect_timeout: Duration::from_secs(5),
            application_name: Some("pgheal localpg"),
            tls: Default::default(),
            scram_keys: None,
        })
        .await
    }

    /// Runs SQL as the superuser; an error from the server is returned.
    pub async fn sql(&self, database: &str, sql: &str) -> Result<(), LocalPgError> {
        let fail = |e: UpstreamError| LocalPgError::Command {
            what: format!("SQL `{sql}`"),
            detail: e.to_string(),
        };
        let mut conn = self.superuser_conn(database).await.map_err(fail)?;
        let result = conn.run_quietly(sql).await.map_err(fail)?;
        conn.terminate().await;
        match result {
            Some(e) => Err(fail(e)),
            None => Ok(()),
        }
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().and_then(|c| c.id()).map(|p| p as i32)
    }

    fn signal(&self, sig: Signal) {
        if let Some(pid) = self.pid() {
            let _ = kill(Pid::from_raw(pid), sig);
        }
    }

    /// Fast shutdown, waiting for the postmaster to exit.
    pub async fn stop(&mut self) {
        self.signal(Signal::SIGINT);
        self.reap(Duration::from_secs(30)).await;
    }

    /// `kill -9` of the postmaster, as a crash.
    pub async fn kill9(&mut self) {
        self.signal(Signal::SIGKILL);
        self.reap(Duration::from_secs(10)).await;
    }

    async fn reap(&mut self, within: Duration) {
        if let Some(mut child) = self.child.take() {
            if tokio::time::timeout(within, child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
    }
}

impl Drop for PgNode {
    fn drop(&mut self) {
        // Immediate shutdown: the directory goes away right after.
        self.signal(Signal::SIGQUIT);
        if let Some(mut child) = self.child.take() {
            for _ in 0..200 {
                if !matches!(child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl PgNode {
    /// Turns on TLS with the given PEM certificate (chain) and key, then
    /// reloads. Files go into the data directory, owned by the server.
    pub async fn enable_ssl(&self, cert_pem: &str, key_pem: &str) -> Result<(), LocalPgError> {
        use std::os::unix::fs::PermissionsExt;
        for (name, text) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = self.data_dir().join(name);
            std::fs::write(&path, text)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            if let Some(r) = self.run_as {
                std::os::unix::fs::chown(&path, Some(r.uid), Some(r.gid))?;
            }
        }
        self.sql("postgres", "ALTER SYSTEM SET ssl = on").await?;
        self.sql("postgres", "SELECT pg_reload_conf()").await
    }
}
