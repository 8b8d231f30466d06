//! What operators use: the psql admin console, the HTTP endpoints
//! (status page, metrics, health, status, events) and configuration reload.

pub mod console;
pub mod gauges;
pub mod http;
mod https;
mod page;
pub mod reload;
mod samples;
