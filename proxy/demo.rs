//! `pgheal demo`: a throwaway local PostgreSQL with pgheal in front of it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::auth::ScramVerifier;
use crate::config::{
    AuthMethod, Config, Database, FailoverConfig, HealthConfig, PoolMode, PoolTimeouts,
    ProxyConfig, User,
};
use crate::listener;
use crate::localpg::{LocalPgError, PgNode};

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
pub fn demo_config(listen: SocketAddr, node: &str) -> Config {
    let mut databases = BTreeMap::new();
    databases.insert(
        APP_DB.to_string(),
        Database {
            name: APP_DB.into(),
            nodes: vec![node.to_string()],
            dbname: APP_DB.into(),
            user: Some(APP_USER.into()),
            password: Some(APP_PASSWORD.into()),
            pool_size: 20,
            min_idle: 0,
            read_routing: false,
        },
    );
    Config {
        proxy: ProxyConfig {
            listen,
            pool_mode: PoolMode::Transaction,
            login_timeout: Duration::from_secs(10),
            max_message_size: pgheal_protocol::frame::DEFAULT_MAX_MESSAGE,
        },
        pool: PoolTimeouts {
            connect_timeout: Duration::from_secs(3),
            checkout_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(600),
            server_lifetime: Duration::from_secs(3600),
        },
        health: HealthConfig::default(),
        failover: FailoverConfig {
            write_wait: Duration::from_secs(2),
        },
        users: vec![User {
            name: APP_USER.into(),
            auth: AuthMethod::ScramSha256,
            password: Some(APP_PASSWORD.into()),
            scram: Some(ScramVerifier::from_password(APP_PASSWORD)),
            admin: false,
        }],
        databases,
    }
}

/// Starts PostgreSQL and pgheal, prints the URL, and cleans up on Ctrl-C.
pub async fn run(listen: SocketAddr) -> Result<(), DemoError> {
    eprintln!("starting a throwaway PostgreSQL primary...");
    let mut node = PgNode::start_new().await?;
    let role = format!("CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'");
    node.sql("postgres", &role).await?;
    node.sql(
        "postgres",
        &format!("CREATE DATABASE {APP_DB} OWNER {APP_USER}"),
    )
    .await?;
    let proxy = listener::start(demo_config(listen, &node.addr()))
        .await
        .map_err(|source| DemoError::Listen {
            addr: listen,
            source,
        })?;
    println!();
    println!("PostgreSQL {} (data in a temporary directory)", node.addr());
    println!("pgheal     {}", proxy.addr);
    println!();
    println!(
        "DATABASE_URL=postgres://{APP_USER}:{APP_PASSWORD}@{}:{}/{APP_DB}",
        proxy.addr.ip(),
        proxy.addr.port()
    );
    println!();
    println!(
        "Try: psql \"postgres://{APP_USER}:{APP_PASSWORD}@{}/{APP_DB}\"",
        proxy.addr
    );
    println!("Press Ctrl-C to stop and remove everything.");
    crate::shutdown_signal().await;
    eprintln!("stopping...");
    proxy.stop_accepting();
    node.stop().await;
    Ok(())
}
