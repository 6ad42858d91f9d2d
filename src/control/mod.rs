//! Control plane: tasks that watch the servers and publish immutable snapshots the
//! data path reads. For now the monitor (health, role, lag); failover, reload and
//! resharding join it in later issues. Nothing in routing/, backend/ or protocol/
//! imports this module.

pub mod monitor;
