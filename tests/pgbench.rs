//! pgbench through pgheal: more clients than server connections.

mod common;
use common::*;

fn args(url: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    v.push(url.to_string());
    v
}

/// Runs pgbench and returns (processed, failed) from its report.
async fn pgbench(url: &str, extra: &[&str]) -> (u64, u64) {
    let out = run("pgbench", args(url, extra), None).await;
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench {extra:?} failed:\n{stdout}\n{}",
        text(&out.stderr)
    );
    let field = |prefix: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .find(|s| !s.is_empty())
            })
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no `{prefix}` in pgbench output:\n{stdout}"))
    };
    (
        field("number of transactions actually processed: "),
        field("number of failed transactions: "),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_clients_on_four_servers_in_transaction_mode() {
    let node = app_node().await;
    let proxy = proxy_with(&node, "pool_mode = \"transaction\"", "pool_size = 4").await;
    let url = app_url(&proxy);

    let init = run("pgbench", args(&url, &["-i", "-s", "2", "-q"]), None).await;
    assert!(init.status.success(), "pgbench -i: {}", text(&init.stderr));

    for mode in ["simple", "extended", "prepared"] {
        let (done, failed) = pgbench(
            &url,
            &["-S", "-M", mode, "-c", "16", "-j", "2", "-t", "300"],
        )
        .await;
        assert_eq!((done, failed), (16 * 300, 0), "-S -M {mode}");
    }
    for mode in ["simple", "prepared"] {
        let (done, failed) = pgbench(&url, &["-M", mode, "-c", "16", "-j", "2", "-t", "100"]).await;
        assert_eq!((done, failed), (16 * 100, 0), "tpcb-like -M {mode}");
    }

    // Never more than pool_size server connections for the app pool.
    let pools = proxy.app.pools();
    assert_eq!(pools.len(), 1);
    let (idle, busy) = pools[0].counts();
    assert!(idle + busy <= 4, "idle {idle} + busy {busy} > pool_size");

    // The balance invariant of tpcb-like holds: every transaction applied whole.
    let out = psql(
        &url,
        &["-c", "SELECT (SELECT sum(bbalance) FROM pgbench_branches) = (SELECT sum(abalance) FROM pgbench_accounts)"],
        None,
    )
    .await;
    assert_eq!(text(&out.stdout).trim(), "t");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_serves_pgbench_and_resets_servers() {
    let node = app_node().await;
    let proxy = proxy_with(&node, "pool_mode = \"session\"", "pool_size = 4").await;
    let url = app_url(&proxy);
    let init = run("pgbench", args(&url, &["-i", "-s", "1", "-q"]), None).await;
    assert!(init.status.success(), "pgbench -i: {}", text(&init.stderr));
    let (done, failed) = pgbench(&url, &["-S", "-c", "4", "-j", "2", "-t", "200"]).await;
    assert_eq!((done, failed), (800, 0));
    let (done, failed) = pgbench(&url, &["-C", "-S", "-c", "4", "-j", "2", "-t", "50"]).await;
    assert_eq!((done, failed), (200, 0));
}
