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
    login(&mut s, &proxy).await;
    let before = rss_bytes();
    // About 400 MB of result rows.
    let sql = "SELECT repeat('x', 4000) || g AS filler FROM generate_series(1, 100000) g";
    let mut q = BytesMut::new();
    shardgate::protocol::messages::query(&mut q, sql);
    s.write_all(&q).await.unwrap();
    let direct = superuser_client(cluster, cluster.primary.1, "postgres").await;
    wait_for("the server to block writing to the proxy", Duration::from_secs(30), || async {
        let n: i64 = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT repeat(%' AND wait_event = 'ClientWrite'",
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

/// Startup + SCRAM with postgres-protocol's client, on a raw socket.
async fn login(s: &mut tokio::net::TcpStream, proxy: &common::proxy::TestProxy) {
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    use shardgate::protocol::messages;
    let mut out = BytesMut::new();
    messages::startup(
        &mut out,
        &[("user", &proxy.user), ("database", &proxy.database)],
    );
    s.write_all(&out).await.unwrap();
    let mut inbuf = BytesMut::new();
    let mut scram = ScramSha256::new(proxy.password.as_bytes(), ChannelBinding::unsupported());
    loop {
        let frame = loop {
            if let Some(f) = shardgate::protocol::decode_frame(&mut inbuf, 1 << 20).unwrap() {
                break f;
            }
            assert!(
                s.read_buf(&mut inbuf).await.unwrap() > 0,
                "closed during login"
            );
        };
        let body = frame.body();
        out.clear();
        match (frame.tag, body.get(..4)) {
            (b'R', Some([0, 0, 0, 10])) => {
                messages::sasl_initial_response(&mut out, "SCRAM-SHA-256", scram.message())
            }
            (b'R', Some([0, 0, 0, 11])) => {
                scram.update(&body[4..]).unwrap();
                messages::put_msg(&mut out, b'p', |b| b.extend_from_slice(scram.message()));
            }
            (b'R', Some([0, 0, 0, 12])) => scram.finish(&body[4..]).unwrap(),
            (b'Z', _) => return,
            (b'E', _) => panic!("login failed"),
            _ => {}
        }
        if !out.is_empty() {
            s.write_all(&out).await.unwrap();
        }
    }
}
