//! Online resharding against three real shards (each a primary and a streaming replica,
//! `wal_level=logical`): a map edit and RELOAD move rows with logical replication while
//! writers keep going through the proxy. The third shard starts without the schema.
//! Each test works in a database of its own on all three.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::proxy::{shard_entry, start_proxy_with_map, ProxyOptions, TestProxy};
use common::{superuser_client, unique_name, wait_for, TestCluster};
use shardgate::app::reload::ReloadOutcome;

fn shards() -> &'static [TestCluster] {
    static CLUSTERS: OnceLock<Vec<TestCluster>> = OnceLock::new();
    CLUSTERS.get_or_init(|| {
        let a = std::thread::spawn(|| common::own_cluster(1));
        let b = std::thread::spawn(|| common::own_cluster(1));
        let c = common::own_cluster(1);
        vec![a.join().expect("shard 0"), b.join().expect("shard 1"), c]
    })
}

const MAX_PAUSE: Duration = Duration::from_secs(2);

/// `users` hash buckets per shard, `events` split at `split`; `s2` listed when given
/// its buckets.
fn map(version: u64, db: &str, buckets: &[(&str, u32, u32)], time: &[(&str, &str)]) -> String {
    let c = shards();
    let mut names: Vec<&str> = buckets.iter().map(|b| b.0).collect();
    names.extend(time.iter().map(|t| t.0));
    let listed = |s: &str| names.contains(&s);
    let mut out = format!("version: {version}\ndatabase: {db}\nshards:\n");
    for (i, name) in ["s0", "s1", "s2"].iter().enumerate() {
        if listed(name) {
            out.push_str(&format!("  {name}: {}\n", shard_entry(&c[i])));
        }
    }
    out.push_str("keyspaces:\n  users:\n    type: hash\n    buckets: 1024\n    map:\n");
    for (shard, lo, hi) in buckets {
        out.push_str(&format!(
            "      - {{ buckets: {lo}-{hi}, shard: {shard} }}\n"
        ));
    }
    out.push_str("  months:\n    type: time\n    map:\n");
    let mut from: Option<&str> = None;
    for (i, (shard, until)) in time.iter().enumerate() {
        let mut entry = Vec::new();
        if let Some(f) = from {
            entry.push(format!("from: {f}"));
        }
        if i + 1 < time.len() {
            entry.push(format!("until: {until}"));
        }
        entry.push(format!("shard: {shard}"));
        out.push_str(&format!("      - {{ {} }}\n", entry.join(", ")));
        from = Some(until);
    }
    out.push_str(
        "tables:\n  users: { column: id, keyspace: users }\n  orders: { column: user_id, keyspace: users }\n  events: { column: created_at, keyspace: months }\ndefault_shard: s0\n",
    );
    out
}

const TWO_SHARDS: [(&str, u32, u32); 2] = [("s0", 0, 511), ("s1", 512, 1023)];
/// Buckets 768-1023 of s1 on s2: the move most tests make.
const THREE_SHARDS: [(&str, u32, u32); 3] = [("s0", 0, 511), ("s1", 512, 767), ("s2", 768, 1023)];
const TIME_TWO: [(&str, &str); 2] = [("s0", "2026-01-01T00:00:00Z"), ("s1", "")];

fn options() -> ProxyOptions {
    ProxyOptions {
        pool_size: 8,
        acquire_timeout: "10s",
        // Resharding SQL needs a superuser: the clusters' `postgres` (trust on loopback).
        extra_users: vec![("postgres".into(), "unused".into())],
        extra: format!(
            "control: {{ user: postgres }}\nreshard: {{ max_pause: {}ms }}\n",
            MAX_PAUSE.as_millis()
        ),
        ..Default::default()
    }
}

/// The tests of this file run one at a time: each moves rows on the same three
/// clusters, and the stall and pause they measure should not be other tests' load.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A database on all three shards; the schema through the proxy (so on s0 and s1 only).
/// The guard keeps the other tests of this file waiting.
async fn setup() -> (TestProxy, String, tokio::sync::MutexGuard<'static, ()>) {
    let serial = SERIAL.lock().await;
    let db = unique_name("rs");
    for c in shards() {
        let su = superuser_client(c, c.primary.1, "postgres").await;
        su.batch_execute(&format!("CREATE DATABASE {db} OWNER {}", c.app_user))
            .await
            .expect("create database");
    }
    let mut proxy = start_proxy_with_map(
        &shards()[0],
        &map(1, &db, &TWO_SHARDS, &TIME_TWO),
        options(),
    )
    .await;
    proxy.database = db.clone();
    let client = proxy.client().await;
    client
        .batch_execute(
            "CREATE TABLE users (id int8 PRIMARY KEY, name text NOT NULL);
             CREATE TABLE orders (id bigserial PRIMARY KEY, user_id int8 NOT NULL, amount int NOT NULL, note text);
             CREATE INDEX ON orders (user_id);
             CREATE TABLE events (id int8, created_at timestamptz NOT NULL, payload text, PRIMARY KEY (id, created_at))",
        )
        .await
        .expect("schema through the proxy");
    (proxy, db, serial)
}

async fn on_shard(shard: usize, db: &str) -> tokio_postgres::Client {
    let c = &shards()[shard];
    superuser_client(c, c.primary.1, db).await
}

async fn int(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// Users 1..=n and two orders each, through the proxy (multi-row INSERTs it splits).
async fn load_users(proxy: &TestProxy, n: i64) {
    let client = proxy.client().await;
    for start in (1..=n).step_by(500) {
        let end = (start + 499).min(n);
        let users: Vec<String> = (start..=end).map(|i| format!("({i}, 'u{i}')")).collect();
        client
            .batch_execute(&format!(
                "INSERT INTO users (id, name) VALUES {}",
                users.join(",")
            ))
            .await
            .expect("load users");
        let orders: Vec<String> = (start..=end)
            .flat_map(|i| [format!("({i}, 1, 'first')"), format!("({i}, 2, 'second')")])
            .collect();
        client
            .batch_execute(&format!(
                "INSERT INTO orders (user_id, amount, note) VALUES {}",
                orders.join(",")
            ))
            .await
            .expect("load orders");
    }
}

/// What one writer had acknowledged.
#[derive(Default)]
struct Acked {
    inserted: Vec<i64>,
    /// user id -> last acknowledged name.
    renamed: HashMap<i64, String>,
    errors: Vec<String>,
    longest: Duration,
}

/// Writer `w`: inserts new users (ids `10_000_000 * (w + 1) + i`) with an order each,
/// and renames existing users `id % 4 == w`, recording what was acknowledged.
fn spawn_writer(
    proxy: &TestProxy,
    w: i64,
    existing: i64,
    acked: Arc<Mutex<Acked>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let dsn = proxy.dsn();
    tokio::spawn(async move {
        let mut client = common::proxy::connect(&dsn).await;
        let mut i = 0i64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let id = 10_000_000 * (w + 1) + i;
            let started = Instant::now();
            let insert = async {
                let tx = client.transaction().await?;
                let name = format!("n{id}");
                tx.execute(
                    "INSERT INTO users (id, name) VALUES ($1, $2)",
                    &[&id, &name],
                )
                .await?;
                tx.execute(
                    "INSERT INTO orders (user_id, amount, note) VALUES ($1, 7, 'live')",
                    &[&id],
                )
                .await?;
                tx.commit().await
            }
            .await;
            let target = (i * 4 + w) % existing + 1;
            let target = target - (target % 4) + w;
            let name = format!("w{w}-{i}");
            let rename = if (1..=existing).contains(&target) {
                Some(
                    client
                        .execute(
                            "UPDATE users SET name = $1 WHERE id = $2",
                            &[&name, &target],
                        )
                        .await,
                )
            } else {
                None
            };
            let took = started.elapsed();
            let mut a = acked.lock().unwrap();
            a.longest = a.longest.max(took);
            match insert {
                Ok(()) => a.inserted.push(id),
                Err(e) => a.errors.push(format!("insert {id}: {}", db_message(&e))),
            }
            match rename {
                Some(Ok(1)) => {
                    a.renamed.insert(target, name);
                }
                Some(Ok(n)) => a.errors.push(format!("rename {target}: {n} rows")),
                Some(Err(e)) => a
                    .errors
                    .push(format!("rename {target}: {}", db_message(&e))),
                None => {}
            }
        }
    })
}

fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

async fn write_map_and_reload(proxy: &TestProxy, text: &str) -> u64 {
    std::fs::write(proxy.map_file(), text).expect("write map");
    match proxy.handle.reload().await {
        Ok(ReloadOutcome::ReshardStarted { job, .. }) => job,
        other => panic!("expected a reshard job, got {other:?}"),
    }
}

async fn wait_phase(proxy: &TestProxy, phases: &[&str], timeout: Duration) -> String {
    let fe = proxy.handle.frontend.clone();
    let mut last = String::new();
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = fe.reshard.status() {
            last = format!("{s:?}");
            if phases.contains(&s.phase.as_str()) {
                return s.phase;
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {phases:?}; last status {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Replication objects the job creates, left on a shard.
async fn leftovers(shard: usize, db: &str) -> Vec<String> {
    let c = on_shard(shard, db).await;
    let mut out = Vec::new();
    for (what, sql) in [
        (
            "slot",
            "SELECT slot_name::text FROM pg_replication_slots WHERE database = current_database()",
        ),
        ("publication", "SELECT pubname::text FROM pg_publication"),
        (
            "subscription",
            "SELECT subname::text FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid \
             WHERE d.datname = current_database()",
        ),
        (
            "fence table",
            "SELECT relname::text FROM pg_class WHERE relname LIKE 'shardgate_reshard%'",
        ),
    ] {
        for row in c.query(sql, &[]).await.expect(sql) {
            out.push(format!("{what} {}", row.get::<_, String>(0)));
        }
    }
    out
}

/// Every `users` and `orders` row on the shard that owns its bucket in `map`, by the
/// servers' own hash.
async fn assert_on_owners(db: &str, map: &[(&str, u32, u32)]) {
    for (name, lo, hi) in map {
        let shard = name[1..].parse().unwrap();
        let users = misplaced(shard, db, "users", "id", *lo, *hi).await;
        assert_eq!(users, 0, "users on {name} outside buckets {lo}-{hi}");
        let orders = misplaced(shard, db, "orders", "user_id", *lo, *hi).await;
        assert_eq!(orders, 0, "orders on {name} outside buckets {lo}-{hi}");
    }
}

/// Rows of `table` on `shard` whose `users` bucket is outside [lo, hi], by the
/// server's own hash.
async fn misplaced(shard: usize, db: &str, table: &str, column: &str, lo: u32, hi: u32) -> i64 {
    let c = on_shard(shard, db).await;
    int(
        &c,
        &format!(
            "SELECT count(*) FROM {table} WHERE (hashint8extended({column}, 0) & 1023) NOT BETWEEN {lo} AND {hi}"
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn buckets_move_to_a_new_shard_while_writers_keep_writing() {
    let (proxy, db, _serial) = setup().await;
    let users = 20_000;
    load_users(&proxy, users).await;
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Vec<Arc<Mutex<Acked>>> = (0..4).map(|_| Arc::default()).collect();
    let writers: Vec<_> = (0..4)
        .map(|w| spawn_writer(&proxy, w, users, acked[w as usize].clone(), stop.clone()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !acked.iter().all(|a| a.lock().unwrap().inserted.len() > 5) {
        if Instant::now() > deadline {
            stop.store(true, Ordering::Relaxed);
            panic!("writers: {:?}", acked[0].lock().unwrap().errors.first());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let new_map = map(2, &db, &THREE_SHARDS, &TIME_TWO);
    write_map_and_reload(&proxy, &new_map).await;
    let phase = wait_phase(
        &proxy,
        &["done", "failed", "cancelled"],
        Duration::from_secs(180),
    )
    .await;
    let status = proxy.handle.frontend.reshard.status().unwrap();
    assert_eq!(phase, "done", "{status:?}");
    // Writers go on a little on the new map, then stop.
    let before = acked[0].lock().unwrap().inserted.len();
    wait_for(
        "writes after the cutover",
        Duration::from_secs(10),
        || async { acked[0].lock().unwrap().inserted.len() > before + 5 },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    eprintln!("reshard status: {status:?}");
    let verify = status.verify.clone().unwrap_or_default();
    assert!(verify.starts_with("ok"), "verification: {verify}");
    // Progress figures: the estimate and the copied count are of the moved rows.
    let moved: u64 = verify
        .split(';')
        .filter_map(|part| {
            part.rsplit(": ")
                .next()?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert!(moved > 10_000, "{verify}");
    assert!(
        status.rows_estimate > moved / 2 && status.rows_estimate < moved * 2,
        "estimate {} for {moved} moved rows",
        status.rows_estimate
    );
    assert!(
        status.rows_copied >= moved * 9 / 10 && status.rows_copied < moved * 2,
        "rows_copied {} for {moved} moved rows",
        status.rows_copied
    );
    assert!(status.pause_ms.is_some_and(|ms| ms < 2_000), "{status:?}");
    // Every row on its owner, by the server's own hash.
    assert_on_owners(&db, &THREE_SHARDS).await;
    // s2 got its share.
    let s2 = on_shard(2, &db).await;
    assert!(int(&s2, "SELECT count(*) FROM users").await > 4_000);
    // No acknowledged insert lost, nothing duplicated.
    let mut seen: HashMap<i64, u32> = HashMap::new();
    let mut names: HashMap<i64, String> = HashMap::new();
    for shard in 0..3 {
        let c = on_shard(shard, &db).await;
        for row in c.query("SELECT id, name FROM users", &[]).await.unwrap() {
            *seen.entry(row.get(0)).or_default() += 1;
            names.insert(row.get(0), row.get(1));
        }
    }
    let dupes: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dupes.is_empty(), "duplicated users: {dupes:?}");
    let mut longest = Duration::ZERO;
    for a in &acked {
        let a = a.lock().unwrap();
        assert!(a.errors.is_empty(), "writer errors: {:?}", a.errors);
        longest = longest.max(a.longest);
        for id in &a.inserted {
            assert_eq!(seen.get(id), Some(&1), "acknowledged user {id}");
        }
        for (id, name) in &a.renamed {
            assert_eq!(names.get(id), Some(name), "acknowledged rename of {id}");
        }
    }
    assert_eq!(
        seen.len() as i64,
        users
            + acked
                .iter()
                .map(|a| a.lock().unwrap().inserted.len() as i64)
                .sum::<i64>()
    );
    // Orders: two per loaded user plus one per acknowledged insert, each once.
    let mut orders = 0;
    for shard in 0..3 {
        orders += int(&on_shard(shard, &db).await, "SELECT count(*) FROM orders").await;
    }
    assert_eq!(
        orders,
        2 * users
            + acked
                .iter()
                .map(|a| a.lock().unwrap().inserted.len() as i64)
                .sum::<i64>()
    );
    eprintln!("longest writer stall: {longest:?}");
    assert!(
        longest <= MAX_PAUSE + Duration::from_secs(1),
        "longest writer stall {longest:?}"
    );
    // The target's sequence is past every id it received.
    let max_id = int(&s2, "SELECT coalesce(max(id), 0) FROM orders").await;
    let seq = int(&s2, "SELECT last_value FROM orders_id_seq").await;
    assert!(seq >= max_id, "orders_id_seq {seq} < max id {max_id}");
    for shard in 0..3 {
        assert_eq!(
            leftovers(shard, &db).await,
            Vec::<String>::new(),
            "s{shard}"
        );
    }
    // Routing follows the new map: a user of bucket >= 768 is read from s2.
    let client = proxy.client().await;
    let on_s2: i64 = s2
        .query_one("SELECT id FROM users LIMIT 1", &[])
        .await
        .unwrap()
        .get(0);
    client
        .execute("UPDATE users SET name = 'after' WHERE id = $1", &[&on_s2])
        .await
        .unwrap();
    let name: String = s2
        .query_one("SELECT name FROM users WHERE id = $1", &[&on_s2])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "after");
    assert!(!Path::new(&format!("{}.reshard.json", proxy.map_file().display())).exists());
}

/// Events 2024-01 .. 2027-12, one per day, through the proxy.
async fn load_events(proxy: &TestProxy) -> i64 {
    let client = proxy.client().await;
    let mut n = 0;
    for year in 2024..=2027 {
        // Days 2-28: no key within 16 hours of a month's (or a shard's) boundary.
        let rows: Vec<String> = (1..=12)
            .flat_map(|month| (2..=28).map(move |day| (month, day)))
            .map(|(month, day)| {
                n += 1;
                format!("({n}, '{year}-{month:02}-{day:02} 12:00:00+00', 'e{n}')")
            })
            .collect();
        client
            .batch_execute(&format!(
                "INSERT INTO events (id, created_at, payload) VALUES {}",
                rows.join(",")
            ))
            .await
            .expect("load events");
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_oldest_time_range_moves_to_a_new_shard() {
    let (proxy, db, _serial) = setup().await;
    let events = load_events(&proxy).await;
    let new_map = map(
        2,
        &db,
        &TWO_SHARDS,
        &[
            ("s2", "2025-01-01T00:00:00Z"),
            ("s0", "2026-01-01T00:00:00Z"),
            ("s1", ""),
        ],
    );
    write_map_and_reload(&proxy, &new_map).await;
    let phase = wait_phase(
        &proxy,
        &["done", "failed", "cancelled"],
        Duration::from_secs(120),
    )
    .await;
    let status = proxy.handle.frontend.reshard.status().unwrap();
    assert_eq!(phase, "done", "{status:?}");
    let bounds = [
        (2, "created_at < '2025-01-01T00:00:00Z'"),
        (
            0,
            "created_at >= '2025-01-01T00:00:00Z' AND created_at < '2026-01-01T00:00:00Z'",
        ),
        (1, "created_at >= '2026-01-01T00:00:00Z'"),
    ];
    let mut total = 0;
    for (shard, owned) in bounds {
        let c = on_shard(shard, &db).await;
        let all = int(&c, "SELECT count(*) FROM events").await;
        let mine = int(&c, &format!("SELECT count(*) FROM events WHERE {owned}")).await;
        assert_eq!(all, mine, "events on s{shard} outside its range");
        assert!(mine >= 324, "s{shard} has {mine} events");
        total += all;
    }
    assert_eq!(total, events);
    // A read of 2024 through the proxy now comes from s2 alone.
    let client = proxy.client().await;
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM events WHERE created_at >= '2024-03-01T00:00:00Z' AND created_at < '2024-04-01T00:00:00Z'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 27);
    for shard in 0..3 {
        assert_eq!(
            leftovers(shard, &db).await,
            Vec::<String>::new(),
            "s{shard}"
        );
    }
}

/// Holds a SHARE lock (writes wait, reads do not) on `table` on `shard` until dropped (the subscription's
/// initial copy into it waits: the job stays in its copy phase).
async fn lock_table(shard: usize, db: &str, table: &str) -> tokio_postgres::Client {
    let c = on_shard(shard, db).await;
    c.batch_execute(&format!("BEGIN; LOCK TABLE {table} IN SHARE MODE"))
        .await
        .expect("lock");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_during_the_copy_leaves_both_sides_as_they_were() {
    let (proxy, db, _serial) = setup().await;
    load_users(&proxy, 2_000).await;
    let s0 = on_shard(0, &db).await;
    let before = int(&s0, "SELECT count(*) FROM orders").await;
    let lock = lock_table(1, &db, "orders").await;
    // Buckets 0-255 move from s0 to s1 (which has the schema and its own rows).
    let new_map = map(
        2,
        &db,
        &[("s1", 0, 255), ("s0", 256, 511), ("s1", 512, 1023)],
        &TIME_TWO,
    );
    write_map_and_reload(&proxy, &new_map).await;
    wait_phase(&proxy, &["copy"], Duration::from_secs(60)).await;
    // Some of the copy has happened: rows of users reached s1 (orders is locked).
    let s1 = on_shard(1, &db).await;
    wait_for("users copied to s1", Duration::from_secs(30), || async {
        int(
            &s1,
            "SELECT count(*) FROM users WHERE (hashint8extended(id, 0) & 1023) <= 255",
        )
        .await
            > 0
    })
    .await;
    assert!(leftovers(0, &db)
        .await
        .iter()
        .any(|l| l.starts_with("publication")));
    // A write over several shards that include the target would change its copies
    // directly and again through replication: refused while the job runs.
    let writer = proxy.client().await;
    let refused = writer
        .execute("UPDATE users SET name = name || '+' WHERE id < 100", &[])
        .await
        .expect_err("a multi-shard write reaching the target during the job");
    assert!(db_message(&refused).starts_with("0A000"), "{refused:?}");
    proxy.handle.frontend.reshard.cancel().expect("cancel");
    drop(lock);
    let phase = wait_phase(
        &proxy,
        &["cancelled", "failed", "done"],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(phase, "cancelled");
    for shard in 0..3 {
        assert_eq!(
            leftovers(shard, &db).await,
            Vec::<String>::new(),
            "s{shard}"
        );
    }
    assert_eq!(
        misplaced(1, &db, "users", "id", 512, 1023).await,
        0,
        "copied users left on s1"
    );
    assert_eq!(
        misplaced(1, &db, "orders", "user_id", 512, 1023).await,
        0,
        "copied orders left on s1"
    );
    assert_eq!(int(&s0, "SELECT count(*) FROM orders").await, before);
    // The map file says the old ownership again (a newer version), and routing follows it.
    let text = std::fs::read_to_string(proxy.map_file()).unwrap();
    assert!(text.contains("0-511"), "{text}");
    assert!(text.contains("version: 3"), "{text}");
    let client = proxy.client().await;
    let id = (1..).find(|i: &i64| bucket(*i) <= 255).unwrap() + 5_000_000;
    let id = (id..).find(|i| bucket(*i) <= 255).unwrap();
    client
        .execute(
            "INSERT INTO users (id, name) VALUES ($1, 'after cancel')",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(
        int(&s0, &format!("SELECT count(*) FROM users WHERE id = {id}")).await,
        1
    );
}

fn bucket(id: i64) -> u32 {
    (shardgate::shard_map::hash::key_hash(&shardgate::shard_map::hash::KeyValue::Int(id)) & 1023)
        as u32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_during_the_copy_resumes_the_job() {
    let (proxy, db, _serial) = setup().await;
    load_users(&proxy, 2_000).await;
    // The schema on s2 beforehand (as the app role), so that its orders table can be
    // locked before the job starts: the copy into it waits, and the job with it.
    let s2 = on_shard(2, &db).await;
    s2.batch_execute(&format!(
        "SET ROLE {}; CREATE TABLE users (id int8 PRIMARY KEY, name text NOT NULL);
         CREATE TABLE orders (id bigserial PRIMARY KEY, user_id int8 NOT NULL, amount int NOT NULL, note text);
         RESET ROLE",
        shards()[2].app_user
    ))
    .await
    .expect("schema on s2");
    let lock = lock_table(2, &db, "orders").await;
    let new_map = map(2, &db, &THREE_SHARDS, &TIME_TWO);
    write_map_and_reload(&proxy, &new_map).await;
    wait_phase(&proxy, &["copy"], Duration::from_secs(60)).await;
    let state = format!("{}.reshard.json", proxy.map_file().display());
    assert!(Path::new(&state).exists());
    let proxy = proxy.restart().await;
    // Restarted before the cutover: routing follows the old ownership.
    let client = proxy.client().await;
    let id = (9_000_000..).find(|i| bucket(*i) >= 768).unwrap();
    client
        .execute("INSERT INTO users (id, name) VALUES ($1, 'during')", &[&id])
        .await
        .unwrap();
    let s1 = on_shard(1, &db).await;
    assert_eq!(
        int(&s1, &format!("SELECT count(*) FROM users WHERE id = {id}")).await,
        1
    );
    drop(lock);
    let phase = wait_phase(
        &proxy,
        &["done", "failed", "cancelled"],
        Duration::from_secs(120),
    )
    .await;
    let status = proxy.handle.frontend.reshard.status().unwrap();
    assert_eq!(phase, "done", "{status:?}");
    assert_on_owners(&db, &THREE_SHARDS).await;
    assert_eq!(
        int(&s2, &format!("SELECT count(*) FROM users WHERE id = {id}")).await,
        1
    );
    let mut users = 0;
    for shard in 0..3 {
        users += int(&on_shard(shard, &db).await, "SELECT count(*) FROM users").await;
        assert_eq!(
            leftovers(shard, &db).await,
            Vec::<String>::new(),
            "s{shard}"
        );
    }
    assert_eq!(users, 2_001);
    assert!(!Path::new(&state).exists());
}

/// A session whose server connection is pinned (a WITH HOLD cursor) on a source shard
/// does not hold up the cutover while idle, and afterwards a write of a moved key from
/// it is refused instead of landing on the shard that no longer owns the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pinned_session_follows_the_cutover() {
    let (proxy, db, _serial) = setup().await;
    load_users(&proxy, 2_000).await;
    let moved = (1..=2_000).find(|i| bucket(*i) >= 768).unwrap();
    let stays = (1..=2_000)
        .find(|i| (512..768).contains(&bucket(*i)))
        .unwrap();
    let pinned = proxy.client().await;
    for sql in [
        "BEGIN".to_owned(),
        format!("SELECT * FROM users WHERE id = {stays}"),
        "DECLARE held CURSOR WITH HOLD FOR SELECT 1".to_owned(),
        "COMMIT".to_owned(),
    ] {
        pinned
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let new_map = map(2, &db, &THREE_SHARDS, &TIME_TWO);
    write_map_and_reload(&proxy, &new_map).await;
    let phase = wait_phase(
        &proxy,
        &["done", "failed", "cancelled"],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(
        phase,
        "done",
        "{:?}",
        proxy.handle.frontend.reshard.status()
    );
    let result = pinned
        .execute("UPDATE users SET name = 'stale' WHERE id = $1", &[&moved])
        .await;
    let s1 = on_shard(1, &db).await;
    let s2 = on_shard(2, &db).await;
    assert_eq!(
        int(
            &s1,
            &format!("SELECT count(*) FROM users WHERE id = {moved}")
        )
        .await,
        0,
        "the moved row is gone from s1"
    );
    let name: String = s2
        .query_one("SELECT name FROM users WHERE id = $1", &[&moved])
        .await
        .unwrap()
        .get(0);
    match result {
        Ok(n) => {
            assert_eq!(n, 1);
            assert_eq!(name, "stale", "an acknowledged update must be on the owner");
        }
        Err(e) => assert_eq!(db_message(&e).split(' ').next(), Some("0A000"), "{e:?}"),
    }
    // The session still works for its own shard.
    pinned
        .execute("UPDATE users SET name = 'fine' WHERE id = $1", &[&stays])
        .await
        .unwrap();
}

/// A transaction open on the source shard when the cutover comes holds it up: the
/// attempt gives up after `reshard.max_pause` (traffic resumes on the old map) and is
/// retried; once the transaction commits, the cutover happens and its write is on the
/// new owner. Replicas of the new owner serve moved keys only past the cutover.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_transaction_delays_the_cutover_and_its_write_survives() {
    let (proxy, db, _serial) = setup().await;
    load_users(&proxy, 2_000).await;
    let moved = (1..=2_000).find(|i| bucket(*i) >= 768).unwrap();
    let new_map = map(2, &db, &THREE_SHARDS, &TIME_TWO);
    write_map_and_reload(&proxy, &new_map).await;
    // Open on the source before the cutover: a read (no transaction id, so it does
    // not hold up the replication slots' creation), its write comes later.
    let long = proxy.client().await;
    long.batch_execute("BEGIN").await.unwrap();
    long.query_one("SELECT name FROM users WHERE id = $1", &[&moved])
        .await
        .unwrap();
    let fe = proxy.handle.frontend.clone();
    wait_for(
        "a cutover attempt to give up",
        Duration::from_secs(60),
        || {
            let fe = fe.clone();
            async move { fe.reshard.status().is_some_and(|s| s.cutover_attempts >= 2) }
        },
    )
    .await;
    assert_eq!(fe.reshard.status().unwrap().phase, "cutover");
    // Meanwhile other shards' and other keys' traffic is served.
    let other = proxy.client().await;
    other
        .execute(
            "UPDATE users SET name = 'meanwhile' WHERE id = $1",
            &[&(moved + 1)],
        )
        .await
        .unwrap();
    long.execute("UPDATE users SET name = 'long' WHERE id = $1", &[&moved])
        .await
        .unwrap();
    long.batch_execute("COMMIT").await.unwrap();
    let phase = wait_phase(
        &proxy,
        &["done", "failed", "cancelled"],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(phase, "done", "{:?}", fe.reshard.status());
    let s2 = on_shard(2, &db).await;
    let name: String = s2
        .query_one("SELECT name FROM users WHERE id = $1", &[&moved])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "long");
    let topology = fe.topology.load();
    let s2_runtime = topology.shards.iter().find(|s| s.name == "s2").unwrap();
    assert!(
        s2_runtime.read_floor > 0,
        "s2's replicas are fenced at the cutover position"
    );
}

/// `shardgate plan OLD NEW`: what moves, and with --config row estimates from the
/// source's statistics; nothing changes on the servers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_prints_what_moves_with_estimates() {
    let (proxy, db, _serial) = setup().await;
    load_users(&proxy, 2_000).await;
    let dir = proxy.map_file().parent().unwrap().to_path_buf();
    let old = dir.join("old.yaml");
    let new = dir.join("new.yaml");
    std::fs::write(&old, map(1, &db, &TWO_SHARDS, &TIME_TWO)).unwrap();
    std::fs::write(&new, map(2, &db, &THREE_SHARDS, &TIME_TWO)).unwrap();
    let run = |with_config: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_shardgate"));
        if with_config {
            cmd.arg("--config").arg(dir.join("shardgate.yaml"));
        }
        cmd.arg("plan").arg(&old).arg(&new);
        common::proxy::run_cmd(&mut cmd)
    };
    let (ok, out, err) = run(false);
    assert!(ok, "{err}");
    assert!(out.contains("shard s2: added"), "{out}");
    assert!(
        out.contains("keyspace users: buckets 768-1023 moves s1 -> s2 (tables: orders, users)"),
        "{out}"
    );
    let (ok, out, err) = run(true);
    assert!(ok, "{err}");
    // About a quarter of 2000 users (half of s1's buckets, s1 holding about half).
    let users_line = out
        .lines()
        .find(|l| l.trim_start().starts_with("users s1 -> s2: about"))
        .unwrap_or_else(|| panic!("{out}"));
    let rows: u64 = users_line
        .split_whitespace()
        .nth(5)
        .unwrap()
        .parse()
        .unwrap();
    assert!((250..1000).contains(&rows), "{users_line}");
    // A dry run: nothing was created on the servers.
    for shard in 0..3 {
        assert_eq!(leftovers(shard, &db).await, Vec::<String>::new());
    }
    assert!(proxy.handle.frontend.reshard.status().is_none());
}
