//! PostgreSQL wire protocol pieces for pgheal: framing, startup packets, typed
//! views over the messages the proxy inspects, and builders for the messages
//! it sends. No I/O: every parser takes bytes and returns `Ok(None)` (or
//! [`frame::Step::NeedMore`]) when it needs more, and a typed error on
//! malformed input. Nothing here panics on any input.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod backend;
pub mod build;
pub mod classify;
pub mod effects;
pub mod frame;
pub mod frontend;
pub mod intent;
pub mod sqlstate;
pub mod startup;

mod cursor;
mod keyword;

pub use frame::{FrameError, Scanner, Step};
