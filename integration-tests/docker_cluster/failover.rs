//! Failover in the docker cluster (issues 8 and 9): a primary container killed with
//! `docker kill`, and a primary cut off with `docker network disconnect` while it keeps
//! running (a partition). Each takes a shard of its own (the kill the first, the
//! partition the last), leaves it with a new primary and the old one fenced, and runs only
//! with `SHARDGATE_TEST_FAILOVER=1`: docker/test.sh runs them last.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardgate::shard_map::ShardMap;
use tokio_postgres::SimpleQueryMessage;

use super::{docker, env_or_skip, port_of, serial, Env, TIMEOUT};
use crate::common::wait_for;

/// The environment when the destructive tests may run, or None after saying why not.
fn failover_env(test: &str) -> Option<&'static Env> {
    let env = env_or_skip(test)?;
    if std::env::var("SHARDGATE_TEST_FAILOVER").as_deref() != Ok("1") {
        println!(
            "SKIPPED {test}: it kills or partitions a primary; set SHARDGATE_TEST_FAILOVER=1 \
             (docker/test.sh runs it last)"
        );
        return None;
    }
    Some(env)
}

fn load_map(env: &Env) -> ShardMap {
    ShardMap::load(&env.map_path).unwrap_or_else(|e| panic!("{}: {e}", env.map_path.display()))
}

/// `SHOW NODES` on the admin console: (shard, address, role, fenced) per row.
async fn show_nodes(env: &Env) -> Vec<(String, String, String, String)> {
    let client = env.admin_client().await;
    let rows = client.simple_query("SHOW NODES").await.expect("SHOW NODES");
    rows.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                let get = |c: &str| r.get(c).unwrap_or_default().to_owned();
                Some((get("shard"), get("address"), get("role"), get("fenced")))
            }
            _ => None,
        })
        .collect()
}

/// `sql` run with psql inside `container` (the node's own socket, so it works while the
/// container is off the network), as the superuser on database `app`.
fn psql_in(container: &str, sql: &str) -> String {
    let out = std::process::Command::new("docker")
        .args([
            "exec", "-u", "postgres", container, "psql", "-XtAq", "-d", "app", "-c", sql,
        ])
        .output()
        .unwrap_or_else(|e| panic!("docker exec: {e}"));
    assert!(
        out.status.success(),
        "docker exec {container} psql -c {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// What a writer saw: acknowledged keys with when their statement started and when it
/// was acknowledged, and errors with when their statement started.
#[derive(Default)]
struct Writes {
    acked: Vec<(i64, Instant, Instant)>,
    failed: Vec<(Instant, String)>,
}

/// Inserts keys of `shard` (from `base`) through the proxy until `stop`, one statement at
/// a time, reconnecting after a broken connection.
fn spawn_writer(
    env: &'static Env,
    shard: &'static str,
    base: i64,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Writes>>, tokio::task::JoinHandle<()>) {
    let writes = Arc::new(Mutex::new(Writes::default()));
    let log = writes.clone();
    let task = tokio::spawn(async move {
        let mut next = base;
        let mut client = env.client().await;
        while !stop.load(Ordering::Relaxed) {
            let key = env.key_in(shard, next);
            next = key + 1;
            let started = Instant::now();
            let sql = format!("INSERT INTO users (id, name) VALUES ({key}, 'failover')");
            match client.batch_execute(&sql).await {
                Ok(()) => log
                    .lock()
                    .unwrap()
                    .acked
                    .push((key, started, Instant::now())),
                Err(e) => {
                    log.lock().unwrap().failed.push((started, e.to_string()));
                    if client.is_closed() {
                        client = env.client().await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    (writes, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_a_killed_primary_container_is_replaced_while_writes_wait() {
    let test = "failover_a_killed_primary_container_is_replaced_while_writes_wait";
    let Some(env) = failover_env(test) else {
        return;
    };
    let (name, shard) = env.shards.iter().next().expect("a shard");
    let (other, _) = env.shards.iter().last().expect("a shard");
    assert_ne!(name, other, "the test needs two shards");
    let Some(container) = env.containers.get(&shard.primary.1) else {
        println!("SKIPPED {test}: SHARDGATE_TEST_CONTAINERS names no container for the primary");
        return;
    };
    let _serial = serial().await;
    env.ensure_schema().await;
    let before = load_map(env);
    let old = before.shards[name].primary.endpoint();
    let stop = Arc::new(AtomicBool::new(false));
    let base = super::key_base();
    // The compose cluster replicates asynchronously, which may lose the last commits
    // before a crash (docs/operations.md). As recommended there (and as
    // integration-tests/failover.rs does), one standby confirms each commit of the
    // primary about to be killed, so every acknowledged write must survive. Only this
    // primary's own configuration changes: the promoted replica runs as before.
    let su = crate::common::superuser_client(shard, shard.primary.1, &shard.database).await;
    // One statement each: ALTER SYSTEM cannot run in a multi-statement query.
    for sql in [
        "ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 (*)'",
        "ALTER SYSTEM SET synchronous_commit = 'on'",
        "SELECT pg_reload_conf()",
    ] {
        su.batch_execute(sql).await.unwrap();
    }
    wait_for("a synchronous standby", TIMEOUT, || async {
        su.query_one(
            "SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum')",
            &[],
        )
        .await
        .is_ok_and(|r| r.get::<_, i64>(0) >= 1)
    })
    .await;
    let (writes, writer) = spawn_writer(env, name, base, stop.clone());
    let (elsewhere, other_writer) = spawn_writer(env, other, base, stop.clone());
    wait_for("writes before the kill", TIMEOUT, || async {
        writes.lock().unwrap().acked.len() >= 20
    })
    .await;

    docker(&["kill", container]).unwrap();
    let killed = Instant::now();
    wait_for("writes to resume on a new primary", TIMEOUT, || async {
        let w = writes.lock().unwrap();
        w.acked.iter().filter(|(_, t, _)| *t > killed).count() >= 20
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    other_writer.await.unwrap();
    let writes = std::mem::take(&mut *writes.lock().unwrap());
    // The first statement started after the kill waited for the new primary.
    let held = writes.acked.iter().find(|(_, t, _)| *t > killed);
    println!(
        "{test}: the first write after the kill was acknowledged {:?} after it, having waited {:?}",
        held.map(|(_, _, done)| *done - killed),
        held.map(|(_, started, done)| *done - *started)
    );
    // Only a statement already running when the primary died may fail; every later one
    // is held until the new primary takes it (failover.after + promotion < buffer).
    let late: Vec<_> = writes.failed.iter().filter(|(t, _)| *t > killed).collect();
    assert!(
        late.len() <= 1,
        "writes failed after the kill instead of waiting: {late:?}"
    );
    let elsewhere = std::mem::take(&mut *elsewhere.lock().unwrap());
    assert!(
        elsewhere.failed.is_empty(),
        "shard {other} did not keep serving: {:?}",
        elsewhere.failed
    );
    assert!(elsewhere.acked.len() >= 20, "shard {other} took few writes");

    // The map file: version + 1, a former replica as the primary, the old one gone.
    let after = load_map(env);
    assert_eq!(after.version, before.version + 1);
    let new = after.shards[name].primary.clone();
    assert!(
        before.shards[name].replicas.contains(&new),
        "{new:?} was not a replica"
    );
    assert!(after.shards[name]
        .replicas
        .iter()
        .all(|r| r.endpoint() != old));
    let fenced = show_nodes(env).await;
    assert!(
        fenced
            .iter()
            .any(|(s, a, role, f)| s == name && *a == old && role == "fenced" && f == "t"),
        "SHOW NODES: {fenced:?}"
    );
    // Every acknowledged key is on the new primary, and new writes go there.
    let new_port = new.port;
    let new_su = crate::common::superuser_client(shard, new_port, &shard.database).await;
    let keys: Vec<String> = writes.acked.iter().map(|(k, _, _)| k.to_string()).collect();
    let found: i64 = new_su
        .query_one(
            &format!(
                "SELECT count(*) FROM users WHERE id IN ({})",
                keys.join(",")
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        found as usize,
        keys.len(),
        "acknowledged writes missing on the new primary"
    );
    let client = env.client().await;
    let key = env.key_in(name, super::key_base());
    let sql =
        format!("INSERT INTO users (id, name) VALUES ({key}, 'x') RETURNING inet_server_port()");
    assert_eq!(port_of(&client, &sql).await, new_port);
}

/// Connects the container back on drop, so a failing test leaves no partition behind.
struct Partitioned {
    network: String,
    container: String,
    alias: String,
}

impl Partitioned {
    fn heal(&self) -> Result<(), String> {
        docker(&[
            "network",
            "connect",
            "--alias",
            &self.alias,
            &self.network,
            &self.container,
        ])
    }
}

impl Drop for Partitioned {
    fn drop(&mut self) {
        // Already connected after `heal`: then this fails, harmlessly.
        let _ = self.heal();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_a_partitioned_primary_is_replaced_and_fenced_when_it_returns() {
    let test = "failover_a_partitioned_primary_is_replaced_and_fenced_when_it_returns";
    let Some(env) = failover_env(test) else {
        return;
    };
    let (name, shard) = env.shards.iter().last().expect("a shard");
    let (Some(container), Ok(network)) = (
        env.containers.get(&shard.primary.1),
        std::env::var("SHARDGATE_TEST_NETWORK"),
    ) else {
        println!("SKIPPED {test}: needs SHARDGATE_TEST_CONTAINERS for the primary and SHARDGATE_TEST_NETWORK");
        return;
    };
    let _serial = serial().await;
    env.ensure_schema().await;
    let before = load_map(env);
    let old = before.shards[name].primary.clone();
    let client = env.client().await;
    let base = super::key_base();
    let mut keys = Vec::new();
    for i in 0..20 {
        let key = env.key_in(name, base + i * 1000);
        client
            .batch_execute(&format!(
                "INSERT INTO users (id, name) VALUES ({key}, 'before')"
            ))
            .await
            .unwrap();
        keys.push(key);
    }
    let count_sql = |keys: &[i64]| {
        let list: Vec<String> = keys.iter().map(i64::to_string).collect();
        format!(
            "SELECT count(*) FROM users WHERE id IN ({})",
            list.join(",")
        )
    };

    docker(&["network", "disconnect", &network, container]).unwrap();
    let cut = Instant::now();
    let partition = Partitioned {
        network: network.clone(),
        container: container.clone(),
        alias: old.host.clone(),
    };
    // Still running, still a primary: a partition, not a crash.
    assert_eq!(psql_in(container, "SELECT pg_is_in_recovery()"), "f");
    wait_for("a replica to be promoted", TIMEOUT, || async {
        let map = load_map(env);
        map.version == before.version + 1 && map.shards[name].primary != old
    })
    .await;
    println!("{test}: promoted {:?} after the partition", cut.elapsed());
    let after = load_map(env);
    let new_port = after.shards[name].primary.port;
    assert!(before.shards[name]
        .replicas
        .contains(&after.shards[name].primary));
    // Writes through the proxy, in sessions old and new, go to the new primary.
    let mut written = Vec::new();
    let fresh = env.client().await;
    for (i, c) in [&client, &fresh].iter().cycle().take(20).enumerate() {
        let key = env.key_in(name, base + 500_000 + i as i64 * 1000);
        let sql = format!(
            "INSERT INTO users (id, name) VALUES ({key}, 'after') RETURNING inet_server_port()"
        );
        assert_eq!(
            port_of(c, &sql).await,
            new_port,
            "a write after the promotion"
        );
        written.push(key);
    }

    // The network comes back; the old primary still believes it is one.
    partition.heal().unwrap();
    assert_eq!(psql_in(container, "SELECT pg_is_in_recovery()"), "f");
    wait_for(
        "SHOW NODES to report the old primary fenced",
        TIMEOUT,
        || async {
            show_nodes(env).await.iter().any(|(s, a, role, f)| {
                s == name && *a == old.endpoint() && role == "fenced" && f == "t"
            })
        },
    )
    .await;
    // The proxy finds it answering as a primary again and makes it read-only.
    wait_for(
        "the returned old primary to be made read-only",
        TIMEOUT,
        || async { psql_in(container, "SHOW default_transaction_read_only") == "on" },
    )
    .await;
    let mut clients = vec![client, fresh, env.client().await];
    for i in 0..30 {
        let key = env.key_in(name, base + 900_000 + i * 1000);
        let c = &clients[i as usize % 3];
        let sql = format!(
            "INSERT INTO users (id, name) VALUES ({key}, 'healed') RETURNING inet_server_port()"
        );
        assert_eq!(
            port_of(c, &sql).await,
            new_port,
            "a write after the network came back"
        );
        written.push(key);
    }
    clients.clear();
    // None of it reached the old primary; all of it is on the new one.
    assert_eq!(
        psql_in(container, &count_sql(&keys)),
        keys.len().to_string()
    );
    assert_eq!(
        psql_in(container, &count_sql(&written)),
        "0",
        "writes reached the old primary"
    );
    let new_su = crate::common::superuser_client(shard, new_port, &shard.database).await;
    let on_new: i64 = new_su
        .query_one(&count_sql(&written), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(on_new as usize, written.len());
    let seen: HashSet<i64> = written.iter().copied().collect();
    assert_eq!(seen.len(), written.len());
}
