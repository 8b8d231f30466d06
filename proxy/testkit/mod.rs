//! Test and demo tooling, outside the serving path (feature `testkit`):
//! throwaway local PostgreSQL nodes, and `pgheal demo` built on them.

pub mod demo;
pub mod localpg;

pub use localpg::{free_port, LocalPgError, PgNode};
