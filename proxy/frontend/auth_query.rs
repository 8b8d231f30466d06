//! Users that are not in `[[users]]`, looked up with `[auth] query` on the
//! database's primary (any reachable node while there is none: pg_authid
//! is replicated). Only SCRAM secrets are used; a found secret is kept for
//! a minute, an unknown user for a few seconds (a storm of wrong names
//! does not reach the server per attempt). The keys a client proves while
//! logging in are what pgheal logs in upstream with: no password is ever
//! held.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::{ScramKeys, ScramVerifier};
use crate::backend::cluster::Role;
use crate::backend::conn::{ConnectSpec, ServerConn, UpstreamError};
use crate::backend::params::quote_literal;
use crate::config::{AuthQuery, Config};
use crate::frontend::Target;
use crate::sync::lock;

/// How long a found secret is used before it is looked up again.
const FOUND_FOR: Duration = Duration::from_secs(60);
/// How long an unknown user stays unknown.
const UNKNOWN_FOR: Duration = Duration::from_secs(5);
/// Cached users at most; past it the cache starts over.
const MAX_CACHED: usize = 10_000;

/// How pgheal's lookup connections show in pg_stat_activity.
pub const AUTH_APPLICATION_NAME: &str = "pgheal auth query";

#[derive(Default)]
pub struct AuthLookup {
    secrets: Mutex<HashMap<String, (Option<ScramVerifier>, Instant)>>,
    keys: Mutex<HashMap<String, Arc<ScramKeys>>>,
}

impl AuthLookup {
    /// The SCRAM secret of `user` (`None`: no such user, or no SCRAM
    /// secret), from the cache or the server.
    pub async fn secret(
        &self,
        config: &Config,
        auth: &AuthQuery,
        target: &Target,
        user: &str,
    ) -> Result<Option<ScramVerifier>, UpstreamError> {
        if let Some((secret, until)) = lock(&self.secrets).get(user) {
            if Instant::now() < *until {
                return Ok(secret.clone());
            }
        }
        let secret = look_up(config, auth, target, user).await?;
        let ttl = if secret.is_some() {
            FOUND_FOR
        } else {
            UNKNOWN_FOR
        };
        let mut secrets = lock(&self.secrets);
        if secrets.len() >= MAX_CACHED {
            secrets.clear();
        }
        secrets.insert(user.to_string(), (secret.clone(), Instant::now() + ttl));
        Ok(secret)
    }

    /// Drops `user`'s cached secret (a login failed with it).
    pub fn forget(&self, user: &str) {
        lock(&self.secrets).remove(user);
    }

    /// Keeps the keys `user` proved, for pgheal's own logins as `user`.
    pub fn remember_keys(&self, user: &str, keys: ScramKeys) {
        let mut all = lock(&self.keys);
        if all.len() >= MAX_CACHED {
            all.clear();
        }
        all.insert(user.to_string(), Arc::new(keys));
    }

    pub fn keys(&self, user: &str) -> Option<Arc<ScramKeys>> {
        lock(&self.keys).get(user).cloned()
    }
}

/// Runs the query on the primary first, then on the other nodes up, then
/// on the rest; the first node that answers decides.
async fn look_up(
    config: &Config,
    auth: &AuthQuery,
    target: &Target,
    user: &str,
) -> Result<Option<ScramVerifier>, UpstreamError> {
    let topology = target.cluster.snapshot();
    let mut nodes: Vec<(u8, String)> = topology
        .nodes
        .iter()
        .map(|n| {
            let rank = match n.role {
                Role::Primary => 0,
                Role::Replica | Role::Unknown => 1,
                Role::Down => 2,
            };
            (rank, n.addr.to_string())
        })
        .collect();
    nodes.sort();
    let sql = auth.query.replace("$1", &quote_literal(user));
    let mut last = None;
    for (_, addr) in nodes {
        let spec = ConnectSpec {
            addr,
            user: auth.user.clone(),
            password: auth.password.clone(),
            database: auth.database.clone(),
            connect_timeout: config.pool.connect_timeout,
            application_name: Some(AUTH_APPLICATION_NAME),
            tls: target.database.tls.clone(),
            scram_keys: None,
        };
        match query_secret(&spec, &sql).await {
            Ok(secret) => return Ok(secret),
            Err(e) => {
                tracing::warn!(node = %spec.addr, error = %e, "auth query failed");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or(UpstreamError::Protocol {
        addr: String::new(),
        what: "no node to run the auth query on".into(),
    }))
}

async fn query_secret(
    spec: &ConnectSpec,
    sql: &str,
) -> Result<Option<ScramVerifier>, UpstreamError> {
    let mut conn = ServerConn::connect(spec).await?;
    let rows = conn.query_rows(sql).await;
    conn.terminate().await;
    let secret = rows?
        .into_iter()
        .next()
        .and_then(|row| row.into_iter().nth(1).flatten());
    Ok(secret.and_then(|s| match ScramVerifier::parse(&s) {
        Ok(v) => Some(v),
        Err(_) => {
            tracing::warn!(
                "auth query returned a secret that is not SCRAM-SHA-256; the user cannot log in"
            );
            None
        }
    }))
}
