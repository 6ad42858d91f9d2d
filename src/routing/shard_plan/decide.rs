//! The last step of `route`: from the shard set of every table reference to a
//! `Target`, per statement kind, with the refusals of DESIGN.md 5.4.

use smallvec::SmallVec;

use super::{Kind, Resolved, Routing, ShardSet, Target, Val};
use crate::shard_map::Keyspace;

impl Routing<'_, '_, '_> {
    pub(super) fn decide(&mut self) -> Target {
        match &self.plan.kind {
            Kind::Read => self.read(),
            Kind::Insert(_) => self.insert(),
            Kind::Update { target, sets } => self.update_or_delete(usize::from(*target), sets),
            Kind::Delete { target } => self.update_or_delete(usize::from(*target), &[]),
            Kind::Ddl {
                tables,
                schema_wide,
            } => {
                if *schema_wide {
                    return Target::All { write: true };
                }
                let mapped = tables
                    .iter()
                    .filter(|t| self.map.tables.contains_key(&***t))
                    .count();
                match mapped {
                    0 => Target::Default,
                    n if n == tables.len() => Target::All { write: true },
                    _ => Target::Refuse(
                        "DDL naming both mapped (sharded or reference) and unmapped tables; run it per table".into(),
                    ),
                }
            }
            Kind::CopyTo(table) => match self.map.tables.get(&**table) {
                Some(crate::shard_map::TableRule::Sharded { .. }) => Target::All { write: false },
                Some(crate::shard_map::TableRule::Reference) => Target::AnyOne,
                None => Target::Default,
            },
            Kind::CopyFrom(table) => match self.map.tables.get(&**table) {
                Some(crate::shard_map::TableRule::Sharded { .. }) => Target::Refuse(format!(
                    "COPY FROM into sharded table \"{table}\" is not supported; use INSERT"
                )),
                Some(crate::shard_map::TableRule::Reference) => Target::All { write: true },
                None => Target::Default,
            },
            Kind::UnplannedWrite(what) => {
                if self
                    .resolved
                    .iter()
                    .all(|r| matches!(r, Resolved::Unmapped))
                {
                    Target::Default
                } else {
                    Target::Refuse(format!(
                        "{what} touching sharded or reference tables is not supported"
                    ))
                }
            }
            Kind::Utility => Target::Default,
        }
    }

    fn sharded(&self) -> impl Iterator<Item = usize> + '_ {
        // Shortened to `self`'s lifetime (covariance), which is all the iterator holds.
        let resolved: &[Resolved<'_>] = &self.resolved;
        (0..resolved.len()).filter(move |&b| matches!(resolved[b], Resolved::Sharded { .. }))
    }

    fn union_all(&self) -> ShardSet {
        self.sharded()
            .fold(ShardSet::default(), |acc, b| acc.or(self.set(b)))
    }

    /// Why a multi-shard execution would be wrong, if it would.
    fn multi_shard_problem(&mut self) -> Option<String> {
        let sharded: super::PerRef<usize> = self.sharded().collect();
        let root = self.find(*sharded.first()?);
        for &b in &sharded[1..] {
            if self.find(b) != root {
                let (x, y) = (
                    &self.plan.bindings[sharded[0]].table,
                    &self.plan.bindings[b].table,
                );
                return Some(format!(
                    "tables \"{x}\" and \"{y}\" are not joined on their shard keys and the statement spans several shards; add the key to the WHERE clause"
                ));
            }
        }
        // A subquery that aggregates (or limits, or de-duplicates) a sharded table gives
        // per-shard answers, unless it is correlated on the key with an outer table.
        for &b in &sharded {
            let scope = usize::from(self.plan.bindings[b].scope);
            let s = &self.plan.scopes[scope];
            if s.grouped && !s.top && !self.linked_outward(b) {
                return Some(format!(
                    "a subquery aggregating, limiting or de-duplicating sharded table \"{}\" across shards is not supported",
                    self.plan.bindings[b].table
                ));
            }
        }
        None
    }

    /// `b` is linked by a key equality to a reference of another scope.
    fn linked_outward(&mut self, b: usize) -> bool {
        let scope = self.plan.bindings[b].scope;
        let root = self.find(b);
        (0..self.resolved.len())
            .any(|o| self.plan.bindings[o].scope != scope && self.find(o) == root && o != b)
    }

    fn target_of(&self, set: ShardSet, write: bool) -> Target {
        if set.len() == self.map.shards.len() && set.len() > 1 {
            Target::All { write }
        } else {
            Target::Shards(set.to_vec())
        }
    }

    fn default_index(&self) -> usize {
        super::shard_index(self.map, &self.map.default_shard).unwrap_or(0)
    }

    fn read(&mut self) -> Target {
        if self.sharded().next().is_none() {
            return if self
                .resolved
                .iter()
                .any(|r| matches!(r, Resolved::Reference))
            {
                Target::AnyOne
            } else {
                Target::Default
            };
        }
        let set = self.union_all();
        match set.len() {
            // No sharded row can match: any one shard answers with no rows.
            0 => Target::Shards(vec![self.default_index()]),
            1 => Target::Shards(set.to_vec()),
            _ => {
                if let Some(why) = self.multi_shard_problem() {
                    return Target::Refuse(why);
                }
                if let Some(Err(why)) = &self.plan.merge {
                    return Target::Refuse(why.clone());
                }
                self.target_of(set, false)
            }
        }
    }

    /// The write target's rule, and whether the rest of the statement is compatible.
    fn update_or_delete(&mut self, target: usize, sets: &[(Box<str>, Option<Val>)]) -> Target {
        match self.resolved[target] {
            Resolved::Reference => {
                if !self.sharded().any(|b| b != target) {
                    Target::All { write: true }
                } else {
                    Target::Refuse(format!(
                        "a write to reference table \"{}\" that reads sharded tables is not supported",
                        self.plan.bindings[target].table
                    ))
                }
            }
            Resolved::Unmapped => self.unmapped_write(),
            Resolved::Sharded {
                column, keyspace, ..
            } => {
                let table = &self.plan.bindings[target].table;
                if !self.keyed[target] {
                    return Target::Refuse(format!(
                        "write to sharded table \"{table}\" needs its key column \"{column}\" in the statement"
                    ));
                }
                let set = self.union_all();
                if set.len() > 1 {
                    if let Some(why) = self.multi_shard_problem() {
                        return Target::Refuse(why);
                    }
                }
                for (col, val) in sets {
                    if **col != *column {
                        continue;
                    }
                    let time = self.time_of_binding(target);
                    let moved = val.as_ref().and_then(|v| {
                        let raw = super::values::fetch(&v.src, self.values)?;
                        super::point_shards(keyspace, self.map, super::Op::Eq, raw, v, &time)
                    });
                    match moved {
                        Some(s) if s.len() == 1 && (set.len() == 0 || s == set) => {}
                        _ => {
                            return Target::Refuse(format!(
                                "UPDATE of sharded table \"{table}\" may move rows to another shard: its key column \"{column}\" can only be set to a value of the same shard"
                            ))
                        }
                    }
                }
                if set.len() == 0 {
                    return Target::Shards(vec![self.default_index()]);
                }
                self.target_of(set, true)
            }
        }
    }

    /// A write to a table the map does not list, which lives on the default shard: the
    /// sharded tables it reads must be there too.
    fn unmapped_write(&self) -> Target {
        let set = self.union_all();
        let default = self.default_index();
        if set.iter().any(|i| i != default) {
            return Target::Refuse(
                "a write to an unsharded table that reads sharded rows outside the default shard is not supported".into(),
            );
        }
        if self
            .resolved
            .iter()
            .any(|r| matches!(r, Resolved::Reference))
            || set.len() > 0
        {
            return Target::Shards(vec![default]);
        }
        Target::Default
    }

    fn insert(&mut self) -> Target {
        let Kind::Insert(ins) = &self.plan.kind else {
            return Target::Default;
        };
        let target = usize::from(ins.target);
        let table = &self.plan.bindings[target].table;
        let readers = self.sharded().any(|b| b != target);
        let (column, keyspace) = match self.resolved[target] {
            Resolved::Reference if readers => {
                return Target::Refuse(format!(
                    "INSERT into reference table \"{table}\" from sharded tables is not supported"
                ))
            }
            Resolved::Reference => return Target::All { write: true },
            Resolved::Unmapped => return self.unmapped_write(),
            Resolved::Sharded {
                column, keyspace, ..
            } => (column, keyspace),
        };
        let Some(columns) = &ins.columns else {
            return Target::Refuse(format!(
                "INSERT into sharded table \"{table}\" needs a column list naming its key column \"{column}\""
            ));
        };
        let Some(pos) = columns.iter().position(|c| **c == *column) else {
            return Target::Refuse(format!(
                "write to sharded table \"{table}\" needs its key column \"{column}\" in the statement"
            ));
        };
        if ins.conflict_sets.iter().any(|c| **c == *column) {
            return Target::Refuse(format!(
                "ON CONFLICT DO UPDATE may not set the key column \"{column}\" of sharded table \"{table}\""
            ));
        }
        let Some(rows) = &ins.rows else {
            return Target::Refuse(format!(
                "INSERT ... SELECT into sharded table \"{table}\" is not supported; insert VALUES"
            ));
        };
        let shards = match self.row_shards(rows, pos, keyspace, target) {
            Ok(shards) => shards,
            Err(row) => {
                return Target::Refuse(format!(
                    "cannot tell the shard of row {} inserted into sharded table \"{table}\": its key \"{column}\" must be a literal or parameter of the key's type, not NULL (time keys: within 16 hours of a shard boundary the column type must be known and, for timestamptz, the value carry a UTC offset or the session TimeZone be UTC: docs/sharding.md)",
                    row + 1
                ))
            }
        };
        let first = shards.first().copied();
        let one_shard = shards.iter().all(|&s| Some(s) == first);
        if readers {
            let others = self
                .sharded()
                .filter(|&b| b != target)
                .fold(ShardSet::default(), |acc, b| acc.or(self.set(b)));
            let alone = first.is_some() && one_shard && others.iter().all(|s| Some(s) == first);
            if !alone {
                return Target::Refuse(format!(
                    "INSERT into sharded table \"{table}\" reads sharded rows of other shards"
                ));
            }
        }
        match first {
            None => Target::Default,
            Some(shard) if one_shard => Target::Shards(vec![shard]),
            Some(_) => Target::SplitInsert(split_rows(&shards)),
        }
    }

    /// The shard of every VALUES row (its key at column `pos`), or the index of the
    /// first row whose shard cannot be told.
    fn row_shards(
        &self,
        rows: &[Vec<Option<Val>>],
        pos: usize,
        keyspace: &Keyspace,
        target: usize,
    ) -> Result<SmallVec<[usize; 8]>, usize> {
        let mut shards = SmallVec::with_capacity(rows.len());
        let time = self.time_of_binding(target);
        for (i, row) in rows.iter().enumerate() {
            let shard = row.get(pos).and_then(Option::as_ref).and_then(|v| {
                let raw = super::values::fetch(&v.src, self.values)?;
                let s = super::point_shards(keyspace, self.map, super::Op::Eq, raw, v, &time)?;
                (s.len() == 1).then(|| s.first()).flatten()
            });
            shards.push(shard.ok_or(i)?);
        }
        Ok(shards)
    }
}

/// Rows grouped by shard: per shard (sorted), its rows' indexes in VALUES order.
fn split_rows(shards: &[usize]) -> Vec<(usize, Vec<usize>)> {
    let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
    for (i, &shard) in shards.iter().enumerate() {
        match groups.iter_mut().find(|g| g.0 == shard) {
            Some(g) => g.1.push(i),
            None => groups.push((shard, vec![i])),
        }
    }
    groups.sort_by_key(|g| g.0);
    groups
}
