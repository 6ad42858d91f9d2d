//! The shape of a shard map file exactly as written, before validation.
//!
//! Names (mapping keys) and values that are checked later are `Spanned`, so a validation
//! error can point at the line of the offending shard, entry or table. Every struct
//! denies unknown fields: a misspelt key in a map that decides where data lives must fail.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_saphyr::Spanned;

pub(crate) type Text = Spanned<String>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawShardMap {
    pub version: u64,
    pub database: Text,
    pub shards: Spanned<Entries<RawShard>>,
    pub keyspaces: Option<Entries<RawKeyspace>>,
    pub tables: Option<Entries<RawTable>>,
    pub default_shard: Text,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawShard {
    pub primary: Text,
    pub replicas: Option<Vec<Text>>,
}

/// One struct for all keyspace types; which fields are allowed depends on `type` and is
/// checked in `keyspace.rs`, where the error can say "`buckets` is only for hash".
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKeyspace {
    #[serde(rename = "type")]
    pub kind: Text,
    pub buckets: Option<Spanned<u32>>,
    /// Hash keyspaces: the key column's type family (`int`, `text`, `uuid`).
    pub key_type: Option<Text>,
    pub map: Spanned<Vec<Spanned<RawEntry>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEntry {
    /// Hash keyspaces: `N` or `A-B`, inclusive.
    pub buckets: Option<Text>,
    /// Range and time keyspaces: inclusive lower bound; absent means unbounded.
    pub from: Option<Text>,
    /// Range and time keyspaces: exclusive upper bound; absent means unbounded.
    pub until: Option<Text>,
    pub shard: Text,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTable {
    pub column: Option<Text>,
    pub keyspace: Option<Text>,
    pub reference: Option<Spanned<bool>>,
}

/// A YAML mapping read as ordered `(name, value)` pairs, keeping each name's position.
/// Duplicate names never get here: serde-saphyr rejects duplicate keys with their line.
#[derive(Debug)]
pub(crate) struct Entries<V>(pub Vec<(Text, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Entries<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(EntriesVisitor(PhantomData))
    }
}

struct EntriesVisitor<V>(PhantomData<V>);

impl<'de, V: Deserialize<'de>> Visitor<'de> for EntriesVisitor<V> {
    type Value = Entries<V>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping of names to values")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries<V>, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(1024));
        while let Some(name) = map.next_key::<Text>()? {
            entries.push((name, map.next_value()?));
        }
        Ok(Entries(entries))
    }
}
