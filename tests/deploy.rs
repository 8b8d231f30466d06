//! What deploy/ ships for operators: the Prometheus alert rules pass
//! `promtool check rules` and their own `promtool test rules`, and the
//! Grafana dashboard and the rules only use series pgheal exports.

mod common;
use common::*;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn deploy(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

fn promtool(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("promtool");
    cmd.args(args).current_dir(deploy("prometheus"));
    output_within(cmd, None, Duration::from_secs(60))
}

#[test]
fn the_alert_rules_check_and_pass_their_tests() {
    let check = promtool(&["check", "rules", "alerts.yaml"]);
    assert!(
        check.status.success(),
        "{}{}",
        text(&check.stdout),
        text(&check.stderr)
    );
    let test = promtool(&["test", "rules", "alerts_test.yaml"]);
    assert!(
        test.status.success(),
        "{}{}",
        text(&test.stdout),
        text(&test.stderr)
    );
}

/// Every series name pgheal's /metrics can carry.
fn exported() -> BTreeSet<String> {
    let text = pgheal::metrics::Metrics::default().encode();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            continue;
        };
        match kind {
            "counter" => names.insert(format!("{name}_total")),
            "histogram" => {
                for part in ["bucket", "sum", "count"] {
                    names.insert(format!("{name}_{part}"));
                }
                true
            }
            _ => names.insert(name.to_string()),
        };
    }
    names
}

/// The `pgheal_...` names a text mentions.
fn mentioned(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("pgheal_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn the_dashboard_and_the_rules_use_only_exported_series() {
    let exported = exported();
    assert!(exported.contains("pgheal_database_mode"), "{exported:?}");
    let dashboard = std::fs::read_to_string(deploy("grafana/pgheal.json")).expect("dashboard");
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard JSON");
    let panels = json["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8, "{} panels", panels.len());
    let mut exprs = String::new();
    for p in panels {
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            exprs.push_str(t["expr"].as_str().expect("expr"));
            exprs.push('\n');
        }
    }
    let rules = std::fs::read_to_string(deploy("prometheus/alerts.yaml")).expect("rules");
    for (what, text) in [("dashboard", exprs.as_str()), ("rules", rules.as_str())] {
        let unknown: Vec<_> = mentioned(text).difference(&exported).cloned().collect();
        assert!(
            unknown.is_empty(),
            "{what} uses series pgheal does not export: {unknown:?}"
        );
    }
}
