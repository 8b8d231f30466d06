//! The soak's output: a summary (faults by kind, transactions, errors by
//! SQLSTATE and fault, acknowledged and lost, peaks, latencies inside and
//! outside fault windows), a per-second CSV and an SVG chart of TPS,
//! errors, RSS and replication lag with the fault windows shaded.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;

use crate::check::Checked;
use crate::faults::CycleEnd;
use crate::load::Ctx;
use crate::record::Recorded;

/// One second of the run.
#[derive(Debug, Default, Clone)]
struct Second {
    ops: f64,
    pgbench_tps: f64,
    errors: f64,
    rss_mib: f64,
    anon_mib: f64,
    fds: f64,
    lag_kib: f64,
    conns: [u64; 3],
    cpu_busy: f64,
    fault: Option<&'static str>,
}

fn seconds(seen: &Recorded) -> Vec<Second> {
    let end = seen
        .samples
        .iter()
        .map(|s| s.t)
        .chain(seen.ops.iter().map(|o| f64::from(o.0)))
        .fold(0.0, f64::max);
    let mut out = vec![Second::default(); end as usize + 1];
    for o in &seen.ops {
        out[o.0 as usize].ops += 1.0;
    }
    for e in &seen.errors {
        if let Some(s) = out.get_mut(e.t as usize) {
            s.errors += 1.0;
        }
    }
    for (t, tps) in &seen.pgbench_tps {
        if let Some(s) = out.get_mut(*t as usize) {
            s.pgbench_tps = *tps;
        }
    }
    for smp in &seen.samples {
        if let Some(s) = out.get_mut(smp.t as usize) {
            s.rss_mib = smp.rss_kib as f64 / 1024.0;
            s.anon_mib = smp.anon_kib as f64 / 1024.0;
            s.fds = smp.fds as f64;
            s.lag_kib = smp.lag_bytes as f64 / 1024.0;
            s.conns = smp.conns;
            s.cpu_busy = smp.cpu_busy;
        }
    }
    // A sample takes a moment (it asks every node): a second without one
    // shows the one before it, not zero.
    for i in 1..out.len() {
        if out[i].fds == 0.0 {
            let before = out[i - 1].clone();
            let s = &mut out[i];
            (s.rss_mib, s.anon_mib, s.fds, s.lag_kib, s.conns, s.cpu_busy) = (
                before.rss_mib,
                before.anon_mib,
                before.fds,
                before.lag_kib,
                before.conns,
                before.cpu_busy,
            );
        }
    }
    for (i, s) in out.iter_mut().enumerate() {
        s.fault = seen.window_at(i as f64 + 0.5).map(|w| w.kind.name());
    }
    out
}

fn percentile(sorted: &[f32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[i])
}

/// Writes soak.csv and soak.svg into `dir`; the summary text.
pub fn write(
    dir: &Path,
    seen: &Recorded,
    ctx: &Ctx,
    cycles: &[CycleEnd],
    checked: &Checked,
) -> String {
    let per_second = seconds(seen);
    let mut csv = String::from(
        "second,client_ops,pgbench_tps,errors,rss_mib,rss_anon_mib,fds,lag_kib,conns_n0,conns_n1,conns_n2,cpu_busy_pct,fault\n",
    );
    for (i, s) in per_second.iter().enumerate() {
        let _ = writeln!(
            csv,
            "{i},{},{:.1},{},{:.1},{:.1},{},{:.1},{},{},{},{:.0},{}",
            s.ops,
            s.pgbench_tps,
            s.errors,
            s.rss_mib,
            s.anon_mib,
            s.fds,
            s.lag_kib,
            s.conns[0],
            s.conns[1],
            s.conns[2],
            s.cpu_busy,
            s.fault.unwrap_or("")
        );
    }
    let _ = std::fs::write(dir.join("soak.csv"), csv);
    let _ = std::fs::write(dir.join("soak.svg"), chart(&per_second, seen));
    let mut log = String::new();
    for w in &seen.windows {
        let _ = writeln!(
            log,
            "{:8.1}s {:8.1}s  {}: {}",
            w.start,
            w.end,
            w.kind.name(),
            w.detail
        );
    }
    let _ = std::fs::write(dir.join("soak-faults.txt"), log);
    summary(dir, seen, ctx, cycles, checked)
}

fn summary(
    dir: &Path,
    seen: &Recorded,
    ctx: &Ctx,
    cycles: &[CycleEnd],
    checked: &Checked,
) -> String {
    let mut out = String::new();
    let mut faults: BTreeMap<&str, usize> = BTreeMap::new();
    for w in &seen.windows {
        *faults.entry(w.kind.name()).or_default() += 1;
    }
    let _ = writeln!(
        out,
        "soak summary ({:.0} s of faults and load)",
        seen.samples.last().map_or(0.0, |s| s.t)
    );
    let _ = writeln!(out, "faults injected: {}", seen.windows.len());
    for (kind, n) in &faults {
        let _ = writeln!(out, "  {kind}: {n}");
    }
    let _ = writeln!(
        out,
        "transactions: pgbench {}, client operations {}; ledger rows acknowledged {}, lost {}, \
         outcome unknown but committed {}",
        ctx.pgbench_transactions.load(Ordering::Relaxed),
        seen.ops.len(),
        checked.acked,
        checked.lost,
        checked.unknown_committed
    );
    let _ = writeln!(
        out,
        "notifications: {} sent, {} received; idle clients usable at the end: {}/{}",
        ctx.notified.load(Ordering::Relaxed),
        ctx.notifications.load(Ordering::Relaxed),
        checked.idle_usable,
        checked.idle_total
    );
    errors(&mut out, seen);
    peaks(&mut out, seen, cycles);
    latencies(&mut out, seen);
    let _ = writeln!(
        out,
        "files: {0}/soak.csv, {0}/soak.svg, {0}/soak-faults.txt (each fault's window)",
        dir.display()
    );
    out
}

fn errors(out: &mut String, seen: &Recorded) {
    let mut by: BTreeMap<(String, &str), usize> = BTreeMap::new();
    for e in &seen.errors {
        let fault = seen.window_at(e.t).map_or("no fault", |w| w.kind.name());
        *by.entry((e.code.clone(), fault)).or_default() += 1;
    }
    let _ = writeln!(out, "errors: {}", seen.errors.len());
    for ((code, fault), n) in by {
        let _ = writeln!(out, "  {code} during {fault}: {n}");
    }
}

fn peaks(out: &mut String, seen: &Recorded, cycles: &[CycleEnd]) {
    let max_rss = seen.samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let max_fds = seen.samples.iter().map(|s| s.fds).max().unwrap_or(0);
    let mut max_conns = [0u64; 3];
    for s in &seen.samples {
        for (most, now) in max_conns.iter_mut().zip(s.conns) {
            *most = (*most).max(now);
        }
    }
    let _ = writeln!(
        out,
        "pgheal: max RSS {:.1} MiB, max descriptors {max_fds}; max pooled connections per node {:?}",
        max_rss as f64 / 1024.0,
        max_conns
    );
    let ends: Vec<String> = cycles
        .iter()
        .map(|c| {
            format!(
                "{:.0}s {:.1} MiB ({:.1} anonymous)/{} fds",
                c.t,
                c.rss_kib as f64 / 1024.0,
                c.anon_kib as f64 / 1024.0,
                c.fds
            )
        })
        .collect();
    let _ = writeln!(out, "at each cycle's end: {}", ends.join(", "));
    let quiet: Vec<f64> = seen
        .samples
        .iter()
        .filter(|s| seen.window_at(s.t).is_none())
        .map(|s| s.cpu_busy)
        .collect();
    let _ = writeln!(
        out,
        "machine CPU busy outside faults (all cores, everything on it): {:.0}% on average",
        quiet.iter().sum::<f64>() / quiet.len().max(1) as f64
    );
}

fn latencies(out: &mut String, seen: &Recorded) {
    let (mut inside, mut outside): (Vec<f32>, Vec<f32>) = (Vec::new(), Vec::new());
    for &(t, ms) in &seen.ops {
        match seen.window_at(f64::from(t)) {
            Some(_) => inside.push(ms),
            None => outside.push(ms),
        }
    }
    for v in [&mut inside, &mut outside] {
        v.sort_by(f32::total_cmp);
    }
    let _ = writeln!(
        out,
        "latency ms (client operations): outside faults p50 {:.1} p99 {:.1}; inside fault windows p50 {:.1} p99 {:.1}",
        percentile(&outside, 0.50),
        percentile(&outside, 0.99),
        percentile(&inside, 0.50),
        percentile(&inside, 0.99)
    );
}

/// Four stacked panels over time, fault windows shaded.
fn chart(per_second: &[Second], seen: &Recorded) -> String {
    const W: f64 = 1000.0;
    const PANEL: f64 = 130.0;
    const LEFT: f64 = 70.0;
    let n = per_second.len().max(2) as f64;
    let x = |t: f64| LEFT + t / n * (W - LEFT - 20.0);
    type Value = fn(&Second) -> f64;
    let panels: [(&str, Value); 4] = [
        ("TPS (pgbench + clients)", |s| s.pgbench_tps + s.ops),
        ("errors / s", |s| s.errors),
        ("pgheal RSS MiB", |s| s.rss_mib),
        ("replica lag KiB", |s| s.lag_kib),
    ];
    let height = 20.0 + panels.len() as f64 * (PANEL + 20.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (k, (title, value)) in panels.iter().enumerate() {
        let top = 20.0 + k as f64 * (PANEL + 20.0);
        let max = per_second.iter().map(value).fold(1.0, f64::max);
        for w in &seen.windows {
            let _ = writeln!(
                svg,
                "<rect x=\"{:.1}\" y=\"{top}\" width=\"{:.1}\" height=\"{PANEL}\" fill=\"#f4c7c3\"><title>{}</title></rect>",
                x(w.start),
                (x(w.end) - x(w.start)).max(1.0),
                w.kind.name()
            );
        }
        let points: Vec<String> = per_second
            .iter()
            .enumerate()
            .map(|(i, s)| {
                format!(
                    "{:.1},{:.1}",
                    x(i as f64),
                    top + PANEL - value(s) / max * PANEL
                )
            })
            .collect();
        let _ = writeln!(
            svg,
            "<rect x=\"{LEFT}\" y=\"{top}\" width=\"{:.1}\" height=\"{PANEL}\" fill=\"none\" stroke=\"#999\"/>\n\
             <polyline fill=\"none\" stroke=\"#1a73e8\" stroke-width=\"1.2\" points=\"{}\"/>\n\
             <text x=\"{}\" y=\"{}\">{title}</text><text x=\"4\" y=\"{}\">{max:.0}</text><text x=\"4\" y=\"{}\">0</text>",
            W - LEFT - 20.0,
            points.join(" "),
            LEFT + 4.0,
            top - 4.0,
            top + 10.0,
            top + PANEL
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{LEFT}\" y=\"{}\">seconds 0 to {} (shaded: fault windows)</text>\n</svg>",
        height - 4.0,
        per_second.len()
    );
    svg
}
