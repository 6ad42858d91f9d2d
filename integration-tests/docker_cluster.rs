//! The proxy running in the docker compose cluster (docker/compose.yml), checked from
//! outside: sharded placement against the servers' own hash SQL, reads on replicas and
//! writes on primaries, a replica whose replay is paused losing its reads, and a replica
//! container killed and started again while reads go on. `docker/test.sh` builds the
//! cluster and runs this file against it.
//!
//! Every test passes with a printed `SKIPPED` line unless these are set (docker/test.sh
//! sets them; docs/docker.md shows how to point them at a cluster of your own):
//! - `SHARDGATE_TEST_PROXY=host:port`: the proxy under test;
//! - `SHARDGATE_TEST_SHARDS=s0=host:port,host:port,...;s1=...`: every shard of the map by
//!   name, primary first, as this process reaches the nodes. Each node must listen on the
//!   port given here (`inet_server_port()` names the node that answered through the proxy);
//! - `SHARDGATE_TEST_SHARD_MAP`: the proxy's shard map (default `docker/shard-map.yaml`),
//!   whose `users` table must be hash-sharded by `id`;
//! - `SHARDGATE_TEST_SUPERUSER_DSN` (its user and password are used on every node) and
//!   `SHARDGATE_TEST_APP_USER` / `_APP_PASSWORD` / `_DATABASE`, as for `shared_cluster`;
//! - `SHARDGATE_TEST_CONTAINERS=port=container,...`: only for the tests that kill or cut
//!   off a container (they skip without it).
//!
//! The `failover_*` tests kill a primary container and cut another off the network: they
//! leave the cluster with new primaries and an old one fenced, so they run only with
//! `SHARDGATE_TEST_FAILOVER=1` (docker/test.sh runs them last, one at a time, after
//! everything else), and they need:
//! - `SHARDGATE_TEST_SHARD_MAP` to be the very file the proxy writes on a promotion;
//! - `SHARDGATE_TEST_NETWORK`: the docker network the proxy reaches the nodes on (the
//!   partition test `docker network disconnect`s a primary from it);
//! - the admin console, as `SHARDGATE_TEST_ADMIN=user:password` (default
//!   `admin:admin-secret`), for `SHOW NODES`.
//!
//! The `reshard_*` test moves hash buckets of `users` from the first shard to the last
//! under writers (a map edit and `RELOAD`, as an operator does): it leaves the proxy on
//! a new map that the other tests of the same process would not know, so it runs only
//! with `SHARDGATE_TEST_RESHARD=1` (docker/test.sh runs it in a process of its own, after
//! the others and before the failover tests). It edits `SHARDGATE_TEST_SHARD_MAP`, which
//! must be the file the proxy reads, and uses the admin console as above.
//!
//! The tests share one long-lived cluster, so they run one at a time and use keys of their
//! own (a random base) in the `users` table, which they create if it is missing.

mod common;
#[path = "docker_cluster/failover.rs"]
mod failover;
#[path = "docker_cluster/reshard.rs"]
mod reshard;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use common::{superuser_client, unique_name, wait_for, TestCluster};
use shardgate::shard_map::hash::{bucket, hashint8extended};
use shardgate::shard_map::{Keyspace, ShardMap, TableRule};
use tokio_postgres::SimpleQueryMessage;

const TIMEOUT: Duration = Duration::from_secs(60);

/// The external cluster as the environment describes it.
struct Env {
    proxy: (String, u16),
    /// By shard name, as in the map.
    shards: BTreeMap<String, TestCluster>,
    /// Inclusive bucket ranges of the `users` keyspace, by shard.
    buckets: u32,
    ranges: Vec<(u32, u32, String)>,
    /// Container of the node listening on a port.
    containers: HashMap<u16, String>,
    /// The proxy's shard map file.
    map_path: PathBuf,
}

fn env() -> Option<&'static Env> {
    static ENV: OnceLock<Option<Env>> = OnceLock::new();
    ENV.get_or_init(load_env).as_ref()
}

fn load_env() -> Option<Env> {
    let proxy = parse_address(&std::env::var("SHARDGATE_TEST_PROXY").ok()?);
    let shards_text = std::env::var("SHARDGATE_TEST_SHARDS").ok()?;
    let mut shards = BTreeMap::new();
    for group in shards_text.split(';').filter(|g| !g.trim().is_empty()) {
        let (name, nodes) = group
            .split_once('=')
            .unwrap_or_else(|| panic!("SHARDGATE_TEST_SHARDS: expected name=nodes, got {group:?}"));
        let mut nodes = nodes.split(',').map(parse_address);
        let primary = nodes
            .next()
            .unwrap_or_else(|| panic!("SHARDGATE_TEST_SHARDS: shard {name} has no nodes"));
        shards.insert(name.trim().to_owned(), cluster(primary, nodes.collect()));
    }
    let map_path = std::env::var("SHARDGATE_TEST_SHARD_MAP").map_or_else(
        |_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docker/shard-map.yaml"),
        PathBuf::from,
    );
    let map = ShardMap::load(&map_path).unwrap_or_else(|e| panic!("{}: {e}", map_path.display()));
    let Some(TableRule::Sharded { column, keyspace }) = map.tables.get("users") else {
        panic!("{}: table users is not sharded", map_path.display());
    };
    assert_eq!(column, "id", "the tests expect users sharded by id");
    let Some(Keyspace::Hash {
        buckets,
        map: ranges,
        ..
    }) = map.keyspaces.get(keyspace)
    else {
        panic!(
            "{}: keyspace {keyspace} is not a hash keyspace",
            map_path.display()
        );
    };
    for name in map.shards.keys() {
        assert!(
            shards.contains_key(name),
            "SHARDGATE_TEST_SHARDS does not name shard {name} of {}",
            map_path.display()
        );
    }
    let containers = std::env::var("SHARDGATE_TEST_CONTAINERS")
        .unwrap_or_default()
        .split(',')
        .filter_map(|pair| {
            let (port, container) = pair.split_once('=')?;
            Some((port.trim().parse().ok()?, container.trim().to_owned()))
        })
        .collect();
    Some(Env {
        proxy,
        shards,
        buckets: *buckets,
        ranges: ranges
            .iter()
            .map(|(r, shard)| (*r.start(), *r.end(), shard.clone()))
            .collect(),
        containers,
        map_path,
    })
}

fn parse_address(text: &str) -> (String, u16) {
    let text = text.trim();
    text.rsplit_once(':')
        .and_then(|(host, port)| Some((host.to_owned(), port.parse().ok()?)))
        .unwrap_or_else(|| panic!("expected host:port in SHARDGATE_TEST_* env, got {text:?}"))
}

fn cluster(primary: (String, u16), replicas: Vec<(String, u16)>) -> TestCluster {
    let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    let default_dsn = format!(
        "host={} port={} user=postgres dbname=postgres",
        primary.0, primary.1
    );
    TestCluster {
        superuser_dsn_primary: var("SHARDGATE_TEST_SUPERUSER_DSN", &default_dsn),
        primary,
        replicas,
        database: var("SHARDGATE_TEST_DATABASE", common::DATABASE),
        app_user: var("SHARDGATE_TEST_APP_USER", common::APP_USER),
        app_password: var("SHARDGATE_TEST_APP_PASSWORD", common::APP_PASSWORD),
        local: None,
    }
}

/// The environment, or `None` after printing why the test is skipped.
fn env_or_skip(test: &str) -> Option<&'static Env> {
    let env = env();
    if env.is_none() {
        println!(
            "SKIPPED {test}: SHARDGATE_TEST_PROXY and SHARDGATE_TEST_SHARDS are not set \
             (docker/test.sh runs this against the compose cluster)"
        );
    }
    env
}

/// One test at a time: they share the cluster and pause or kill its nodes.
/// A tokio mutex: held across awaits, and not poisoned by a failing test.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

impl Env {
    fn shard_of(&self, id: i64) -> &str {
        let b = bucket(hashint8extended(id, 0), self.buckets);
        self.ranges
            .iter()
            .find(|(lo, hi, _)| (*lo..=*hi).contains(&b))
            .map(|(_, _, shard)| shard.as_str())
            .unwrap_or_else(|| panic!("bucket {b} is in no range of the map"))
    }

    /// The server-side condition "this row's id belongs to `shard`", written out here
    /// (not taken from the proxy) so the servers' own hash judges the proxy's placement.
    fn membership_sql(&self, shard: &str) -> String {
        let mask = self.buckets - 1;
        let terms: Vec<String> = self
            .ranges
            .iter()
            .filter(|(_, _, s)| s == shard)
            .map(|(lo, hi, _)| format!("(hashint8extended(id, 0) & {mask}) BETWEEN {lo} AND {hi}"))
            .collect();
        if terms.is_empty() {
            "false".into()
        } else {
            format!("({})", terms.join(" OR "))
        }
    }

    /// A key of `shard` at or after `from`.
    fn key_in(&self, shard: &str, from: i64) -> i64 {
        (from..)
            .find(|id| self.shard_of(*id) == shard)
            .expect("some key maps to every shard")
    }

    async fn client(&self) -> tokio_postgres::Client {
        let any = self.shards.values().next().expect("at least one shard");
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.proxy.0)
            .port(self.proxy.1)
            .user(&any.app_user)
            .password(&any.app_password)
            .dbname(&any.database)
            .connect_timeout(Duration::from_secs(10));
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to the proxy at {:?}: {e}", self.proxy));
        tokio::spawn(connection);
        client
    }

    /// The proxy's admin console, as `SHARDGATE_TEST_ADMIN=user:password` (default
    /// `admin:admin-secret`).
    async fn admin_client(&self) -> tokio_postgres::Client {
        let admin =
            std::env::var("SHARDGATE_TEST_ADMIN").unwrap_or_else(|_| "admin:admin-secret".into());
        let (user, password) = admin
            .split_once(':')
            .expect("SHARDGATE_TEST_ADMIN=user:password");
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.proxy.0)
            .port(self.proxy.1)
            .user(user)
            .password(password)
            .dbname("shardgate")
            .connect_timeout(Duration::from_secs(10));
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("the admin console: {e}"));
        tokio::spawn(connection);
        client
    }

    /// The sample schema of docs/sharding.md, created through the proxy when missing.
    async fn ensure_schema(&self) {
        let client = self.client().await;
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS users (id bigint PRIMARY KEY, name text NOT NULL);
                 CREATE TABLE IF NOT EXISTS orders (id bigserial, user_id bigint NOT NULL,
                     total numeric(10,2), PRIMARY KEY (user_id, id));
                 CREATE TABLE IF NOT EXISTS countries (code text PRIMARY KEY, name text NOT NULL)",
            )
            .await
            .unwrap_or_else(|e| panic!("creating the schema through the proxy: {e}"));
    }
}

/// A random base for this test's keys, far from other runs' keys.
fn key_base() -> i64 {
    i64::from(rand::random::<u32>()) * 1_000_000
}

/// The first column of the first row of `sql`, as text.
async fn first_value(client: &tokio_postgres::Client, sql: &str) -> String {
    let rows = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

async fn port_of(client: &tokio_postgres::Client, sql: &str) -> u16 {
    let value = first_value(client, sql).await;
    value
        .parse()
        .unwrap_or_else(|_| panic!("{sql}: {value:?} is no port"))
}

/// A read that goes to `shard` by its key (the row need not exist).
fn read_on(env: &Env, shard: &str, base: i64) -> String {
    let key = env.key_in(shard, base);
    format!("SELECT inet_server_port(), count(*) FROM users WHERE id = {key}")
}

fn ports(c: &TestCluster) -> HashSet<u16> {
    c.replicas.iter().map(|(_, p)| *p).collect()
}

/// Waits until reads of `shard` in a session that never wrote have reached every port of
/// `expected` and the last 20 reached no other node.
async fn wait_reads_reach(env: &Env, shard: &str, expected: &HashSet<u16>, what: &str) {
    let client = env.client().await;
    let sql = read_on(env, shard, key_base());
    // (ports seen since the last read elsewhere, reads since then)
    let state = Mutex::new((HashSet::new(), 0));
    wait_for(what, TIMEOUT, || async {
        let port = port_of(&client, &sql).await;
        let mut state = state.lock().unwrap();
        let (seen, streak) = &mut *state;
        if !expected.contains(&port) {
            seen.clear();
            *streak = 0;
            return false;
        }
        seen.insert(port);
        *streak += 1;
        seen.len() == expected.len() && *streak >= 20
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_land_on_the_shard_the_servers_own_hash_names() {
    let Some(env) = env_or_skip("rows_land_on_the_shard_the_servers_own_hash_names") else {
        return;
    };
    let _serial = serial().await;
    env.ensure_schema().await;
    let client = env.client().await;
    let base = key_base();
    let ids: Vec<i64> = (base..base + 200).collect();
    let values: Vec<String> = ids
        .iter()
        .map(|id| format!("({id}, 'user {id}')"))
        .collect();
    let insert = format!("INSERT INTO users (id, name) VALUES {}", values.join(", "));
    let done = client.simple_query(&insert).await.unwrap();
    assert!(
        done.iter()
            .any(|m| matches!(m, SimpleQueryMessage::CommandComplete(200))),
        "one INSERT 0 200 for the split insert"
    );
    // Orders of the first ten users, placed by user_id: co-located with their user.
    let orders: Vec<String> = ids[..10].iter().map(|id| format!("({id}, 9.99)")).collect();
    client
        .batch_execute(&format!(
            "INSERT INTO orders (user_id, total) VALUES {}",
            orders.join(", ")
        ))
        .await
        .unwrap();
    let country = unique_name("c");
    client
        .batch_execute(&format!(
            "INSERT INTO countries (code, name) VALUES ('{country}', 'test')"
        ))
        .await
        .unwrap();

    let last = ids[ids.len() - 1];
    let range = format!("id BETWEEN {base} AND {last}");
    let merged = first_value(
        &client,
        &format!("SELECT count(*) FROM users WHERE {range}"),
    )
    .await;
    assert_eq!(merged, "200", "a merged count through the proxy");
    for (name, shard) in &env.shards {
        let su = superuser_client(shard, shard.primary.1, &shard.database).await;
        let expected = ids.iter().filter(|id| env.shard_of(**id) == name).count();
        assert!(expected > 0, "200 keys put some on shard {name}");
        let count = |sql: String| {
            let su = &su;
            async move { su.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0) }
        };
        let membership = env.membership_sql(name);
        let here = count(format!("SELECT count(*) FROM users WHERE {range}")).await;
        assert_eq!(here as usize, expected, "rows of this run on shard {name}");
        let misplaced = format!("SELECT count(*) FROM users WHERE {range} AND NOT {membership}");
        assert_eq!(count(misplaced).await, 0, "rows on {name} it does not own");
        let orders_sql = format!(
            "SELECT count(*) FROM orders o JOIN users u ON u.id = o.user_id \
             WHERE o.user_id BETWEEN {base} AND {last}"
        );
        let orders_here = ids[..10]
            .iter()
            .filter(|id| env.shard_of(**id) == name)
            .count();
        assert_eq!(
            count(orders_sql).await as usize,
            orders_here,
            "orders next to users"
        );
        let reference = format!("SELECT count(*) FROM countries WHERE code = '{country}'");
        assert_eq!(
            count(reference).await,
            1,
            "the reference row on shard {name}"
        );
        su.batch_execute(&format!(
            "DELETE FROM orders WHERE user_id BETWEEN {base} AND {last};
             DELETE FROM users WHERE {range};
             DELETE FROM countries WHERE code = '{country}'"
        ))
        .await
        .unwrap();
    }
    // The merged count through the proxy agrees with the servers that they are gone, once
    // the replicas have replayed the deletes (made directly on the primaries).
    let merged = format!("SELECT count(*) FROM users WHERE {range}");
    wait_for("the deletes to reach the replicas", TIMEOUT, || async {
        first_value(&client, &merged).await == "0"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_reads_and_merged_reads_through_the_proxy_see_every_shard() {
    let Some(env) = env_or_skip("keyed_reads_and_merged_reads_through_the_proxy_see_every_shard")
    else {
        return;
    };
    let _serial = serial().await;
    env.ensure_schema().await;
    let client = env.client().await;
    let base = key_base();
    let ids: Vec<i64> = (base..base + 50).collect();
    let values: Vec<String> = ids.iter().map(|id| format!("({id}, 'u{id}')")).collect();
    client
        .batch_execute(&format!(
            "INSERT INTO users (id, name) VALUES {}",
            values.join(", ")
        ))
        .await
        .unwrap();
    let last = ids[ids.len() - 1];
    // Read your writes: this session's reads see the rows at once, wherever they run.
    let merged = first_value(
        &client,
        &format!("SELECT count(*) FROM users WHERE id BETWEEN {base} AND {last}"),
    )
    .await;
    assert_eq!(merged, "50");
    let by_key = client
        .prepare("SELECT name FROM users WHERE id = $1")
        .await
        .unwrap();
    for id in &ids {
        let row = client.query_one(&by_key, &[id]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), format!("u{id}"));
    }
    // A merged ORDER BY with LIMIT, in the simple protocol.
    let sorted = client
        .simple_query(&format!(
            "SELECT id FROM users WHERE id BETWEEN {base} AND {last} ORDER BY id DESC LIMIT 5"
        ))
        .await
        .unwrap();
    let got: Vec<i64> = sorted
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .collect();
    assert_eq!(got, (last - 4..=last).rev().collect::<Vec<_>>());
    // And in the extended protocol, without LIMIT, as drivers send it.
    let sorted = client
        .query(
            "SELECT id FROM users WHERE id BETWEEN $1 AND $2 ORDER BY id",
            &[&base, &last],
        )
        .await
        .unwrap();
    let got: Vec<i64> = sorted.iter().map(|r| r.get(0)).collect();
    assert_eq!(got, ids);
    client
        .batch_execute(&format!("DELETE FROM users WHERE id IN ({})", {
            let list: Vec<String> = ids.iter().map(i64::to_string).collect();
            list.join(", ")
        }))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_each_shards_replicas_and_writes_to_its_primary() {
    let Some(env) = env_or_skip("reads_go_to_each_shards_replicas_and_writes_to_its_primary")
    else {
        return;
    };
    let _serial = serial().await;
    env.ensure_schema().await;
    for (name, shard) in &env.shards {
        let replicas = ports(shard);
        wait_reads_reach(
            env,
            name,
            &replicas,
            &format!("reads of {name} on its replicas"),
        )
        .await;
        let reader = env.client().await;
        let read = read_on(env, name, key_base());
        for _ in 0..20 {
            let port = port_of(&reader, &read).await;
            assert!(replicas.contains(&port), "a read of {name} ran on {port}");
        }
        // Explicit transactions go to the primary unless READ ONLY.
        reader.batch_execute("BEGIN").await.unwrap();
        assert_eq!(port_of(&reader, &read).await, shard.primary.1);
        reader.batch_execute("COMMIT").await.unwrap();
        reader.batch_execute("BEGIN READ ONLY").await.unwrap();
        assert!(replicas.contains(&port_of(&reader, &read).await));
        reader.batch_execute("COMMIT").await.unwrap();

        let writer = env.client().await;
        let key = env.key_in(name, key_base());
        let insert = format!(
            "INSERT INTO users (id, name) VALUES ({key}, 'w') RETURNING inet_server_port()"
        );
        assert_eq!(
            port_of(&writer, &insert).await,
            shard.primary.1,
            "{name}'s write"
        );
        let delete = format!("DELETE FROM users WHERE id = {key} RETURNING inet_server_port()");
        assert_eq!(port_of(&writer, &delete).await, shard.primary.1);
    }
    // A statement without a table runs on the default shard (s0 in docker/shard-map.yaml).
    let reader = env.client().await;
    let port = port_of(&reader, "SELECT inet_server_port()").await;
    assert!(
        env.shards.values().any(|s| ports(s).contains(&port)),
        "{port}"
    );
}

/// Resumes replay on drop, so a failing test leaves no paused replica behind.
struct Paused<'a>(&'a TestCluster, u16);

async fn set_replay_paused(c: &TestCluster, port: u16, paused: bool) {
    let su = superuser_client(c, port, "postgres").await;
    let f = if paused {
        "pg_wal_replay_pause"
    } else {
        "pg_wal_replay_resume"
    };
    su.batch_execute(&format!("SELECT {f}()")).await.unwrap();
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        let config = node_config(self.0, self.1);
        // Drop cannot await: a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                match config.connect(tokio_postgres::NoTls).await {
                    Ok((client, conn)) => {
                        tokio::spawn(conn);
                        if let Err(e) = client.batch_execute("SELECT pg_wal_replay_resume()").await
                        {
                            eprintln!("resuming replay: {e}");
                        }
                    }
                    Err(e) => eprintln!("resuming replay: {e}"),
                }
            });
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_replay_paused_gets_no_reads_until_it_catches_up() {
    let Some(env) = env_or_skip("a_replica_with_replay_paused_gets_no_reads_until_it_catches_up")
    else {
        return;
    };
    let _serial = serial().await;
    env.ensure_schema().await;
    // The last shard: the kill test uses the first.
    let (name, shard) = env.shards.iter().last().expect("a shard");
    assert!(shard.replicas.len() >= 2, "shard {name} needs two replicas");
    let all = ports(shard);
    let (paused, other) = (shard.replicas[0].1, shard.replicas[1].1);
    wait_reads_reach(env, name, &all, "reads on every replica before the pause").await;

    // Writes straight to the primary, so the paused replica falls behind in time.
    let direct = superuser_client(shard, shard.primary.1, &shard.database).await;
    let table = unique_name("lag");
    direct
        .batch_execute(&format!("CREATE TABLE {table} (v int)"))
        .await
        .unwrap();
    let insert = format!("INSERT INTO {table} VALUES (1)");
    let writer = tokio::spawn(async move {
        while direct.batch_execute(&insert).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    set_replay_paused(shard, paused, true).await;
    let guard = Paused(shard, paused);
    // The contract: no reads there within max_replica_lag (1s in docker/shardgate.yaml)
    // and two lag checks (250ms each) after it falls behind.
    tokio::time::sleep(Duration::from_millis(1000 + 2 * 250)).await;
    let only_other = HashSet::from([other]);
    wait_reads_reach(
        env,
        name,
        &only_other,
        "the paused replica to lose its reads",
    )
    .await;
    let reader = env.client().await;
    let read = read_on(env, name, key_base());
    for _ in 0..40 {
        assert_eq!(
            port_of(&reader, &read).await,
            other,
            "a read reached {paused}"
        );
    }
    set_replay_paused(shard, paused, false).await;
    drop(guard);
    wait_reads_reach(env, name, &all, "the resumed replica to serve reads again").await;
    writer.abort();
    let su = superuser_client(shard, shard.primary.1, &shard.database).await;
    su.batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

fn docker(args: &[&str]) -> Result<(), String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("docker {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Starts the container again on drop, so a failing test leaves it running.
struct Killed(String);

impl Drop for Killed {
    fn drop(&mut self) {
        if let Err(error) = docker(&["start", &self.0]) {
            eprintln!("{error}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_on_while_a_replica_container_is_killed_and_restarted() {
    let test = "reads_go_on_while_a_replica_container_is_killed_and_restarted";
    let Some(env) = env_or_skip(test) else {
        return;
    };
    let (name, shard) = env.shards.iter().next().expect("a shard");
    let victim = shard.replicas.last().expect("a replica").1;
    let Some(container) = env.containers.get(&victim) else {
        println!("SKIPPED {test}: SHARDGATE_TEST_CONTAINERS names no container for port {victim}");
        return;
    };
    let _serial = serial().await;
    env.ensure_schema().await;
    let all = ports(shard);
    wait_reads_reach(env, name, &all, "reads on every replica before the kill").await;
    // Sessions whose pooled server connections include the victim's.
    let clients: Vec<_> = futures_util::future::join_all((0..4).map(|_| env.client())).await;
    let read = read_on(env, name, key_base());
    for c in &clients {
        port_of(c, &read).await;
    }

    docker(&["kill", container]).unwrap();
    let killed = Killed(container.clone());
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    for i in 0..200 {
        let c = &clients[i % clients.len()];
        match c.simple_query(&read).await {
            Ok(rows) => {
                if let Some(SimpleQueryMessage::Row(r)) = rows.first() {
                    seen.insert(r.get(0).unwrap_or_default().to_owned());
                }
            }
            Err(e) => errors.push(format!("read {i}: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(errors.is_empty(), "reads failed after the kill: {errors:?}");
    assert!(
        !seen.contains(&victim.to_string()),
        "a read reached the killed replica"
    );

    drop(killed); // docker start
                  // Streaming again, then back in the proxy's rotation.
    wait_for("the restarted replica to stream", TIMEOUT, || async {
        let Ok(Ok((client, conn))) = tokio::time::timeout(
            Duration::from_secs(2),
            node_config(shard, victim).connect(tokio_postgres::NoTls),
        )
        .await
        else {
            return false;
        };
        tokio::spawn(conn);
        client
            .query_opt("SELECT status FROM pg_stat_wal_receiver", &[])
            .await
            .ok()
            .flatten()
            .is_some_and(|r| r.get::<_, String>(0) == "streaming")
    })
    .await;
    wait_reads_reach(
        env,
        name,
        &all,
        "the restarted replica to serve reads again",
    )
    .await;
}

/// A superuser config for the node at `port` (no panic when it is down).
fn node_config(c: &TestCluster, port: u16) -> tokio_postgres::Config {
    let base: tokio_postgres::Config = c.superuser_dsn_primary.parse().expect("superuser DSN");
    let mut config = tokio_postgres::Config::new();
    if let Some(user) = base.get_user() {
        config.user(user);
    }
    if let Some(password) = base.get_password() {
        config.password(password);
    }
    config.host(c.host_for(port)).port(port).dbname("postgres");
    config
}
