//! The soak's cluster: a primary and two streaming replicas with
//! synchronous replication (`ANY 1`), each behind a TCP relay that pgheal
//! connects through (so a node's network can be held), and the failover
//! steps a failover manager takes: promote the most advanced replica,
//! re-point the other, bring the old primary back with pg_rewind.

use std::time::Duration;

use pgheal::testkit::localpg::{PgNode, SUPERUSER_PASSWORD};

use crate::common::{Relay, APP_PASSWORD};

pub struct Cluster {
    pub nodes: Vec<PgNode>,
    pub relays: Vec<Relay>,
    pub primary: usize,
}

/// The name a node streams under (`application_name`), as
/// `synchronous_standby_names` lists it.
pub fn name(i: usize) -> String {
    format!("n{i}")
}

fn conninfo(primary: &PgNode, i: usize) -> String {
    format!(
        "host=127.0.0.1 port={} user=postgres password={SUPERUSER_PASSWORD} application_name={}",
        primary.port,
        name(i)
    )
}

async fn one(node: &PgNode, sql: &str) -> Option<String> {
    let mut conn = node.superuser_conn("postgres").await.ok()?;
    let rows = conn.query_rows(sql).await.ok();
    conn.terminate().await;
    rows?.first()?.first()?.clone()
}

impl Cluster {
    pub async fn start() -> Cluster {
        // pg_rewind needs full page writes and hint bits in the WAL, and
        // the target's WAL back to where the servers diverged. Hint bits
        // and kept WAL go into the configuration file: pg_rewind's own
        // crash recovery of a killed node reads only that.
        let mut primary = PgNode::start_new_with(&["full_page_writes=on"])
            .await
            .expect("primary");
        for sql in [
            "ALTER SYSTEM SET wal_log_hints = on",
            "ALTER SYSTEM SET wal_keep_size = '1GB'",
        ] {
            primary.sql("postgres", sql).await.expect(sql);
        }
        primary.stop().await;
        primary.start().await.expect("restart with wal_log_hints");
        primary
            .sql(
                "postgres",
                &format!("CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'"),
            )
            .await
            .expect("role");
        primary
            .sql("postgres", "CREATE DATABASE app OWNER app")
            .await
            .expect("database");
        let mut nodes = vec![primary];
        for _ in 1..3 {
            let replica = PgNode::start_replica_of(&nodes[0]).await.expect("replica");
            nodes.push(replica);
        }
        for i in 1..3 {
            follow(&nodes[i], &nodes[0], i).await;
        }
        // Synchronous from here on, on every node (a promoted one keeps it).
        for node in &nodes {
            node.sql(
                "postgres",
                "ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 (n0, n1, n2)'",
            )
            .await
            .expect("synchronous_standby_names");
            node.sql("postgres", "SELECT pg_reload_conf()")
                .await
                .expect("reload");
        }
        let mut relays = Vec::new();
        for node in &nodes {
            relays.push(Relay::start(node.addr()).await);
        }
        let cluster = Cluster {
            nodes,
            relays,
            primary: 0,
        };
        cluster.wait_whole(Duration::from_secs(60)).await;
        cluster
    }

    /// Each node's role and, for the primary, who streams from it; the last
    /// lines of each node's log: what a failed heal is reported with.
    pub async fn describe(&self) -> String {
        let mut out = String::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let role = one(node, "SELECT pg_is_in_recovery()::text").await;
            let streams = one(
                node,
                "SELECT string_agg(application_name || ':' || state, ',') FROM pg_stat_replication",
            )
            .await;
            let log = std::fs::read_to_string(node.log_path()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(6).collect();
            out.push_str(&format!(
                "\n    n{i} in_recovery={role:?} streaming_from_it={streams:?}\n      {}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n      ")
            ));
        }
        out
    }

    pub fn replicas(&self) -> Vec<usize> {
        (0..3).filter(|&i| i != self.primary).collect()
    }

    pub fn primary(&self) -> &PgNode {
        &self.nodes[self.primary]
    }

    /// Waits until both replicas stream from the primary; false when they
    /// did not within `within`.
    pub async fn wait_whole(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            let streaming = one(
                self.primary(),
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            )
            .await;
            if streaming.as_deref() == Some("2") {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    /// kill -9 of the primary, then what a failover manager does. With
    /// `split_brain`, the old primary first comes back as it was (a
    /// primary, not demoted) for `undemoted` while the new one serves.
    pub async fn fail_over(&mut self, split_brain: Option<Duration>, detect: Duration) -> String {
        let old = self.primary;
        let started = std::time::Instant::now();
        let step = |what: String| eprintln!("soak: failover +{:.1?}: {what}", started.elapsed());
        self.nodes[old].kill9().await;
        tokio::time::sleep(detect).await;
        let new = self.most_advanced_replica().await;
        self.nodes[new].promote().await.expect("promote");
        step(format!("n{old} killed, n{new} promoted"));
        self.primary = new;
        for other in self.replicas().into_iter().filter(|&i| i != old) {
            follow(&self.nodes[other], &self.nodes[new], other).await;
        }
        if let Some(undemoted) = split_brain {
            self.nodes[old]
                .start()
                .await
                .expect("old primary, undemoted");
            step(format!("n{old} back, undemoted"));
            tokio::time::sleep(undemoted).await;
            self.nodes[old].stop().await;
        }
        // pg_rewind reads the source's timeline from its control file,
        // which a promotion updates only at its next checkpoint.
        self.nodes[new]
            .sql("postgres", "CHECKPOINT")
            .await
            .expect("checkpoint");
        let (target, source) = two(&mut self.nodes, old, new);
        target
            .rewind_from(source, &name(old))
            .await
            .expect("pg_rewind the old primary");
        step(format!("n{old} rewound and started"));
        format!("n{old} killed, n{new} promoted, n{old} rewound")
    }

    /// The replica that received the most WAL: it has every commit a
    /// synchronous standby acknowledged.
    async fn most_advanced_replica(&self) -> usize {
        let mut best = (0u64, self.replicas()[0]);
        for i in self.replicas() {
            let lsn = one(
                &self.nodes[i],
                "SELECT pg_wal_lsn_diff(pg_last_wal_receive_lsn(), '0/0')::bigint",
            )
            .await;
            let lsn = lsn.and_then(|l| l.parse().ok()).unwrap_or(0);
            if lsn > best.0 {
                best = (lsn, i);
            }
        }
        best.1
    }

    pub async fn kill_replica(&mut self, i: usize, down: Duration) {
        self.nodes[i].kill9().await;
        tokio::time::sleep(down).await;
        self.nodes[i].start().await.expect("replica restart");
    }

    pub async fn restart_primary(&mut self) {
        let p = self.primary;
        self.nodes[p].stop().await;
        self.nodes[p].start().await.expect("primary restart");
    }

    pub async fn pause_replay(&self, i: usize, paused: Duration) {
        let _ = one(&self.nodes[i], "SELECT pg_wal_replay_pause()").await;
        tokio::time::sleep(paused).await;
        let _ = one(&self.nodes[i], "SELECT pg_wal_replay_resume()").await;
    }
}

/// Points replica `i` at `primary` (PostgreSQL reloads primary_conninfo).
async fn follow(replica: &PgNode, primary: &PgNode, i: usize) {
    let sql = format!(
        "ALTER SYSTEM SET primary_conninfo = '{}'",
        conninfo(primary, i)
    );
    replica
        .sql("postgres", &sql)
        .await
        .expect("primary_conninfo");
    replica
        .sql("postgres", "SELECT pg_reload_conf()")
        .await
        .expect("reload");
}

/// Two distinct elements, the first mutable.
fn two(nodes: &mut [PgNode], a: usize, b: usize) -> (&mut PgNode, &PgNode) {
    assert_ne!(a, b);
    if a < b {
        let (left, right) = nodes.split_at_mut(b);
        (&mut left[a], &right[0])
    } else {
        let (left, right) = nodes.split_at_mut(a);
        (&mut right[0], &left[b])
    }
}

/// One value from the node on `port`, as the superuser, directly.
pub async fn value_on(port: u16, sql: &str) -> Option<String> {
    let url = format!(
        "host=127.0.0.1 port={port} user=postgres password={SUPERUSER_PASSWORD} \
         dbname=postgres connect_timeout=3"
    );
    let connected = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_postgres::connect(&url, tokio_postgres::NoTls),
    );
    let (client, conn) = connected.await.ok()?.ok()?;
    let driver = tokio::spawn(conn);
    let rows = tokio::time::timeout(Duration::from_secs(5), client.simple_query(sql)).await;
    driver.abort();
    rows.ok()?.ok()?.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    })
}

/// pgheal's pooled connections on the node: app's backends, without
/// pgheal's health checks, backups and restores.
pub async fn pooled_on(port: u16) -> u64 {
    value_on(
        port,
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' \
         AND backend_type = 'client backend' AND application_name NOT LIKE 'pgheal %'",
    )
    .await
    .and_then(|v| v.parse().ok())
    .unwrap_or(0)
}

/// How far the furthest replica's replay is behind the primary on `port`.
pub async fn lag_on(port: u16) -> u64 {
    value_on(
        port,
        "SELECT coalesce(max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)), 0)::bigint \
         FROM pg_stat_replication",
    )
    .await
    .and_then(|v| v.parse().ok())
    .unwrap_or(0)
}
