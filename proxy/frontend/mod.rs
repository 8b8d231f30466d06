//! The client side: the state every client task shares, login and client
//! authentication, cancel keys, the client registry, errors as clients see
//! them, and the per-client session that runs the data path.

mod app;
pub mod auth_query;
pub mod cancel;
pub mod clients;
pub mod error;
pub mod login;
pub mod session;

pub use app::{App, Counters, Target, TargetStats};
