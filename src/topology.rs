//! The immutable snapshots the data path reads and the control plane publishes:
//! - `Topology`: the shard map and, per shard, its nodes and freshness; replaced by a
//!   reload. A session takes one per transaction (when it holds no server).
//! - `Freshness`: the health and lag of one shard's nodes; the shard's monitor builds a
//!   new one every `lag_check_interval` and swaps it in. Sessions load it once per
//!   routing decision (`arc_swap`, no lock).

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;

/// Why a node gets no reads right now (shown by the admin console, logged on change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exclusion {
    /// No probe has completed yet.
    Unknown,
    /// The last probe failed (connect or query error); retried with backoff.
    Down(String),
    /// The node is not in recovery: it is not a replica (or was promoted).
    NotReplica,
    /// Replay is further behind than `max_replica_lag` / `max_replica_lag_bytes`, or
    /// has not yet come back under the re-admission threshold (hysteresis).
    Lagging { bytes: u64, millis: u64 },
    /// The node answers as a primary but must not be one: its timeline is older than
    /// one seen elsewhere in the shard, it belongs to another database system, or the
    /// map names another primary (control/monitor/fence.rs). It gets no reads, and the
    /// control plane keeps writes away from it even when it is the map's primary.
    Fenced(String),
}

/// One node as the monitor last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFreshness {
    /// "host:port", for logs and the console.
    pub addr: String,
    pub healthy: bool,
    pub in_recovery: bool,
    /// Primary: current WAL insert position. Replica: last replayed position.
    pub lsn: u64,
    /// Replica only: bytes of WAL behind the primary's position at probe time.
    pub lag_bytes: u64,
    /// Replica only: 0 when it has replayed everything it received.
    pub lag_millis: u64,
    /// None when the node may serve reads (replicas; the primary always may, unless
    /// it is `Fenced`).
    pub excluded: Option<Exclusion>,
}

/// Freshness of one shard's nodes: index 0 is the primary, 1.. the replicas, in map order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Freshness {
    pub nodes: Vec<NodeFreshness>,
    /// Increases with every published snapshot.
    pub generation: u64,
    /// Recent primary probes, oldest first: when the probe was sent, and the primary's
    /// WAL insert position it returned. Read-your-writes uses them (DESIGN 5.3).
    pub primary_marks: Vec<(Instant, u64)>,
}

impl Freshness {
    /// A WAL position that includes everything the primary committed before `t`: the
    /// position of the first probe sent at or after `t` (a probe runs after it is
    /// sent, so after the commit). None until such a probe has come back.
    pub fn position_after(&self, t: Instant) -> Option<u64> {
        // Marks are in the order the probes were sent: a binary search.
        let first = self.primary_marks.partition_point(|&(sent, _)| sent < t);
        self.primary_marks.get(first).map(|&(_, lsn)| lsn)
    }

    /// Replicas that may serve reads, as node indexes (never 0).
    pub fn eligible_replicas(&self) -> impl Iterator<Item = (usize, &NodeFreshness)> {
        self.nodes
            .iter()
            .enumerate()
            .skip(1)
            .filter(|(_, n)| n.healthy && n.excluded.is_none())
    }
}

/// Where the control plane publishes and the data path reads.
pub type SharedFreshness = Arc<ArcSwap<Freshness>>;

/// A node of a shard: index 0 the primary, then the replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendNode {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
    /// The node's own database (`postgres://host:port/dbname`); the map's otherwise.
    pub database: Option<String>,
}

/// One shard as the data path uses it.
pub struct ShardRuntime {
    pub name: String,
    /// Index 0 the primary, then the replicas in map order.
    pub nodes: Vec<BackendNode>,
    /// Node health and lag, published by this shard's monitor.
    pub fresh: SharedFreshness,
    /// A WAL position (of this shard's primary) its replicas must have replayed before
    /// they serve reads: set when a reshard cutover moved keys here, 0 otherwise.
    pub read_floor: u64,
}

/// The shard map and the shards it names, as one immutable value.
pub struct Topology {
    pub map: Arc<crate::shard_map::ShardMap>,
    /// The map's shards in its (name) order: routing names shards by this index.
    pub shards: Vec<ShardRuntime>,
    /// Index of the map's `default_shard` in `shards`.
    pub default_shard: usize,
    /// Increases with every reload that changed something.
    pub generation: u64,
}

impl Topology {
    /// Whether routing has to look for shard keys at all.
    pub fn sharded(&self) -> bool {
        self.shards.len() > 1
    }
}

/// Parses a PostgreSQL LSN ("16/B374D848") into a byte position.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    Some((hi << 32) | lo)
}

pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trip() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("x"), None);
    }
}
