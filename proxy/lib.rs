//! pgheal: a PostgreSQL wire-protocol proxy that pools server connections
//! and keeps applications working while the nodes behind it fail.
//!
//! Modules form layers; each uses only those listed before it (checked by
//! `tests/architecture.rs`):
//!
//! 1. `sync`, `auth`, `metrics`, `events`, `net`: lock helpers, SCRAM/md5,
//!    counters, the event ring, the byte stream (plain or TLS);
//! 2. `config`: the TOML file read into a validated type;
//! 3. `backend`: one server connection, pools, session parameters,
//!    prepared statements, cluster health and topology, the router;
//! 4. `frontend`: the shared state, login, cancel keys, the client
//!    registry, and the per-client session (the data path);
//! 5. `ops`: migrations and backups;
//! 6. `admin`: psql console, HTTP endpoints, reload;
//! 7. `server`: the accept loop and the process's life (signals, shutdown);
//! 8. `testkit` (feature `testkit`, on by default): throwaway local
//!    PostgreSQL nodes for `pgheal demo` and the tests; nothing that
//!    serves clients uses it.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub(crate) mod sync;

pub mod auth;
pub mod events;
pub mod metrics;
pub mod net;

pub mod config;

pub mod backend;

pub mod frontend;

pub mod ops;

pub mod admin;

pub mod server;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use backend::cluster::HEALTH_APPLICATION_NAME;
pub use frontend::{App, Target};
