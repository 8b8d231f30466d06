//! Progress lines for the command line's long work (`pgheal backup now`),
//! shown on a terminal only: a backup's bytes written and time so far,
//! redrawn in place.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Redraws "DB: N bytes written, T s" for each dump being written into
/// `dir` (its `.DB-....dump.tmp` files) until dropped.
pub struct BackupProgress {
    task: tokio::task::JoinHandle<()>,
}

impl BackupProgress {
    pub fn start(dir: PathBuf) -> BackupProgress {
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                if let Some(line) = status(&dir, started.elapsed()) {
                    let mut out = std::io::stdout().lock();
                    let _ = write!(out, "\r\x1b[K{line}");
                    let _ = out.flush();
                }
            }
        });
        BackupProgress { task }
    }
}

impl Drop for BackupProgress {
    fn drop(&mut self) {
        self.task.abort();
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "\r\x1b[K");
        let _ = out.flush();
    }
}

/// The dumps in progress in `dir`, as one line.
fn status(dir: &Path, elapsed: Duration) -> Option<String> {
    let mut parts = Vec::new();
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix('.').filter(|n| n.ends_with(".dump.tmp")) else {
            continue;
        };
        let database = rest.rsplit_once('-').map_or(rest, |(db, _)| db);
        let bytes = entry.metadata().map_or(0, |m| m.len());
        parts.push(format!("{database}: {bytes} bytes written"));
    }
    let what = if parts.is_empty() {
        "connecting".to_string()
    } else {
        parts.join(", ")
    };
    Some(format!("backup: {what}, {:.1} s", elapsed.as_secs_f64()))
}

/// Redraws "restore: N objects, T s: OBJECT" as pg_restore goes, at most
/// every 100 ms; shows nothing when not on a terminal.
pub struct RestoreLine {
    on: bool,
    started: Instant,
    last: std::sync::Mutex<Option<Instant>>,
}

impl RestoreLine {
    pub fn new(on: bool) -> RestoreLine {
        RestoreLine {
            on,
            started: Instant::now(),
            last: std::sync::Mutex::new(None),
        }
    }

    pub fn show(&self, objects: usize, current: &str) {
        if !self.on {
            return;
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < Duration::from_millis(100)) {
            return;
        }
        *last = Some(Instant::now());
        let elapsed = self.started.elapsed().as_secs_f64();
        let current: String = current.chars().take(60).collect();
        let mut out = std::io::stdout().lock();
        let _ = write!(
            out,
            "\r\x1b[Krestore: {objects} objects, {elapsed:.1} s: {current}"
        );
        let _ = out.flush();
    }
}

impl Drop for RestoreLine {
    fn drop(&mut self) {
        if self.on {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "\r\x1b[K");
            let _ = out.flush();
        }
    }
}
