//! HTTP on `[proxy] http_listen`: `/` (the status page, see `page`),
//! `/metrics` (Prometheus text),
//! `/healthz` (the process answers), `/readyz` (200 when every database
//! can serve reads, else 503 with the reason), `/status` (JSON topology and
//! mode of each database), `/events` (the event timeline, JSON). With
//! `[proxy] http_auth` every path but `/healthz` and `/readyz` needs the
//! bearer token; with `http_tls` all of them are served over TLS.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{FromRef, RawQuery, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use super::samples::Samples;
use crate::backend::cluster::Mode;
use crate::frontend::App;

/// Binds and serves until pgheal shuts down; returns the bound address.
pub async fn start(app: Arc<App>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let shutdown = app.shutdown.clone();
    let state_tls = app.config().proxy.http_tls.then(|| app.clone());
    let state = Http {
        samples: Samples::start(&app),
        app,
    };
    let guarded = Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/events", get(events))
        .route_layer(middleware::from_fn_with_state(
            state.app.clone(),
            authorized,
        ));
    let router = guarded
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    let tls = state_tls;
    tokio::spawn(async move {
        let served = match tls {
            Some(app) => match super::https::TlsListener::new(listener, app) {
                Ok(tls) => {
                    axum::serve(tls, router)
                        .with_graceful_shutdown(async move { shutdown.cancelled().await })
                        .await
                }
                Err(e) => Err(e),
            },
            None => {
                axum::serve(listener, router)
                    .with_graceful_shutdown(async move { shutdown.cancelled().await })
                    .await
            }
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    tracing::info!(addr = %bound, "HTTP endpoints listening");
    Ok(bound)
}

/// What the handlers share.
#[derive(Clone)]
struct Http {
    app: Arc<App>,
    samples: Arc<Samples>,
}

impl FromRef<Http> for Arc<App> {
    fn from_ref(http: &Http) -> Arc<App> {
        http.app.clone()
    }
}

/// The status page (see `page`).
async fn page(State(http): State<Http>) -> Response {
    let body = super::page::render(&http.app, &http.samples.all());
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// With `[proxy] http_auth`, only requests with the bearer token pass.
async fn authorized(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let Some(token) = app.config().proxy.http_token.clone() else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
        return next.run(request).await;
    }
    let mut denied = json_response(
        StatusCode::UNAUTHORIZED,
        json!({"error": "this endpoint needs Authorization: Bearer <token> ([proxy] http_auth)"}),
    );
    let challenge = header::HeaderValue::from_static("Bearer");
    denied
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, challenge);
    denied
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let body = super::gauges::render(&app);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

fn json_response(code: StatusCode, value: serde_json::Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{value}\n"),
    )
        .into_response()
}

/// Ready when every database has a node that can serve reads; a shutting
/// down pgheal is not ready.
async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.shutdown.is_cancelled() {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"ready": false, "reason": "pgheal is shutting down"}),
        );
    }
    if let Some(why) = app.migration_failure() {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"ready": false, "reason": format!("migrations failed: {why}")}),
        );
    }
    let down: Vec<String> = app
        .targets()
        .into_iter()
        .filter(|(_, t)| t.cluster.snapshot().mode() == Mode::Down)
        .map(|(name, _)| name.clone())
        .collect();
    if down.is_empty() {
        return json_response(StatusCode::OK, json!({"ready": true}));
    }
    let reason = format!("no node is up for database(s) {}", down.join(", "));
    json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"ready": false, "reason": reason}),
    )
}

/// The event timeline as JSON, oldest first: all kept events, or with
/// `?since=N` those after event N (poll with the last `seq` seen).
async fn events(State(app): State<Arc<App>>, RawQuery(query): RawQuery) -> Response {
    let since = query.as_deref().map_or(Ok(0), since);
    let Ok(since) = since else {
        let error = "expected ?since=N, N the seq of the last event seen";
        return json_response(StatusCode::BAD_REQUEST, json!({ "error": error }));
    };
    let events: Vec<_> = app
        .events
        .since(since)
        .iter()
        .map(|e| e.to_json())
        .collect();
    let last = app.events.last();
    json_response(StatusCode::OK, json!({ "last": last, "events": events }))
}

/// `since=N` from a query string (other parameters are ignored).
fn since(query: &str) -> Result<u64, std::num::ParseIntError> {
    query
        .split('&')
        .find_map(|p| p.strip_prefix("since="))
        .map_or(Ok(0), str::parse)
}

async fn status(State(app): State<Arc<App>>) -> Response {
    let mut databases = serde_json::Map::new();
    for (name, target) in app.targets() {
        let topology = target.cluster.snapshot();
        let nodes: Vec<_> = topology
            .nodes
            .iter()
            .map(|n| {
                json!({
                    "addr": n.addr.as_ref(),
                    "role": n.role.as_str(),
                    "lsn": n.lsn,
                    "replay_lag_seconds": n.replay_lag.as_secs_f64(),
                    "lag_bytes": n.lag_bytes,
                    "timeline": n.timeline,
                    "streaming": n.streaming,
                    "consecutive_failures": n.failures,
                    "last_error": n.last_error,
                })
            })
            .collect();
        databases.insert(
            name.clone(),
            json!({
                "mode": topology.mode().as_str(),
                "failovers": target.cluster.failovers(),
                "nodes": nodes,
            }),
        );
    }
    json_response(StatusCode::OK, json!({ "databases": databases }))
}
