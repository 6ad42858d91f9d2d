//! The shard map (DESIGN.md section 4): which shards exist, which servers serve them,
//! and which shard owns each key of each sharded table. Loaded from `shard-maps/*.yaml`
//! and validated so that every key maps to exactly one existing shard.
//!
//! A `ShardMap` is an immutable value: the control path builds a new one on `RELOAD`,
//! failover or cutover and publishes it; routing only reads it. This module depends on
//! nothing else in the crate. The file format reference is `docs/configuration.md`.

mod addr;
mod build;
mod error;
pub mod hash;
mod keyspace;
mod raw;
#[cfg(test)]
mod tests;
pub mod time;
mod write;
pub(crate) mod yaml;

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

pub use addr::{NodeAddr, DEFAULT_PORT};
pub use error::ShardMapError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardMap {
    /// The file this was loaded from (shown by `SHOW MAP`).
    pub source: PathBuf,
    /// Bumped by the operator on every edit; the proxy logs old -> new.
    pub version: u64,
    /// Backend database name, unless a node's address names another.
    pub database: String,
    /// Never empty.
    pub shards: BTreeMap<String, ShardSpec>,
    pub keyspaces: BTreeMap<String, Keyspace>,
    /// Tables not listed here live on `default_shard`.
    pub tables: BTreeMap<String, TableRule>,
    /// Always a key of `shards`.
    pub default_shard: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSpec {
    pub primary: NodeAddr,
    pub replicas: Vec<NodeAddr>,
}

/// How key values map to shards. Every map is sorted and covers every possible key
/// exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keyspace {
    /// `bucket = H(key) & (buckets - 1)` with PostgreSQL's extended hash, seed 0.
    Hash {
        /// A power of two.
        buckets: u32,
        /// Which of PostgreSQL's hash functions the key's type uses: `int` (smallint,
        /// integer, bigint: `hashint8extended`, the default), `text` (text, varchar:
        /// `hashtextextended`) or `uuid` (`uuid_hash_extended`). The proxy needs it
        /// because a value such as `'42'` hashes differently as text and as a number.
        key_type: hash::KeyType,
        /// Inclusive bucket ranges, sorted, covering `0..=buckets-1` without overlap.
        map: Vec<(RangeInclusive<u32>, String)>,
    },
    /// Integer keys. Entries are half-open `[from, until)`; `None` is unbounded.
    Range {
        map: Vec<(Option<i64>, Option<i64>, String)>,
    },
    /// timestamptz/timestamp/date keys as microseconds since 1970-01-01T00:00:00Z,
    /// half-open `[from, until)`; `None` is unbounded.
    Time {
        map: Vec<(Option<i64>, Option<i64>, String)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableRule {
    /// Rows live on the shard that owns `column`'s value in `keyspace`.
    Sharded { column: String, keyspace: String },
    /// A full copy on every shard: reads go anywhere, writes go to all.
    Reference,
}

impl ShardMap {
    /// Reads and validates a shard map file.
    pub fn load(path: &Path) -> Result<ShardMap, ShardMapError> {
        let text = std::fs::read_to_string(path).map_err(|source| ShardMapError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        ShardMap::from_yaml_str(&text, path)
    }

    /// Parses and validates `text` as if it had been read from `source`.
    pub fn from_yaml_str(text: &str, source: &Path) -> Result<ShardMap, ShardMapError> {
        build::build(text, source)
            .map_err(|issue| ShardMapError::invalid(source.to_path_buf(), issue))
    }

    /// The shard holding tables the map does not list.
    ///
    /// # Panics
    /// Only if `default_shard` was changed by hand to a name not in `shards`; maps from
    /// [`ShardMap::load`] and [`ShardMap::from_yaml_str`] are validated not to.
    pub fn default_shard(&self) -> &ShardSpec {
        match self.shards.get(&self.default_shard) {
            Some(spec) => spec,
            None => panic!(
                "shard map invariant broken: default_shard {:?} is not a shard",
                self.default_shard
            ),
        }
    }
}
