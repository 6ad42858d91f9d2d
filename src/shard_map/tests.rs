//! Tests for shard map loading: the DESIGN.md example and the shipped maps, one test per
//! validation rule checking the reported line, and no-panic property tests for untrusted
//! input. Value parsers (timestamps, node addresses) are tested in `tests/values.rs`.

use std::path::Path;

use proptest::prelude::*;

use super::time::parse_timestamp;
use super::{Keyspace, ShardMap, ShardMapError, TableRule};

mod values;

const EXAMPLE: &str = include_str!("../../shard-maps/example.yaml");

/// Six lines; a test's `keyspaces:` goes on line 7 and its first keyspace on line 8.
const BASE: &str = "\
version: 3
database: app
shards:
  s0: { primary: 10.0.0.1:5432 }
  s1: { primary: 10.0.0.2:5432 }
default_shard: s0
";

fn parse(text: &str) -> Result<ShardMap, ShardMapError> {
    ShardMap::from_yaml_str(text, Path::new("map.yaml"))
}

fn assert_fails(text: &str, line: u32, needle: &str) {
    let err = match parse(text) {
        Ok(map) => panic!("expected an error, got {map:?}\n{text}"),
        Err(err) => err,
    };
    let message = err.to_string();
    assert_eq!(err.line(), Some(line), "wrong line in: {message}\n{text}");
    assert!(
        message.starts_with(&format!("map.yaml:{line}")),
        "{message}"
    );
    assert!(
        message.contains(needle),
        "{message:?} should contain {needle:?}"
    );
}

/// A hash keyspace `k` with 1024 buckets; the map entries start on line 12.
fn hash_map(entries: &[&str]) -> String {
    let mut text = format!("{BASE}keyspaces:\n  k:\n    type: hash\n    buckets: 1024\n    map:\n");
    for entry in entries {
        text.push_str(&format!("      - {entry}\n"));
    }
    text
}

/// A keyspace `k` of `kind` (range or time); the map entries start on line 11.
fn line_map(kind: &str, entries: &[&str]) -> String {
    let mut text = format!("{BASE}keyspaces:\n  k:\n    type: {kind}\n    map:\n");
    for entry in entries {
        text.push_str(&format!("      - {entry}\n"));
    }
    text
}

fn micros(text: &str) -> i64 {
    parse_timestamp(text).expect("test timestamp")
}

#[test]
fn design_example_parses() {
    let map = parse(EXAMPLE).expect("DESIGN.md example");
    assert_eq!(map.version, 1);
    assert_eq!(map.database, "app");
    assert_eq!(map.shards.len(), 2);
    assert_eq!(map.shards["s1"].primary.to_string(), "127.0.0.1:5442");
    assert_eq!(map.shards["s1"].replicas.len(), 1);
    assert_eq!(map.shards["s1"].replicas[0].port, 5443);
    assert_eq!(map.default_shard, "s0");
    assert_eq!(map.default_shard().primary.port, 5432);
    let users = Keyspace::Hash {
        buckets: 1024,
        key_type: crate::shard_map::hash::KeyType::Int,
        map: vec![(0..=511, "s0".into()), (512..=1023, "s1".into())],
    };
    assert_eq!(map.keyspaces["users"], users);
    let tenants = Keyspace::Range {
        map: vec![
            (None, Some(1_000_000), "s0".into()),
            (Some(1_000_000), None, "s1".into()),
        ],
    };
    assert_eq!(map.keyspaces["tenants"], tenants);
    let jan = micros("2026-01-01T00:00:00Z");
    let months = Keyspace::Time {
        map: vec![
            (None, Some(jan), "s0".into()),
            (Some(jan), None, "s1".into()),
        ],
    };
    assert_eq!(map.keyspaces["months"], months);
    let sharded = |column: &str, keyspace: &str| TableRule::Sharded {
        column: column.into(),
        keyspace: keyspace.into(),
    };
    assert_eq!(map.tables["users"], sharded("id", "users"));
    assert_eq!(map.tables["orders"], sharded("user_id", "users"));
    assert_eq!(map.tables["invoices"], sharded("tenant_id", "tenants"));
    assert_eq!(map.tables["events"], sharded("created_at", "months"));
    assert_eq!(map.tables["countries"], TableRule::Reference);
}

#[test]
fn shipped_maps_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("shard-maps");
    let example = ShardMap::load(&dir.join("example.yaml")).expect("example.yaml");
    assert_eq!(example.source, dir.join("example.yaml"));
    assert_eq!(example.keyspaces.len(), 3);
    let local = ShardMap::load(&dir.join("local.yaml")).expect("local.yaml");
    assert_eq!(local.database, "app");
    assert_eq!(local.shards.len(), 1);
    assert_eq!(local.default_shard().primary.to_string(), "127.0.0.1:5432");
    assert_eq!(
        local.default_shard().replicas[0].to_string(),
        "127.0.0.1:5433"
    );
    assert!(local.keyspaces.is_empty() && local.tables.is_empty());
}

#[test]
fn missing_file_names_the_file() {
    let err = ShardMap::load(Path::new("/nonexistent/map.yaml")).expect_err("missing");
    assert!(matches!(err, ShardMapError::Io { .. }));
    assert!(err
        .to_string()
        .starts_with("/nonexistent/map.yaml: cannot read: "));
}

#[test]
fn keyspace_entries_are_sorted_and_single_entries_cover_everything() {
    let hash = hash_map(&[
        "{ buckets: 512-1023, shard: s1 }",
        "{ buckets: 0-511, shard: s0 }",
    ]);
    let map = parse(&hash).expect("unsorted hash map");
    let Keyspace::Hash { map: entries, .. } = &map.keyspaces["k"] else {
        panic!("hash")
    };
    assert_eq!(entries[0], (0..=511, "s0".to_string()));
    let all = line_map("range", &["{ shard: s1 }"]);
    let map = parse(&all).expect("single unbounded entry");
    assert_eq!(
        map.keyspaces["k"],
        Keyspace::Range {
            map: vec![(None, None, "s1".into())]
        }
    );
    let three = line_map(
        "range",
        &[
            "{ from: 10, shard: s1 }",
            "{ from: -5, until: 10, shard: s0 }",
            "{ until: -5, shard: s1 }",
        ],
    );
    let map = parse(&three).expect("three ranges");
    let Keyspace::Range { map: entries } = &map.keyspaces["k"] else {
        panic!("range")
    };
    assert_eq!(entries[1], (Some(-5), Some(10), "s0".to_string()));
}

#[test]
fn hash_maps_must_cover_every_bucket_once() {
    let gap = hash_map(&[
        "{ buckets: 0-500, shard: s0 }",
        "{ buckets: 512-1023, shard: s1 }",
    ]);
    assert_fails(
        &gap,
        13,
        "keyspaces.k.map: buckets 501-511 belong to no shard",
    );
    let overlap = hash_map(&[
        "{ buckets: 0-600, shard: s0 }",
        "{ buckets: 512-1023, shard: s1 }",
    ]);
    assert_fails(
        &overlap,
        13,
        "buckets 512-600 are assigned twice: to s0 (line 12) and to s1",
    );
    let tail = hash_map(&["{ buckets: 0-511, shard: s0 }"]);
    assert_fails(&tail, 12, "buckets 512-1023 belong to no shard");
    let head = hash_map(&["{ buckets: 1-1023, shard: s0 }"]);
    assert_fails(&head, 12, "buckets 0-0 belong to no shard");
    let outside = hash_map(&["{ buckets: 0-2047, shard: s0 }"]);
    assert_fails(
        &outside,
        12,
        "bucket 2047 is out of range: buckets are 0-1023",
    );
    assert_fails(&hash_map(&["{ buckets: 9-3, shard: s0 }"]), 12, "reversed");
    assert_fails(
        &hash_map(&["{ buckets: all, shard: s0 }"]),
        12,
        "invalid bucket range",
    );
    assert_fails(&hash_map(&["{ shard: s0 }"]), 12, "needs `buckets: A-B`");
    assert_fails(
        &hash_map(&["{ buckets: 0-1023, until: 5, shard: s0 }"]),
        12,
        "`until` does not apply",
    );
    assert_fails(
        &hash_map(&["{ buckets: 0-1023, shard: s7 }"]),
        12,
        "unknown shard \"s7\" (shards are s0, s1)",
    );
    assert_fails(
        &hash_map(&[]).replace("map:\n", "map: []\n"),
        11,
        "the map is empty",
    );
    let odd = hash_map(&["{ buckets: 0-999, shard: s0 }"]).replace("1024", "1000");
    assert_fails(&odd, 10, "keyspaces.k.buckets: 1000 is not a power of two");
    let no_count = hash_map(&["{ buckets: 0-1, shard: s0 }"]).replace("    buckets: 1024\n", "");
    assert_fails(&no_count, 9, "a hash keyspace needs `buckets`");
}

#[test]
fn range_maps_must_tile_the_line() {
    let gap = line_map(
        "range",
        &["{ until: 100, shard: s0 }", "{ from: 200, shard: s1 }"],
    );
    assert_fails(&gap, 12, "keys from 100 until 200 belong to no shard");
    let overlap = line_map(
        "range",
        &["{ until: 200, shard: s0 }", "{ from: 100, shard: s1 }"],
    );
    assert_fails(
        &overlap,
        12,
        "keys from 100 until 200 are assigned twice: to s0 (line 11) and to s1",
    );
    let no_low = line_map("range", &["{ from: 0, shard: s0 }"]);
    assert_fails(&no_low, 11, "keys before 0 belong to no shard");
    let no_high = line_map(
        "range",
        &[
            "{ until: 0, shard: s0 }",
            "{ from: 0, until: 50, shard: s1 }",
        ],
    );
    assert_fails(&no_high, 12, "keys from 50 on belong to no shard");
    let twice = line_map("range", &["{ shard: s0 }", "{ shard: s1 }"]);
    assert_fails(&twice, 12, "all keys are assigned twice");
    let reversed = line_map(
        "range",
        &[
            "{ until: 0, shard: s0 }",
            "{ from: 9, until: 9, shard: s1 }",
        ],
    );
    assert_fails(&reversed, 12, "`from` 9 must be below `until` 9");
    assert_fails(
        &line_map("range", &["{ until: 1e6, shard: s0 }"]),
        11,
        "invalid bound \"1e6\"",
    );
    assert_fails(
        &line_map("range", &["{ buckets: 0-1, shard: s0 }"]),
        11,
        "`buckets` does not apply to a range",
    );
    let counted = line_map("range", &["{ shard: s0 }"])
        .replace("type: range\n", "type: range\n    buckets: 4\n");
    assert_fails(&counted, 10, "only hash keyspaces have buckets");
    assert_fails(
        &line_map("ranges", &["{ shard: s0 }"]),
        9,
        "unknown type \"ranges\"",
    );
}

#[test]
fn time_maps_must_tile_the_line() {
    let gap = line_map(
        "time",
        &[
            "{ until: 2026-01-01, shard: s0 }",
            "{ from: 2026-02-01T00:00:00Z, shard: s1 }",
        ],
    );
    assert_fails(
        &gap,
        12,
        "times from 2026-01-01T00:00:00Z until 2026-02-01T00:00:00Z belong to no shard",
    );
    let shifted = line_map(
        "time",
        &[
            "{ until: 2026-01-01T00:00:00Z, shard: s0 }",
            "{ from: 2026-01-01T01:00:00+01:00, shard: s1 }",
        ],
    );
    assert!(
        parse(&shifted).is_ok(),
        "equal instants in different offsets meet exactly"
    );
    let local = line_map(
        "time",
        &[
            "{ until: 2026-01-01T00:00:00, shard: s0 }",
            "{ from: 2026-01-01, shard: s1 }",
        ],
    );
    assert_fails(&local, 11, "a UTC offset is required");
}

#[test]
fn references_and_tables_are_checked() {
    assert_fails(
        &BASE.replace("default_shard: s0", "default_shard: s9"),
        6,
        "default_shard: unknown shard \"s9\"",
    );
    // The table under test goes first under `tables:`, on line `at`.
    let tables = |row: &str| EXAMPLE.replace("\ntables:\n", &format!("\ntables:\n  {row}\n"));
    let at = EXAMPLE
        .lines()
        .position(|l| l == "tables:")
        .map_or(0, |i| i as u32 + 2);
    let both = tables("t: { reference: true, column: id }");
    assert_fails(&both, at, "a reference table is copied to every shard");
    let neither = tables("t: { reference: false }");
    assert_fails(&neither, at, "tables.t: needs both `column` and `keyspace`");
    let unknown = tables("t: { column: id, keyspace: nope }");
    assert_fails(
        &unknown,
        at,
        "unknown keyspace \"nope\" (keyspaces are months, tenants, users)",
    );
    let no_column = tables("t: { column: '', keyspace: users }");
    assert_fails(&no_column, at, "tables.t.column: must not be empty");
    assert_fails(
        &tables("users: { reference: true }"),
        at + 1,
        "duplicate mapping key: users",
    );
    let no_keyspaces = format!("{BASE}tables:\n  t: {{ column: id, keyspace: users }}\n");
    assert_fails(&no_keyspaces, 8, "(none are defined)");
    let twice = format!(
        "{BASE}tables:\n  t: {{ reference: true }}\n  t: {{ column: id, keyspace: users }}\n"
    );
    assert_fails(&twice, 9, "duplicate mapping key: t");
}

#[test]
fn shards_are_checked() {
    assert_fails(
        "version: 1\ndatabase: app\nshards: {}\ndefault_shard: s0\n",
        3,
        "at least one shard",
    );
    assert_fails(
        &BASE.replace("10.0.0.2:5432", "10.0.0.2:99999"),
        5,
        "shards.s1: invalid node address",
    );
    assert_fails(
        &BASE.replace("10.0.0.2:5432", "10.0.0.1:5432"),
        5,
        "node 10.0.0.1:5432 is already listed for shard s0 (line 4)",
    );
    let replica = BASE.replace(
        "10.0.0.2:5432 }",
        "10.0.0.2:5432, replicas: [10.0.0.3:1, 'x y'] }",
    );
    assert_fails(&replica, 5, "invalid node address \"x y\"");
    assert_fails(
        &BASE.replace("  s1:", "  's 1':"),
        5,
        "shards: invalid name \"s 1\"",
    );
    assert_fails(
        &BASE.replace("database: app", "database: ''"),
        2,
        "database: must not be empty",
    );
}

#[test]
fn structural_errors_point_at_the_field() {
    assert_fails(
        &BASE.replace("version: 3", "versoin: 3"),
        1,
        "unknown field `versoin`",
    );
    assert_fails(
        &BASE.replace("default_shard: s0", "default_shard: s0\nextra: 1"),
        7,
        "unknown field `extra`",
    );
    assert_fails(
        &BASE.replace("5432 }\n  s1", "5432, replica: [] }\n  s1"),
        4,
        "unknown field `replica`",
    );
    assert_fails(
        &hash_map(&["{ buckets: 0-1023, shard: s0, weight: 2 }"]),
        12,
        "unknown field `weight`",
    );
    assert_fails(
        &BASE.replace("version: 3\n", ""),
        1,
        "missing field `version`",
    );
    assert_fails(&BASE.replace("version: 3", "version: -3"), 1, "");
    assert_fails(&BASE.replace("shards:", "shards: ["), 3, "");
    let block = "version: 1\ndatabase: app\nshards:\n  s0:\n    primary: h:1\n    \
                 replicas: []\n    standby: h:2\ndefault_shard: s0\n";
    assert_fails(block, 7, "unknown field `standby`");
    assert!(parse("# empty\n").is_err_and(|e| e.to_string().contains("the file is empty")));
}

/// Edits of a valid map are much likelier than random text to reach deep parser states.
fn mutated_example() -> impl Strategy<Value = String> {
    let edit = (
        any::<prop::sample::Index>(),
        0..3u8,
        "[ -~\n\t:{}\\[\\],#&*!|>'\"%@`-]{0,3}",
    );
    prop::collection::vec(edit, 1..6).prop_map(|edits| {
        let mut text = EXAMPLE.to_string();
        for (at, kind, insert) in edits {
            let pos = at.index(text.len() + 1);
            match kind {
                0 => text.insert_str(pos, &insert),
                1 => text.truncate(pos),
                _ => text.replace_range(pos..(pos + insert.len()).min(text.len()), &insert),
            }
        }
        text
    })
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        let _ = parse(&text);
    }

    #[test]
    fn edited_examples_never_panic(text in mutated_example()) {
        if let Err(err) = parse(&text) {
            prop_assert!(err.to_string().starts_with("map.yaml"));
        }
    }
}

#[test]
fn hash_keyspaces_name_their_key_type() {
    let yaml = |key_type: &str| {
        format!(
            "version: 1\ndatabase: app\nshards:\n  s0: {{ primary: 127.0.0.1:5432 }}\nkeyspaces:\n  k:\n    type: hash\n    buckets: 2\n{key_type}    map:\n      - {{ buckets: 0-1, shard: s0 }}\ndefault_shard: s0\n"
        )
    };
    let path = Path::new("k.yaml");
    let key_type = |text: &str| match ShardMap::from_yaml_str(&yaml(text), path) {
        Ok(map) => match &map.keyspaces["k"] {
            Keyspace::Hash { key_type, .. } => Ok(*key_type),
            other => panic!("{other:?}"),
        },
        Err(e) => Err(e.to_string()),
    };
    use crate::shard_map::hash::KeyType;
    assert_eq!(key_type(""), Ok(KeyType::Int));
    assert_eq!(key_type("    key_type: text\n"), Ok(KeyType::Text));
    assert_eq!(key_type("    key_type: uuid\n"), Ok(KeyType::Uuid));
    let err = key_type("    key_type: float\n").unwrap_err();
    assert!(
        err.contains("k.yaml:9") && err.contains("unknown key type \"float\""),
        "{err}"
    );
}
