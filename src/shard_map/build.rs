//! Turns the raw YAML shape of a shard map into a `ShardMap`, checking every reference
//! between its parts: shard names, node addresses, keyspaces used by tables, the default
//! shard. Keyspace coverage is checked in `keyspace.rs`. The first problem is reported
//! with the position of the name or value that caused it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_saphyr::{Options, Spanned};

use super::raw::{Entries, RawKeyspace, RawShard, RawShardMap, RawTable, Text};
use super::yaml::{line_of, Issue};
use super::{keyspace, Keyspace, NodeAddr, ShardMap, ShardSpec, TableRule};

const EMPTY_FILE: &str = "the file is empty; a shard map needs at least `version`, \
                          `database`, `shards` and `default_shard`";

pub(super) fn build(text: &str, source: &Path) -> Result<ShardMap, Issue> {
    let options = Options {
        with_snippet: false,
        ..Options::default()
    };
    let raw: RawShardMap = serde_saphyr::from_str_with_options(text, options)
        .map_err(|err| Issue::from_yaml(&err, text, EMPTY_FILE))?;
    let database = non_empty(&raw.database, "database")?;
    let shards = shards(&raw.shards)?;
    let lookup = |name: &Text, ctx: &str| shard_ref(&shards, name, ctx);
    let keyspaces = keyspaces(raw.keyspaces.as_ref(), &lookup)?;
    let tables = tables(raw.tables.as_ref(), &keyspaces)?;
    let default_shard = lookup(&raw.default_shard, "default_shard")?;
    Ok(ShardMap {
        source: source.to_path_buf(),
        version: raw.version,
        database,
        shards,
        keyspaces,
        tables,
        default_shard,
    })
}

fn non_empty(text: &Text, field: &str) -> Result<String, Issue> {
    if text.value.trim().is_empty() {
        return Err(Issue::at(text, format!("{field}: must not be empty")));
    }
    Ok(text.value.clone())
}

/// Shard names appear in admin commands (`PAUSE s1`) and metric labels, so they are
/// kept to characters that need no quoting anywhere.
fn check_name(name: &Text, ctx: &str) -> Result<String, Issue> {
    let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if name.value.is_empty() || !name.value.chars().all(valid) {
        let msg = format!(
            "{ctx}: invalid name \"{}\": use letters, digits, `_` and `-`",
            name.value
        );
        return Err(Issue::at(name, msg));
    }
    Ok(name.value.clone())
}

fn shards(raw: &Spanned<Entries<RawShard>>) -> Result<BTreeMap<String, ShardSpec>, Issue> {
    if raw.value.0.is_empty() {
        return Err(Issue::at(raw, "shards: at least one shard is required"));
    }
    let mut seen = HashMap::new();
    let mut shards = BTreeMap::new();
    for (name, shard) in &raw.value.0 {
        let id = check_name(name, "shards")?;
        let ctx = format!("shards.{id}");
        let primary = node(&mut seen, name, &shard.primary, &ctx)?;
        let replicas = (shard.replicas.iter().flatten())
            .map(|text| node(&mut seen, name, text, &ctx))
            .collect::<Result<_, _>>()?;
        shards.insert(id, ShardSpec { primary, replicas });
    }
    Ok(shards)
}

/// Parses one node address and records it in `seen` (endpoint -> shard and position):
/// a server listed twice would be promoted, fenced and counted twice.
fn node<'a>(
    seen: &mut HashMap<String, (&'a str, &'a Text)>,
    shard: &'a Text,
    text: &'a Text,
    ctx: &str,
) -> Result<NodeAddr, Issue> {
    let node: NodeAddr = text.value.parse().map_err(|why| {
        let msg = format!("{ctx}: invalid node address \"{}\": {why}", text.value);
        Issue::at(text, msg)
    })?;
    if let Some((other, first)) = seen.insert(node.endpoint(), (&shard.value, text)) {
        let msg = format!(
            "{ctx}: node {} is already listed for shard {other} ({})",
            node.endpoint(),
            line_of(first)
        );
        return Err(Issue::at(text, msg));
    }
    Ok(node)
}

fn shard_ref(
    shards: &BTreeMap<String, ShardSpec>,
    name: &Text,
    ctx: &str,
) -> Result<String, Issue> {
    if shards.contains_key(&name.value) {
        return Ok(name.value.clone());
    }
    let known: Vec<&str> = shards.keys().map(String::as_str).collect();
    let msg = format!(
        "{ctx}: unknown shard \"{}\" (shards are {})",
        name.value,
        known.join(", ")
    );
    Err(Issue::at(name, msg))
}

fn keyspaces(
    raw: Option<&Entries<RawKeyspace>>,
    lookup: keyspace::ShardLookup,
) -> Result<BTreeMap<String, Keyspace>, Issue> {
    let mut keyspaces = BTreeMap::new();
    for (name, raw) in raw.map_or(&[][..], |e| &e.0) {
        let id = check_name(name, "keyspaces")?;
        let built = keyspace::build(&id, raw, lookup)?;
        keyspaces.insert(id, built);
    }
    Ok(keyspaces)
}

fn tables(
    raw: Option<&Entries<RawTable>>,
    keyspaces: &BTreeMap<String, Keyspace>,
) -> Result<BTreeMap<String, TableRule>, Issue> {
    let mut tables = BTreeMap::new();
    for (name, raw) in raw.map_or(&[][..], |e| &e.0) {
        let id = non_empty(name, "tables")?;
        let rule = table(&format!("tables.{id}"), name, raw, keyspaces)?;
        tables.insert(id, rule);
    }
    Ok(tables)
}

fn table(
    ctx: &str,
    name: &Text,
    raw: &RawTable,
    keyspaces: &BTreeMap<String, Keyspace>,
) -> Result<TableRule, Issue> {
    if raw.reference.as_ref().is_some_and(|r| r.value) {
        if let Some(extra) = raw.column.as_ref().or(raw.keyspace.as_ref()) {
            let msg = format!(
                "{ctx}: a reference table is copied to every shard \
                 and has no `column` or `keyspace`"
            );
            return Err(Issue::at(extra, msg));
        }
        return Ok(TableRule::Reference);
    }
    let (Some(column), Some(keyspace)) = (&raw.column, &raw.keyspace) else {
        let msg = format!("{ctx}: needs both `column` and `keyspace`, or `reference: true`");
        return Err(Issue::at(name, msg));
    };
    let column = non_empty(column, &format!("{ctx}.column"))?;
    if !keyspaces.contains_key(&keyspace.value) {
        let known: Vec<&str> = keyspaces.keys().map(String::as_str).collect();
        let known = if known.is_empty() {
            "none are defined".to_string()
        } else {
            format!("keyspaces are {}", known.join(", "))
        };
        let msg = format!(
            "{ctx}.keyspace: unknown keyspace \"{}\" ({known})",
            keyspace.value
        );
        return Err(Issue::at(keyspace, msg));
    }
    Ok(TableRule::Sharded {
        column,
        keyspace: keyspace.value.clone(),
    })
}
