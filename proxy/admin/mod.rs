//! What operators use: the psql admin console, the HTTP endpoints
//! (metrics, health, status) and configuration reload.

pub mod console;
pub mod gauges;
pub mod http;
pub mod reload;
