//! What the soak saw, on one clock: every operation's latency, every error
//! a client was told, every fault's window, and a sample per second.

use std::sync::Mutex;
use std::time::Instant;

/// The faults the soak injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    KillPrimary,
    SplitBrain,
    BlackholePrimary,
    KillReplica,
    PauseReplay,
    RestartPrimary,
    ReloadPoolSize,
    HostileBurst,
}

impl FaultKind {
    pub const CYCLE: [FaultKind; 8] = [
        FaultKind::KillPrimary,
        FaultKind::ReloadPoolSize,
        FaultKind::KillReplica,
        FaultKind::BlackholePrimary,
        FaultKind::HostileBurst,
        FaultKind::PauseReplay,
        FaultKind::RestartPrimary,
        FaultKind::SplitBrain,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillPrimary => "kill -9 primary",
            FaultKind::SplitBrain => "kill -9 primary, old primary back undemoted",
            FaultKind::BlackholePrimary => "primary blackholed",
            FaultKind::KillReplica => "kill -9 replica",
            FaultKind::PauseReplay => "replica replay paused",
            FaultKind::RestartPrimary => "primary restarted",
            FaultKind::ReloadPoolSize => "RELOAD pool_size",
            FaultKind::HostileBurst => "hostile connections",
        }
    }

    /// The SQLSTATEs README's "What clients see" documents for the fault
    /// ("closed": the connection was closed after a FATAL, as README says
    /// for pinned sessions).
    pub fn allowed(self) -> &'static [&'static str] {
        match self {
            FaultKind::KillPrimary
            | FaultKind::SplitBrain
            | FaultKind::BlackholePrimary
            | FaultKind::RestartPrimary => &["08006", "25P02", "25006", "57P01", "57P02", "closed"],
            FaultKind::KillReplica => &["08006", "25P02", "57P01", "57P02", "closed"],
            FaultKind::PauseReplay | FaultKind::ReloadPoolSize | FaultKind::HostileBurst => &[],
        }
    }
}

/// A fault from its injection until the cluster was whole again.
#[derive(Debug, Clone)]
pub struct Window {
    pub kind: FaultKind,
    pub start: f64,
    pub end: f64,
    pub detail: String,
}

/// An error a client was told.
#[derive(Debug, Clone)]
pub struct Seen {
    pub t: f64,
    pub client: &'static str,
    pub code: String,
    pub message: String,
}

/// The once-a-second sample.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub t: f64,
    pub rss_kib: u64,
    pub anon_kib: u64,
    pub fds: u64,
    pub lag_bytes: u64,
    /// pgheal's pooled connections on each node (pg_stat_activity).
    pub conns: [u64; 3],
    /// The machine's CPU use since the previous sample, percent of all
    /// cores (from /proc/stat).
    pub cpu_busy: f64,
}

#[derive(Default)]
struct Inner {
    ops: Vec<(f32, f32)>,
    errors: Vec<Seen>,
    windows: Vec<Window>,
    samples: Vec<Sample>,
    violations: Vec<String>,
    pgbench_tps: Vec<(f64, f64)>,
}

pub struct Recorder {
    start: Mutex<Instant>,
    inner: Mutex<Inner>,
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            start: Mutex::new(Instant::now()),
            inner: Mutex::default(),
        }
    }

    pub fn now(&self) -> f64 {
        let start = *self.start.lock().unwrap_or_else(|e| e.into_inner());
        start.elapsed().as_secs_f64()
    }

    /// Time 0 is now: the load starts.
    pub fn start_clock(&self) {
        *self.start.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An operation that succeeded, started at `t` and taking `ms`.
    pub fn op(&self, t: f64, ms: f64) {
        self.inner().ops.push((t as f32, ms as f32));
    }

    pub fn error(&self, client: &'static str, code: &str, message: impl Into<String>) {
        let seen = Seen {
            t: self.now(),
            client,
            code: code.to_string(),
            message: message.into(),
        };
        self.inner().errors.push(seen);
    }

    /// Something that must never happen, whenever it happens.
    pub fn violation(&self, what: impl Into<String>) {
        let what = format!("{:.1}s: {}", self.now(), what.into());
        self.inner().violations.push(what);
    }

    pub fn window(&self, w: Window) {
        self.inner().windows.push(w);
    }

    pub fn sample(&self, s: Sample) {
        self.inner().samples.push(s);
    }

    pub fn pgbench_tps(&self, t: f64, tps: f64) {
        self.inner().pgbench_tps.push((t, tps));
    }

    pub fn snapshot(&self) -> Recorded {
        let i = self.inner();
        Recorded {
            ops: i.ops.clone(),
            errors: i.errors.clone(),
            windows: i.windows.clone(),
            samples: i.samples.clone(),
            violations: i.violations.clone(),
            pgbench_tps: i.pgbench_tps.clone(),
        }
    }
}

/// A copy of everything recorded, for the checks and the report.
pub struct Recorded {
    pub ops: Vec<(f32, f32)>,
    pub errors: Vec<Seen>,
    pub windows: Vec<Window>,
    pub samples: Vec<Sample>,
    pub violations: Vec<String>,
    pub pgbench_tps: Vec<(f64, f64)>,
}

impl Recorded {
    /// The window `t` falls in, if any.
    pub fn window_at(&self, t: f64) -> Option<&Window> {
        self.windows.iter().find(|w| w.start <= t && t <= w.end)
    }
}
