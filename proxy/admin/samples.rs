//! A ring of per-second samples for the status page's charts: the last 15
//! minutes of each database's transactions, rejected writes, retried reads,
//! waiting clients and replica lag per node, taken by one task while the
//! HTTP listener runs.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use crate::frontend::{App, TargetStats};
use crate::sync::lock;

/// Samples kept: 15 minutes, one a second.
pub const KEPT: usize = 15 * 60;

/// One second of one database.
#[derive(Debug, Clone, Default)]
pub struct DbSample {
    pub transactions: f64,
    pub rejected: f64,
    pub retried: f64,
    /// Clients waiting for a server.
    pub waiting: f64,
    /// Replay lag in seconds, by node.
    pub lag: BTreeMap<String, f64>,
}

/// One second, every database.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub at: Option<SystemTime>,
    pub databases: BTreeMap<String, DbSample>,
}

/// The ring, and each database's counters at the last sample (rates are
/// differences).
#[derive(Debug, Default)]
pub struct Samples {
    ring: Mutex<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    samples: VecDeque<Sample>,
    last: BTreeMap<String, [u64; 3]>,
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
        let mut sample = Sample {
            at: Some(SystemTime::now()),
            ..Sample::default()
        };
        let mut counts = BTreeMap::new();
        for (database, target) in app.targets() {
            let s = &target.stats;
            let now = [&s.transactions, &s.rejected, &s.retried].map(TargetStats::get);
            counts.insert(database.clone(), now);
            let db = sample.databases.entry(database).or_default();
            for n in &target.cluster.snapshot().nodes {
                db.lag
                    .insert(n.addr.to_string(), n.replay_lag.as_secs_f64());
            }
        }
        for pool in app.pools() {
            if let Some(db) = sample.databases.get_mut(&pool.database) {
                db.waiting += pool.waiting() as f64;
            }
        }
        let mut ring = lock(&self.ring);
        for (database, now) in &counts {
            let (Some(before), Some(db)) =
                (ring.last.get(database), sample.databases.get_mut(database))
            else {
                continue;
            };
            let rate = |i: usize| now[i].saturating_sub(before[i]) as f64;
            (db.transactions, db.rejected, db.retried) = (rate(0), rate(1), rate(2));
        }
        ring.last = counts;
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
