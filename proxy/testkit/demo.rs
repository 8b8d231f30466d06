//! `pgheal demo`: a throwaway local PostgreSQL with pgheal in front of it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::auth::ScramVerifier;
use crate::config::{
    AuthMethod, Config, Database, FailoverConfig, HealthConfig, PoolMode, PoolTimeouts,
    ProxyConfig, User,
};
use crate::testkit::localpg::{LocalPgError, PgNode};

const APP_USER: &str = "app";
const APP_PASSWORD: &str = "app";
const APP_DB: &str = "app";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Pg(#[from] LocalPgError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The configuration the demo runs with.
pub fn demo_config(listen: SocketAddr, nodes: &[String]) -> Config {
    let mut databases = BTreeMap::new();
    databases.insert(
        APP_DB.to_string(),
        Database {
            name: APP_DB.into(),
            nodes: nodes.to_vec(),
            dbname: APP_DB.into(),
            user: Some(APP_USER.into()),
            password: Some(APP_PASSWORD.into()),
            pool_size: 20,
            min_idle: 0,
            read_routing: false,
            max_replica_lag: Duration::from_secs(1),
            max_replica_lag_bytes: crate::config::DEFAULT_MAX_LAG_BYTES,
            tls: Default::default(),
            max_databases: 0,
        },
    );
    Config {
        proxy: ProxyConfig {
            listen,
            pool_mode: PoolMode::Transaction,
            login_timeout: Duration::from_secs(10),
            max_message_size: pgheal_protocol::frame::DEFAULT_MAX_MESSAGE,
            max_client_connections: 10_000,
            shutdown_timeout: Duration::from_secs(30),
            http_listen: None,
            http_token: None,
            http_tls: false,
            watch_config: false,
        },
        pool: PoolTimeouts {
            connect_timeout: Duration::from_secs(3),
            checkout_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(600),
            server_lifetime: Duration::from_secs(3600),
            max_prepared_statements: 512,
        },
        health: HealthConfig::default(),
        failover: FailoverConfig::default(),
        tls: None,
        migrations: None,
        backup: None,
        auth: None,
        users: vec![User {
            name: APP_USER.into(),
            auth: AuthMethod::ScramSha256,
            password: Some(APP_PASSWORD.into()),
            scram: Some(ScramVerifier::from_password(APP_PASSWORD)),
            scram_secret: None,
            admin: false,
        }],
        databases,
    }
}

/// Starts a primary, a streaming replica and pgheal, prints the URL and
/// how to try a failover, and cleans up on Ctrl-C.
pub async fn run(listen: SocketAddr) -> Result<(), DemoError> {
    eprintln!("starting a throwaway PostgreSQL primary and a streaming replica...");
    let mut primary = PgNode::start_new().await?;
    let role = format!("CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'");
    primary.sql("postgres", &role).await?;
    primary
        .sql(
            "postgres",
            &format!("CREATE DATABASE {APP_DB} OWNER {APP_USER}"),
        )
        .await?;
    let mut replica = PgNode::start_replica_of(&primary).await?;
    let nodes = [primary.addr(), replica.addr()];
    let proxy = crate::server::start(demo_config(listen, &nodes))
        .await
        .map_err(|source| DemoError::Listen {
            addr: listen,
            source,
        })?;
    print_banner(&primary, &replica, proxy.addr);
    crate::server::run::shutdown_signal().await;
    eprintln!("stopping...");
    proxy.stop_accepting();
    replica.stop().await;
    primary.stop().await;
    Ok(())
}

fn print_banner(primary: &PgNode, replica: &PgNode, proxy: SocketAddr) {
    let url = format!(
        "postgres://{APP_USER}:{APP_PASSWORD}@{}:{}/{APP_DB}",
        proxy.ip(),
        proxy.port()
    );
    let pid = |n: &PgNode| n.pid().map_or_else(|| "?".to_string(), |p| p.to_string());
    println!();
    println!(
        "PostgreSQL {} primary (pid {}), data in a temporary directory",
        primary.addr(),
        pid(primary)
    );
    println!(
        "PostgreSQL {} replica (pid {}), made with pg_basebackup -R",
        replica.addr(),
        pid(replica)
    );
    println!("pgheal     {proxy}");
    println!();
    println!("DATABASE_URL={url}");
    println!();
    println!("Try a failover while a client stays connected:");
    println!("  psql \"{url}\"                       # keep it open; create a table, insert");
    println!(
        "  kill -9 {}                            # the primary dies: reads go on, writes get 25006",
        pid(primary)
    );
    println!(
        "  psql \"postgres://postgres:postgres@{}/postgres\" -c 'SELECT pg_promote()'",
        replica.addr()
    );
    println!("  # back in the open psql, the next write succeeds on the promoted replica");
    println!();
    println!("Press Ctrl-C to stop and remove everything.");
}
