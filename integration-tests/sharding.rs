//! Sharding by key through the proxy, against two real shards (each a primary and a
//! streaming replica): DDL reaches every shard, rows land where the servers' own hash
//! SQL says they belong, point statements go to one shard, keyless reads are merged,
//! and what cannot be done safely is refused with 0A000.

mod common;

use std::time::Duration;

use common::proxy::{shard_entry, TestProxy};
use common::sharded::{map, on_shard, setup, shard_of, BUCKETS};
use common::{shard_clusters, wait_for};
use tokio_postgres::SimpleQueryMessage;

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

fn simple_rows(messages: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_reaches_every_shard_and_rows_land_where_the_servers_hash_says() {
    let (proxy, db) = setup().await;
    let c = proxy.client().await;
    c.batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, name text)")
        .await
        .unwrap();
    for shard in 0..2 {
        let s = on_shard(shard, &db).await;
        assert_eq!(
            count(
                &s,
                "SELECT count(*) FROM pg_tables WHERE tablename = 'users'"
            )
            .await,
            1,
            "shard {shard} has the table"
        );
    }
    // Single-row inserts, simple protocol and extended with a bound parameter.
    for id in -300i64..300 {
        c.batch_execute(&format!(
            "INSERT INTO users (id, name) VALUES ({id}, 'u{id}')"
        ))
        .await
        .unwrap();
    }
    let insert = c
        .prepare("INSERT INTO users (id, name) VALUES ($1, $2)")
        .await
        .unwrap();
    for id in 1000i64..1600 {
        c.execute(&insert, &[&id, &format!("u{id}")]).await.unwrap();
    }
    // Multi-row inserts split per shard, one combined tag.
    for chunk in 0..10i64 {
        let values: Vec<String> = (0..100)
            .map(|i| {
                let id = 10_000 + chunk * 100 + i;
                format!("({id}, 'u{id}')")
            })
            .collect();
        let done = c
            .simple_query(&format!(
                "INSERT INTO users (id, name) VALUES {}",
                values.join(", ")
            ))
            .await
            .unwrap();
        let tag = done.iter().find_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        });
        assert_eq!(tag, Some(100));
    }
    // Edge keys.
    for id in [i64::MIN, i64::MAX, i32::MIN as i64, i32::MAX as i64 + 1] {
        c.execute(&insert, &[&id, &"edge"]).await.unwrap();
    }
    let mut seen = 0;
    for (shard, (lo, hi)) in BUCKETS.iter().enumerate() {
        let s = on_shard(shard, &db).await;
        let here = count(&s, "SELECT count(*) FROM users").await;
        let misplaced = count(
            &s,
            &format!(
                "SELECT count(*) FROM users WHERE (hashint8extended(id, 0) & 1023) NOT BETWEEN {lo} AND {hi}"
            ),
        )
        .await;
        assert_eq!(misplaced, 0, "shard {shard} holds rows of the other shard");
        assert!(here > 0, "shard {shard} got no rows");
        seen += here;
    }
    let through_proxy = count(&c, "SELECT count(*) FROM users").await;
    assert_eq!(seen, through_proxy);
    assert_eq!(seen, 600 + 600 + 1000 + 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_reads_and_keyless_reads_answer_as_one_server() {
    let (proxy, _db) = setup().await;
    let c = proxy.client().await;
    c.batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, name text, score int)")
        .await
        .unwrap();
    let values: Vec<String> = (1..=500)
        .map(|id| format!("({id}, 'u{id}', {})", id % 7))
        .collect();
    c.batch_execute(&format!(
        "INSERT INTO users (id, name, score) VALUES {}",
        values.join(", ")
    ))
    .await
    .unwrap();
    // Point reads: simple and extended (binary results).
    for id in [1i64, 2, 250, 499] {
        let rows = c
            .simple_query(&format!("SELECT name FROM users WHERE id = {id}"))
            .await
            .unwrap();
        assert_eq!(simple_rows(&rows), vec![vec![Some(format!("u{id}"))]]);
        let row = c
            .query_one("SELECT name, score FROM users WHERE id = $1", &[&id])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), format!("u{id}"));
        assert_eq!(row.get::<_, i32>(1), (id % 7) as i32);
    }
    let rows = c
        .simple_query("SELECT id FROM users WHERE id IN (3, 400, 77) ORDER BY id")
        .await
        .unwrap();
    assert_eq!(
        simple_rows(&rows),
        [3, 77, 400].map(|v| vec![Some(v.to_string())])
    );
    // Keyless reads: merged.
    assert_eq!(count(&c, "SELECT count(*) FROM users").await, 500);
    let rows = c
        .simple_query("SELECT id FROM users ORDER BY id DESC LIMIT 5 OFFSET 2")
        .await
        .unwrap();
    assert_eq!(
        simple_rows(&rows),
        [498, 497, 496, 495, 494].map(|v| vec![Some(v.to_string())])
    );
    let rows = c
        .simple_query("SELECT score, count(*), sum(id), min(id), max(id) FROM users GROUP BY score ORDER BY score")
        .await
        .unwrap();
    let direct: Vec<Vec<Option<String>>> = (0..7)
        .map(|s| {
            let ids: Vec<i64> = (1..=500).filter(|i| i % 7 == s).collect();
            vec![
                Some(s.to_string()),
                Some(ids.len().to_string()),
                Some(ids.iter().sum::<i64>().to_string()),
                Some(ids.iter().min().unwrap().to_string()),
                Some(ids.iter().max().unwrap().to_string()),
            ]
        })
        .collect();
    assert_eq!(simple_rows(&rows), direct);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_and_cross_shard_writes_are_refused() {
    let (proxy, _db) = setup().await;
    let c = proxy.client().await;
    c.batch_execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text); CREATE TABLE orders (id bigint, user_id bigint, total int)",
    )
    .await
    .unwrap();
    let err = c
        .batch_execute("UPDATE users SET name = 'x'")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("0A000"));
    assert!(
        err.as_db_error().unwrap().message().contains("users"),
        "{err}"
    );
    let err = c.batch_execute("DELETE FROM orders").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("0A000"));
    // Find two ids on different shards.
    let (a, b) = (
        1i64,
        (2..100).find(|&i| shard_of(i) != shard_of(1)).unwrap(),
    );
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute(&format!("INSERT INTO users (id, name) VALUES ({a}, 'a')"))
        .await
        .unwrap();
    let err = c
        .batch_execute(&format!("INSERT INTO users (id, name) VALUES ({b}, 'b')"))
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("0A000"));
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(count(&c, "SELECT count(*) FROM users").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_tables_are_written_everywhere_or_nowhere() {
    let (proxy, db) = setup().await;
    let c = proxy.client().await;
    c.batch_execute("CREATE TABLE countries (code text PRIMARY KEY, name text)")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO countries VALUES ('fr', 'France'), ('de', 'Germany')")
        .await
        .unwrap();
    for shard in 0..2 {
        let s = on_shard(shard, &db).await;
        assert_eq!(count(&s, "SELECT count(*) FROM countries").await, 2);
    }
    // One logical row, whatever the number of copies (extended protocol this time).
    let n = c
        .execute(
            "INSERT INTO countries (code, name) VALUES ($1, $2)",
            &[&"nl", &"Netherlands"],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    c.batch_execute("DELETE FROM countries WHERE code = 'nl'")
        .await
        .unwrap();
    // A row that exists on shard 1 only: the insert fails there, so neither shard
    // keeps the new rows.
    on_shard(1, &db)
        .await
        .batch_execute("INSERT INTO countries VALUES ('it', 'Italy')")
        .await
        .unwrap();
    let err = c
        .batch_execute("INSERT INTO countries VALUES ('es', 'Spain'), ('it', 'Italia')")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("23505"));
    let s0 = on_shard(0, &db).await;
    assert_eq!(count(&s0, "SELECT count(*) FROM countries").await, 2);
    let s1 = on_shard(1, &db).await;
    assert_eq!(count(&s1, "SELECT count(*) FROM countries").await, 3);
    // Reads of a reference table go to one shard.
    wait_for(
        "the read to see both rows",
        Duration::from_secs(5),
        || async {
            count(
                &c,
                "SELECT count(*) FROM countries WHERE code IN ('fr', 'de')",
            )
            .await
                == 2
        },
    )
    .await;
}

/// `UPDATE ... WHERE id IN (a, b)` with `a` and `b` on two of three shards runs on
/// those two, all or nothing (simple and extended protocol), with one combined answer.
/// (The third shard, without keys, is shard 1's server under another name and
/// database.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_write_over_two_of_three_shards_is_all_or_nothing() {
    let clusters = shard_clusters();
    let db = common::unique_name("shdb3");
    common::create_database(clusters, &db).await;
    common::create_database(&clusters[1..], &format!("{db}_s2")).await;
    let port = clusters[1].primary.1;
    let three = map(&db).replace(
        "\nkeyspaces:",
        &format!("\n  s2: {{ primary: \"postgres://localhost:{port}/{db}_s2\" }}\nkeyspaces:"),
    );
    let mut proxy = common::proxy::start_proxy_with_map(
        &clusters[0],
        &three,
        common::proxy::ProxyOptions {
            pool_size: 4,
            ..Default::default()
        },
    )
    .await;
    proxy.database = db.clone();
    let c = proxy.client().await;
    c.batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, name text)")
        .await
        .unwrap();
    // The third shard's node names its own database, and the proxy uses it.
    let s2 = common::superuser_client(&clusters[1], port, &format!("{db}_s2")).await;
    assert_eq!(
        count(
            &s2,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'users'"
        )
        .await,
        1
    );
    let a = (1..100).find(|&i| shard_of(i) == 0).unwrap_or(0);
    let b = (1..100).find(|&i| shard_of(i) == 1).unwrap_or(0);
    c.batch_execute(&format!(
        "INSERT INTO users (id, name) VALUES ({a}, 'a'), ({b}, 'b')"
    ))
    .await
    .unwrap();
    // Only shard 1 refuses the new name.
    on_shard(1, &db)
        .await
        .batch_execute("ALTER TABLE users ADD CONSTRAINT short CHECK (length(name) < 5)")
        .await
        .unwrap();
    let err = c
        .batch_execute(&format!(
            "UPDATE users SET name = 'too long' WHERE id IN ({a}, {b})"
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("23514"), "{err}");
    let err = c
        .execute(
            "UPDATE users SET name = $1 WHERE id = ANY($2)",
            &[&"too long", &vec![a, b]],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("23514"), "{err}");
    let s0 = on_shard(0, &db).await;
    let name: String = s0
        .query_one("SELECT name FROM users WHERE id = $1", &[&a])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "a", "shard 0 kept its row as it was");
    // When every shard can, every shard does; the count adds up.
    let rows = c
        .simple_query(&format!(
            "UPDATE users SET name = 'ok' WHERE id IN ({a}, {b}) RETURNING id"
        ))
        .await
        .unwrap();
    let tag = rows.iter().find_map(|m| match m {
        SimpleQueryMessage::CommandComplete(n) => Some(*n),
        _ => None,
    });
    assert_eq!(tag, Some(2));
    assert_eq!(simple_rows(&rows).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_ranges_place_rows_by_month_and_narrow_reads() {
    let (proxy, db) = setup().await;
    let c = proxy.client().await;
    c.batch_execute("CREATE TABLE events (id int, created_at timestamptz, what text)")
        .await
        .unwrap();
    c.batch_execute(
        "INSERT INTO events (id, created_at, what) VALUES (1, '2025-12-30 23:59:59+00', 'old'), (2, '2026-01-02 00:00:00+00', 'new'), (3, '2026-03-05 10:00:00+00', 'new')",
    )
    .await
    .unwrap();
    let s0 = on_shard(0, &db).await;
    let s1 = on_shard(1, &db).await;
    assert_eq!(count(&s0, "SELECT count(*) FROM events").await, 1);
    assert_eq!(count(&s1, "SELECT count(*) FROM events").await, 2);
    // A function that exists only on shard 1: a range read of shard 1's months never
    // reaches shard 0.
    s1.batch_execute(
        "CREATE FUNCTION only_here(t text) RETURNS text LANGUAGE sql AS $$ SELECT upper(t) $$",
    )
    .await
    .unwrap();
    let rows = c
        .simple_query(
            "SELECT only_here(what) FROM events WHERE created_at >= '2026-02-01' ORDER BY id",
        )
        .await
        .unwrap();
    assert_eq!(simple_rows(&rows), vec![vec![Some("NEW".to_owned())]]);
}

/// Near a month boundary a time key is placed exactly once the proxy knows the
/// column's type (from the catalog) and, for timestamptz without an offset, the
/// session's TimeZone: each row lands where the server's own comparison with the
/// map's bound says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_keys_near_a_boundary_are_placed_by_the_column_type_and_time_zone() {
    // A timestamptz column: offsets count, and so does the session's zone.
    let (proxy, db) = setup().await;
    let mut c = proxy.client().await;
    c.batch_execute("CREATE TABLE events (id int, created_at timestamptz)")
        .await
        .unwrap();
    c.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
    let rows = [
        "(1, '2025-12-31 23:30:00+00')",
        "(2, '2026-01-01 00:30:00-05')", // 05:30 UTC
        "(3, '2025-12-31 23:30:00+05')", // 18:30 UTC the day before
        "(4, '2025-12-31 23:59:59')",    // UTC by the session's zone
        "(5, '2026-01-01 00:00:00')",
    ];
    for row in rows {
        c.batch_execute(&format!("INSERT INTO events (id, created_at) VALUES {row}"))
            .await
            .unwrap_or_else(|e| panic!("{row}: {e}"));
    }
    // Bound parameters in binary: an instant.
    let instant = std::time::UNIX_EPOCH + Duration::from_secs(1_767_225_600 - 60); // 2025-12-31 23:59 UTC
    let tx = c.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO events (id, created_at) VALUES (6, $1)",
        &[&instant],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    // In a zone with daylight saving time a naive value near the boundary is refused.
    c.batch_execute("SET TimeZone = 'Europe/Berlin'")
        .await
        .unwrap();
    let err = c
        .batch_execute("INSERT INTO events (id, created_at) VALUES (7, '2025-12-31 23:30:00')")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("0A000"), "{err}");
    let placed = "SELECT string_agg(id::text, ',' ORDER BY id) FROM events";
    let shard_rows = |shard: usize| {
        let db = db.clone();
        async move {
            let s = on_shard(shard, &db).await;
            let ids: Option<String> = s.query_one(placed, &[]).await.unwrap().get(0);
            let wrong: i64 = s
                .query_one(
                    if shard == 0 {
                        "SELECT count(*) FROM events WHERE created_at >= '2026-01-01T00:00:00Z'"
                    } else {
                        "SELECT count(*) FROM events WHERE created_at < '2026-01-01T00:00:00Z'"
                    },
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (ids.unwrap_or_default(), wrong)
        }
    };
    assert_eq!(shard_rows(0).await, ("1,3,4,6".to_owned(), 0));
    assert_eq!(shard_rows(1).await, ("2,5".to_owned(), 0));
    proxy.handle.shutdown();

    // A timestamp column keeps the wall-clock time and ignores offsets.
    let (proxy, db) = setup().await;
    let c = proxy.client().await;
    c.batch_execute("CREATE TABLE events (id int, created_at timestamp)")
        .await
        .unwrap();
    c.batch_execute("SET TimeZone = 'America/New_York'")
        .await
        .unwrap();
    for row in [
        "(1, '2025-12-31 23:30:00+05')",
        "(2, '2026-01-01 00:30:00-05')",
        "(3, '2025-12-31 23:59:59.999999')",
    ] {
        c.batch_execute(&format!("INSERT INTO events (id, created_at) VALUES {row}"))
            .await
            .unwrap_or_else(|e| panic!("{row}: {e}"));
    }
    let s0 = on_shard(0, &db).await;
    let on_s0: Option<String> = s0.query_one(placed, &[]).await.unwrap().get(0);
    assert_eq!(on_s0.as_deref(), Some("1,3"));
    let s1 = on_shard(1, &db).await;
    let on_s1: Option<String> = s1.query_one(placed, &[]).await.unwrap().get(0);
    assert_eq!(on_s1.as_deref(), Some("2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_without_a_column_list_are_placed_by_the_tables_own_columns() {
    let (proxy, db) = setup().await;
    let c = proxy.client().await;
    c.batch_execute("CREATE TABLE orders (id bigint, user_id bigint, total int)")
        .await
        .unwrap();
    // The key is the second column: the proxy must know that to place the rows.
    let values: Vec<String> = (1..=200)
        .map(|i| format!("({i}, {i}, {})", i * 10))
        .collect();
    c.batch_execute(&format!("INSERT INTO orders VALUES {}", values.join(", ")))
        .await
        .unwrap();
    c.batch_execute("INSERT INTO orders VALUES (1000, 7, 1)")
        .await
        .unwrap();
    for (shard, (lo, hi)) in BUCKETS.iter().enumerate() {
        let s = on_shard(shard, &db).await;
        let misplaced = count(
            &s,
            &format!(
                "SELECT count(*) FROM orders WHERE (hashint8extended(user_id, 0) & 1023) NOT BETWEEN {lo} AND {hi}"
            ),
        )
        .await;
        assert_eq!(misplaced, 0, "shard {shard}");
    }
    assert_eq!(count(&c, "SELECT count(*) FROM orders").await, 201);
    let row = c
        .query_one(
            "SELECT total FROM orders WHERE user_id = 7 AND id = 1000",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
}

fn rewrite_map(proxy: &TestProxy, text: &str) {
    // Write then rename, as editors do: the watcher sees one whole file.
    let path = proxy.map_file();
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, text).unwrap();
    std::fs::rename(&temp, &path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_apply_topology_and_refuse_invalid_maps_and_key_moves() {
    let (proxy, db) = setup().await;
    let c = proxy.client().await;
    c.batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, name text)")
        .await
        .unwrap();
    let version = || proxy.handle.frontend.topology.load().map.version;
    assert_eq!(version(), 1);
    // Invalid: overlapping buckets. Rejected with file and line; the old map stays.
    let invalid = map(&db)
        .replace("buckets: 512-1023", "buckets: 500-1023")
        .replace("version: 1", "version: 2");
    rewrite_map(&proxy, &invalid);
    let err = proxy.handle.reload().await.unwrap_err().to_string();
    assert!(
        err.contains("map.yaml:") && err.contains("keeping version 1"),
        "{err}"
    );
    assert_eq!(version(), 1);
    // A table changing rule cannot be resharded: refused, routing unchanged (bucket
    // moves start a reshard job: integration-tests/resharding.rs).
    let moved = map(&db)
        .replace(
            "users: { column: id, keyspace: users }",
            "users: { reference: true }",
        )
        .replace("version: 1", "version: 3");
    assert_ne!(moved, map(&db).replace("version: 1", "version: 3"));
    rewrite_map(&proxy, &moved);
    let err = proxy.handle.reload().await.unwrap_err().to_string();
    assert!(
        err.contains("cannot be resharded") && err.contains("rule changed"),
        "{err}"
    );
    assert_eq!(version(), 1);
    let id = (1..1000)
        .find(|&i| {
            let b = shardgate::shard_map::hash::bucket(
                shardgate::shard_map::hash::hashint8extended(i, 0),
                1024,
            );
            (256..512).contains(&b)
        })
        .unwrap();
    c.batch_execute(&format!(
        "INSERT INTO users (id, name) VALUES ({id}, 'stays')"
    ))
    .await
    .unwrap();
    let s0 = on_shard(0, &db).await;
    assert_eq!(
        count(&s0, &format!("SELECT count(*) FROM users WHERE id = {id}")).await,
        1
    );
    // A topology change (shard s1 without its replica) applies at once, through the
    // file watcher alone, and routing keeps working on the new snapshot.
    let (host, port) = &shard_clusters()[1].primary;
    let no_replica = map(&db)
        .replace(
            &shard_entry(&shard_clusters()[1]),
            &format!("{{ primary: \"{host}:{port}\" }}"),
        )
        .replace("version: 1", "version: 4");
    rewrite_map(&proxy, &no_replica);
    wait_for(
        "the watcher to apply version 4",
        Duration::from_secs(10),
        || async { version() == 4 },
    )
    .await;
    let topology = proxy.handle.frontend.topology.load();
    assert_eq!(topology.shards[1].nodes.len(), 1);
    assert_eq!(topology.shards[0].nodes.len(), 2);
    drop(topology);
    for i in 0..50 {
        c.batch_execute(&format!(
            "INSERT INTO users (id, name) VALUES ({}, 'after')",
            10_000 + i
        ))
        .await
        .unwrap();
    }
    assert_eq!(
        count(&c, "SELECT count(*) FROM users WHERE name = 'after'").await,
        50
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_multi_row_insert_is_split_by_shard() {
    let (proxy, db) = setup().await;
    let c = proxy.client().await;
    c.batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, name text)")
        .await
        .unwrap();
    let ids: Vec<i64> = (1..=6).collect();
    assert!(ids.iter().any(|&i| shard_of(i) == 0) && ids.iter().any(|&i| shard_of(i) == 1));
    let names: Vec<String> = ids.iter().map(|i| format!("p{i}")).collect();
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
    for (id, name) in ids.iter().zip(&names) {
        params.push(id);
        params.push(name);
    }
    let rows = c
        .query(
            "INSERT INTO users (id, name) VALUES ($1, $2), ($3, $4), ($5, $6), ($7, $8), ($9, $10), ($11, $12) RETURNING id, name",
            &params,
        )
        .await
        .unwrap();
    let mut returned: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    returned.sort();
    assert_eq!(returned, ids);
    for (shard, (lo, hi)) in BUCKETS.iter().enumerate() {
        let s = on_shard(shard, &db).await;
        let expected = ids.iter().filter(|&&i| shard_of(i) == shard).count() as i64;
        assert_eq!(
            count(&s, "SELECT count(*) FROM users").await,
            expected,
            "shard {shard}"
        );
        let misplaced = count(
            &s,
            &format!("SELECT count(*) FROM users WHERE (hashint8extended(id, 0) & 1023) NOT BETWEEN {lo} AND {hi}"),
        )
        .await;
        assert_eq!(misplaced, 0);
    }
    let n = c
        .execute(
            "INSERT INTO users (id, name) VALUES ($1, $2), ($3, $4)",
            &[&100i64, &"a", &101i64, &"b"],
        )
        .await
        .unwrap();
    assert_eq!(n, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_read_inside_a_transaction_sees_the_transactions_writes() {
    let (proxy, _db) = setup().await;
    let c = proxy.client().await;
    c.batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, name text)")
        .await
        .unwrap();
    let values: Vec<String> = (1..=100).map(|i| format!("({i}, 'u{i}')")).collect();
    c.batch_execute(&format!(
        "INSERT INTO users (id, name) VALUES {}",
        values.join(", ")
    ))
    .await
    .unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    // A keyless read first (the transaction has no shard yet), then a write.
    assert_eq!(count_simple(&c, "SELECT count(*) FROM users").await, 100);
    c.batch_execute("INSERT INTO users (id, name) VALUES (1000, 'mine')")
        .await
        .unwrap();
    // The transaction's own shard answers on its connection: the row is counted.
    assert_eq!(count_simple(&c, "SELECT count(*) FROM users").await, 101);
    let rows = c
        .simple_query("SELECT id FROM users ORDER BY id DESC LIMIT 2")
        .await
        .unwrap();
    assert_eq!(
        simple_rows(&rows),
        vec![vec![Some("1000".to_owned())], vec![Some("100".to_owned())]]
    );
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(count_simple(&c, "SELECT count(*) FROM users").await, 100);
    // The same through the extended protocol (a driver's transaction).
    let mut c = c;
    let t = c.transaction().await.unwrap();
    let n: i64 = t
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 100);
    t.execute(
        "INSERT INTO users (id, name) VALUES ($1, $2)",
        &[&2000i64, &"mine"],
    )
    .await
    .unwrap();
    let n: i64 = t
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 101);
    t.rollback().await.unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 100);
}

async fn count_simple(c: &tokio_postgres::Client, sql: &str) -> i64 {
    let rows = c.simple_query(sql).await.unwrap();
    simple_rows(&rows)[0][0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap()
}

/// A driver's transaction (tokio-postgres: BEGIN, then Parse/Describe/Sync to prepare,
/// then Bind/Execute/Sync) runs on the shard of its first statement's key, even though
/// the statement was described before its key was known: new connections each time, keys
/// on both shards.
#[tokio::test]
async fn prepared_statements_in_a_driver_transaction_run_on_their_keys_shard() {
    let (proxy, db) = setup().await;
    let setup_client = proxy.client().await;
    setup_client
        .batch_execute("CREATE TABLE users (id int8 PRIMARY KEY, name text)")
        .await
        .unwrap();
    for id in 1..=40i64 {
        let mut client = proxy.client().await;
        let tx = client.transaction().await.unwrap();
        let name = format!("n{id}");
        tx.execute(
            "INSERT INTO users (id, name) VALUES ($1, $2)",
            &[&id, &name],
        )
        .await
        .unwrap_or_else(|e| panic!("insert {id}: {e:?}"));
        tx.execute("UPDATE users SET name = name || '!' WHERE id = $1", &[&id])
            .await
            .unwrap_or_else(|e| panic!("update {id}: {e:?}"));
        tx.commit().await.unwrap();
    }
    let mut total = 0;
    for shard in 0..2 {
        let c = on_shard(shard, &db).await;
        total += count(&c, "SELECT count(*) FROM users WHERE name LIKE '%!'").await;
    }
    assert_eq!(total, 40);
}
