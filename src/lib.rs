//! shardgate: a PostgreSQL wire-protocol proxy for read/write splitting and sharding.
//!
//! The data path, top to bottom: `frontend` accepts clients (startup, auth, the
//! per-client session loop), asks `routing` where each transaction goes (statement
//! analysis with sqlparser, cached by text; a pure `route` function over the
//! freshness snapshot), and forwards frames (`protocol`) to a server connection from
//! `backend`'s pools, passing the server's frames back without re-encoding them.
//!
//! The control path, beside it: `control` (the monitor) probes every node and
//! publishes immutable `topology` snapshots that sessions read without locks.
//! `config` and `shard_map` load and validate the two YAML files; `app` wires
//! everything together and owns shutdown; `demo` and `local_cluster` run a local
//! cluster for the two-command promise.

pub mod admin;
pub mod app;
pub mod backend;
pub mod config;
pub mod control;
pub mod demo;
pub mod frontend;
pub mod local_cluster;
pub mod merge;
pub mod protocol;
pub mod reshard;
pub mod routing;
pub mod shard_map;
pub mod topology;
