//! Shutdown drains open transactions and closes idle sessions; a slow reader of a huge
//! result holds the server back (backpressure) instead of filling proxy memory.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::proxy::{start_proxy, ProxyOptions};
use common::{shared_cluster, superuser_client, unique_name, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_open_transactions_finish_and_closes_idle_sessions() {
    let cluster = shared_cluster();
    let proxy = start_proxy(cluster, ProxyOptions::default()).await;
    let table = unique_name("drain");
    let busy = proxy.client().await;
    busy.batch_execute(&format!("CREATE TABLE {table} (a int)"))
        .await
        .unwrap();
    let idle = proxy.client().await;
    busy.batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES (1)"))
        .await
        .unwrap();
    let addr = proxy.addr;
    proxy.handle.shutdown();
    // The idle session is told why it is closed.
    wait_for(
        "the idle session to be closed",
        Duration::from_secs(10),
        || async { idle.is_closed() },
    )
    .await;
    // New connections are no longer accepted.
    wait_for("the listener to close", Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    // The open transaction still completes.
    busy.batch_execute(&format!("INSERT INTO {table} VALUES (2); COMMIT"))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), proxy.handle.wait())
        .await
        .expect("proxy stops after the last transaction");
    let direct = superuser_client(cluster, cluster.primary.1, &cluster.database).await;
    let n: i64 = direct
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_holds_the_server_back_instead_of_filling_memory() {
    let cluster = shared_cluster();
    let proxy = start_proxy(cluster, ProxyOptions::default()).await;
    // A raw protocol client, so that we control exactly when bytes are read.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    common::raw::login(&mut s, &proxy).await;
    let before = rss_bytes();
    // About 400 MB of result rows.
    // Pinned to the primary, where the test watches the server's wait event.
    let sql = "/* shardgate: primary */ SELECT repeat('x', 4000) || g AS filler FROM generate_series(1, 100000) g";
    let mut q = BytesMut::new();
    shardgate::protocol::messages::query(&mut q, sql);
    s.write_all(&q).await.unwrap();
    let direct = superuser_client(cluster, cluster.primary.1, "postgres").await;
    wait_for("the server to block writing to the proxy", Duration::from_secs(30), || async {
        let n: i64 = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%SELECT repeat(%' AND wait_event = 'ClientWrite'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n == 1
    })
    .await;
    let grown = rss_bytes().saturating_sub(before);
    assert!(
        grown < 64 << 20,
        "proxy buffered {} MB for a client that reads nothing",
        grown >> 20
    );
    // Reading everything now still delivers the whole result.
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    let mut tail = Vec::new();
    loop {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed early");
        total += n as u64;
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 64 {
            tail.drain(..tail.len() - 64);
        }
        if tail.ends_with(&[b'Z', 0, 0, 0, 5, b'I']) {
            break;
        }
    }
    assert!(total > 400_000_000, "{total} bytes");
}

/// Runs the real binary on a free port with a config for `cluster`.
fn spawn_binary(
    cluster: &common::TestCluster,
) -> (std::process::Child, String, common::proxy::TempDir) {
    let port = shardgate::local_cluster::free_port();
    let opts = ProxyOptions::default();
    let (dir, config) = common::proxy::write_config(cluster, &opts, &format!("127.0.0.1:{port}"));
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .arg("--config")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start shardgate");
    let dsn = format!(
        "host=127.0.0.1 port={port} user={} password={} dbname={}",
        cluster.app_user, cluster.app_password, cluster.database
    );
    (child, dsn, dir)
}

async fn wait_until_up(dsn: &str) -> tokio_postgres::Client {
    wait_for(
        "the binary to accept connections",
        Duration::from_secs(20),
        || async {
            tokio_postgres::connect(dsn, tokio_postgres::NoTls)
                .await
                .is_ok()
        },
    )
    .await;
    common::proxy::connect(dsn).await
}

async fn wait_exit(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    wait_for("shardgate to exit", within, || {
        let exited = child.try_wait().unwrap().is_some();
        async move { exited }
    })
    .await;
    child.wait().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_sigint_exits_at_once() {
    let cluster = shared_cluster();
    let table = unique_name("signals");
    let (mut child, dsn, _dir) = spawn_binary(cluster);
    let busy = wait_until_up(&dsn).await;
    busy.batch_execute(&format!(
        "CREATE TABLE {table} (a int); BEGIN; INSERT INTO {table} VALUES (1)"
    ))
    .await
    .unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    busy.batch_execute(&format!("INSERT INTO {table} VALUES (2); COMMIT"))
        .await
        .unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");

    let (mut child, dsn, _dir) = spawn_binary(cluster);
    let open = wait_until_up(&dsn).await;
    open.batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES (3)"))
        .await
        .unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    wait_exit(&mut child, Duration::from_secs(3)).await;
    let direct = superuser_client(cluster, cluster.primary.1, &cluster.database).await;
    wait_for("the interrupted transaction to roll back", Duration::from_secs(10), || async {
        let rows = direct.query(&format!("SELECT a FROM {table} ORDER BY a"), &[]).await.unwrap();
        let values: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        values == vec![1, 2]
            && direct
                .query_one("SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'", &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
                == 0
    })
    .await;
}

/// A proxy for `cluster` with `limits` added to its `limits:` section (the shared
/// options have no field for the idle limits), and its directory.
async fn start_with_limits(
    cluster: &common::TestCluster,
    limits: &str,
) -> (shardgate::app::ProxyHandle, String, common::proxy::TempDir) {
    let opts = ProxyOptions {
        pool_size: 1,
        ..Default::default()
    };
    let (dir, path) = common::proxy::write_config(cluster, &opts, "127.0.0.1:0");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replacen("limits: { ", &format!("limits: {{ {limits}, "), 1);
    std::fs::write(&path, text).unwrap();
    let config = shardgate::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let map =
        shardgate::shard_map::ShardMap::load(&config.shard_map).unwrap_or_else(|e| panic!("{e}"));
    let handle = shardgate::app::start(&config, &map)
        .await
        .expect("proxy starts");
    let dsn = format!(
        "host=127.0.0.1 port={} user={} password={} dbname={}",
        handle.local_addr.port(),
        cluster.app_user,
        cluster.app_password,
        cluster.database
    );
    (handle, dsn, dir)
}

/// A client whose connection's end is reported: the SQLSTATE of the error it ended
/// with (a FATAL the server sent while the client was idle), "" for a clean end.
async fn watched_client(
    dsn: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::oneshot::Receiver<String>,
) {
    let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {dsn}: {e}"));
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let code = match conn.await {
            Ok(()) => String::new(),
            Err(error) => error
                .code()
                .map_or_else(|| error.to_string(), |c| c.code().to_owned()),
        };
        let _ = tx.send(code);
    });
    (client, rx)
}

/// The primary's pool of the app user: (in use, idle).
fn primary_pool(handle: &shardgate::app::ProxyHandle, user: &str) -> (usize, usize) {
    let fe = &handle.frontend;
    let pools = fe.pools_for(user, &fe.topology.load());
    (pools[0][0].in_use(), pools[0][0].idle_count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_idle_in_a_transaction_is_rolled_back_released_and_closed_with_25p03() {
    let cluster = shared_cluster();
    let (handle, dsn, _dir) = start_with_limits(cluster, "idle_in_transaction_timeout: 1s").await;
    let table = unique_name("idle_txn");
    let setup = common::proxy::connect(&dsn).await;
    setup
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, v int); INSERT INTO {table} VALUES (1, 0)"
        ))
        .await
        .unwrap();
    drop(setup);
    let (idler, ended) = watched_client(&dsn).await;
    idler
        .batch_execute(&format!("BEGIN; UPDATE {table} SET v = 1 WHERE id = 1"))
        .await
        .unwrap();
    let pid: i32 = idler
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // The row lock is held meanwhile.
    let direct = superuser_client(cluster, cluster.primary.1, &cluster.database).await;
    let blocked = direct
        .batch_execute(&format!(
            "SET lock_timeout = '100ms'; UPDATE {table} SET v = 2 WHERE id = 1"
        ))
        .await
        .unwrap_err();
    assert_eq!(blocked.code().map(|c| c.code()), Some("55P03"), "{blocked}");
    let ended = tokio::time::timeout(Duration::from_secs(10), ended)
        .await
        .expect("the idle client is closed")
        .unwrap();
    assert_eq!(ended, "25P03");
    // Rolled back and released before the client was told: the lock is gone, the one
    // server connection is idle in the pool, and the next client gets it.
    assert_eq!(primary_pool(&handle, &cluster.app_user), (0, 1));
    let state: String = direct
        .query_one("SELECT state FROM pg_stat_activity WHERE pid = $1", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "idle");
    let other = common::proxy::connect(&dsn).await;
    other
        .batch_execute(&format!(
            "SET lock_timeout = '1s'; UPDATE {table} SET v = 2 WHERE id = 1"
        ))
        .await
        .unwrap();
    let v: i32 = other
        .query_one(&format!("SELECT v FROM {table} WHERE id = 1"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 2, "the idle transaction's update was rolled back");
    assert!(idler.simple_query("SELECT 1").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_idle_outside_a_transaction_is_closed_with_57p05_and_its_pinned_connection_comes_back_clean(
) {
    let cluster = shared_cluster();
    let (handle, dsn, _dir) = start_with_limits(
        cluster,
        "client_idle_timeout: 1s, idle_in_transaction_timeout: 0s",
    )
    .await;
    // LISTEN keeps the client's server connection between transactions.
    let (listener, ended) = watched_client(&dsn).await;
    listener.batch_execute("LISTEN idle_jobs").await.unwrap();
    assert_eq!(primary_pool(&handle, &cluster.app_user), (1, 0));
    let ended = tokio::time::timeout(Duration::from_secs(10), ended)
        .await
        .expect("the idle client is closed")
        .unwrap();
    assert_eq!(ended, "57P05");
    assert_eq!(primary_pool(&handle, &cluster.app_user), (0, 1));
    // The next client has that same connection (a pool of one), no longer listening.
    // It opens a transaction and idles in it: the idle-session limit is not the
    // in-transaction one (off here), so it is still served afterwards.
    let (next, next_ended) = watched_client(&dsn).await;
    let channels: i64 = next
        .query_one(
            "/* shardgate: primary */ SELECT count(*) FROM pg_listening_channels()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(channels, 0);
    next.batch_execute("BEGIN").await.unwrap();
    let (idler, idler_ended) = watched_client(&dsn).await;
    idler.simple_query("SELECT 1").await.unwrap();
    let code = tokio::time::timeout(Duration::from_secs(10), idler_ended)
        .await
        .expect("the second idle client is closed")
        .unwrap();
    assert_eq!(code, "57P05");
    next.batch_execute("SELECT 1; COMMIT").await.unwrap();
    drop(next);
    drop(next_ended);
    assert!(listener.simple_query("SELECT 1").await.is_err());
}
