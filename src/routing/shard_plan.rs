//! The shard planner (DESIGN.md 5.4): which shard(s) one statement goes to.
//!
//! Two steps, so that the expensive one runs once per statement *shape*:
//! - [`plan`] parses the text (sqlparser, PostgreSqlDialect) and records, without the
//!   shard map, every table reference, every condition that restricts a table's rows
//!   (as a tree of comparisons whose values are *positions*: the n-th literal of the
//!   text, the n-th bind parameter) and, for keyless reads, the merge shape. Literals
//!   are numbered exactly as the analysis cache blanks them ([`literal_spans`]), so one
//!   plan serves every text with the same cache key.
//! - [`route`] takes one execution's values and the current map and picks the shards:
//!   no parsing, and no heap allocation beyond the result's own vector (per-reference
//!   state lives inline for statements with up to [`INLINE_REFS`] table references).
//!
//! Soundness rules the code relies on (each narrowing must be provable):
//! - A condition restricts a table reference when no row of that table failing it can
//!   affect the result: the WHERE of the reference's own SELECT, the ON of an inner
//!   join, and the ON of an outer join for its nullable side only.
//! - An unqualified column equal to a sharded table's key column is that table's key:
//!   had it named another table's column in the same FROM, PostgreSQL would have
//!   reported it as ambiguous.
//! - `a.key = b.key` between tables of the same keyspace co-locates them; a multi-shard
//!   read is only run (and concatenated or merged) when every sharded table of the
//!   statement is linked this way; a single-shard route needs no such proof.
//! - Time values are widened by 16 hours either way, because the map does not say
//!   whether the column is timestamp or timestamptz nor the session's TimeZone.

mod extract;
mod merge;
mod values;

#[cfg(test)]
mod tests;

use std::ops::Range;

use smallvec::SmallVec;

use crate::shard_map::hash::{bucket, key_hash, KeyType, KeyValue};
use crate::shard_map::{Keyspace, ShardMap, TableRule};

pub use extract::plan;
pub use merge::{shard_sql, ColumnSource, MergeShape, OutputColumn, SortKey};
pub use values::literal_spans;

use values::Raw;

/// Maps with more shards than this route every sharded statement as unknown-key
/// (reads to all shards, writes refused): shard sets are fixed-size bit sets so that
/// routing does not allocate.
pub const MAX_SHARDS: usize = 256;

/// Table references per statement whose routing state stays on the stack; statements
/// with more spill to the heap (correct, only slower).
const INLINE_REFS: usize = 4;

/// Per-table-reference state of one `route` call.
type PerRef<T> = SmallVec<[T; INLINE_REFS]>;

/// Where values come from for one execution.
pub struct Values<'a> {
    pub text: &'a str,
    /// [`literal_spans`] of `text`; ignored by plans of texts it refused.
    pub literals: &'a [Range<usize>],
    /// Bind parameters (`$1` = index 0): `None` = NULL.
    pub params: &'a [Option<&'a [u8]>],
    /// Per parameter: format code (0 text, 1 binary), Bind's 0/1/N rule already expanded.
    pub param_formats: &'a [i16],
    /// Per parameter: type OID from Parse (0 = unspecified).
    pub param_types: &'a [u32],
    /// What the session knows about time keys (exact placement when known).
    pub time: TimeKeys<'a>,
}

/// The type of a table's time key column, as the catalog says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeColumn {
    Timestamptz,
    Timestamp,
    Date,
}

impl TimeColumn {
    /// From `format_type(atttypid, NULL)`; None for types time keyspaces do not take.
    pub fn from_type_name(name: &str) -> Option<TimeColumn> {
        match name {
            "timestamp with time zone" => Some(TimeColumn::Timestamptz),
            "timestamp without time zone" => Some(TimeColumn::Timestamp),
            "date" => Some(TimeColumn::Date),
            _ => None,
        }
    }
}

/// What a session knows about time keys. Without it (the default) a time value is
/// known only to within 16 hours: PostgreSQL reads a literal differently for
/// `timestamp` and `timestamptz` columns and by the session's TimeZone.
#[derive(Debug, Clone, Copy, Default)]
pub struct TimeKeys<'a> {
    /// Tables of time keyspaces (by their name in the map) and their key column's type.
    pub columns: &'a [(String, TimeColumn)],
    /// The session's TimeZone as seconds east of UTC, when it is a fixed offset (UTC).
    pub utc_offset: Option<i32>,
}

impl TimeKeys<'_> {
    fn column(&self, table: &str) -> Option<TimeColumn> {
        self.columns
            .iter()
            .find(|(t, _)| t == table)
            .map(|(_, c)| *c)
    }
}

impl<'a> Values<'a> {
    /// The values of a simple-protocol text with no parameters.
    pub fn simple(text: &'a str, literals: &'a [Range<usize>]) -> Values<'a> {
        Values {
            text,
            literals,
            params: &[],
            param_formats: &[],
            param_types: &[],
            time: TimeKeys::default(),
        }
    }

    /// The same values, read with what the session knows about time keys.
    pub fn with_time(self, time: TimeKeys<'a>) -> Values<'a> {
        Values { time, ..self }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Tables not in the map (or none): the default shard.
    Default,
    /// Only reference tables are read: any one shard will do.
    AnyOne,
    /// Exactly these shards (indexes into `map.shards` in its order), sorted and
    /// deduplicated. One element = single-shard. A read on several needs the merge
    /// shape ([`ShardPlan::merge`]).
    Shards(Vec<usize>),
    /// Every shard: keyless reads (merge with [`ShardPlan::merge`]), DDL of mapped
    /// tables and schema-wide objects, writes to reference tables.
    All { write: bool },
    /// A multi-row INSERT into a sharded table whose rows belong to several shards: per
    /// shard (sorted), the indexes of its rows in the VALUES list.
    SplitInsert(Vec<(usize, Vec<usize>)>),
    /// Refused with SQLSTATE 0A000 and this message.
    Refuse(String),
    /// sqlparser could not parse the text, so its tables are unknown. The caller sends
    /// it to the default shard when the map has one shard, and refuses it otherwise.
    Unknown,
}

/// A statement's routing template; see the module comment.
#[derive(Debug, Clone)]
pub struct ShardPlan {
    statements: Vec<StatementPlan>,
    parsed: bool,
}

impl ShardPlan {
    /// False when sqlparser rejected the text ([`route`] then says `Unknown`).
    pub fn parsed(&self) -> bool {
        self.parsed
    }

    /// Every statement only reads.
    pub fn is_read(&self) -> bool {
        self.parsed && self.statements.iter().all(|s| matches!(s.kind, Kind::Read))
    }

    /// Some statement is DDL (CREATE/ALTER/DROP, TRUNCATE, schema-wide objects).
    pub fn is_ddl(&self) -> bool {
        self.statements
            .iter()
            .any(|s| matches!(s.kind, Kind::Ddl { .. }))
    }

    /// The tables the text names (lower-cased unless quoted, last name part), which the
    /// caller matches against the map's sharded tables. CTE names are not included.
    pub fn tables(&self) -> impl Iterator<Item = &str> {
        self.statements.iter().flat_map(|s| {
            s.bindings.iter().map(|b| &*b.table).chain(match &s.kind {
                Kind::Ddl { tables, .. } => tables.iter().map(|t| &**t).collect::<Vec<_>>(),
                _ => Vec::new(),
            })
        })
    }

    /// How a read that runs on several shards is merged: `None` when plain
    /// concatenation is right, `Some(Err(why))` when the proxy cannot merge it
    /// (`route` then refuses a multi-shard execution with that message).
    pub fn merge(&self) -> Option<&Result<MergeShape, String>> {
        match self.statements.as_slice() {
            [one] => one.merge.as_ref(),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
struct StatementPlan {
    kind: Kind,
    bindings: Vec<Binding>,
    scopes: Vec<Scope>,
    filters: Vec<Filter>,
    merge: Option<Result<MergeShape, String>>,
}

#[derive(Debug, Clone)]
enum Kind {
    Read,
    Insert(InsertPlan),
    Update {
        target: u16,
        /// Columns assigned by SET, with their value when it is one.
        sets: Vec<(Box<str>, Option<Val>)>,
    },
    Delete {
        target: u16,
    },
    /// CREATE/ALTER/DROP of `tables`, or of schema-wide objects.
    Ddl {
        tables: Vec<Box<str>>,
        schema_wide: bool,
    },
    CopyTo(Box<str>),
    CopyFrom(Box<str>),
    /// A write the planner cannot place (MERGE, data-modifying WITH, SELECT INTO ...):
    /// fine on the default shard, refused when it touches mapped tables.
    UnplannedWrite(&'static str),
    /// Transaction control, SET, SHOW ...: the caller handles those.
    Utility,
}

#[derive(Debug, Clone)]
struct InsertPlan {
    target: u16,
    /// `None` without a column list.
    columns: Option<Vec<Box<str>>>,
    /// `None` when the source is not a VALUES list; per row, per column, the value when
    /// it is one.
    rows: Option<Vec<Vec<Option<Val>>>>,
    /// Columns ON CONFLICT DO UPDATE assigns.
    conflict_sets: Vec<Box<str>>,
}

/// One table reference (a FROM item, a write target).
#[derive(Debug, Clone)]
struct Binding {
    /// The table's last name part, folded like PostgreSQL folds identifiers.
    table: Box<str>,
    scope: u16,
}

#[derive(Debug, Clone, Default)]
struct Scope {
    /// Aggregates, GROUP BY, DISTINCT, window functions, LIMIT/OFFSET or a set
    /// operation other than UNION ALL: not computable per shard unless co-located with
    /// an outer table.
    grouped: bool,
    /// The outermost SELECT (its merge is the plan's merge shape).
    top: bool,
}

/// A condition and the table references whose rows it restricts.
#[derive(Debug, Clone)]
struct Filter {
    cond: Cond,
    restricts: Vec<u16>,
}

#[derive(Debug, Clone)]
enum Cond {
    Unknown,
    And(Vec<Cond>),
    Or(Vec<Cond>),
    Cmp(ColRef, Op, Val),
    In(ColRef, Vec<Val>),
    /// `col = ANY(array value)`.
    Any(ColRef, Val),
    ColEq(ColRef, ColRef),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    /// `v < col` is `col > v`.
    fn flip(self) -> Op {
        match self {
            Op::Eq => Op::Eq,
            Op::Lt => Op::Gt,
            Op::Le => Op::Ge,
            Op::Gt => Op::Lt,
            Op::Ge => Op::Le,
        }
    }
}

#[derive(Debug, Clone)]
enum ColRef {
    /// `alias.column` naming a table reference.
    Bound(u16, Box<str>),
    /// `column` in the SELECT of this scope.
    Unqualified(u16, Box<str>),
}

/// Where one value comes from at execution time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueRef {
    /// The n-th literal of the text ([`literal_spans`] order).
    Literal(u16),
    /// The n-th bind parameter (`$1` = 0).
    Param(u16),
    /// A literal's text, in plans of texts [`literal_spans`] refuses (such a plan is
    /// only valid for its own text).
    Const(Box<str>),
    Null,
}

/// A value as used in a comparison: its source and what the SQL does to it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Val {
    src: ValueRef,
    /// Unary minus applied (an odd number of times).
    negate: bool,
    /// Cast to `date`: the time is truncated to midnight.
    to_date: bool,
    /// Cast explicitly: read as the cast's type, not the column's.
    cast: bool,
}

/// The integer a [`ValueRef`] holds in one execution (LIMIT, OFFSET, `ORDER BY 2`);
/// `None` when it is NULL, not an integer or not available.
pub fn value_as_i64(src: &ValueRef, values: &Values) -> Option<i64> {
    let val = Val {
        src: src.clone(),
        negate: false,
        to_date: false,
        cast: false,
    };
    values::fetch(src, values).and_then(|raw| values::int_of(raw, &val).flatten())
}

/// A set of shard indexes.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
struct ShardSet([u64; MAX_SHARDS / 64]);

impl ShardSet {
    /// Every index: the state of a sharded reference before any condition narrows it,
    /// standing for "all shards of its keyspace" (see [`Routing::set`]).
    const ALL: ShardSet = ShardSet([u64::MAX; MAX_SHARDS / 64]);

    fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn and(self, o: ShardSet) -> ShardSet {
        ShardSet(std::array::from_fn(|i| self.0[i] & o.0[i]))
    }
    fn or(self, o: ShardSet) -> ShardSet {
        ShardSet(std::array::from_fn(|i| self.0[i] | o.0[i]))
    }
    fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }
    fn first(&self) -> Option<usize> {
        self.iter().next()
    }
    fn to_vec(self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.len());
        out.extend(self.iter());
        out
    }
    /// Members in increasing order, word by word (a few instructions per member).
    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let bit = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                Some(w * 64 + bit)
            })
        })
    }
}

/// A table reference resolved against the map (two thin pointers: per-reference state
/// is copied around on the stack).
#[derive(Clone, Copy)]
enum Resolved<'m> {
    Sharded {
        column: &'m String,
        /// An entry of `map.keyspaces`: the same keyspace is the same address.
        keyspace: &'m Keyspace,
    },
    Reference,
    Unmapped,
}

/// Picks the shard(s) for one execution of `plan` under `map`.
pub fn route(plan: &ShardPlan, map: &ShardMap, values: &Values) -> Target {
    if !plan.parsed {
        return Target::Unknown;
    }
    match plan.statements.as_slice() {
        [] => Target::Default,
        [one] => route_statement(one, map, values),
        many => {
            let mut targets = many.iter().map(|s| route_statement(s, map, values));
            let first = targets.next().unwrap_or(Target::Default);
            if let Target::Refuse(_) = first {
                return first;
            }
            for t in targets {
                if let Target::Refuse(_) = t {
                    return t;
                }
                if t != first {
                    return Target::Refuse(
                        "a text with several statements must route them all to the same shard; send them separately".into(),
                    );
                }
            }
            first
        }
    }
}

/// Everything route computes about one statement's table references.
struct Routing<'p, 'm, 'v> {
    plan: &'p StatementPlan,
    map: &'m ShardMap,
    values: &'v Values<'v>,
    resolved: PerRef<Resolved<'m>>,
    /// Per sharded reference: the shards its conditions allow, [`ShardSet::ALL`] until
    /// one narrows it. Read through [`Routing::set`], which turns `ALL` into the
    /// keyspace's shards: every narrowing yields a subset of those (point_shards only
    /// names shards of the keyspace's map), so intersecting with them first, as the
    /// obvious code would, changes nothing and costs a walk of the map per reference.
    sets: PerRef<ShardSet>,
    /// Some condition on the reference's key column was seen (writes need one).
    keyed: PerRef<bool>,
    /// Union-find parents: references linked by key equalities.
    parent: PerRef<usize>,
}

fn route_statement(plan: &StatementPlan, map: &ShardMap, values: &Values) -> Target {
    let mut r = Routing {
        plan,
        map,
        values,
        resolved: PerRef::new(),
        sets: PerRef::new(),
        keyed: PerRef::new(),
        parent: PerRef::new(),
    };
    // Filled in place: collecting into a vector and moving it in copies it again.
    for (i, b) in plan.bindings.iter().enumerate() {
        let resolved = resolve(map, &b.table);
        let sharded = matches!(resolved, Resolved::Sharded { .. });
        if sharded && map.shards.len() > MAX_SHARDS {
            return Target::Refuse(format!(
                "shardgate routes sharded tables on at most {MAX_SHARDS} shards"
            ));
        }
        r.resolved.push(resolved);
        r.sets.push(if sharded {
            ShardSet::ALL
        } else {
            ShardSet::default()
        });
        r.keyed.push(false);
        r.parent.push(i);
    }
    r.apply_filters();
    r.decide()
}

/// What the map says about a table.
fn resolve<'m>(map: &'m ShardMap, table: &str) -> Resolved<'m> {
    match map.tables.get(table) {
        Some(TableRule::Sharded { column, keyspace }) => match map.keyspaces.get(keyspace) {
            Some(keyspace) => Resolved::Sharded { column, keyspace },
            None => Resolved::Unmapped,
        },
        Some(TableRule::Reference) => Resolved::Reference,
        None => Resolved::Unmapped,
    }
}

impl Routing<'_, '_, '_> {
    /// The shards reference `b` may be on: its narrowed set, or its keyspace's shards
    /// when nothing narrowed it (empty for references that are not sharded).
    fn set(&self, b: usize) -> ShardSet {
        match (self.sets[b], self.resolved[b]) {
            (ShardSet::ALL, Resolved::Sharded { keyspace, .. }) => {
                keyspace_shards(keyspace, self.map)
            }
            (set, _) => set,
        }
    }

    fn apply_filters(&mut self) {
        for f in &self.plan.filters {
            for &b in &f.restricts {
                let b = usize::from(b);
                if let Resolved::Sharded { .. } = self.resolved[b] {
                    if let Some(set) = self.eval(&f.cond, b) {
                        self.sets[b] = self.sets[b].and(set);
                    }
                }
            }
        }
        // Key equalities: restrict along them until a pass changes nothing. A narrowing
        // travels at least one link per pass and sets only shrink, so that takes at most
        // as many passes as there are references; the bound is a guard (one more than
        // needed, since `ALL` shrinking to its keyspace's shards also counts as a change).
        let plan = self.plan;
        for _ in 0..=self.resolved.len() + 1 {
            let mut changed = false;
            for f in &plan.filters {
                for_each_link(&f.cond, &mut |x, y| changed |= self.link(f, x, y));
            }
            if !changed {
                break;
            }
        }
    }

    /// Applies one `x = y` conjunct of filter `f`; true when a set shrank.
    fn link(&mut self, f: &Filter, x: &ColRef, y: &ColRef) -> bool {
        let (Some(bx), Some(by)) = (self.key_binding(x), self.key_binding(y)) else {
            return false;
        };
        if !self.same_keyspace(bx, by) {
            return false;
        }
        self.union(bx, by);
        let mut changed = false;
        for (to, from) in [(bx, by), (by, bx)] {
            if f.restricts.iter().any(|&b| usize::from(b) == to) {
                let narrowed = self.sets[to].and(self.sets[from]);
                if narrowed != self.sets[to] {
                    self.sets[to] = narrowed;
                    changed = true;
                }
                self.keyed[to] |= self.keyed[from];
            }
        }
        changed
    }

    fn same_keyspace(&self, a: usize, b: usize) -> bool {
        match (self.resolved[a], self.resolved[b]) {
            (Resolved::Sharded { keyspace: x, .. }, Resolved::Sharded { keyspace: y, .. }) => {
                std::ptr::eq(x, y)
            }
            _ => false,
        }
    }

    fn find(&mut self, mut i: usize) -> usize {
        while self.parent[i] != i {
            self.parent[i] = self.parent[self.parent[i]];
            i = self.parent[i];
        }
        i
    }

    fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        self.parent[ra] = rb;
    }

    /// The sharded reference whose key column `col` is, if any.
    fn key_binding(&self, col: &ColRef) -> Option<usize> {
        let is_key = |b: usize, name: &str| matches!(self.resolved[b], Resolved::Sharded { column, .. } if column == name);
        match col {
            ColRef::Bound(b, name) => is_key(usize::from(*b), name).then_some(usize::from(*b)),
            ColRef::Unqualified(scope, name) => {
                let mut found = None;
                for (i, b) in self.plan.bindings.iter().enumerate() {
                    if b.scope == *scope && is_key(i, name) {
                        if found.is_some() {
                            // Two tables with this key column: PostgreSQL would call it
                            // ambiguous, unless USING/NATURAL merged them; be safe.
                            return None;
                        }
                        found = Some(i);
                    }
                }
                found
            }
        }
    }

    /// The shards `cond` allows for reference `b`; `None` = no narrowing.
    fn eval(&mut self, cond: &Cond, b: usize) -> Option<ShardSet> {
        match cond {
            Cond::Unknown | Cond::ColEq(..) => None,
            Cond::And(parts) => {
                let mut acc: Option<ShardSet> = None;
                for p in parts {
                    if let Some(s) = self.eval(p, b) {
                        acc = Some(acc.map_or(s, |a| a.and(s)));
                    }
                }
                acc
            }
            Cond::Or(parts) => {
                let mut acc = ShardSet::default();
                for p in parts {
                    acc = acc.or(self.eval(p, b)?);
                }
                Some(acc)
            }
            Cond::Cmp(col, op, val) => {
                self.on_key(col, b)?;
                self.compare(b, *op, val)
            }
            Cond::In(col, vals) => {
                self.on_key(col, b)?;
                let mut acc = ShardSet::default();
                for v in vals {
                    acc = acc.or(self.compare(b, Op::Eq, v)?);
                }
                Some(acc)
            }
            Cond::Any(col, val) => {
                self.on_key(col, b)?;
                let raw = values::fetch(&val.src, self.values)?;
                let Resolved::Sharded { keyspace, .. } = self.resolved[b] else {
                    return None;
                };
                let mut acc = Some(ShardSet::default());
                let (map, flags) = (self.map, val);
                let time = self.time_of_binding(b);
                let ok = values::array_elements(raw, &mut |element| match point_shards(
                    keyspace,
                    map,
                    Op::Eq,
                    element,
                    flags,
                    &time,
                ) {
                    Some(s) => {
                        acc = acc.map(|a| a.or(s));
                        true
                    }
                    None => false,
                });
                if ok {
                    acc
                } else {
                    None
                }
            }
        }
    }

    /// How time values compared with reference `b`'s key are read.
    fn time_of_binding(&self, b: usize) -> values::TimeRead<'_> {
        values::TimeRead {
            column: self.values.time.column(&self.plan.bindings[b].table),
            utc_offset: self.values.time.utc_offset,
            param_types: self.values.param_types,
        }
    }

    /// `Some` (and notes that `b` is keyed) when `col` is `b`'s key column.
    fn on_key(&mut self, col: &ColRef, b: usize) -> Option<()> {
        (self.key_binding(col) == Some(b)).then(|| self.keyed[b] = true)
    }

    fn compare(&self, b: usize, op: Op, val: &Val) -> Option<ShardSet> {
        let Resolved::Sharded { keyspace, .. } = self.resolved[b] else {
            return None;
        };
        let raw = values::fetch(&val.src, self.values)?;
        point_shards(keyspace, self.map, op, raw, val, &self.time_of_binding(b))
    }
}

/// Calls `each` with the top-level `a.key = b.key` conjuncts of a condition.
fn for_each_link<'c>(cond: &'c Cond, each: &mut impl FnMut(&'c ColRef, &'c ColRef)) {
    match cond {
        Cond::ColEq(a, b) => each(a, b),
        Cond::And(parts) => parts.iter().for_each(|p| for_each_link(p, each)),
        _ => {}
    }
}

/// Index of shard `name` in the map's order.
fn shard_index(map: &ShardMap, name: &str) -> Option<usize> {
    map.shards.keys().position(|k| k == name)
}

/// The shards a keyspace's map names.
fn keyspace_shards(ks: &Keyspace, map: &ShardMap) -> ShardSet {
    let mut set = ShardSet::default();
    let mut add = |name: &str| {
        if let Some(i) = shard_index(map, name) {
            set.insert(i);
        }
    };
    match ks {
        Keyspace::Hash { map: m, .. } => m.iter().for_each(|(_, s)| add(s)),
        Keyspace::Range { map: m } | Keyspace::Time { map: m } => {
            m.iter().for_each(|(_, _, s)| add(s))
        }
    }
    set
}

/// The shards holding keys that satisfy `key <op> value`; `None` = unknown.
fn point_shards(
    ks: &Keyspace,
    map: &ShardMap,
    op: Op,
    raw: Raw,
    val: &Val,
    time: &values::TimeRead,
) -> Option<ShardSet> {
    let mut set = ShardSet::default();
    match ks {
        Keyspace::Hash {
            buckets,
            map: m,
            key_type: kt,
        } => {
            if op != Op::Eq {
                return None;
            }
            let hash = match kt {
                KeyType::Int => values::int_of(raw, val)?.map(|v| key_hash(&KeyValue::Int(v))),
                KeyType::Text => values::text_of(raw, val)?.map(|t| key_hash(&KeyValue::Text(&t))),
                KeyType::Uuid => values::uuid_of(raw, val)?.map(|u| key_hash(&KeyValue::Uuid(u))),
            };
            let Some(hash) = hash else {
                return Some(set); // NULL: no row matches.
            };
            let b = bucket(hash, *buckets);
            let (_, name) = m.iter().find(|(r, _)| r.contains(&b))?;
            set.insert(shard_index(map, name)?);
        }
        Keyspace::Range { map: m } | Keyspace::Time { map: m } => {
            let v = if matches!(ks, Keyspace::Time { .. }) {
                values::time_of(raw, val, time)?
            } else {
                values::int_of(raw, val)?.map(|v| (v, 0))
            };
            let Some((v, slack)) = v else {
                return Some(set);
            };
            let (lo, hi) = interval(op, i128::from(v), slack);
            for (from, until, name) in m {
                let from = from.map_or(i128::MIN, i128::from);
                let until = until.map_or(i128::MAX, i128::from);
                if from <= hi && until > lo {
                    set.insert(shard_index(map, name)?);
                }
            }
        }
    }
    Some(set)
}

/// The inclusive interval of keys satisfying `key <op> v`, with `v` known only to
/// within `slack`.
fn interval(op: Op, v: i128, slack: i64) -> (i128, i128) {
    let s = i128::from(slack);
    match op {
        Op::Eq => (v - s, v + s),
        Op::Lt => (i128::MIN, v + s - 1),
        Op::Le => (i128::MIN, v + s),
        Op::Gt => (v - s + 1, i128::MAX),
        Op::Ge => (v - s, i128::MAX),
    }
}

mod decide;
