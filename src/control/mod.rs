//! Control plane: tasks that watch the servers and publish immutable snapshots the
//! data path reads: the monitor (health, role, lag, fencing), and `check` (what
//! `shardgate check` asks the servers). Failover, reload and resharding live in
//! src/app and src/reshard. Nothing in routing/, backend/ or protocol/ imports this
//! module.

pub mod check;
pub mod monitor;
