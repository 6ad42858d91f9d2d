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
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok((client, conn)) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await {
            tokio::spawn(conn);
            return client;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the binary never accepted connections"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_exit(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "shardgate did not exit within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
