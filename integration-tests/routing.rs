//! Read/write splitting against a real primary and two streaming replicas: reads on
//! fresh replicas, writes and read-write transactions on the primary, hints, lag-based
//! exclusion, read-your-writes, and reads surviving a replica crash.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::proxy::{start_proxy, ProxyOptions, TestProxy};
use common::{own_cluster, shared_cluster, superuser_client, unique_name, wait_for, TestCluster};
use shardgate::routing::route::RouteReason;
use shardgate::topology::Exclusion;

async fn port_of(client: &tokio_postgres::Client, sql: &str) -> u16 {
    let rows = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no port"))
}

fn replica_ports(c: &TestCluster) -> HashSet<u16> {
    c.replicas.iter().map(|(_, p)| *p).collect()
}

/// Waits until the monitor has seen every replica fresh: reads then reach all of them.
async fn wait_replicas_serving(proxy: &TestProxy, ports: &HashSet<u16>) {
    let client = proxy.client().await;
    let seen = std::sync::Mutex::new(HashSet::new());
    wait_for(
        "reads to reach every replica",
        Duration::from_secs(30),
        || async {
            let port = port_of(&client, "SELECT inet_server_port()").await;
            let mut seen = seen.lock().unwrap();
            seen.insert(port);
            ports.iter().all(|p| seen.contains(p))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_spread_over_replicas_and_writes_go_to_the_primary() {
    let cluster = shared_cluster();
    let proxy = start_proxy(cluster, ProxyOptions::default()).await;
    let replicas = replica_ports(cluster);
    wait_replicas_serving(&proxy, &replicas).await;
    let client = proxy.client().await;
    let mut seen = HashSet::new();
    for _ in 0..40 {
        let port = port_of(&client, "SELECT inet_server_port()").await;
        assert!(replicas.contains(&port), "a read ran on {port}");
        seen.insert(port);
        // The extended protocol routes the same way.
        let row = client
            .query_one("SELECT inet_server_port()", &[])
            .await
            .unwrap();
        assert!(replicas.contains(&(row.get::<_, i32>(0) as u16)));
    }
    assert_eq!(seen, replicas, "reads use both replicas");
    let table = unique_name("rw");
    client
        .batch_execute(&format!("CREATE TABLE {table} (id serial, port int)"))
        .await
        .unwrap();
    let primary = cluster.primary.1;
    let sql = format!("INSERT INTO {table} (port) VALUES (inet_server_port()) RETURNING port");
    assert_eq!(port_of(&client, &sql).await, primary);
    let sql = format!("SELECT inet_server_port() FROM {table} LIMIT 1 FOR UPDATE");
    assert_eq!(port_of(&client, &sql).await, primary);
    let sql = format!("SELECT inet_server_port() FROM (SELECT nextval('{table}_id_seq')) s");
    assert_eq!(port_of(&client, &sql).await, primary);
    let sql = format!(
        "WITH moved AS (DELETE FROM {table} RETURNING port) SELECT inet_server_port() FROM moved"
    );
    assert_eq!(port_of(&client, &sql).await, primary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_and_hints_pick_their_node() {
    let cluster = shared_cluster();
    let proxy = start_proxy(cluster, ProxyOptions::default()).await;
    let replicas = replica_ports(cluster);
    let primary = cluster.primary.1;
    wait_replicas_serving(&proxy, &replicas).await;
    let client = proxy.client().await;

    client.batch_execute("BEGIN").await.unwrap();
    assert_eq!(port_of(&client, "SELECT inet_server_port()").await, primary);
    client.batch_execute("COMMIT").await.unwrap();
    for begin in [
        "BEGIN READ ONLY",
        "START TRANSACTION READ ONLY",
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
    ] {
        client.batch_execute(begin).await.unwrap();
        let first = port_of(&client, "SELECT inet_server_port()").await;
        assert!(replicas.contains(&first), "{begin}: {first}");
        // The transaction stays on the node its first statement chose.
        for _ in 0..5 {
            assert_eq!(port_of(&client, "SELECT inet_server_port()").await, first);
        }
        client.batch_execute("COMMIT").await.unwrap();
    }

    assert_eq!(
        port_of(
            &client,
            "/* shardgate: primary */ SELECT inet_server_port()"
        )
        .await,
        primary
    );
    client
        .batch_execute("SET shardgate.target = 'primary'")
        .await
        .unwrap();
    for _ in 0..5 {
        assert_eq!(port_of(&client, "SELECT inet_server_port()").await, primary);
    }
    let hinted = port_of(
        &client,
        "/* shardgate: replica */ SELECT inet_server_port()",
    )
    .await;
    assert!(replicas.contains(&hinted));
    client
        .batch_execute("SET shardgate.target TO auto")
        .await
        .unwrap();
    assert!(replicas.contains(&port_of(&client, "SELECT inet_server_port()").await));
    // The same through the extended protocol (what JDBC and most drivers send).
    client
        .execute("SET shardgate.target = 'primary'", &[])
        .await
        .unwrap();
    for _ in 0..5 {
        let row = client
            .query_one("SELECT inet_server_port()", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0) as u16, primary);
    }
    client
        .execute("SET shardgate.target = 'auto'", &[])
        .await
        .unwrap();
    let row = client
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap();
    assert!(replicas.contains(&(row.get::<_, i32>(0) as u16)));
}

async fn pause(c: &TestCluster, port: u16, on: bool) {
    let su = superuser_client(c, port, "postgres").await;
    let f = if on {
        "pg_wal_replay_pause"
    } else {
        "pg_wal_replay_resume"
    };
    su.batch_execute(&format!("SELECT {f}()")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_replica_gets_no_reads_until_it_catches_up_and_sessions_read_their_writes() {
    let cluster = own_cluster(2);
    let replicas = replica_ports(&cluster);
    let (paused, other) = (cluster.replicas[0].1, cluster.replicas[1].1);
    let opts = ProxyOptions {
        max_replica_lag: "500ms",
        lag_check_interval: "100ms",
        ..Default::default()
    };
    let proxy = start_proxy(&cluster, opts).await;
    wait_replicas_serving(&proxy, &replicas).await;
    let direct = superuser_client(&cluster, cluster.primary.1, &cluster.database).await;
    let table = unique_name("lag");
    direct
        .batch_execute(&format!("CREATE TABLE {table} (v int)"))
        .await
        .unwrap();
    let writer = tokio::spawn(async move {
        for i in 0..100_000 {
            if direct
                .execute(&format!("INSERT INTO {table} VALUES ({i})"), &[])
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    pause(&cluster, paused, true).await;
    // The contract: within max_replica_lag + 2 check intervals, no more reads there.
    tokio::time::sleep(Duration::from_millis(500 + 2 * 100)).await;
    let client = proxy.client().await;
    for _ in 0..40 {
        let port = port_of(&client, "SELECT inet_server_port()").await;
        assert_ne!(port, paused, "a read reached the paused replica");
        assert_eq!(port, other);
    }
    pause(&cluster, paused, false).await;
    wait_replicas_serving(&proxy, &replicas).await;
    writer.abort();

    // Read-your-writes: both replicas paused but within a generous lag limit.
    drop(client);
    let opts = ProxyOptions {
        max_replica_lag: "1h",
        max_replica_lag_bytes: "1GB",
        ..Default::default()
    };
    let proxy = start_proxy(&cluster, opts).await;
    wait_replicas_serving(&proxy, &replicas).await;
    for (_, port) in &cluster.replicas {
        pause(&cluster, *port, true).await;
    }
    let table = unique_name("ryw");
    let writer = proxy.client().await;
    writer
        .batch_execute(&format!("CREATE TABLE {table} (v int)"))
        .await
        .unwrap();
    for i in 0..300 {
        writer
            .batch_execute(&format!("INSERT INTO {table} VALUES ({i})"))
            .await
            .unwrap();
        let row = writer
            .query_one(&format!("SELECT count(*) FROM {table} WHERE v = $1"), &[&i])
            .await
            .unwrap();
        assert_eq!(
            row.get::<_, i64>(0),
            1,
            "insert {i} not visible to its own session"
        );
    }
    // Those reads went to the primary because no replica had the write, and the proxy
    // kept that reason.
    let stats = &proxy.handle.frontend.route_stats;
    assert!(
        stats.count(RouteReason::NotCaughtUp) >= 300,
        "{}",
        stats.count(RouteReason::NotCaughtUp)
    );
    // A session that never wrote still reads from the (paused, but within limits) replicas.
    let reader = proxy.client().await;
    for _ in 0..10 {
        assert!(replicas.contains(&port_of(&reader, "SELECT inet_server_port()").await));
    }
    for (_, port) in &cluster.replicas {
        pause(&cluster, *port, false).await;
    }
    // Once the replicas have replayed past its writes, the writer reads from them
    // again: the guarantee costs primary reads only until replicas catch up.
    wait_for(
        "the writer to read from a replica again",
        Duration::from_secs(30),
        || async { replicas.contains(&port_of(&writer, "SELECT inet_server_port()").await) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_survive_a_replica_crash() {
    let cluster = own_cluster(2);
    let replicas = replica_ports(&cluster);
    let proxy = start_proxy(&cluster, ProxyOptions::default()).await;
    wait_replicas_serving(&proxy, &replicas).await;
    // Warm pooled connections to both replicas so some are idle when one dies.
    let clients: Vec<_> = futures_util::future::join_all((0..4).map(|_| proxy.client())).await;
    for c in &clients {
        port_of(c, "SELECT inet_server_port()").await;
    }
    let local = cluster.local.as_ref().expect("own cluster is local");
    local.kill_node(&local.replicas()[0]);
    let mut errors = 0;
    let mut ports = HashSet::new();
    for i in 0..100 {
        let c = &clients[i % clients.len()];
        match c.simple_query("SELECT inet_server_port()").await {
            Ok(rows) => {
                if let Some(tokio_postgres::SimpleQueryMessage::Row(r)) = rows.first() {
                    ports.insert(r.get(0).unwrap_or_default().to_string());
                }
            }
            Err(e) => {
                eprintln!("read {i} failed: {e}");
                errors += 1;
            }
        }
    }
    assert_eq!(errors, 0);
    assert!(!ports.contains(&cluster.replicas[0].1.to_string()));
    // The monitor notices on its own and excludes the dead replica from routing.
    wait_for(
        "the monitor to mark the dead replica down",
        Duration::from_secs(10),
        || async {
            let fresh = proxy.handle.frontend.default_fresh().load();
            matches!(fresh.nodes[1].excluded, Some(Exclusion::Down(_))) && !fresh.nodes[1].healthy
        },
    )
    .await;
    assert_eq!(
        proxy
            .handle
            .frontend
            .default_fresh()
            .load()
            .eligible_replicas()
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_dying_mid_result_is_reported_not_hidden() {
    use futures_util::{pin_mut, TryStreamExt};
    let cluster = own_cluster(1);
    let replica = cluster.replicas[0].1;
    let proxy = start_proxy(&cluster, ProxyOptions::default()).await;
    wait_replicas_serving(&proxy, &replica_ports(&cluster)).await;
    let client = proxy.client().await;
    // Rows of 1 kB, 5 ms apart: the server flushes every few rows, so the client
    // holds part of the answer well before the end.
    let sql = "SELECT inet_server_port(), repeat('x', 1000), pg_sleep(0.005) FROM generate_series(1, 2000)";
    let rows = client
        .query_raw(sql, std::iter::empty::<i32>())
        .await
        .unwrap();
    pin_mut!(rows);
    let first = rows.try_next().await.unwrap().expect("a first row");
    assert_eq!(first.get::<_, i32>(0) as u16, replica);
    let local = cluster.local.as_ref().expect("own cluster is local");
    local.kill_node(&local.replicas()[0]);
    let mut received = 1;
    let outcome = loop {
        match rows.try_next().await {
            Ok(Some(_)) => received += 1,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    let err = outcome.expect_err("a truncated result must end in an error");
    assert!(received < 2000, "{received} rows");
    eprintln!("after {received} rows: {err}");
    // The proxy is fine, and the next read is served (by the primary now).
    let again = proxy.client().await;
    let port = port_of(&again, "SELECT inet_server_port()").await;
    assert_eq!(port, cluster.primary.1);
}

/// One frontend message: tag, length, body.
fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Parse + Bind (unnamed statement into the unnamed portal), no parameters.
fn parse_bind(sql: &str) -> Vec<u8> {
    let mut parse = b"\0".to_vec();
    parse.extend_from_slice(sql.as_bytes());
    parse.extend_from_slice(&[0, 0, 0]);
    let mut out = frame(b'P', &parse);
    out.extend(frame(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebound_portal_is_no_longer_the_proxys_set() {
    use tokio::io::AsyncWriteExt;
    let cluster = shared_cluster();
    let proxy = start_proxy(cluster, ProxyOptions::default()).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    common::raw::login(&mut s, &proxy).await;
    // The SET is bound but never executed; the portal is then bound to a SELECT.
    let mut batch = parse_bind("SET shardgate.target = 'primary'");
    batch.extend(parse_bind("SELECT 42"));
    batch.extend(frame(b'E', &[0, 0, 0, 0, 0]));
    batch.extend(frame(b'S', &[]));
    s.write_all(&batch).await.unwrap();
    let mut inbuf = bytes::BytesMut::new();
    let answer = common::raw::read_until_ready(&mut s, &mut inbuf).await;
    let tags: Vec<u8> = answer.iter().map(|(t, _)| *t).collect();
    assert_eq!(tags, b"1212DCZ".to_vec(), "{answer:?}");
    let (_, row) = &answer[4];
    assert!(row.ends_with(b"42"), "{row:?}");
}
