//! The server side: one connection (connect, authenticate, parameters,
//! reset), pools of them, the prepared statements each holds, cluster
//! health and topology, the router that picks a node, and what statement
//! texts it routes do (remembered per thread).

pub mod analysis;
pub mod cluster;
pub mod conn;
pub mod error;
pub mod freshness;
pub mod health;
pub mod params;
pub mod pool;
pub mod router;
pub mod statements;
