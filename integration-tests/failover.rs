//! Promotion by the proxy itself (issue 9): a real primary with two streaming replicas
//! (synchronous: `ANY 1 (*)`) is killed while a client writes through the proxy; a
//! replica is promoted, the other follows it, the map file names it, no acknowledged
//! write is lost, and the old primary, restarted as a primary, never gets a write again.
//! Each test has clusters of its own (they kill nodes).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::proxy::{start_proxy, start_proxy_with_map, ProxyOptions, TestProxy};
use common::{own_cluster, superuser_client, wait_for, TestCluster};

async fn cluster_with_sync_replicas() -> TestCluster {
    let cluster = tokio::task::spawn_blocking(|| own_cluster(2))
        .await
        .unwrap();
    let su = superuser_client(&cluster, cluster.primary.1, "postgres").await;
    // Set after start: during setup the primary would wait for standbys not yet there.
    su.batch_execute("ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 (*)'")
        .await
        .unwrap();
    // The test clusters run with synchronous_commit off for speed; here it must wait.
    su.batch_execute("ALTER SYSTEM SET synchronous_commit = 'on'")
        .await
        .unwrap();
    su.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    // Commits wait for a standby from now on: nothing acknowledged can be lost.
    wait_for("a synchronous standby", Duration::from_secs(20), || async {
        su.query_one(
            "SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum')",
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0) >= 1)
        .unwrap_or(false)
    })
    .await;
    cluster
}

fn options(auto: bool) -> ProxyOptions {
    ProxyOptions {
        lag_check_interval: "100ms",
        acquire_timeout: "20s",
        // Promotion needs a superuser: the cluster's `postgres` (trust on loopback).
        extra_users: vec![("postgres".into(), "unused".into())],
        extra: format!(
            "control: {{ user: postgres }}\nfailover: {{ auto: {auto}, after: 1s, buffer: 20s }}\n"
        ),
        ..Default::default()
    }
}

/// Inserts sequential ids through the proxy until told to stop, reconnecting after a
/// failure; records every id whose INSERT was acknowledged.
fn spawn_writer(
    proxy: &TestProxy,
    acked: Arc<Mutex<Vec<i64>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let dsn = proxy.dsn();
    tokio::spawn(async move {
        let mut next = 1i64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let Ok((client, connection)) =
                tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await
            else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            tokio::spawn(connection);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match client
                    .execute("INSERT INTO ledger (id) VALUES ($1)", &[&next])
                    .await
                {
                    Ok(_) => {
                        acked.lock().unwrap().push(next);
                        next += 1;
                    }
                    Err(_) => {
                        // Unknown outcome: the id is skipped, never reused.
                        next += 1;
                        break;
                    }
                }
            }
        }
    })
}

fn primary_port(proxy: &TestProxy) -> u16 {
    proxy.handle.frontend.topology.load().shards[0].nodes[0].port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_is_replaced_and_no_acknowledged_write_is_lost() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let cluster = cluster_with_sync_replicas().await;
    let proxy = start_proxy(&cluster, options(true)).await;
    proxy
        .client()
        .await
        .batch_execute("CREATE TABLE ledger (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = spawn_writer(&proxy, acked.clone(), stop.clone());
    wait_for(
        "writes before the crash",
        Duration::from_secs(10),
        || async { acked.lock().unwrap().len() >= 50 },
    )
    .await;
    let old_port = cluster.primary.1;
    let local = cluster.local.as_ref().unwrap();
    local.kill_node(local.primary());
    let before_crash = acked.lock().unwrap().len();
    // Writes resume within failover.after plus a few seconds.
    wait_for(
        "writes to resume on a new primary",
        Duration::from_secs(20),
        || async { acked.lock().unwrap().len() >= before_crash + 50 },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    let new_port = primary_port(&proxy);
    assert_ne!(new_port, old_port);
    // Every acknowledged id is on the new primary.
    let new_primary = superuser_client(&cluster, new_port, &cluster.database).await;
    let ids: Vec<i64> = new_primary
        .query("SELECT id FROM ledger ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let acked = acked.lock().unwrap().clone();
    let missing: Vec<i64> = acked
        .iter()
        .filter(|id| ids.binary_search(id).is_err())
        .copied()
        .collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    // The other replica streams from the new primary.
    let other = cluster
        .replicas
        .iter()
        .map(|r| r.1)
        .find(|p| *p != new_port)
        .unwrap();
    let follower = superuser_client(&cluster, other, "postgres").await;
    wait_for("the other replica to stream from the new primary", Duration::from_secs(20), || async {
        follower
            .query_one("SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming' AND sender_port = $1", &[&i32::from(new_port)])
            .await
            .map(|r| r.get::<_, i64>(0) == 1)
            .unwrap_or(false)
    })
    .await;
    // The map file names the new primary, version + 1, and the old file is kept.
    let map = shardgate::shard_map::ShardMap::load(&proxy.map_file()).unwrap();
    assert_eq!(map.version, 2);
    assert_eq!(map.shards["s0"].primary.port, new_port);
    assert!(map.shards["s0"].replicas.iter().all(|r| r.port != old_port));
    assert!(proxy.map_file().with_file_name("map.yaml.bak-1").exists());

    // The old primary comes back believing it is a primary: no write reaches it.
    local.start_node(local.primary()).unwrap();
    let old = superuser_client(&cluster, old_port, &cluster.database).await;
    let before: i64 = old
        .query_one("SELECT count(*) FROM ledger", &[])
        .await
        .unwrap()
        .get(0);
    let c = proxy.client().await;
    for id in 1_000_000i64..1_000_020 {
        c.execute("INSERT INTO ledger (id) VALUES ($1)", &[&id])
            .await
            .unwrap();
    }
    let after: i64 = old
        .query_one("SELECT count(*) FROM ledger", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(before, after, "a write reached the fenced old primary");
    assert!(proxy
        .handle
        .frontend
        .fenced
        .lock()
        .unwrap()
        .iter()
        .any(|(_, addr)| addr.ends_with(&format!(":{old_port}"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_switchover_on_a_healthy_shard() {
    let cluster = cluster_with_sync_replicas().await;
    let proxy = start_proxy(&cluster, options(false)).await;
    let c = proxy.client().await;
    c.batch_execute("CREATE TABLE ledger (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    for id in 1i64..=100 {
        c.execute("INSERT INTO ledger (id) VALUES ($1)", &[&id])
            .await
            .unwrap();
    }
    let target = cluster.replicas[1].clone();
    let done = proxy
        .handle
        .promote("s0", Some(&format!("{}:{}", target.0, target.1)))
        .await
        .unwrap();
    assert_eq!(done.new_primary, format!("{}:{}", target.0, target.1));
    assert_eq!(primary_port(&proxy), target.1);
    // Writes go to the new primary; nothing acknowledged before is missing.
    let c = proxy.client().await;
    for id in 101i64..=120 {
        c.execute("INSERT INTO ledger (id) VALUES ($1)", &[&id])
            .await
            .unwrap();
    }
    let new_primary = superuser_client(&cluster, target.1, &cluster.database).await;
    let n: i64 = new_primary
        .query_one("SELECT count(*) FROM ledger", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 120);
}

/// A map of the one shard: `primary` and `replicas` as ports of `cluster`'s host.
fn map_text(cluster: &TestCluster, version: u64, primary: u16, replicas: &[u16]) -> String {
    let host = &cluster.primary.0;
    let replicas: Vec<String> = replicas.iter().map(|p| format!("\"{host}:{p}\"")).collect();
    format!(
        "version: {version}\ndatabase: {}\nshards:\n  s0: {{ primary: \"{host}:{primary}\", replicas: [{}] }}\ndefault_shard: s0\n",
        cluster.database,
        replicas.join(", ")
    )
}

fn with_console(mut opts: ProxyOptions) -> ProxyOptions {
    opts.extra
        .push_str("admin: { user: admin, password: admin-secret }\n");
    opts
}

/// `SHOW NODES` on the admin console: (address, role, fenced, excluded) per row.
async fn show_nodes(proxy: &TestProxy) -> Vec<(String, String, String, String)> {
    let console = common::proxy::connect(&format!(
        "host=127.0.0.1 port={} user=admin password=admin-secret dbname=shardgate",
        proxy.port()
    ))
    .await;
    let rows = console.simple_query("SHOW NODES").await.unwrap();
    rows.iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some((
                r.get("address").unwrap_or_default().to_owned(),
                r.get("role").unwrap_or_default().to_owned(),
                r.get("fenced").unwrap_or_default().to_owned(),
                r.get("excluded").unwrap_or_default().to_owned(),
            )),
            _ => None,
        })
        .collect()
}

/// A server setting; empty when the query fails (the fence ends the sessions of a
/// node it makes read-only, this one's included: the caller's wait tries again).
async fn setting(client: &tokio_postgres::Client, name: &str) -> String {
    client
        .query_one(&format!("SELECT current_setting('{name}')"), &[])
        .await
        .map(|row| row.get(0))
        .unwrap_or_default()
}

async fn count(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM ledger", &[])
        .await
        .unwrap()
        .get(0)
}

/// Issue 9's fence, by timeline rather than `pg_is_in_recovery()`: after a promotion the
/// old primary comes back as a primary (timeline 1, the shard is on 2). A proxy started
/// later from a map that lists it as a replica fences it (SHOW NODES), never reads or
/// writes there and makes it read-only; a proxy started from the stale map that still
/// names it as the primary (the backup of before the promotion) fences it too and adopts
/// the promoted replica instead of writing to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_primary_is_fenced_by_its_timeline_after_a_proxy_restart() {
    let cluster = tokio::task::spawn_blocking(|| own_cluster(2))
        .await
        .unwrap();
    let local = cluster.local.as_ref().unwrap();
    let old = cluster.primary.1;
    let first = start_proxy(&cluster, options(false)).await;
    let c = first.client().await;
    c.batch_execute("CREATE TABLE ledger (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    for id in 1i64..=20 {
        c.execute("INSERT INTO ledger (id) VALUES ($1)", &[&id])
            .await
            .unwrap();
    }
    local
        .wait_replicas_caught_up(Duration::from_secs(20))
        .unwrap();
    local.kill_node(local.primary());
    let done = first.handle.promote("s0", None).await.unwrap();
    let new = primary_port(&first);
    let other = cluster
        .replicas
        .iter()
        .map(|r| r.1)
        .find(|p| *p != new)
        .unwrap();
    assert!(done
        .following
        .iter()
        .any(|f| f.ends_with(&format!(":{other}"))));
    first.handle.shutdown();
    first.handle.wait().await;
    // The old primary restarts as a primary, on the timeline the shard has left.
    local.start_node(local.primary()).unwrap();
    let old_su = superuser_client(&cluster, old, &cluster.database).await;
    assert!(!old_su
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get::<_, bool>(0));
    let old_rows = count(&old_su).await;

    // 1. Listed as a replica in the map a restarted proxy reads.
    let listed = map_text(&cluster, 3, new, &[other, old]);
    let second = start_proxy_with_map(&cluster, &listed, with_console(options(false))).await;
    let old_addr = format!("{}:{old}", cluster.primary.0);
    wait_for(
        "the old primary to be fenced",
        Duration::from_secs(20),
        || async {
            show_nodes(&second)
                .await
                .iter()
                .any(|(addr, _, fenced, why)| {
                    *addr == old_addr && fenced == "t" && why.contains("timeline 1")
                })
        },
    )
    .await;
    // Made read-only on the server, so not even a direct client writes there.
    wait_for(
        "the old primary to be read-only",
        Duration::from_secs(20),
        || async {
            let su = superuser_client(&cluster, old, &cluster.database).await;
            setting(&su, "default_transaction_read_only").await == "on"
        },
    )
    .await;
    let c = second.client().await;
    for id in 100i64..120 {
        c.execute("INSERT INTO ledger (id) VALUES ($1)", &[&id])
            .await
            .unwrap();
        let port: i32 = c
            .query_one("SELECT inet_server_port()", &[])
            .await
            .unwrap()
            .get(0);
        assert_ne!(
            port,
            i32::from(old),
            "a read reached the fenced old primary"
        );
    }
    let old_su = superuser_client(&cluster, old, &cluster.database).await;
    assert_eq!(
        count(&old_su).await,
        old_rows,
        "a write reached the old primary"
    );
    second.handle.shutdown();
    second.handle.wait().await;

    // 2. The stale map of before the promotion: the old primary is its primary. Undo the
    //    server-side fence first, as for an old primary no proxy has seen yet.
    old_su
        .batch_execute("ALTER SYSTEM RESET default_transaction_read_only")
        .await
        .unwrap();
    old_su
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let stale = map_text(&cluster, 1, old, &[new, other]);
    let third = start_proxy_with_map(&cluster, &stale, with_console(options(true))).await;
    wait_for(
        "the promoted replica to be adopted",
        Duration::from_secs(30),
        || async { primary_port(&third) == new },
    )
    .await;
    let map = shardgate::shard_map::ShardMap::load(&third.map_file()).unwrap();
    assert_eq!((map.version, map.shards["s0"].primary.port), (2, new));
    let c = third.client().await;
    for id in 200i64..220 {
        c.execute("INSERT INTO ledger (id) VALUES ($1)", &[&id])
            .await
            .unwrap();
    }
    wait_for(
        "the stale primary to be read-only",
        Duration::from_secs(20),
        || async {
            let su = superuser_client(&cluster, old, &cluster.database).await;
            setting(&su, "default_transaction_read_only").await == "on"
        },
    )
    .await;
    let old_su = superuser_client(&cluster, old, &cluster.database).await;
    assert_eq!(
        count(&old_su).await,
        old_rows,
        "a write reached the stale primary"
    );
    let new_su = superuser_client(&cluster, new, &cluster.database).await;
    assert_eq!(count(&new_su).await, 60);
    assert!(show_nodes(&third)
        .await
        .iter()
        .any(|(addr, role, fenced, _)| *addr == old_addr && role == "fenced" && fenced == "t"));
}
