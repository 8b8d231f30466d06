//! The status page at `GET /`: one HTML document with the current state
//! rendered in (per database: mode, nodes, pools, charts of its last 15
//! minutes as inline SVG; clients; the event timeline), and a few lines of script that fetch
//! the page again every 1.5 s and swap its content in. No build step, no
//! external resource: it works in an air-gapped cluster. Nothing secret is
//! on it (no passwords, no tokens, no client addresses).

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use html_escape::encode_text as esc;

use super::samples::{DbSample, Sample};
use crate::backend::cluster::{Mode, Role, Topology};
use crate::events::{Event, Kind};
use crate::frontend::{App, Target};

/// Seconds per chart point (15 minutes in 180 points).
const STEP: usize = 5;
/// Events listed on the page.
const LISTED: usize = 30;

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1em 2em;color:#222}\
h1{font-size:1.4em}h2{font-size:1.2em;margin:1.2em 0 .3em}\
.mode{display:inline-block;padding:.2em .7em;border-radius:4px;color:#fff;font-weight:bold}\
.read-write{background:#2a7}.read-only{background:#d80}.down{background:#c33}\
table{border-collapse:collapse;margin:.3em 0}td,th{padding:.15em .6em;border-bottom:1px solid #ddd;text-align:left}\
.bar{display:inline-block;height:.8em;background:#ddd;width:12em;position:relative;vertical-align:middle}\
.bar span{position:absolute;top:0;bottom:0;left:0}.busy{background:#47a}.wait{background:#c33}\
svg{background:#fafafa;border:1px solid #ddd;margin:.2em .5em .2em 0}.charts{display:flex;flex-wrap:wrap}\
.chart p{margin:.2em 0;font-size:.9em}.error{color:#c33}.warn{color:#b60}";

const SCRIPT: &str = "setInterval(async()=>{try{const r=await fetch(location.pathname,{cache:'no-store'});\
if(!r.ok)return;const d=new DOMParser().parseFromString(await r.text(),'text/html');\
const m=d.getElementById('main');if(m)document.getElementById('main').replaceWith(m)}catch(e){}},1500);";

/// The whole page.
pub fn render(app: &App, samples: &[Sample]) -> String {
    let mut out = String::with_capacity(32 * 1024);
    out.push_str("<!doctype html><html><head><meta charset=\"utf-8\"><title>pgheal</title>");
    let _ = write!(out, "<style>{STYLE}</style></head><body><div id=\"main\">");
    let _ = write!(out, "<h1>pgheal {}</h1>", env!("CARGO_PKG_VERSION"));
    let events = app.events.since(0);
    for (name, target) in app.targets() {
        database(&mut out, app, &name, &target);
        charts(&mut out, &name, samples, &events);
    }
    clients(&mut out, app);
    timeline(&mut out, &events);
    let _ = write!(out, "</div><script>{SCRIPT}</script></body></html>");
    out
}

fn database(out: &mut String, app: &App, name: &str, target: &Target) {
    let topology = target.cluster.snapshot();
    let mode = topology.mode();
    let _ = write!(
        out,
        "<h2>{}</h2><span class=\"mode {m}\" data-mode=\"{m}\">{m}</span> {}",
        esc(name),
        why(&topology, mode),
        m = mode.as_str()
    );
    out.push_str(
        "<table><tr><th>node</th><th>role</th><th>up</th><th>lag</th><th>behind</th>\
                  <th>failures</th><th>last checked</th><th>next retry</th></tr>",
    );
    for n in &topology.nodes {
        let up = matches!(n.role, Role::Primary | Role::Replica);
        let checked = n.checked_at.map_or("never".into(), |t| {
            format!("{:.1} s ago", t.elapsed().as_secs_f64())
        });
        let retry = match n.retry_at {
            Some(at) if !up => {
                let wait = at.saturating_duration_since(std::time::Instant::now());
                format!("in {:.1} s", wait.as_secs_f64())
            }
            _ => String::new(),
        };
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.1} s</td><td>{} bytes</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&n.addr),
            n.role.as_str(),
            if up { "yes" } else { "no" },
            n.replay_lag.as_secs_f64(),
            n.lag_bytes.unwrap_or(0),
            n.failures,
            checked,
            retry
        );
    }
    out.push_str("</table>");
    pools(out, app, name);
}

/// Why a database is not read-write, and what clients meet meanwhile.
fn why(topology: &Topology, mode: Mode) -> String {
    let what = match mode {
        Mode::ReadWrite => return String::new(),
        Mode::ReadOnly if topology.count(Role::Primary) > 1 => "writes are refused",
        Mode::ReadOnly => "reads work, writes get 25006",
        Mode::Down => return topology.reason().unwrap_or_default().to_string(),
    };
    format!("{}: {what}", topology.reason().unwrap_or_default())
}

fn pools(out: &mut String, app: &App, database: &str) {
    let pools: Vec<_> = app
        .pools()
        .into_iter()
        .filter(|p| p.database == database)
        .collect();
    if pools.is_empty() {
        return;
    }
    out.push_str("<table><tr><th>pool</th><th>servers</th><th>busy / idle / waiting</th></tr>");
    for p in pools {
        let (idle, busy) = p.counts();
        let size = p.size().max(1) as f64;
        let pct = |n: usize| (n as f64 / size * 100.0).min(100.0);
        let _ = write!(
            out,
            "<tr><td>{} @ {}</td><td><span class=\"bar\"><span class=\"busy\" style=\"width:{:.0}%\"></span>\
             </span></td><td>{busy} / {idle} / {} of {}</td></tr>",
            esc(p.user()),
            esc(p.addr()),
            pct(busy),
            p.waiting(),
            p.size()
        );
    }
    out.push_str("</table>");
}

fn clients(out: &mut String, app: &App) {
    let c = &app.counters;
    let total = c.client_connections.load(Ordering::Relaxed);
    let active = c.active_clients.load(Ordering::Relaxed);
    let pinned = c.pinned_clients.load(Ordering::Relaxed);
    let resting = c.resting_clients.load(Ordering::Relaxed);
    let _ = write!(
        out,
        "<h2>Clients</h2><p>{total} connected: {active} active, {} idle ({resting} resting), {pinned} pinned</p>",
        total.saturating_sub(active)
    );
}

/// A database's charts; failovers of it are marked.
fn charts(out: &mut String, database: &str, samples: &[Sample], events: &[Event]) {
    let start = samples.first().and_then(|s| s.at);
    let marks: Vec<f64> = events
        .iter()
        .filter(|e| e.kind == Kind::Failover && e.database.as_deref() == Some(database))
        .filter_map(|e| e.at.duration_since(start?).ok())
        .map(|d| d.as_secs_f64() / super::samples::KEPT as f64)
        .collect();
    let db: Vec<Option<&DbSample>> = samples.iter().map(|s| s.databases.get(database)).collect();
    let series = |f: &dyn Fn(&DbSample) -> f64| -> Vec<f64> {
        db.iter().map(|s| s.map_or(0.0, f)).collect()
    };
    out.push_str("<div class=\"charts\">");
    chart(
        out,
        "transactions/s",
        &[("", series(&|s| s.transactions))],
        &marks,
    );
    chart(
        out,
        "rejected writes/s",
        &[("", series(&|s| s.rejected))],
        &marks,
    );
    chart(
        out,
        "retried reads/s",
        &[("", series(&|s| s.retried))],
        &marks,
    );
    chart(
        out,
        "waiting clients",
        &[("", series(&|s| s.waiting))],
        &marks,
    );
    let nodes: Vec<String> = db
        .last()
        .copied()
        .flatten()
        .map(|s| s.lag.keys().cloned().collect())
        .unwrap_or_default();
    let lag: Vec<(&str, Vec<f64>)> = nodes
        .iter()
        .map(|n| {
            let v = series(&|s| s.lag.get(n).copied().unwrap_or(0.0));
            (n.as_str(), v)
        })
        .collect();
    chart(out, "replica lag (s)", &lag, &marks);
    out.push_str("</div>");
}

const COLORS: [&str; 6] = ["#47a", "#c33", "#2a7", "#d80", "#85c", "#555"];

/// A 15-minute line chart of `series`, scaled to its largest value.
fn chart(out: &mut String, title: &str, series: &[(&str, Vec<f64>)], marks: &[f64]) {
    let (w, h) = (360.0, 90.0);
    let points = |v: &[f64]| -> Vec<f64> {
        v.chunks(STEP)
            .map(|c| c.iter().sum::<f64>() / c.len() as f64)
            .collect()
    };
    let max = series
        .iter()
        .flat_map(|(_, v)| points(v))
        .fold(0.0f64, f64::max);
    let _ = write!(
        out,
        "<div class=\"chart\"><p>{} (max {max:.1})</p><svg width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">",
        esc(title)
    );
    let per_point = w / (super::samples::KEPT / STEP) as f64;
    for (i, (name, v)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let _ = write!(out, "<polyline fill=\"none\" stroke=\"{color}\" points=\"");
        for (x, y) in points(v).iter().enumerate() {
            let y = h - 2.0 - (y / max.max(1e-9)) * (h - 4.0);
            let _ = write!(out, "{:.0},{:.0} ", x as f64 * per_point, y);
        }
        let _ = write!(out, "\"><title>{}</title></polyline>", esc(name));
    }
    for m in marks {
        let x = m * w;
        let _ = write!(
            out,
            "<line x1=\"{x:.0}\" x2=\"{x:.0}\" y1=\"0\" y2=\"{h}\" stroke=\"#c33\" stroke-dasharray=\"3\"><title>failover</title></line>"
        );
    }
    out.push_str("</svg></div>");
}

fn timeline(out: &mut String, events: &[Event]) {
    out.push_str(
        "<h2>Events</h2><table id=\"events\"><tr><th>time (UTC)</th><th>event</th>\
                  <th>database</th><th>node</th><th>details</th></tr>",
    );
    for e in events.iter().rev().take(LISTED) {
        // The stylesheet colours warn and error rows.
        let class = e.level.as_str();
        let _ = write!(
            out,
            "<tr class=\"{class}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e.time(),
            e.kind.as_str(),
            esc(e.database.as_deref().unwrap_or("")),
            esc(e.node.as_deref().unwrap_or("")),
            esc(&e.details)
        );
    }
    let now = humantime::format_rfc3339_seconds(SystemTime::now());
    let _ = write!(out, "</table><p>rendered {now}</p>");
}
