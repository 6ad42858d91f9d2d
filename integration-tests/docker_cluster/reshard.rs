//! Online resharding in the docker cluster (issue 11): half of the first shard's hash
//! buckets move to the last shard while writers keep inserting and updating through the
//! dockerized proxy. The operator's way: the proxy's map file edited, `RELOAD` on the
//! admin console, `SHOW RESHARD` polled until the job is done. Then every row is on its
//! owner by the servers' own hash, every acknowledged write is there once, and the job
//! left no slot, publication, subscription or fence table behind.
//!
//! It leaves the proxy on the new map, which the other tests of the process loaded
//! before, so it runs only with `SHARDGATE_TEST_RESHARD=1`: docker/test.sh runs it in a
//! process of its own, after the other `docker_cluster` tests and before the failover
//! tests (which read the map afresh).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardgate::shard_map::hash::{bucket, hashint8extended};
use shardgate::shard_map::{Keyspace, ShardMap, TableRule};
use tokio_postgres::{Client, SimpleQueryMessage};

use super::{env_or_skip, port_of, serial, Env, TIMEOUT};
use crate::common::{superuser_client, wait_for};

/// Users loaded before the job, with one order each.
const USERS: i64 = 4200;
const WRITERS: i64 = 3;
/// `reshard.max_pause`: docker/shardgate.yaml keeps the default.
const MAX_PAUSE: Duration = Duration::from_secs(2);
/// The whole job (a few thousand rows) takes seconds; this bounds a stuck one.
const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// The environment when the test may run, or None after saying why not.
fn reshard_env(test: &str) -> Option<&'static Env> {
    let env = env_or_skip(test)?;
    if std::env::var("SHARDGATE_TEST_RESHARD").as_deref() != Ok("1") {
        println!(
            "SKIPPED {test}: it leaves the proxy on a new shard map; set \
             SHARDGATE_TEST_RESHARD=1 (docker/test.sh runs it in a process of its own)"
        );
        return None;
    }
    Some(env)
}

/// `users`' hash keyspace in `map`: (name, bucket count, ranges).
fn users_keyspace(map: &ShardMap) -> (String, u32, Vec<(u32, u32, String)>) {
    let Some(TableRule::Sharded { keyspace, .. }) = map.tables.get("users") else {
        panic!("users is not sharded in {}", map.source.display());
    };
    let Some(Keyspace::Hash { buckets, map, .. }) = map.keyspaces.get(keyspace) else {
        panic!("keyspace {keyspace} is not a hash keyspace");
    };
    let ranges = map
        .iter()
        .map(|(r, s)| (*r.start(), *r.end(), s.clone()))
        .collect();
    (keyspace.clone(), *buckets, ranges)
}

/// `map` with the upper half of `from`'s first bucket range given to `to`, version + 1,
/// and the moved range.
fn moved_map(map: &ShardMap, from: &str, to: &str) -> (ShardMap, (u32, u32)) {
    let (name, _, _) = users_keyspace(map);
    let mut next = map.clone();
    next.version += 1;
    let Some(Keyspace::Hash { map: ranges, .. }) = next.keyspaces.get_mut(&name) else {
        unreachable!("checked by users_keyspace");
    };
    let at = ranges
        .iter()
        .position(|(r, s)| s == from && r.end() > r.start())
        .unwrap_or_else(|| panic!("shard {from} owns no range of two buckets or more"));
    let (lo, hi) = (*ranges[at].0.start(), *ranges[at].0.end());
    let mid = lo + (hi - lo).div_ceil(2);
    ranges[at].0 = lo..=mid - 1;
    ranges.insert(at + 1, (mid..=hi, to.to_owned()));
    (next, (mid, hi))
}

/// The server-side condition "`column`'s key belongs to `shard` in `map`".
fn owned_sql(map: &ShardMap, shard: &str, column: &str) -> String {
    let (_, buckets, ranges) = users_keyspace(map);
    let terms: Vec<String> = ranges
        .iter()
        .filter(|(_, _, s)| s == shard)
        .map(|(lo, hi, _)| {
            format!(
                "(hashint8extended({column}, 0) & {}) BETWEEN {lo} AND {hi}",
                buckets - 1
            )
        })
        .collect();
    if terms.is_empty() {
        "false".into()
    } else {
        format!("({})", terms.join(" OR "))
    }
}

/// Users `base .. base + USERS` and an order each, through the proxy (multi-row INSERTs
/// it splits by shard).
async fn load(env: &Env, base: i64) {
    let client = env.client().await;
    for start in (base..base + USERS).step_by(700) {
        let ids = start..(start + 700).min(base + USERS);
        let users: Vec<String> = ids.clone().map(|i| format!("({i}, 'u{i}')")).collect();
        let orders: Vec<String> = ids.map(|i| format!("({i}, 1.00)")).collect();
        for sql in [
            format!("INSERT INTO users (id, name) VALUES {}", users.join(",")),
            format!(
                "INSERT INTO orders (user_id, total) VALUES {}",
                orders.join(",")
            ),
        ] {
            client
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("loading users through the proxy: {}", db_message(&e)));
        }
    }
}

/// What one writer had acknowledged.
#[derive(Default)]
struct Acked {
    inserted: Vec<i64>,
    /// user id -> last acknowledged name (each writer renames users of its own).
    renamed: HashMap<i64, String>,
    errors: Vec<String>,
    longest: Duration,
}

/// Writer `w`, through the proxy until `stop`: a new user with an order in one
/// transaction (ids `base + 1_000_000 * (w + 1) + i`), then a rename of a loaded user
/// whose offset from `base` is `w` modulo WRITERS, in the extended protocol as drivers do.
fn spawn_writer(
    env: &'static Env,
    w: i64,
    base: i64,
    acked: Arc<Mutex<Acked>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut client = env.client().await;
        let mut i = 0i64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let id = base + 1_000_000 * (w + 1) + i;
            let started = Instant::now();
            let insert = insert_user(&mut client, id).await;
            let target = base + (i % (USERS / WRITERS)) * WRITERS + w;
            let name = format!("w{w}-{i}");
            let rename = client
                .execute(
                    "UPDATE users SET name = $1 WHERE id = $2",
                    &[&name, &target],
                )
                .await;
            acked
                .lock()
                .unwrap()
                .record(started.elapsed(), id, insert, (target, name), rename);
            if client.is_closed() {
                client = env.client().await;
            }
        }
    })
}

async fn insert_user(client: &mut Client, id: i64) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let name = format!("n{id}");
    tx.execute(
        "INSERT INTO users (id, name) VALUES ($1, $2)",
        &[&id, &name],
    )
    .await?;
    tx.execute(
        "INSERT INTO orders (user_id, total) VALUES ($1, 7.00)",
        &[&id],
    )
    .await?;
    tx.commit().await
}

impl Acked {
    /// One writer iteration: the insert of user `id`, the rename of `renamed.0` to
    /// `renamed.1`, and how long both took.
    fn record(
        &mut self,
        took: Duration,
        id: i64,
        insert: Result<(), tokio_postgres::Error>,
        (target, name): (i64, String),
        rename: Result<u64, tokio_postgres::Error>,
    ) {
        self.longest = self.longest.max(took);
        match insert {
            Ok(()) => self.inserted.push(id),
            Err(e) => self.errors.push(format!("insert {id}: {}", db_message(&e))),
        }
        match rename {
            Ok(1) => {
                self.renamed.insert(target, name);
            }
            Ok(n) => self.errors.push(format!("rename {target}: {n} rows")),
            Err(e) => self
                .errors
                .push(format!("rename {target}: {}", db_message(&e))),
        }
    }
}

fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// `SHOW RESHARD`'s row as column -> value; None before any job.
async fn show_reshard(admin: &Client) -> Option<HashMap<String, String>> {
    let rows = admin
        .simple_query("SHOW RESHARD")
        .await
        .expect("SHOW RESHARD");
    rows.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(
            r.columns()
                .iter()
                .enumerate()
                .map(|(i, c)| (c.name().to_owned(), r.get(i).unwrap_or("").to_owned()))
                .collect(),
        ),
        _ => None,
    })
}

/// Polls `SHOW RESHARD` until a job other than `previous` is done; fails at once when it
/// ends failed or cancelled. Returns its last row and the phases seen, in order.
async fn wait_job_done(
    admin: &Client,
    previous: Option<&str>,
) -> (HashMap<String, String>, Vec<String>) {
    let last = Mutex::new((HashMap::new(), Vec::<String>::new()));
    wait_for("the reshard job to be done", JOB_TIMEOUT, || async {
        let Some(row) = show_reshard(admin).await else {
            return false;
        };
        if Some(row["job"].as_str()) == previous {
            return false;
        }
        let phase = row["phase"].clone();
        assert!(
            phase != "failed" && phase != "cancelled",
            "the reshard job ended {phase}: {row:?}"
        );
        let mut last = last.lock().unwrap();
        if last.1.last() != Some(&phase) {
            last.1.push(phase.clone());
        }
        last.0 = row;
        phase == "done"
    })
    .await;
    last.into_inner().unwrap()
}

/// The new map written as the operator would (atomically: the proxy watches the file),
/// owned like the directory so the proxy can still rewrite it on a promotion.
fn write_map(path: &Path, map: &ShardMap, old_version: u64) {
    map.write_file(path, old_version)
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    if let Some(dir) = path.parent().and_then(|d| std::fs::metadata(d).ok()) {
        use std::os::unix::fs::MetadataExt;
        // Only root may give files away; elsewhere the file keeps our owner.
        let _ = std::os::unix::fs::chown(path, Some(dir.uid()), Some(dir.gid()));
    }
}

/// `RELOAD` on the admin console. The proxy also watches the file, so the job may
/// already have been started by the time it arrives: then RELOAD is refused with
/// 0A000 because a job is running (or finds nothing changed).
async fn reload(admin: &Client) -> String {
    match admin.simple_query("RELOAD").await {
        Ok(rows) => rows
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get("result").map(str::to_owned),
                _ => None,
            })
            .expect("RELOAD answers a row"),
        Err(e) => {
            let db = e.as_db_error().unwrap_or_else(|| panic!("RELOAD: {e}"));
            assert_eq!(
                db.code().code(),
                "0A000",
                "RELOAD refused: {}",
                db.message()
            );
            assert!(
                db.message().contains("job"),
                "RELOAD refused: {}",
                db.message()
            );
            format!("refused, the watcher was first: {}", db.message())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reshard_buckets_move_between_shards_while_writers_keep_writing() {
    let test = "reshard_buckets_move_between_shards_while_writers_keep_writing";
    let Some(env) = reshard_env(test) else {
        return;
    };
    let (from, to) = (
        env.shards.keys().next().expect("a shard"),
        env.shards.keys().last().expect("a shard"),
    );
    assert_ne!(from, to, "the test needs two shards");
    let _serial = serial().await;
    env.ensure_schema().await;
    let base = super::key_base();
    load(env, base).await;
    let admin = env.admin_client().await;
    let previous = show_reshard(&admin).await.map(|r| r["job"].clone());

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Vec<Arc<Mutex<Acked>>> = (0..WRITERS).map(|_| Arc::default()).collect();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| spawn_writer(env, w, base, acked[w as usize].clone(), stop.clone()))
        .collect();
    let inserted = |w: usize| acked[w].lock().unwrap().inserted.len();
    wait_for("every writer to write", TIMEOUT, || async {
        (0..acked.len()).all(|w| inserted(w) >= 5)
    })
    .await;

    let before = ShardMap::load(&env.map_path).expect("the proxy's shard map");
    let (after, moved) = moved_map(&before, from, to);
    write_map(&env.map_path, &after, before.version);
    let started = Instant::now();
    let reloaded = reload(&admin).await;
    let (status, phases) = wait_job_done(&admin, previous.as_deref()).await;
    println!(
        "{test}: buckets {}-{} {from} -> {to}: RELOAD {reloaded:?}; done after {:?} \
         (phases {}); SHOW RESHARD {status:?}",
        moved.0,
        moved.1,
        started.elapsed(),
        phases.join(" -> ")
    );
    // Writers go on a little on the new map, then stop.
    let counts: Vec<usize> = (0..acked.len()).map(inserted).collect();
    wait_for("writes after the cutover", TIMEOUT, || async {
        (0..acked.len()).all(|w| inserted(w) >= counts[w] + 5)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    let acked: Vec<Acked> = acked
        .iter()
        .map(|a| std::mem::take(&mut *a.lock().unwrap()))
        .collect();

    assert!(
        status["verify"].starts_with("ok"),
        "verification: {status:?}"
    );
    check_writers(test, &acked);
    check_placement(env, &after).await;
    check_rows(env, base, &acked).await;
    check_clean(env).await;
    let state = format!("{}.reshard.json", env.map_path.display());
    wait_for("the job's state file to be removed", TIMEOUT, || async {
        !Path::new(&state).exists()
    })
    .await;
    // Routing follows the new map: a key of the moved buckets is written on `to`.
    let key = (base..)
        .find(|k| (moved.0..=moved.1).contains(&bucket(hashint8extended(*k, 0), env.buckets)))
        .expect("a key in the moved buckets");
    let client = env.client().await;
    let sql =
        format!("UPDATE users SET name = 'routed' WHERE id = {key} RETURNING inet_server_port()");
    assert_eq!(port_of(&client, &sql).await, env.shards[to].primary.1);
    remove_rows(env, base).await;
}

/// No writer saw an error, and none waited much longer than the cutover's pause.
fn check_writers(test: &str, acked: &[Acked]) {
    let longest = acked.iter().map(|a| a.longest).max().unwrap_or_default();
    let writes: usize = acked.iter().map(|a| a.inserted.len()).sum();
    println!(
        "{test}: {writes} users inserted by the writers; longest writer iteration {longest:?}"
    );
    for a in acked {
        assert!(a.errors.is_empty(), "writer errors: {:?}", a.errors);
    }
    // A held transaction waits at most max_pause; a second for the statements themselves
    // on a busy machine.
    assert!(
        longest <= MAX_PAUSE + Duration::from_secs(1),
        "longest writer stall {longest:?}"
    );
}

/// Every row of `users` and `orders` on each shard belongs there by the new map,
/// judged by the server's own hash.
async fn check_placement(env: &Env, map: &ShardMap) {
    for (name, shard) in &env.shards {
        let su = superuser_client(shard, shard.primary.1, &shard.database).await;
        for (table, column) in [("users", "id"), ("orders", "user_id")] {
            let owned = owned_sql(map, name, column);
            let sql = format!("SELECT count(*) FROM {table} WHERE NOT {owned}");
            let misplaced: i64 = su.query_one(&sql, &[]).await.expect(&sql).get(0);
            assert_eq!(
                misplaced, 0,
                "rows of {table} on {name} that it does not own"
            );
        }
    }
}

/// This test's rows on all shards: each once, every acknowledged insert there, every
/// acknowledged rename visible, one order per user.
async fn check_rows(env: &Env, base: i64, acked: &[Acked]) {
    let end = base + 1_000_000 * (WRITERS + 1);
    let mut users: HashMap<i64, Vec<String>> = HashMap::new();
    let mut orders = HashSet::new();
    let mut order_rows = 0;
    for shard in env.shards.values() {
        let su = superuser_client(shard, shard.primary.1, &shard.database).await;
        let rows = su
            .query(
                "SELECT id, name FROM users WHERE id >= $1 AND id < $2",
                &[&base, &end],
            )
            .await
            .expect("users");
        for row in rows {
            users.entry(row.get(0)).or_default().push(row.get(1));
        }
        let rows = su
            .query(
                "SELECT user_id, id FROM orders WHERE user_id >= $1 AND user_id < $2",
                &[&base, &end],
            )
            .await
            .expect("orders");
        order_rows += rows.len();
        orders.extend(
            rows.iter()
                .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1))),
        );
    }
    let dupes: Vec<_> = users.iter().filter(|(_, names)| names.len() > 1).collect();
    assert!(dupes.is_empty(), "users on more than one shard: {dupes:?}");
    assert_eq!(order_rows, orders.len(), "orders on more than one shard");
    let inserted: usize = acked.iter().map(|a| a.inserted.len()).sum();
    assert_eq!(users.len(), USERS as usize + inserted, "users of this test");
    assert_eq!(
        orders.len(),
        USERS as usize + inserted,
        "orders of this test"
    );
    for a in acked {
        for id in &a.inserted {
            assert!(users.contains_key(id), "acknowledged user {id} lost");
        }
        for (id, name) in &a.renamed {
            let found = users.get(id).map(|n| n[0].as_str());
            assert_eq!(found, Some(name.as_str()), "acknowledged rename of {id}");
        }
    }
}

/// No replication slot, publication, subscription or fence table left on any shard.
async fn check_clean(env: &Env) {
    for (name, shard) in &env.shards {
        let su = superuser_client(shard, shard.primary.1, &shard.database).await;
        let mut left = Vec::new();
        for (what, sql) in [
            ("slot", "SELECT slot_name::text FROM pg_replication_slots"),
            ("publication", "SELECT pubname::text FROM pg_publication"),
            ("subscription", "SELECT subname::text FROM pg_subscription"),
            (
                "fence table",
                "SELECT relname::text FROM pg_class WHERE relname LIKE 'shardgate_reshard%'",
            ),
        ] {
            for row in su.query(sql, &[]).await.expect(sql) {
                left.push(format!("{what} {}", row.get::<_, String>(0)));
            }
        }
        assert!(left.is_empty(), "left on {name}: {left:?}");
    }
}

/// This test's rows, deleted on the primaries.
async fn remove_rows(env: &Env, base: i64) {
    let end = base + 1_000_000 * (WRITERS + 1);
    for shard in env.shards.values() {
        let su = superuser_client(shard, shard.primary.1, &shard.database).await;
        su.batch_execute(&format!(
            "DELETE FROM orders WHERE user_id >= {base} AND user_id < {end};
             DELETE FROM users WHERE id >= {base} AND id < {end}"
        ))
        .await
        .expect("removing the test's rows");
    }
}
