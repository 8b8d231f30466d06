//! The soak's invariants, checked once the load has stopped: nothing
//! acknowledged lost or doubled, tpcb's balances, errors only inside fault
//! windows and only the documented ones, pools within pool_size and idle
//! ones closed, pgheal's memory and descriptors flat across cycles, idle
//! clients still usable.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::cluster::{self, Cluster};
use crate::faults::CycleEnd;
use crate::load::{classify, Ctx};
use crate::record::Recorded;
use crate::{Pgheal, IDLE_TIMEOUT, MIN_IDLE, SHUTDOWN_TIMEOUT};

#[derive(Debug, Default)]
pub struct Checked {
    pub broken: Vec<String>,
    pub acked: usize,
    pub lost: usize,
    pub unknown_committed: usize,
    pub idle_usable: usize,
    pub idle_total: usize,
}

pub async fn after(
    c: &Cluster,
    p: &Pgheal,
    ctx: &Ctx,
    idle: &[tokio_postgres::Client],
    cycles: &[CycleEnd],
) -> Checked {
    let mut out = Checked::default();
    ledger(c, ctx, &mut out).await;
    balances(c, &mut out).await;
    pools_close(c, &mut out).await;
    usage(cycles, &mut out);
    idle_usable(idle, &mut out).await;
    let log = std::fs::read_to_string(&p.log).unwrap_or_default();
    if log.contains("panicked") {
        out.broken.push("pgheal panicked (see its log)".into());
    }
    if ctx.pgbench_transactions.load(Ordering::Relaxed) == 0 || out.acked == 0 {
        out.broken.push("the load did no work".into());
    }
    if ctx.notifications.load(Ordering::Relaxed) == 0 {
        out.broken.push("the listener got no notification".into());
    }
    out
}

/// Every acknowledged ledger row is on the final primary, none twice.
async fn ledger(c: &Cluster, ctx: &Ctx, out: &mut Checked) {
    let mut conn = c
        .primary()
        .superuser_conn("app")
        .await
        .expect("final primary");
    let rows = conn
        .query_rows("SELECT id, count(*) FROM ledger GROUP BY id")
        .await
        .expect("ledger");
    conn.terminate().await;
    let found: HashMap<i64, i64> = rows
        .iter()
        .filter_map(|r| {
            let id = r.first()?.as_deref()?.parse().ok()?;
            let n = r.get(1)?.as_deref()?.parse().ok()?;
            Some((id, n))
        })
        .collect();
    let acked = ctx.acked.lock().unwrap().clone();
    out.acked = acked.len();
    let lost: Vec<i64> = acked
        .iter()
        .copied()
        .filter(|id| !found.contains_key(id))
        .collect();
    out.lost = lost.len();
    if !lost.is_empty() {
        out.broken.push(format!(
            "{} acknowledged ledger rows are not on the final primary (first: {:?})",
            lost.len(),
            &lost[..lost.len().min(5)]
        ));
    }
    let twice: Vec<i64> = found
        .iter()
        .filter(|(_, &n)| n > 1)
        .map(|(&id, _)| id)
        .collect();
    if !twice.is_empty() {
        out.broken
            .push(format!("ledger ids written twice: {twice:?}"));
    }
    let unknown = ctx.unknown.lock().unwrap().clone();
    out.unknown_committed = unknown.iter().filter(|id| found.contains_key(id)).count();
}

/// tpcb-like keeps the sums of accounts, tellers, branches and history equal.
async fn balances(c: &Cluster, out: &mut Checked) {
    let mut conn = c
        .primary()
        .superuser_conn("app")
        .await
        .expect("final primary");
    let rows = conn
        .query_rows(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts), \
                    (SELECT sum(bbalance) FROM pgbench_branches), \
                    (SELECT sum(tbalance) FROM pgbench_tellers), \
                    (SELECT coalesce(sum(delta), 0) FROM pgbench_history)",
        )
        .await
        .expect("balances");
    conn.terminate().await;
    let sums: Vec<Option<String>> = rows.first().cloned().unwrap_or_default();
    if sums.windows(2).any(|w| w[0] != w[1]) {
        out.broken.push(format!(
            "tpcb balances differ: accounts, branches, tellers, history = {sums:?}"
        ));
    }
}

/// After the load stops, each node's pool shrinks to min_idle within
/// idle_timeout (and a tick of the pool's maintenance).
async fn pools_close(c: &Cluster, out: &mut Checked) {
    tokio::time::sleep(IDLE_TIMEOUT + Duration::from_secs(3)).await;
    for (i, node) in c.nodes.iter().enumerate() {
        let n = cluster::pooled_on(node.port).await;
        if n > MIN_IDLE {
            out.broken.push(format!(
                "n{i} still has {n} pooled connections {:?} after the load stopped (min_idle {MIN_IDLE})",
                IDLE_TIMEOUT + Duration::from_secs(3)
            ));
        }
    }
}

/// RSS and descriptors at each cycle's end within 10% of the first's.
fn usage(cycles: &[CycleEnd], out: &mut Checked) {
    let Some(first) = cycles.first() else {
        return;
    };
    for (i, c) in cycles.iter().enumerate().skip(1) {
        if c.rss_kib as f64 > first.rss_kib as f64 * 1.10 {
            out.broken.push(format!(
                "RSS after cycle {} is {} KiB, more than 10% over the first cycle's {} KiB",
                i + 1,
                c.rss_kib,
                first.rss_kib
            ));
        }
        if c.fds as f64 > first.fds as f64 * 1.10 {
            out.broken.push(format!(
                "descriptors after cycle {} are {}, more than 10% over the first cycle's {}",
                i + 1,
                c.fds,
                first.fds
            ));
        }
    }
}

async fn idle_usable(idle: &[tokio_postgres::Client], out: &mut Checked) {
    out.idle_total = idle.len();
    let mut failures = Vec::new();
    for chunk in idle.chunks(100) {
        let results =
            futures_util::future::join_all(chunk.iter().map(|c| c.simple_query("SELECT 1"))).await;
        for r in results {
            match r {
                Ok(_) => out.idle_usable += 1,
                Err(e) => failures.push(classify(&e)),
            }
        }
    }
    if !failures.is_empty() {
        out.broken.push(format!(
            "{} idle clients, never told an error, are unusable: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        ));
    }
}

/// Errors outside every fault window, or not documented for their fault;
/// pools beyond pool_size.
pub fn during(seen: &Recorded, pool_sizes: &[(f64, u64)]) -> Vec<String> {
    let mut broken = Vec::new();
    for e in &seen.errors {
        match seen.window_at(e.t) {
            None => broken.push(format!(
                "{:.1}s: {} got {} outside any fault window: {}",
                e.t, e.client, e.code, e.message
            )),
            Some(w) if !w.kind.allowed().contains(&e.code.as_str()) => broken.push(format!(
                "{:.1}s: {} got {} during \"{}\", which README does not document for it: {}",
                e.t,
                e.client,
                e.code,
                w.kind.name(),
                e.message
            )),
            Some(_) => {}
        }
    }
    for s in &seen.samples {
        let allowed = pool_allowed(pool_sizes, s.t);
        for (i, &n) in s.conns.iter().enumerate() {
            if n > allowed {
                broken.push(format!(
                    "{:.1}s: n{i} has {n} pooled connections, pool_size {allowed}",
                    s.t
                ));
            }
        }
    }
    broken
}

/// pool_size at `t`, or the size before a RELOAD that lowered it during
/// the shutdown_timeout after it.
fn pool_allowed(sizes: &[(f64, u64)], t: f64) -> u64 {
    let grace = SHUTDOWN_TIMEOUT.as_secs_f64() + 1.0;
    let current = sizes
        .iter()
        .rev()
        .find(|(at, _)| *at <= t)
        .map_or(0, |s| s.1);
    let before = sizes
        .windows(2)
        .filter(|w| w[1].0 <= t && t <= w[1].0 + grace)
        .map(|w| w[0].1)
        .max()
        .unwrap_or(0);
    current.max(before)
}
