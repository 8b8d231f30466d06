//! The fault schedule: one fault after another, each kind in turn, with
//! jittered quiet periods between them (where no client may see an error)
//! and each fault's window lasting until the cluster and pgheal are whole
//! again. Also the schema and the load's start.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::io::AsyncWriteExt;

use crate::cluster::Cluster;
use crate::load::{self, Ctx};
use crate::record::{FaultKind, Recorder, Window};
use crate::{Pgheal, POOL, POOL_LOW};

/// pgbench's tables (scale 1) and the ledger, on the primary.
pub async fn prepare_schema(cluster: &Cluster) {
    let p = cluster.primary();
    let url = format!(
        "host=127.0.0.1 port={} user=postgres password={} dbname=app",
        p.port,
        pgheal::testkit::localpg::SUPERUSER_PASSWORD
    );
    crate::common::pgbench_init(&url).await;
    p.sql(
        "app",
        "CREATE TABLE ledger (id bigint NOT NULL, writer int NOT NULL, at timestamptz DEFAULT now()); \
         CREATE INDEX ON ledger (writer, id); \
         CREATE TABLE soak_probe (t timestamptz); \
         GRANT ALL ON ALL TABLES IN SCHEMA public TO app",
    )
    .await
    .expect("schema");
    assert!(cluster.wait_whole(Duration::from_secs(60)).await);
}

/// Waits until a write through pgheal succeeds; false if it did not.
pub async fn wait_writable(port: u16, within: Duration) -> bool {
    let url = format!(
        "postgres://app:{}@127.0.0.1:{port}/app?sslmode=disable&connect_timeout=5",
        crate::common::APP_PASSWORD
    );
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        let attempt = async {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            let driver = tokio::spawn(conn);
            let done = client
                .batch_execute("INSERT INTO soak_probe VALUES (now())")
                .await;
            driver.abort();
            done
        };
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(15), attempt).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

/// Every client of the soak, each its own task.
pub fn start_load(ctx: &Arc<Ctx>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = vec![
        tokio::spawn(load::pgbench(ctx.clone(), 100)),
        tokio::spawn(load::ledger_writer(ctx.clone(), 0, 2)),
        tokio::spawn(load::ledger_writer(ctx.clone(), 1, 2)),
        tokio::spawn(load::reader(ctx.clone(), false)),
        tokio::spawn(load::reader(ctx.clone(), true)),
        tokio::spawn(load::churn(ctx.clone())),
        tokio::spawn(load::notifier(ctx.clone())),
        tokio::spawn(load::listener(ctx.clone())),
    ];
    for k in 1..=2 {
        tasks.push(tokio::spawn(load::pinned(ctx.clone(), k)));
    }
    tasks
}

/// pgheal's RSS and descriptors at the end of each full cycle of faults.
#[derive(Debug, Clone)]
pub struct CycleEnd {
    pub t: f64,
    pub rss_kib: u64,
    pub anon_kib: u64,
    pub fds: u64,
}

pub struct Schedule {
    rec: Arc<Recorder>,
    primary: Arc<AtomicUsize>,
    injected: usize,
}

/// `base` scaled by a random factor in [0.7, 1.3].
fn jitter(base: Duration) -> Duration {
    base.mul_f64(rand::thread_rng().gen_range(0.7..1.3))
}

impl Schedule {
    pub fn new(rec: Arc<Recorder>, primary: Arc<AtomicUsize>) -> Schedule {
        Schedule {
            rec,
            primary,
            injected: 0,
        }
    }

    /// Injects faults until `duration` has passed (the last one is seen
    /// through to its end); the usage at the end of each cycle.
    pub async fn run(&mut self, c: &mut Cluster, p: &Pgheal, duration: Duration) -> Vec<CycleEnd> {
        let until = self.rec.now() + duration.as_secs_f64();
        let mut cycles = Vec::new();
        while self.rec.now() < until {
            tokio::time::sleep(jitter(Duration::from_millis(2500))).await;
            let kind = FaultKind::CYCLE[self.injected % FaultKind::CYCLE.len()];
            self.one(kind, c, p).await;
            self.injected += 1;
            if self.injected % FaultKind::CYCLE.len() == 0 {
                let u = p.usage();
                cycles.push(CycleEnd {
                    t: self.rec.now(),
                    rss_kib: u.rss_kib,
                    anon_kib: u.anon_kib,
                    fds: u.fds,
                });
            }
        }
        // A quiet stretch after the last fault, where no error may appear.
        tokio::time::sleep(Duration::from_secs(4)).await;
        cycles
    }

    async fn one(&mut self, kind: FaultKind, c: &mut Cluster, p: &Pgheal) {
        let start = self.rec.now();
        tracing::info!(fault = kind.name(), at = start, "injecting");
        let detail = self.inject(kind, c, p).await;
        self.primary.store(c.primary, Ordering::Relaxed);
        let injected = self.rec.now();
        let whole = c.wait_whole(Duration::from_secs(90)).await;
        let healed = self.rec.now();
        let writable = wait_writable(p.port, Duration::from_secs(90)).await;
        eprintln!(
            "soak: {:.1}s {}: injected in {:.1}s, whole after {:.1}s more, writable after {:.1}s more",
            start,
            kind.name(),
            injected - start,
            healed - injected,
            self.rec.now() - healed
        );
        if !whole || !writable {
            self.rec.violation(format!(
                "after {}: the cluster whole {whole}, writable through pgheal {writable}:{}",
                kind.name(),
                c.describe().await
            ));
        }
        // Errors of the fault may reach clients a moment after it healed.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let end = self.rec.now();
        self.rec.window(Window {
            kind,
            start,
            end,
            detail,
        });
    }

    async fn inject(&mut self, kind: FaultKind, c: &mut Cluster, p: &Pgheal) -> String {
        let replica = c.replicas()[self.injected % 2];
        match kind {
            FaultKind::KillPrimary => c.fail_over(None, jitter(Duration::from_secs(1))).await,
            FaultKind::SplitBrain => {
                let undemoted = jitter(Duration::from_secs(3));
                c.fail_over(Some(undemoted), jitter(Duration::from_secs(1)))
                    .await
            }
            FaultKind::BlackholePrimary => {
                let held = jitter(Duration::from_secs(6));
                c.relays[c.primary].hold();
                tokio::time::sleep(held).await;
                c.relays[c.primary].release();
                format!("n{} held for {held:.1?}", c.primary)
            }
            FaultKind::KillReplica => {
                c.kill_replica(replica, jitter(Duration::from_millis(1500)))
                    .await;
                format!("n{replica}")
            }
            FaultKind::PauseReplay => {
                let paused = jitter(Duration::from_secs(4));
                c.pause_replay(replica, paused).await;
                format!("n{replica} paused {paused:.1?}")
            }
            FaultKind::RestartPrimary => {
                c.restart_primary().await;
                format!("n{}", c.primary)
            }
            FaultKind::ReloadPoolSize => {
                let now = p.pool_sizes.lock().unwrap().last().map_or(POOL, |l| l.1);
                let next = if now == POOL { POOL_LOW } else { POOL };
                p.reload(next, self.rec.now());
                format!("pool_size {now} -> {next}")
            }
            FaultKind::HostileBurst => hostile_burst(p.port, 200).await,
        }
    }
}

/// `n` connections that send what no client would: garbage, an absurd
/// length, half a startup packet then silence, SSLRequest then garbage.
async fn hostile_burst(port: u16, n: usize) -> String {
    let mut tasks = Vec::new();
    for i in 0..n {
        tasks.push(tokio::spawn(async move {
            let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                return;
            };
            let bytes: Vec<u8> = match i % 4 {
                0 => (0..64).map(|b| (b * 37 + i) as u8).collect(),
                1 => vec![0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0],
                2 => vec![0, 0, 0, 40, 0, 3, 0, 0, b'u', b's'],
                _ => vec![0, 0, 0, 8, 4, 210, 22, 47, 1, 2, 3, 4, 5],
            };
            let _ = s.write_all(&bytes).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    format!("{n} connections")
}
