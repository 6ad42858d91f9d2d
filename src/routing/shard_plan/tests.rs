//! Unit tests of the shard planner over a two-shard map with hash, range and time
//! keyspaces and a reference table, plus no-panic and literal-numbering properties.

use std::path::Path;

use proptest::prelude::*;

use super::*;
use crate::shard_map::hash::{bucket, key_hash, KeyValue};

const MAP: &str = "\
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
  names:
    type: hash
    key_type: text
    buckets: 1024
    map:
      - { buckets: 0-511, shard: s0 }
      - { buckets: 512-1023, shard: s1 }
  devices:
    type: hash
    key_type: uuid
    buckets: 1024
    map:
      - { buckets: 0-511, shard: s0 }
      - { buckets: 512-1023, shard: s1 }
  tenants:
    type: range
    map:
      - { until: 1000, shard: s0 }
      - { from: 1000, shard: s1 }
  months:
    type: time
    map:
      - { until: 2026-01-01T00:00:00Z, shard: s0 }
      - { from: 2026-01-01T00:00:00Z, shard: s1 }
tables:
  users: { column: id, keyspace: users }
  orders: { column: user_id, keyspace: users }
  Orders: { column: user_id, keyspace: users }
  accounts: { column: name, keyspace: names }
  devices: { column: id, keyspace: devices }
  invoices: { column: tenant_id, keyspace: tenants }
  events: { column: created_at, keyspace: months }
  countries: { reference: true }
default_shard: s0
";

fn map() -> ShardMap {
    match ShardMap::from_yaml_str(MAP, Path::new("map.yaml")) {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    }
}

/// The shard of an integer key in the `users` keyspace.
fn shard_of(v: i64) -> usize {
    usize::from(bucket(key_hash(&KeyValue::Int(v)), 1024) >= 512)
}

/// Two keys on different shards.
fn keys_on_both() -> (i64, i64) {
    let a = (1..).find(|&v| shard_of(v) == 0).unwrap_or(0);
    let b = (1..).find(|&v| shard_of(v) == 1).unwrap_or(0);
    (a, b)
}

/// Plans `sql` and routes it with its own literals.
fn simple(sql: &str) -> Target {
    let p = plan(sql);
    let spans = literal_spans(sql).unwrap_or_default();
    route(&p, &map(), &Values::simple(sql, &spans))
}

/// Plans `shape` once, routes `sql` (same cache key) with it.
fn cached(shape: &str, sql: &str) -> Target {
    let p = plan(shape);
    let spans = literal_spans(sql).unwrap_or_default();
    route(&p, &map(), &Values::simple(sql, &spans))
}

fn with_params(sql: &str, params: &[Option<&[u8]>], formats: &[i16], types: &[u32]) -> Target {
    let p = plan(sql);
    let values = Values {
        text: sql,
        literals: &[],
        params,
        param_formats: formats,
        param_types: types,
        time: Default::default(),
    };
    route(&p, &map(), &values)
}

fn one(s: usize) -> Target {
    Target::Shards(vec![s])
}

fn refused(t: &Target, needle: &str) {
    match t {
        Target::Refuse(m) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
        other => panic!("expected a refusal containing {needle:?}, got {other:?}"),
    }
}

#[test]
fn point_reads_by_literal_and_cached_shape() {
    let (a, b) = keys_on_both();
    assert_eq!(
        simple(&format!("SELECT * FROM users WHERE id = {a}")),
        one(0)
    );
    assert_eq!(
        simple(&format!("SELECT * FROM users WHERE {b} = id")),
        one(1)
    );
    // One plan, other literal values.
    let shape = format!("SELECT * FROM users WHERE id = {a}");
    assert_eq!(
        cached(&shape, &format!("SELECT * FROM users WHERE id = {b}")),
        one(1)
    );
    assert_eq!(
        simple(&format!("SELECT * FROM users WHERE id = '{b}'")),
        one(1)
    );
    assert_eq!(
        simple(&format!("SELECT * FROM users WHERE id = '{b}'::int")),
        one(1)
    );
    assert_eq!(
        simple(&format!(
            "SELECT * FROM users WHERE id = CAST({a} AS bigint)"
        )),
        one(0)
    );
}

#[test]
fn negative_numbers() {
    let neg = (1..).find(|&v| shard_of(-v) == 1).unwrap_or(0);
    assert_eq!(
        simple(&format!("SELECT * FROM users WHERE id = -{neg}")),
        one(1)
    );
    assert_eq!(
        simple(&format!("SELECT * FROM users WHERE id = '-{neg}'")),
        one(1)
    );
    assert_eq!(
        simple("SELECT * FROM invoices WHERE tenant_id = -5"),
        one(0)
    );
}

#[test]
fn and_or_in_any() {
    let (a, b) = keys_on_both();
    assert_eq!(
        simple(&format!("SELECT * FROM users WHERE id IN ({a}, {b})")),
        Target::All { write: false }
    );
    assert_eq!(
        simple(&format!("SELECT * FROM users WHERE id IN ({a}, {a})")),
        one(0)
    );
    assert_eq!(
        simple(&format!("SELECT * FROM users WHERE id = {a} OR id = {b}")),
        Target::All { write: false }
    );
    assert_eq!(
        simple(&format!(
            "SELECT * FROM users WHERE id = {a} AND name = 'x'"
        )),
        one(0)
    );
    assert_eq!(
        simple(&format!(
            "SELECT * FROM users WHERE (id = {a} OR id = {a}) AND x > 1"
        )),
        one(0)
    );
    // An unknown OR branch widens to every shard.
    assert_eq!(
        simple(&format!("SELECT * FROM users WHERE id = {a} OR name = 'x'")),
        Target::All { write: false }
    );
    assert_eq!(
        simple(&format!(
            "SELECT * FROM users WHERE id = ANY('{{{a},{a}}}')"
        )),
        one(0)
    );
    assert_eq!(
        simple(&format!("SELECT * FROM users WHERE id = ANY(ARRAY[{b}])")),
        one(1)
    );
    assert_eq!(
        simple("SELECT * FROM users WHERE id > 5"),
        Target::All { write: false }
    );
    assert_eq!(
        simple("SELECT * FROM users WHERE abs(id) = 5"),
        Target::All { write: false }
    );
}

#[test]
fn params_text_and_binary() {
    let (a, b) = keys_on_both();
    let sql = "SELECT * FROM users WHERE id = $1";
    let text = b.to_string();
    assert_eq!(
        with_params(sql, &[Some(text.as_bytes())], &[0], &[0]),
        one(1)
    );
    let b8 = b.to_be_bytes();
    assert_eq!(with_params(sql, &[Some(&b8)], &[1], &[20]), one(1));
    let b4 = (b as i32).to_be_bytes();
    assert_eq!(with_params(sql, &[Some(&b4)], &[1], &[23]), one(1));
    assert_eq!(with_params(sql, &[Some(&b4)], &[1], &[0]), one(1));
    let a2 = (a as i16).to_be_bytes();
    assert_eq!(with_params(sql, &[Some(&a2)], &[1], &[21]), one(0));
    // Unparsable for the key type: every shard for a read.
    assert_eq!(
        with_params(sql, &[Some(b"x")], &[0], &[0]),
        Target::All { write: false }
    );
    // NULL matches nothing: any single shard answers.
    assert!(matches!(with_params(sql, &[None], &[0], &[0]), Target::Shards(v) if v.len() == 1));
    // Arrays: text and binary.
    let arr = format!("{{{a}}}");
    let any = "SELECT * FROM users WHERE id = ANY($1)";
    assert_eq!(
        with_params(any, &[Some(arr.as_bytes())], &[0], &[1016]),
        one(0)
    );
    let mut bin = Vec::new();
    for w in [1i32, 0, 20, 1, 1] {
        bin.extend_from_slice(&w.to_be_bytes());
    }
    bin.extend_from_slice(&8i32.to_be_bytes());
    bin.extend_from_slice(&b.to_be_bytes());
    assert_eq!(with_params(any, &[Some(&bin)], &[1], &[1016]), one(1));
}

#[test]
fn text_and_uuid_keys() {
    let name = (0..)
        .map(|i| format!("n{i}"))
        .find(|n| bucket(key_hash(&KeyValue::Text(n)), 1024) >= 512)
        .unwrap_or_default();
    assert_eq!(
        simple(&format!("SELECT * FROM accounts WHERE name = '{name}'")),
        one(1)
    );
    let sql = "SELECT * FROM accounts WHERE name = $1";
    assert_eq!(
        with_params(sql, &[Some(name.as_bytes())], &[1], &[25]),
        one(1)
    );
    let u = [7u8; 16];
    let expect = usize::from(bucket(key_hash(&KeyValue::Uuid(u)), 1024) >= 512);
    let text = "07070707-0707-0707-0707-070707070707";
    assert_eq!(
        simple(&format!("SELECT * FROM devices WHERE id = '{text}'")),
        one(expect)
    );
    assert_eq!(
        with_params(
            "SELECT * FROM devices WHERE id = $1",
            &[Some(&u)],
            &[1],
            &[2950]
        ),
        one(expect)
    );
    assert_eq!(
        with_params(
            "SELECT * FROM devices WHERE id = $1",
            &[Some(text.as_bytes())],
            &[0],
            &[0]
        ),
        one(expect)
    );
}

#[test]
fn range_keyspace_bounds() {
    assert_eq!(
        simple("SELECT * FROM invoices WHERE tenant_id = 999"),
        one(0)
    );
    assert_eq!(
        simple("SELECT * FROM invoices WHERE tenant_id = 1000"),
        one(1)
    );
    assert_eq!(
        simple("SELECT * FROM invoices WHERE tenant_id BETWEEN 10 AND 999"),
        one(0)
    );
    assert_eq!(
        simple("SELECT * FROM invoices WHERE tenant_id BETWEEN 10 AND 1000"),
        Target::All { write: false }
    );
    assert_eq!(
        simple("SELECT * FROM invoices WHERE tenant_id < 1000"),
        one(0)
    );
    assert_eq!(
        simple("SELECT * FROM invoices WHERE tenant_id >= 1000"),
        one(1)
    );
    assert_eq!(
        simple("SELECT * FROM invoices WHERE 1000 <= tenant_id"),
        one(1)
    );
    assert_eq!(
        simple("SELECT * FROM invoices WHERE tenant_id > 5 AND tenant_id <= 999"),
        one(0)
    );
    assert_eq!(
        simple("SELECT * FROM invoices WHERE tenant_id = 1.5"),
        Target::All { write: false }
    );
}

#[test]
fn time_keyspace_bounds() {
    assert_eq!(
        simple("SELECT * FROM events WHERE created_at >= '2026-03-01'"),
        one(1)
    );
    assert_eq!(
        simple("SELECT * FROM events WHERE created_at < '2025-06-01 10:00:00+02'"),
        one(0)
    );
    // Within 16 hours of the boundary both shards may hold it (timestamp vs timestamptz).
    assert_eq!(
        simple("SELECT * FROM events WHERE created_at = '2025-12-31T20:00:00Z'"),
        Target::All { write: false }
    );
    assert_eq!(
        simple("SELECT * FROM events WHERE created_at BETWEEN '2025-01-01' AND '2025-02-01'"),
        one(0)
    );
    assert_eq!(
        simple("SELECT * FROM events WHERE created_at > now() - interval '1 day'"),
        Target::All { write: false }
    );
    // Binary timestamps: microseconds since 2000-01-01.
    let micros: i64 = (26 * 365 + 7 + 60) * 86_400_000_000;
    let p = micros.to_be_bytes();
    assert_eq!(
        with_params(
            "SELECT * FROM events WHERE created_at > $1",
            &[Some(&p)],
            &[1],
            &[1184]
        ),
        one(1)
    );
}

/// `sql` routed knowing the time key column's type and the session's UTC offset.
fn timed(sql: &str, column: TimeColumn, utc_offset: Option<i32>) -> Target {
    let columns = [("events".to_owned(), column)];
    let p = plan(sql);
    let spans = literal_spans(sql).unwrap_or_default();
    let time = TimeKeys {
        columns: &columns,
        utc_offset,
    };
    route(&p, &map(), &Values::simple(sql, &spans).with_time(time))
}

#[test]
fn time_keys_are_exact_when_the_column_type_and_zone_are_known() {
    use TimeColumn::*;
    let insert = |at: &str| format!("INSERT INTO events (created_at) VALUES ('{at}')");
    // Half an hour before the boundary, with an explicit offset: exact for timestamptz.
    assert_eq!(
        timed(&insert("2025-12-31T23:30:00Z"), Timestamptz, None),
        one(0)
    );
    assert_eq!(
        timed(&insert("2026-01-01 00:30:00+00"), Timestamptz, None),
        one(1)
    );
    // 00:30 at UTC-5 is 05:30 UTC; 23:30 at UTC+5 is 18:30 UTC the day before.
    assert_eq!(
        timed(&insert("2026-01-01 00:30-05"), Timestamptz, None),
        one(1)
    );
    assert_eq!(
        timed(&insert("2025-12-31 23:30+05"), Timestamptz, None),
        one(0)
    );
    // Without an offset a timestamptz needs the session's zone.
    assert!(matches!(
        timed(&insert("2025-12-31 23:30"), Timestamptz, None),
        Target::Refuse(_)
    ));
    assert_eq!(
        timed(&insert("2025-12-31 23:30"), Timestamptz, Some(0)),
        one(0)
    );
    assert_eq!(
        timed(&insert("2026-01-01 00:00"), Timestamptz, Some(0)),
        one(1)
    );
    // A timestamp (or date) column keeps the wall-clock time and ignores an offset.
    assert_eq!(
        timed(&insert("2025-12-31 23:30+05"), Timestamp, None),
        one(0)
    );
    assert_eq!(
        timed(&insert("2026-01-01 00:30-05"), Timestamp, None),
        one(1)
    );
    assert_eq!(
        timed(&insert("2025-12-31 23:59:59.999999"), Timestamp, None),
        one(0)
    );
    assert_eq!(timed(&insert("2025-12-31"), Date, None), one(0));
    assert_eq!(timed(&insert("2026-01-01"), Date, None), one(1));
    // Reads narrow the same way; an explicit cast keeps the 16 hours.
    let read = "SELECT * FROM events WHERE created_at >= '2026-01-01T00:00:00Z'";
    assert_eq!(timed(read, Timestamptz, None), one(1));
    let cast = "SELECT * FROM events WHERE created_at = '2025-12-31T23:00:00Z'::timestamptz";
    assert_eq!(
        timed(cast, Timestamptz, Some(0)),
        Target::All { write: false }
    );
    // Unknown column type: as before.
    let columns: [(String, TimeColumn); 0] = [];
    let sql = insert("2025-12-31T23:30:00Z");
    let p = plan(&sql);
    let spans = literal_spans(&sql).unwrap_or_default();
    let time = TimeKeys {
        columns: &columns,
        utc_offset: Some(0),
    };
    assert!(matches!(
        route(&p, &map(), &Values::simple(&sql, &spans).with_time(time)),
        Target::Refuse(_)
    ));
}

#[test]
fn aliases_schemas_and_quoted_names() {
    let (a, b) = keys_on_both();
    assert_eq!(
        simple(&format!("SELECT * FROM orders o WHERE o.user_id = {b}")),
        one(1)
    );
    assert_eq!(
        simple(&format!(
            "SELECT * FROM public.orders WHERE public.orders.user_id = {b}"
        )),
        one(1)
    );
    assert_eq!(
        simple(&format!("SELECT * FROM ORDERS WHERE USER_ID = {a}")),
        one(0)
    );
    assert_eq!(
        simple(&format!("SELECT * FROM \"Orders\" WHERE user_id = {b}")),
        one(1)
    );
    // "ORDERS" quoted is a table the map does not list.
    assert_eq!(
        simple(&format!("SELECT * FROM \"ORDERS\" WHERE user_id = {b}")),
        Target::Default
    );
    // A CTE named like a sharded table is not that table.
    assert_eq!(
        simple("WITH orders AS (SELECT 1 AS user_id) SELECT * FROM orders"),
        Target::Default
    );
}

#[test]
fn joins() {
    let (a, _) = keys_on_both();
    assert_eq!(
        simple(&format!(
            "SELECT * FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = {a}"
        )),
        one(0)
    );
    assert_eq!(
        simple(&format!(
            "SELECT * FROM users u LEFT JOIN orders o ON o.user_id = u.id WHERE u.id = {a}"
        )),
        one(0)
    );
    assert_eq!(
        simple(&format!(
            "SELECT * FROM orders o JOIN countries c ON c.code = o.country WHERE o.user_id = {a}"
        )),
        one(0)
    );
    // Co-located keyless join: every shard, concatenated.
    assert_eq!(
        simple("SELECT * FROM users u JOIN orders o ON o.user_id = u.id"),
        Target::All { write: false }
    );
    // Not joined on the key: refused.
    refused(
        &simple("SELECT * FROM users u JOIN orders o ON o.note = u.name"),
        "not joined on their shard keys",
    );
    refused(
        &simple("SELECT * FROM users u JOIN invoices i ON i.tenant_id = u.id"),
        "not joined",
    );
    // Correlated on the key: fine; uncorrelated aggregate: refused.
    assert_eq!(
        simple("SELECT u.*, (SELECT count(*) FROM orders o WHERE o.user_id = u.id) FROM users u"),
        Target::All { write: false }
    );
    refused(
        &simple("SELECT * FROM orders WHERE total > (SELECT avg(total) FROM orders)"),
        "",
    );
}

#[test]
fn reference_and_unmapped_tables() {
    assert_eq!(simple("SELECT * FROM countries"), Target::AnyOne);
    assert_eq!(
        simple("UPDATE countries SET name = 'x' WHERE code = 'fr'"),
        Target::All { write: true }
    );
    assert_eq!(
        simple("INSERT INTO countries (code) VALUES ('fr')"),
        Target::All { write: true }
    );
    assert_eq!(
        simple("SELECT * FROM products WHERE id = 3"),
        Target::Default
    );
    assert_eq!(simple("SELECT 1"), Target::Default);
    assert_eq!(simple("BEGIN"), Target::Default);
    assert_eq!(simple("SET search_path = x"), Target::Default);
    assert_eq!(simple("SELEC garbage"), Target::Unknown);
}

#[test]
fn inserts() {
    let (a, b) = keys_on_both();
    assert_eq!(
        simple(&format!(
            "INSERT INTO orders (user_id, total) VALUES ({b}, 5) RETURNING id"
        )),
        one(1)
    );
    assert_eq!(
        simple(&format!(
            "INSERT INTO orders (total, user_id) VALUES (1, {a}), (2, {b}), (3, {a})"
        )),
        Target::SplitInsert(vec![(0, vec![0, 2]), (1, vec![1])])
    );
    assert_eq!(
        simple(&format!(
            "INSERT INTO orders (user_id) VALUES ({a}) ON CONFLICT DO NOTHING"
        )),
        one(0)
    );
    assert_eq!(
        with_params(
            "INSERT INTO orders (user_id, total) VALUES ($1, $2)",
            &[Some(&b.to_be_bytes()), None],
            &[1, 0],
            &[20, 0]
        ),
        one(1)
    );
    refused(
        &simple("INSERT INTO orders VALUES (1, 2)"),
        "column list naming its key column \"user_id\"",
    );
    refused(
        &simple("INSERT INTO orders (total) VALUES (1)"),
        "needs its key column \"user_id\"",
    );
    refused(
        &simple("INSERT INTO orders (user_id) SELECT id FROM users"),
        "INSERT ... SELECT",
    );
    refused(
        &simple("INSERT INTO orders (user_id) VALUES (nextval('s'))"),
        "cannot tell the shard",
    );
    refused(
        &simple(&format!(
            "INSERT INTO orders (user_id) VALUES ({a}) ON CONFLICT (id) DO UPDATE SET user_id = 7"
        )),
        "ON CONFLICT",
    );
    assert_eq!(
        simple("INSERT INTO events (created_at) VALUES ('2026-02-01T00:00:00Z')"),
        one(1)
    );
    refused(
        &simple("INSERT INTO events (created_at) VALUES ('2026-01-01T02:00:00Z')"),
        "16 hours",
    );
}

#[test]
fn updates_and_deletes() {
    let (a, b) = keys_on_both();
    assert_eq!(
        simple(&format!("UPDATE orders SET total = 1 WHERE user_id = {a}")),
        one(0)
    );
    assert_eq!(
        simple(&format!(
            "DELETE FROM orders WHERE user_id = {b} RETURNING *"
        )),
        one(1)
    );
    assert_eq!(
        simple(&format!("UPDATE users SET id = {a} WHERE id = {a}")),
        one(0)
    );
    refused(
        &simple(&format!("UPDATE users SET id = {b} WHERE id = {a}")),
        "move rows",
    );
    refused(
        &simple("UPDATE orders SET total = 1"),
        "write to sharded table \"orders\" needs its key column \"user_id\"",
    );
    refused(
        &simple("DELETE FROM orders WHERE total > 5"),
        "needs its key column \"user_id\"",
    );
    // A key predicate that does not narrow runs everywhere (the WHERE still filters).
    assert_eq!(
        simple("DELETE FROM orders WHERE user_id > 5"),
        Target::All { write: true }
    );
}

#[test]
fn ddl() {
    assert_eq!(
        simple("CREATE TABLE orders (user_id bigint)"),
        Target::All { write: true }
    );
    assert_eq!(
        simple("CREATE INDEX ON countries (code)"),
        Target::All { write: true }
    );
    assert_eq!(
        simple("ALTER TABLE public.users ADD COLUMN x int"),
        Target::All { write: true }
    );
    assert_eq!(simple("DROP TABLE products"), Target::Default);
    assert_eq!(simple("CREATE TABLE products (id int)"), Target::Default);
    assert_eq!(
        simple("CREATE EXTENSION pgcrypto"),
        Target::All { write: true }
    );
    assert_eq!(simple("CREATE SCHEMA s"), Target::All { write: true });
    refused(&simple("DROP TABLE orders, products"), "both mapped");
    assert!(plan("CREATE TABLE orders (user_id bigint)").is_ddl());
}

#[test]
fn merge_shapes() {
    let p = plan("SELECT id, name FROM users ORDER BY 2 DESC LIMIT 10 OFFSET 5");
    let Some(Ok(shape)) = p.merge() else {
        panic!("{:?}", p.merge());
    };
    assert_eq!(
        shape.sort,
        vec![SortKey {
            column: ColumnSource::Ordinal(ValueRef::Literal(0)),
            descending: true,
            nulls_first: true
        }]
    );
    assert_eq!(shape.limit, Some(ValueRef::Literal(1)));
    assert_eq!(shape.offset, Some(ValueRef::Literal(2)));
    assert!(shape.rewrite);
    assert_eq!(
        shard_sql("SELECT id, name FROM users ORDER BY 2 DESC LIMIT 10 OFFSET 5").as_deref(),
        Some("SELECT id, name FROM users ORDER BY 2 DESC LIMIT CAST((10) AS BIGINT) + CAST((5) AS BIGINT)")
    );
    let p = plan("SELECT status, count(*), avg(total) FROM orders GROUP BY status ORDER BY status");
    let Some(Ok(shape)) = p.merge() else {
        panic!("{:?}", p.merge());
    };
    assert_eq!(
        shape.aggregate,
        Some(vec![
            OutputColumn::GroupKey,
            OutputColumn::Count,
            OutputColumn::Avg { sum: 3, count: 4 },
            OutputColumn::Sum,
            OutputColumn::Count
        ])
    );
    assert_eq!(shape.hidden_columns, 2);
    assert_eq!(shape.sort[0].column, ColumnSource::Index(0));
    assert!(!shape.sort[0].nulls_first);
    let p = plan("SELECT name FROM users ORDER BY created_at NULLS FIRST");
    let Some(Ok(shape)) = p.merge() else {
        panic!("{:?}", p.merge());
    };
    assert_eq!(shape.sort[0].column, ColumnSource::Index(1));
    assert_eq!(shape.hidden_columns, 1);
    assert_eq!(
        shard_sql("SELECT name FROM users ORDER BY created_at").as_deref(),
        Some("SELECT name, created_at FROM users ORDER BY created_at")
    );
    let p = plan("SELECT * FROM users ORDER BY name");
    let Some(Ok(shape)) = p.merge() else {
        panic!("{:?}", p.merge());
    };
    assert_eq!(shape.sort[0].column, ColumnSource::Hidden(0));
    // Keyless reads the proxy cannot merge are refused, keyed ones are not.
    refused(&simple("SELECT DISTINCT name FROM users"), "DISTINCT");
    refused(
        &simple("SELECT status, count(*) FROM orders GROUP BY status HAVING count(*) > 1"),
        "HAVING",
    );
    refused(
        &simple("SELECT string_agg(name, ',') FROM users"),
        "string_agg",
    );
    refused(
        &simple("SELECT count(DISTINCT user_id) FROM orders"),
        "DISTINCT",
    );
    refused(
        &simple("SELECT id, row_number() OVER () FROM users"),
        "window",
    );
    refused(
        &simple("SELECT sum(total) + 1 FROM orders"),
        "expression over aggregates",
    );
    assert_eq!(
        simple("SELECT DISTINCT name FROM users WHERE id = 1"),
        one(shard_of(1))
    );
    assert!(plan("SELECT * FROM users").merge().is_none());
    assert!(plan("SELECT * FROM users").is_read());
}

#[test]
fn literal_numbering_matches_the_cache() {
    assert_eq!(
        literal_spans("SELECT 'a''b', 1.5, t2.c3, $1 -- 4\n").map(|s| s.len()),
        Some(2)
    );
    assert_eq!(literal_spans("SELECT E'\\n'"), None);
    assert_eq!(literal_spans("SELECT $$x$$"), None);
    // Texts the cache refuses are planned with their own values.
    let sql = "SELECT * FROM users WHERE id = 1 AND x = E'\\n'";
    let p = plan(sql);
    assert_eq!(
        route(&p, &map(), &Values::simple(sql, &[])),
        one(shard_of(1))
    );
    // A literal the blanking splits (1e5) is not a key value.
    assert_eq!(
        simple("SELECT * FROM users WHERE id = 1e5"),
        Target::All { write: false }
    );
}

proptest! {
    #[test]
    fn never_panics(sql in "\\PC{0,120}", params in proptest::collection::vec(proptest::option::of(proptest::collection::vec(any::<u8>(), 0..24)), 0..4), fmt in any::<bool>()) {
        let p = plan(&sql);
        let spans = literal_spans(&sql).unwrap_or_default();
        let refs: Vec<Option<&[u8]>> = params.iter().map(|p| p.as_deref()).collect();
        let formats = vec![i16::from(fmt); refs.len()];
        let types = vec![0u32; refs.len()];
        let values = Values { text: &sql, literals: &spans, params: &refs, param_formats: &formats, param_types: &types, time: Default::default() };
        let _ = route(&p, &map(), &values);
    }

    #[test]
    fn shaped_sql_never_panics(
        t in 0..6usize,
        v in any::<i64>(),
        s in "[a-z0-9 '{},:-]{0,20}",
        bytes in proptest::collection::vec(any::<u8>(), 0..40),
        fmt in 0..2i16,
        oid in prop_oneof![Just(0u32), Just(20), Just(23), Just(25), Just(1016), Just(1114), Just(1184), Just(2950)],
    ) {
        let templates = [
            format!("SELECT * FROM users WHERE id = {v} OR id = $1"),
            format!("SELECT * FROM events WHERE created_at > '{}' AND created_at < $1", s.replace('\'', "''")),
            "SELECT * FROM users WHERE id = ANY($1)".to_string(),
            format!("INSERT INTO orders (user_id) VALUES ($1), ({v})"),
            "UPDATE devices SET x = 1 WHERE id = $1".to_string(),
            format!("SELECT * FROM accounts WHERE name IN ('{}', $1)", s.replace('\'', "''")),
        ];
        let sql = &templates[t];
        let p = plan(sql);
        let spans = literal_spans(sql).unwrap_or_default();
        let params = [Some(bytes.as_slice())];
        let values = Values { text: sql, literals: &spans, params: &params, param_formats: &[fmt], param_types: &[oid], time: Default::default() };
        let _ = route(&p, &map(), &values);
    }

    /// The plain-digits shortcut of integer keys gives what the general parse gives.
    #[test]
    fn integer_shortcut_agrees(
        text in "[ +-]{0,2}[0-9]{0,22}[ _]{0,1}",
        wide in any::<u64>(),
        neg in any::<i64>(),
    ) {
        for t in [text, wide.to_string(), neg.to_string(), format!("{:018}", wide % 1_000_000_000_000_000_000)] {
            prop_assert_eq!(values::parse_wide_int(&t), values::parse_int_text(&t), "{:?}", t);
        }
    }

    /// `literal_spans` numbers exactly the literals the cache key blanks: as many spans
    /// as `?` the key gains (the cache's `cache_key` is private: its key is rebuilt here
    /// from the spans, and each span must be a number or a quoted string).
    #[test]
    fn spans_are_literals(sql in "[a-z0-9 '=.,$\"()-]{0,60}") {
        if let Some(spans) = literal_spans(&sql) {
            let mut last = 0;
            for s in &spans {
                prop_assert!(s.start >= last);
                last = s.end;
                let raw = &sql[s.clone()];
                prop_assert!(raw.starts_with('\'') && raw.ends_with('\'') && raw.len() >= 2 || raw.bytes().all(|b| b.is_ascii_digit() || b == b'.'));
            }
        }
    }
}

#[test]
fn bigint_minimum_written_as_minus_literal_is_a_key() {
    // PostgreSQL folds `-9223372036854775808` into bigint although the literal alone
    // is one past i64::MAX (found by the differential test).
    let want = one(shard_of(i64::MIN));
    assert_eq!(
        simple("SELECT * FROM users WHERE id = -9223372036854775808"),
        want
    );
    assert_eq!(
        simple("INSERT INTO users (id, name) VALUES (-9223372036854775808, 'x')"),
        want
    );
    // Out of bigint's range either way: no key.
    for sql in [
        "INSERT INTO users (id, name) VALUES (9223372036854775808, 'x')",
        "INSERT INTO users (id, name) VALUES (- -9223372036854775808, 'x')",
        "INSERT INTO users (id, name) VALUES (-9223372036854775809, 'x')",
    ] {
        refused(&simple(sql), "cannot tell the shard");
    }
}

#[test]
fn shard_sets_list_members_in_order_across_words() {
    let mut set = super::ShardSet::default();
    for i in [255, 0, 64, 63, 130] {
        set.insert(i);
    }
    assert_eq!(set.to_vec(), vec![0, 63, 64, 130, 255]);
    assert_eq!(set.first(), Some(0));
    assert_eq!(super::ShardSet::default().first(), None);
}
