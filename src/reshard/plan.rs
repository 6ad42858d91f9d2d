//! What a shard-map edit moves: the diff of two validated maps, as key pieces that change
//! owner, and the SQL that says whether a row belongs to a piece (publication row
//! filters, verification, clean-up). Pure: no servers, no I/O; `shardgate plan`, the
//! reload path and the job all use it.

use std::collections::BTreeMap;

use crate::shard_map::hash::KeyType;
use crate::shard_map::time::format_timestamp;
use crate::shard_map::{Keyspace, ShardMap, TableRule};

/// Keys of one keyspace that change owner. Bounds are inclusive-exclusive `[from,
/// until)`: bucket numbers for hash keyspaces, key values for range keyspaces,
/// microseconds since the epoch for time keyspaces; `None` is unbounded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Piece {
    pub from: Option<i64>,
    pub until: Option<i64>,
    pub source: String,
    pub target: String,
}

/// How a keyspace's keys are compared, for the SQL of its pieces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Axis {
    Hash { buckets: u32, key_type: KeyTypeName },
    Range,
    Time,
}

/// `KeyType` as stored in job state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KeyTypeName {
    Int,
    Text,
    Uuid,
}

/// The moves of one keyspace: its pieces and the tables sharded by it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyspaceMove {
    pub keyspace: String,
    pub axis: Axis,
    pub pieces: Vec<Piece>,
    /// (table, key column), in map order.
    pub tables: Vec<(String, String)>,
    /// Hash keyspaces: buckets each shard owned in the old map (row estimates scale a
    /// source's rows by the share of its buckets that move).
    #[serde(default)]
    pub owned_buckets: BTreeMap<String, i64>,
}

/// Everything an edit moves. Empty when only the topology changed.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    pub moves: Vec<KeyspaceMove>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("the backend database changed ({0} -> {1}); a reshard moves rows within one database")]
    Database(String, String),
    #[error("the default shard changed ({0} -> {1}); moving unlisted tables is not supported")]
    DefaultShard(String, String),
    #[error("table {0}: its rule changed; a reshard moves keys of a keyspace, not tables between rules (add the table in one edit, move keys in the next)")]
    Table(String),
    #[error("keyspace {0}: its type or bucket count changed; only its map may change")]
    Kind(String),
    #[error("keyspace {0} was added or removed together with tables that use it")]
    Keyspace(String),
    #[error(
        "keyspace {keyspace}: keys move to shard {shard}, which is not in the new map's shards"
    )]
    UnknownShard { keyspace: String, shard: String },
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.moves.is_empty()
    }

    /// Shards that give keys away.
    pub fn sources(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .moves
            .iter()
            .flat_map(|m| m.pieces.iter().map(|p| p.source.clone()))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// (source, target) pairs, each once: one publication/subscription per pair.
    pub fn pairs(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .moves
            .iter()
            .flat_map(|m| {
                m.pieces
                    .iter()
                    .map(|p| (p.source.clone(), p.target.clone()))
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Per table, the SQL condition for the rows that move from `source` to `target`
    /// (tables with nothing moving between them are left out).
    pub fn filters(&self, source: &str, target: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for m in &self.moves {
            let pieces: Vec<&Piece> = m
                .pieces
                .iter()
                .filter(|p| p.source == source && p.target == target)
                .collect();
            if pieces.is_empty() {
                continue;
            }
            for (table, column) in &m.tables {
                let terms: Vec<String> = pieces
                    .iter()
                    .map(|p| membership(m.axis, column, p.from, p.until))
                    .collect();
                out.push((table.clone(), terms.join(" OR ")));
            }
        }
        out
    }
}

impl Plan {
    /// For a table of a hash keyspace, the share of `source`'s rows that moves to
    /// `target` (buckets are equally likely): moved buckets over the buckets `source`
    /// owned. None for range and time keyspaces, whose rows are estimated by the planner
    /// from column statistics.
    pub fn hash_share(&self, source: &str, target: &str, table: &str) -> Option<f64> {
        let m = self
            .moves
            .iter()
            .find(|m| m.tables.iter().any(|(t, _)| t == table))?;
        let Axis::Hash { buckets, .. } = m.axis else {
            return None;
        };
        let moved: i64 = m
            .pieces
            .iter()
            .filter(|p| p.source == source && p.target == target)
            .map(|p| p.until.unwrap_or(i64::from(buckets)) - p.from.unwrap_or(0))
            .sum();
        let owned = m
            .owned_buckets
            .get(source)
            .copied()
            .unwrap_or(i64::from(buckets));
        Some(moved as f64 / owned.max(1) as f64)
    }
}

/// The diff of two maps. Errors for edits a reshard cannot carry out.
pub fn diff(old: &ShardMap, new: &ShardMap) -> Result<Plan, PlanError> {
    if old.database != new.database {
        return Err(PlanError::Database(
            old.database.clone(),
            new.database.clone(),
        ));
    }
    if old.default_shard != new.default_shard {
        return Err(PlanError::DefaultShard(
            old.default_shard.clone(),
            new.default_shard.clone(),
        ));
    }
    let names: std::collections::BTreeSet<&String> =
        old.tables.keys().chain(new.tables.keys()).collect();
    for name in names {
        if old.tables.get(name) != new.tables.get(name) {
            return Err(PlanError::Table(name.clone()));
        }
    }
    let mut moves = Vec::new();
    for (name, before) in &old.keyspaces {
        let Some(after) = new.keyspaces.get(name) else {
            if used_by(old, name).is_empty() {
                continue;
            }
            return Err(PlanError::Keyspace(name.clone()));
        };
        let (axis, pieces) = keyspace_diff(name, before, after)?;
        if pieces.is_empty() {
            continue;
        }
        for piece in &pieces {
            if !new.shards.contains_key(&piece.target) {
                return Err(PlanError::UnknownShard {
                    keyspace: name.clone(),
                    shard: piece.target.clone(),
                });
            }
        }
        let tables = used_by(old, name);
        if tables.is_empty() {
            continue;
        }
        let owned_buckets = match before {
            Keyspace::Hash { map, .. } => {
                let mut owned = BTreeMap::new();
                for (range, shard) in map {
                    *owned.entry(shard.clone()).or_insert(0) +=
                        i64::from(*range.end()) - i64::from(*range.start()) + 1;
                }
                owned
            }
            _ => BTreeMap::new(),
        };
        moves.push(KeyspaceMove {
            keyspace: name.clone(),
            axis,
            pieces,
            tables,
            owned_buckets,
        });
    }
    Ok(Plan { moves })
}

fn used_by(map: &ShardMap, keyspace: &str) -> Vec<(String, String)> {
    map.tables
        .iter()
        .filter_map(|(table, rule)| match rule {
            TableRule::Sharded {
                column,
                keyspace: k,
            } if k == keyspace => Some((table.clone(), column.clone())),
            _ => None,
        })
        .collect()
}

/// Owner boundaries of one keyspace: (first key, owner), sorted; the first starts at
/// `None` (minus infinity).
type Line = Vec<(Option<i64>, String)>;

fn keyspace_diff(
    name: &str,
    before: &Keyspace,
    after: &Keyspace,
) -> Result<(Axis, Vec<Piece>), PlanError> {
    let kind = || PlanError::Kind(name.to_owned());
    let (axis, old, new) = match (before, after) {
        (
            Keyspace::Hash {
                buckets,
                key_type,
                map,
            },
            Keyspace::Hash {
                buckets: b2,
                key_type: k2,
                map: m2,
            },
        ) => {
            if buckets != b2 || key_type != k2 {
                return Err(kind());
            }
            let line = |map: &Vec<(std::ops::RangeInclusive<u32>, String)>| -> Line {
                map.iter()
                    .enumerate()
                    .map(|(i, (r, s))| ((i > 0).then_some(i64::from(*r.start())), s.clone()))
                    .collect()
            };
            let axis = Axis::Hash {
                buckets: *buckets,
                key_type: match key_type {
                    KeyType::Int => KeyTypeName::Int,
                    KeyType::Text => KeyTypeName::Text,
                    KeyType::Uuid => KeyTypeName::Uuid,
                },
            };
            (axis, line(map), line(m2))
        }
        (Keyspace::Range { map }, Keyspace::Range { map: m2 }) => {
            (Axis::Range, interval_line(map), interval_line(m2))
        }
        (Keyspace::Time { map }, Keyspace::Time { map: m2 }) => {
            (Axis::Time, interval_line(map), interval_line(m2))
        }
        _ => return Err(kind()),
    };
    let mut pieces = diff_lines(&old, &new);
    if let Axis::Hash { buckets, .. } = axis {
        // Hash lines end at the last bucket, not at infinity.
        for p in &mut pieces {
            if p.until.is_none() {
                p.until = Some(i64::from(buckets));
            }
            if p.from.is_none() {
                p.from = Some(0);
            }
        }
    }
    Ok((axis, pieces))
}

fn interval_line(map: &[(Option<i64>, Option<i64>, String)]) -> Line {
    map.iter().map(|(from, _, s)| (*from, s.clone())).collect()
}

/// Walks both lines' boundaries together and keeps the stretches whose owner differs,
/// merging neighbours with the same (source, target).
fn diff_lines(old: &Line, new: &Line) -> Vec<Piece> {
    let mut starts: Vec<Option<i64>> = old.iter().chain(new).map(|(s, _)| *s).collect();
    starts.sort();
    starts.dedup();
    let owner = |line: &Line, at: Option<i64>| -> String {
        // The last boundary at or before `at` (None sorts first).
        let i = line.partition_point(|(s, _)| *s <= at);
        line[i.saturating_sub(1)].1.clone()
    };
    let mut pieces: Vec<Piece> = Vec::new();
    for (i, start) in starts.iter().enumerate() {
        let until = starts.get(i + 1).copied().flatten();
        let (source, target) = (owner(old, *start), owner(new, *start));
        if source == target {
            continue;
        }
        match pieces.last_mut() {
            Some(last)
                if last.until == *start && last.source == source && last.target == target =>
            {
                last.until = until;
            }
            _ => pieces.push(Piece {
                from: *start,
                until,
                source,
                target,
            }),
        }
    }
    pieces
}

/// `column`'s rows in `[from, until)` of the keyspace, as SQL a publication row filter
/// accepts (immutable built-ins and constants only).
pub fn membership(axis: Axis, column: &str, from: Option<i64>, until: Option<i64>) -> String {
    let col = quote_ident(column);
    match axis {
        Axis::Hash { buckets, key_type } => {
            let hash = match key_type {
                KeyTypeName::Int => format!("hashint8extended({col}::int8, 0)"),
                KeyTypeName::Text => format!("hashtextextended({col}::text, 0)"),
                KeyTypeName::Uuid => format!("uuid_hash_extended({col}, 0)"),
            };
            let lo = from.unwrap_or(0);
            let hi = until.unwrap_or(i64::from(buckets)) - 1;
            format!("(({hash} & {}) BETWEEN {lo} AND {hi})", buckets - 1)
        }
        Axis::Range => bounds(
            &col,
            from.map(|v| v.to_string()),
            until.map(|v| v.to_string()),
        ),
        Axis::Time => bounds(
            &col,
            from.map(|v| format!("'{}'", format_timestamp(v))),
            until.map(|v| format!("'{}'", format_timestamp(v))),
        ),
    }
}

fn bounds(col: &str, from: Option<String>, until: Option<String>) -> String {
    match (from, until) {
        (Some(f), Some(u)) => format!("({col} >= {f} AND {col} < {u})"),
        (Some(f), None) => format!("({col} >= {f})"),
        (None, Some(u)) => format!("({col} < {u})"),
        (None, None) => format!("({col} IS NOT NULL)"),
    }
}

/// A (possibly schema-qualified) name as SQL: each part quoted.
pub fn quote_name(name: &str) -> String {
    name.split('.')
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(".")
}

pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A piece's keys as an operator reads them.
pub fn describe(axis: Axis, piece: &Piece) -> String {
    let show = |v: i64| match axis {
        Axis::Time => format_timestamp(v),
        _ => v.to_string(),
    };
    match axis {
        Axis::Hash { .. } => format!(
            "buckets {}-{}",
            piece.from.unwrap_or(0),
            piece.until.map_or(0, |u| u - 1)
        ),
        _ => match (piece.from, piece.until) {
            (Some(f), Some(u)) => format!("[{}, {})", show(f), show(u)),
            (Some(f), None) => format!("[{}, +inf)", show(f)),
            (None, Some(u)) => format!("(-inf, {})", show(u)),
            (None, None) => "all keys".to_owned(),
        },
    }
}

/// Shards of `new` not in `old` and the other way round (topology only).
pub fn shard_changes(old: &ShardMap, new: &ShardMap) -> (Vec<String>, Vec<String>) {
    let added = new
        .shards
        .keys()
        .filter(|s| !old.shards.contains_key(*s))
        .cloned()
        .collect();
    let removed = old
        .shards
        .keys()
        .filter(|s| !new.shards.contains_key(*s))
        .cloned()
        .collect();
    (added, removed)
}

/// The map routing follows while a job runs: the old ownership, with the shards of both
/// maps (the new map's specs where both name a shard), so new shards get pools and
/// monitors and shards that are emptied keep serving until cutover.
pub fn interim_map(old: &ShardMap, new: &ShardMap) -> ShardMap {
    let mut shards: BTreeMap<_, _> = old.shards.clone();
    for (name, spec) in &new.shards {
        shards.insert(name.clone(), spec.clone());
    }
    ShardMap {
        source: new.source.clone(),
        version: old.version,
        database: old.database.clone(),
        shards,
        keyspaces: old.keyspaces.clone(),
        tables: old.tables.clone(),
        default_shard: old.default_shard.clone(),
    }
}

#[cfg(test)]
mod tests;
