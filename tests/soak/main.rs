//! The chaos soak: a primary and two synchronous replicas, pgheal in front
//! of them, every kind of client at once, and faults on a schedule with
//! jitter for `DURATION` (default 60s here; `benches/soak` runs 60m).
//! Passes only when every invariant held (see check.rs); prints a summary
//! and writes a per-second CSV and an SVG chart into `SOAK_OUT` (default
//! target/soak).
//!
//! Traffic goes to 127.0.0.1 only; every process it starts is its own and
//! is stopped at the end.

#[path = "../common/mod.rs"]
mod common;

mod check;
mod cluster;
mod faults;
mod load;
mod record;
mod report;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::common::{TestCa, APP_PASSWORD};
use crate::load::Ctx;
use crate::record::{Recorder, Sample};

/// pgheal's pool per node, and the size a RELOAD fault switches to.
pub const POOL: u64 = 12;
pub const POOL_LOW: u64 = 8;
pub const MIN_IDLE: u64 = 2;
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// What pgheal's configuration is made of.
struct Settings {
    port: u16,
    relays: Vec<String>,
    ca: TestCa,
}

impl Settings {
    fn config_text(&self, pool: u64) -> String {
        let nodes: Vec<String> = self.relays.iter().map(|r| format!("\"{r}\"")).collect();
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{}\"\npool_mode = \"transaction\"\n\
             max_client_connections = 5000\nshutdown_timeout = \"{}s\"\nlogin_timeout = \"10s\"\n\
             [pool]\ncheckout_timeout = \"30s\"\nidle_timeout = \"{}s\"\nconnect_timeout = \"3s\"\n\
             [health]\ntimeout = \"2s\"\n[failover]\nwrite_wait = \"10s\"\n{}\
             [[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n\
             [[users]]\nname = \"ops\"\npassword = \"opspw\"\nadmin = true\n\
             [databases.app]\nnodes = [{}]\npool_size = {pool}\nmin_idle = {MIN_IDLE}\n\
             read_routing = true\n",
            self.port,
            SHUTDOWN_TIMEOUT.as_secs(),
            IDLE_TIMEOUT.as_secs(),
            self.ca.section("prefer"),
            nodes.join(", ")
        )
    }
}

/// pgheal, run as its own process (its RSS and descriptors are measured).
pub struct Pgheal {
    pub child: tokio::process::Child,
    pub port: u16,
    pub config: PathBuf,
    pub log: PathBuf,
    settings: Settings,
    /// (time, pool_size) from the start and at each RELOAD.
    pub pool_sizes: Mutex<Vec<(f64, u64)>>,
}

impl Pgheal {
    async fn start(relays: Vec<String>, dir: &std::path::Path) -> Pgheal {
        let settings = Settings {
            port: common::free_port(),
            relays,
            ca: TestCa::new(),
        };
        let config = dir.join("pgheal.toml");
        let log = dir.join("pgheal.log");
        std::fs::write(&config, settings.config_text(POOL)).expect("config");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgheal"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "pgheal=info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .kill_on_drop(true)
            .spawn()
            .expect("pgheal");
        Pgheal {
            child,
            port: settings.port,
            config,
            log,
            settings,
            pool_sizes: Mutex::new(vec![(0.0, POOL)]),
        }
    }

    pub fn ca(&self) -> &TestCa {
        &self.settings.ca
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Rewrites the configuration with another pool_size and sends SIGHUP.
    pub fn reload(&self, pool: u64, at: f64) {
        std::fs::write(&self.config, self.settings.config_text(pool)).expect("config");
        self.pool_sizes.lock().unwrap().push((at, pool));
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP);
    }

    /// RSS, its anonymous part and open descriptors, from /proc.
    pub fn usage(&self) -> Usage {
        usage(self.pid())
    }
}

/// A process's memory and descriptors.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// VmRSS, KiB: everything resident, the executable's pages included.
    pub rss_kib: u64,
    /// RssAnon, KiB: the process's own memory (heap, stacks), where a leak
    /// shows; the rest of RSS is pages of the executable and libraries.
    pub anon_kib: u64,
    pub fds: u64,
}

/// A process's RSS, RssAnon and open descriptors, from /proc.
pub fn usage(pid: u32) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Usage {
        rss_kib: kib("VmRSS:"),
        anon_kib: kib("RssAnon:"),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64),
    }
}

/// The machine's (busy, total) CPU time so far, in ticks.
fn cpu_times() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn duration() -> Duration {
    let text = std::env::var("DURATION").unwrap_or_else(|_| "60s".into());
    humantime::parse_duration(&text).expect("DURATION, e.g. 90s or 60m")
}

/// Lets this process (and pgheal, its child) hold every client's socket.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak() {
    raise_fd_limit();
    let duration = duration();
    let out_dir = std::env::var("SOAK_OUT").map_or_else(
        |_| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../soak"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&out_dir).expect("output directory");
    let rec = Arc::new(Recorder::new());
    let mut cluster = Cluster::start().await;
    faults::prepare_schema(&cluster).await;
    let work = tempfile::tempdir().expect("dir");
    let relays = cluster.relays.iter().map(|r| r.addr()).collect();
    let pgheal = Pgheal::start(relays, work.path()).await;
    faults::wait_writable(pgheal.port, Duration::from_secs(60)).await;
    let ctx = Arc::new(Ctx {
        port: pgheal.port,
        password: APP_PASSWORD.into(),
        tls: pgheal.ca().rustls_client(),
        rec: rec.clone(),
        stop: CancellationToken::new(),
        acked: Mutex::default(),
        unknown: Mutex::default(),
        notified: Default::default(),
        notifications: Default::default(),
        pgbench_transactions: Default::default(),
    });
    let idle_count: usize = std::env::var("SOAK_IDLE").map_or(1000, |v| v.parse().unwrap_or(1000));
    let idle = load::idle_clients(&ctx, idle_count).await;
    rec.start_clock();
    let load = faults::start_load(&ctx);
    let primary = Arc::new(AtomicUsize::new(0));
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    let sampler = tokio::spawn(sample(
        rec.clone(),
        pgheal.pid(),
        ports,
        primary.clone(),
        ctx.stop.clone(),
    ));
    let mut schedule = faults::Schedule::new(rec.clone(), primary.clone());
    let cycles = schedule.run(&mut cluster, &pgheal, duration).await;
    ctx.stop.cancel();
    for task in load {
        let _ = tokio::time::timeout(Duration::from_secs(120), task).await;
    }
    let _ = sampler.await;
    let checked = check::after(&cluster, &pgheal, &ctx, &idle, &cycles).await;
    let seen = rec.snapshot();
    let summary = report::write(&out_dir, &seen, &ctx, &cycles, &checked);
    println!("{summary}");
    let mut broken = seen.violations.clone();
    broken.extend(check::during(&seen, &pgheal.pool_sizes.lock().unwrap()));
    broken.extend(checked.broken.iter().cloned());
    assert!(
        broken.is_empty(),
        "the soak broke {} invariant(s):\n  {}\n(pgheal's log: {})",
        broken.len(),
        broken.join("\n  "),
        pgheal.log.display()
    );
}

/// Once a second: pgheal's RSS and descriptors, the replicas' lag, and
/// pgheal's pooled connections on each node.
async fn sample(
    rec: Arc<Recorder>,
    pid: u32,
    ports: Vec<u16>,
    primary: Arc<AtomicUsize>,
    stop: CancellationToken,
) {
    let mut cpu = cpu_times();
    while !stop.is_cancelled() {
        let t = rec.now();
        let Usage {
            rss_kib,
            anon_kib,
            fds,
        } = usage(pid);
        let now = cpu_times();
        let (busy, total) = (now.0 - cpu.0, (now.1 - cpu.1).max(1));
        cpu = now;
        let mut conns = [0u64; 3];
        for (i, port) in ports.iter().enumerate() {
            conns[i] = cluster::pooled_on(*port).await;
        }
        let lag_bytes = cluster::lag_on(ports[primary.load(Ordering::Relaxed)]).await;
        rec.sample(Sample {
            t,
            rss_kib,
            anon_kib,
            fds,
            lag_bytes,
            conns,
            cpu_busy: busy as f64 * 100.0 / total as f64,
        });
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.cancelled() => {}
        }
    }
}
