//! A ring of per-second samples for the status page's charts: the last 15
//! minutes of transactions, rejected writes, retried reads, waiting clients
//! (per database) and replica lag (per node), taken by one task while the
//! HTTP listener runs.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use crate::frontend::App;
use crate::sync::lock;

/// Samples kept: 15 minutes, one a second.
pub const KEPT: usize = 15 * 60;

/// One second of the whole process.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub at: Option<SystemTime>,
    pub transactions: f64,
    pub rejected: f64,
    pub retried: f64,
    /// Clients waiting for a server, by database.
    pub waiting: BTreeMap<String, f64>,
    /// Replay lag in seconds, by database and node.
    pub lag: BTreeMap<(String, String), f64>,
}

/// The ring, and the counters at the last sample (rates are differences).
#[derive(Debug, Default)]
pub struct Samples {
    ring: Mutex<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    samples: VecDeque<Sample>,
    last: Option<(u64, u64, u64)>,
}

impl Samples {
    /// Samples `app` every second until it is gone or shuts down.
    pub fn start(app: &Arc<App>) -> Arc<Samples> {
        let samples = Arc::new(Samples::default());
        tokio::spawn(every_second(Arc::downgrade(app), samples.clone()));
        samples
    }

    /// The samples kept, oldest first.
    pub fn all(&self) -> Vec<Sample> {
        lock(&self.ring).samples.iter().cloned().collect()
    }

    fn take(&self, app: &App) {
        let m = &app.metrics;
        let now = (m.transactions.get(), m.rejected_total(), m.retried_total());
        let mut sample = Sample {
            at: Some(SystemTime::now()),
            ..Sample::default()
        };
        for pool in app.pools() {
            *sample.waiting.entry(pool.database.clone()).or_default() += pool.waiting() as f64;
        }
        for (database, target) in app.targets() {
            for n in &target.cluster.snapshot().nodes {
                let key = (database.clone(), n.addr.to_string());
                sample.lag.insert(key, n.replay_lag.as_secs_f64());
            }
        }
        let mut ring = lock(&self.ring);
        if let Some(before) = ring.last {
            sample.transactions = now.0.saturating_sub(before.0) as f64;
            sample.rejected = now.1.saturating_sub(before.1) as f64;
            sample.retried = now.2.saturating_sub(before.2) as f64;
        }
        ring.last = Some(now);
        if ring.samples.len() == KEPT {
            ring.samples.pop_front();
        }
        ring.samples.push_back(sample);
    }
}

async fn every_second(app: Weak<App>, samples: Arc<Samples>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Some(app) = app.upgrade() else { return };
        if app.shutdown.is_cancelled() {
            return;
        }
        samples.take(&app);
    }
}
