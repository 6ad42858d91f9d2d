use std::path::Path;

use super::*;

fn map(text: &str) -> ShardMap {
    ShardMap::from_yaml_str(text, Path::new("test.yaml")).unwrap()
}

const OLD: &str = "
version: 1
database: app
shards:
  s0: { primary: 127.0.0.1:5432 }
  s1: { primary: 127.0.0.1:5442 }
keyspaces:
  users:
    type: hash
    buckets: 1024
    map:
      - { buckets: 0-511, shard: s0 }
      - { buckets: 512-1023, shard: s1 }
  months:
    type: time
    map:
      - { until: 2026-01-01T00:00:00Z, shard: s0 }
      - { from: 2026-01-01T00:00:00Z, shard: s1 }
tables:
  users: { column: id, keyspace: users }
  orders: { column: user_id, keyspace: users }
  events: { column: created_at, keyspace: months }
default_shard: s0
";

#[test]
fn topology_only_edits_move_nothing() {
    let new = OLD.replace("5442 }", "5442, replicas: [127.0.0.1:5443] }");
    let plan = diff(&map(OLD), &map(&new)).unwrap();
    assert!(plan.is_empty());
}

#[test]
fn moved_buckets_become_one_piece_per_stretch() {
    let new = OLD
        .replace(
            "  s1: { primary: 127.0.0.1:5442 }",
            "  s1: { primary: 127.0.0.1:5442 }\n  s2: { primary: 127.0.0.1:5452 }",
        )
        .replace(
            "- { buckets: 512-1023, shard: s1 }",
            "- { buckets: 512-767, shard: s1 }\n      - { buckets: 768-1023, shard: s2 }",
        );
    let plan = diff(&map(OLD), &map(&new)).unwrap();
    assert_eq!(plan.moves.len(), 1);
    let m = &plan.moves[0];
    assert_eq!(m.keyspace, "users");
    assert_eq!(
        m.pieces,
        vec![Piece {
            from: Some(768),
            until: Some(1024),
            source: "s1".into(),
            target: "s2".into()
        }]
    );
    assert_eq!(plan.pairs(), vec![("s1".to_owned(), "s2".to_owned())]);
    // Half of s1's buckets move: half of its rows.
    assert_eq!(plan.hash_share("s1", "s2", "orders"), Some(0.5));
    let filters = plan.filters("s1", "s2");
    assert_eq!(
        filters[0],
        (
            "orders".to_owned(),
            "((hashint8extended(\"user_id\"::int8, 0) & 1023) BETWEEN 768 AND 1023)".to_owned()
        )
    );
    assert_eq!(filters.len(), 2);
}

#[test]
fn a_time_split_moves_the_oldest_range() {
    let new = OLD.replace(
        "- { until: 2026-01-01T00:00:00Z, shard: s0 }",
        "- { until: 2025-01-01T00:00:00Z, shard: s1 }\n      - { from: 2025-01-01T00:00:00Z, until: 2026-01-01T00:00:00Z, shard: s0 }",
    );
    let plan = diff(&map(OLD), &map(&new)).unwrap();
    let m = &plan.moves[0];
    assert_eq!(m.keyspace, "months");
    assert_eq!(m.pieces.len(), 1);
    assert_eq!(m.pieces[0].from, None);
    assert_eq!(
        (m.pieces[0].source.as_str(), m.pieces[0].target.as_str()),
        ("s0", "s1")
    );
    let sql = membership(m.axis, "created_at", m.pieces[0].from, m.pieces[0].until);
    assert!(sql.starts_with("(\"created_at\" < '2025-01-01"), "{sql}");
    assert_eq!(describe(m.axis, &m.pieces[0]).split(',').count(), 2);
}

#[test]
fn swaps_in_both_directions_are_separate_pieces() {
    let new = OLD
        .replace(
            "0-511, shard: s0",
            "0-255, shard: s1 }\n      - { buckets: 256-511, shard: s0",
        )
        .replace(
            "512-1023, shard: s1",
            "512-767, shard: s0 }\n      - { buckets: 768-1023, shard: s1",
        );
    let plan = diff(&map(OLD), &map(&new)).unwrap();
    let pieces = &plan.moves[0].pieces;
    assert_eq!(pieces.len(), 2);
    assert_eq!(pieces[0].until, Some(256));
    assert_eq!(pieces[1].from, Some(512));
    assert_eq!(plan.sources(), vec!["s0".to_owned(), "s1".to_owned()]);
}

#[test]
fn table_rule_changes_are_refused() {
    let new = OLD.replace(
        "events: { column: created_at, keyspace: months }",
        "events: { reference: true }",
    );
    assert!(matches!(
        diff(&map(OLD), &map(&new)),
        Err(PlanError::Table(_))
    ));
    let new = OLD
        .replace("buckets: 1024", "buckets: 2048")
        .replace("512-1023", "512-2047");
    assert!(matches!(
        diff(&map(OLD), &map(&new)),
        Err(PlanError::Kind(_))
    ));
}
