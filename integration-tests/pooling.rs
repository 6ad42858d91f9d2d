//! Transaction pooling keeps sessions apart: settings follow their client from server
//! connection to server connection, a vanished client's transaction is rolled back and
//! its connection comes back clean, cancels reach only the right query, and the pool
//! bound and its wait timeout hold.

mod common;

use std::time::{Duration, Instant};

use common::proxy::{start_proxy, ProxyOptions};
use common::{shared_cluster, superuser_client, unique_name, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_clients_with_their_own_settings_on_a_pool_of_two() {
    let cluster = shared_cluster();
    let proxy = start_proxy(
        cluster,
        ProxyOptions {
            pool_size: 2,
            ..Default::default()
        },
    )
    .await;
    let mut clients = Vec::new();
    for i in 0..8u64 {
        let c = proxy.client().await;
        c.batch_execute(&format!("SET statement_timeout = '{}ms'", 1001 + i))
            .await
            .unwrap();
        c.execute(&format!("SET application_name = 'client{i}'"), &[])
            .await
            .unwrap();
        clients.push(c);
    }
    let mut tasks = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            for round in 0..25 {
                let row = c
                    .query_one("SELECT current_setting('statement_timeout'), current_setting('application_name')", &[])
                    .await
                    .unwrap();
                assert_eq!(row.get::<_, String>(0), format!("{}ms", 1001 + i), "client {i} round {round}");
                assert_eq!(row.get::<_, String>(1), format!("client{i}"));
                let shown = c.simple_query("SHOW statement_timeout").await.unwrap();
                let value = shown.iter().find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(String::from),
                    _ => None,
                });
                assert_eq!(value, Some(format!("{}ms", 1001 + i)));
            }
            c
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.unwrap());
    }
    // The settings really govern execution: 1001ms cuts a 1.5 s sleep.
    let err = clients[0]
        .simple_query("SELECT pg_sleep(1.5)")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("57014"));
    // RESET brings back the default for this client only.
    clients[1]
        .batch_execute("RESET statement_timeout")
        .await
        .unwrap();
    let r = clients[1]
        .query_one("SELECT current_setting('statement_timeout')", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "0");
    let r = clients[2]
        .query_one("SELECT current_setting('statement_timeout')", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "1003ms");
    // A SET rolled back with its transaction is forgotten.
    clients[3]
        .batch_execute("BEGIN; SET statement_timeout = 5; ROLLBACK")
        .await
        .unwrap();
    let r = clients[3]
        .query_one("SELECT current_setting('statement_timeout')", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "1004ms");
    // Never more than two server connections for this pool.
    let direct = superuser_client(cluster, cluster.primary.1, "postgres").await;
    let n: i64 = direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND application_name LIKE 'client%'",
            &[&cluster.app_user],
        )
        .await
        .unwrap()
        .get(0);
    assert!(n <= 2, "{n} server connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_vanishing_mid_transaction_commits_nothing_and_leaves_clean_connections() {
    let cluster = shared_cluster();
    let proxy = start_proxy(
        cluster,
        ProxyOptions {
            pool_size: 1,
            ..Default::default()
        },
    )
    .await;
    let table = unique_name("vanish");
    let setup = proxy.client().await;
    setup
        .batch_execute(&format!("CREATE TABLE {table} (v text)"))
        .await
        .unwrap();
    drop(setup);
    {
        let doomed = proxy.client().await;
        doomed
            .batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES ('lost')"))
            .await
            .unwrap();
        // Dropping the client closes its socket without COMMIT or Terminate.
    }
    let direct = superuser_client(cluster, cluster.primary.1, &cluster.database).await;
    wait_for("the open transaction to end", Duration::from_secs(10), || async {
        let n: i64 = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND state LIKE 'idle in transaction%'",
                &[&cluster.app_user],
            )
            .await
            .unwrap()
            .get(0);
        n == 0
    })
    .await;
    // With a pool of one, the next client gets that same server connection: if it were
    // still inside the old transaction, this insert would not be visible directly.
    let next = proxy.client().await;
    next.batch_execute(&format!("INSERT INTO {table} VALUES ('kept')"))
        .await
        .unwrap();
    let rows = direct
        .query(&format!("SELECT v FROM {table}"), &[])
        .await
        .unwrap();
    let values: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(values, vec!["kept".to_string()]);
}

/// `current_setting('work_mem')` and the server's pid, on the primary (a pool of one).
async fn work_mem_and_pid(client: &tokio_postgres::Client) -> (String, String) {
    let messages = client
        .simple_query(
            "/* shardgate: primary */ SELECT current_setting('work_mem'), pg_backend_pid()",
        )
        .await
        .unwrap();
    let row = messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .expect("a row");
    (row.get(0).unwrap().into(), row.get(1).unwrap().into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_local_ends_with_its_transaction_when_the_connection_changes_hands() {
    let cluster = shared_cluster();
    let proxy = start_proxy(
        cluster,
        ProxyOptions {
            pool_size: 1,
            ..Default::default()
        },
    )
    .await;
    let a = proxy.client().await;
    let b = proxy.client().await;
    a.batch_execute("/* shardgate: primary */ BEGIN; SET LOCAL work_mem = '77MB'")
        .await
        .unwrap();
    let (inside, pid) = work_mem_and_pid(&a).await;
    assert_eq!(inside, "77MB", "SET LOCAL holds inside its transaction");
    a.batch_execute("COMMIT").await.unwrap();
    // The one server connection goes to another client with a setting of its own, and
    // back: the first client's settings are brought back on it, and SET LOCAL is not
    // among them (replayed as a session SET, it would come back here).
    b.batch_execute("SET work_mem = '5MB'").await.unwrap();
    assert_eq!(work_mem_and_pid(&b).await, ("5MB".to_string(), pid.clone()));
    let (after, same_pid) = work_mem_and_pid(&a).await;
    assert_eq!(
        same_pid, pid,
        "the pool of one lends the same server connection"
    );
    assert_ne!(after, "77MB", "SET LOCAL outlived its transaction");
    assert_ne!(after, "5MB", "another client's SET reached this one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_only_the_right_query() {
    let cluster = shared_cluster();
    let proxy = start_proxy(
        cluster,
        ProxyOptions {
            pool_size: 4,
            ..Default::default()
        },
    )
    .await;
    let victim = proxy.client().await;
    let bystander = proxy.client().await;
    let token = victim.cancel_token();
    let started = Instant::now();
    let sleeper = tokio::spawn(async move { victim.simple_query("SELECT pg_sleep(20)").await });
    let other = tokio::spawn(async move {
        bystander
            .query_one("SELECT pg_sleep(1.5), 'done'", &[])
            .await
    });
    // The read may run on any node: the cancel must find it wherever it is.
    let mut nodes = vec![superuser_client(cluster, cluster.primary.1, "postgres").await];
    for (_, port) in &cluster.replicas {
        nodes.push(superuser_client(cluster, *port, "postgres").await);
    }
    wait_for("pg_sleep(20) to run", Duration::from_secs(10), || async {
        let mut n = 0;
        for node in &nodes {
            let row = node
                .query_one("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(20)' AND state = 'active'", &[])
                .await
                .unwrap();
            n += row.get::<_, i64>(0);
        }
        n == 1
    })
    .await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = sleeper.await.unwrap().unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15));
    let row = other
        .await
        .unwrap()
        .expect("the other session's query is not cancelled");
    assert_eq!(row.get::<_, String>(1), "done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_wait_times_out_with_a_clear_error() {
    let cluster = shared_cluster();
    let opts = ProxyOptions {
        pool_size: 1,
        acquire_timeout: "300ms",
        ..Default::default()
    };
    let proxy = start_proxy(cluster, opts).await;
    let holder = proxy.client().await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let waiter = proxy.client().await;
    // Pinned to the primary, whose one connection the holder keeps.
    let err = waiter
        .simple_query("/* shardgate: primary */ SELECT 1")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("53300"), "{err}");
    holder.batch_execute("COMMIT").await.unwrap();
    let again = proxy.client().await;
    again.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pooling_keeps_one_server_connection_per_client() {
    let cluster = shared_cluster();
    let proxy = start_proxy(
        cluster,
        ProxyOptions {
            pool_mode: "session",
            pool_size: 2,
            ..Default::default()
        },
    )
    .await;
    let client = proxy.client().await;
    let first: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    for _ in 0..20 {
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(pid, first);
    }
    // Temp tables are fine in session mode and gone for the next client.
    client
        .batch_execute("CREATE TEMP TABLE scratch (a int)")
        .await
        .unwrap();
    drop(client);
    let next = proxy.client().await;
    let err = next
        .simple_query("SELECT * FROM scratch")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("42P01"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_state_under_transaction_pooling_never_reaches_another_client() {
    let cluster = shared_cluster();
    let proxy = start_proxy(
        cluster,
        ProxyOptions {
            pool_size: 1,
            ..Default::default()
        },
    )
    .await;
    let a = proxy.client().await;
    a.batch_execute(
        "CREATE TEMP TABLE mine (a int); SELECT set_config('search_path', 'nowhere', false)",
    )
    .await
    .unwrap();
    let b = proxy.client().await;
    let err = b.simple_query("SELECT * FROM mine").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("42P01"));
    let path: String = b.query_one("SHOW search_path", &[]).await.unwrap().get(0);
    assert_ne!(path, "nowhere");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_and_notifications_pass_through_in_session_mode() {
    use futures_util::future::poll_fn;
    use tokio_postgres::AsyncMessage;
    let cluster = shared_cluster();
    let proxy = start_proxy(
        cluster,
        ProxyOptions {
            pool_mode: "session",
            ..Default::default()
        },
    )
    .await;
    let (listener, mut conn) = tokio_postgres::connect(&proxy.dsn(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(msg)) = poll_fn(|cx| conn.poll_message(cx)).await {
            let text = match msg {
                AsyncMessage::Notice(n) => format!("notice:{}", n.message()),
                AsyncMessage::Notification(n) => format!("notify:{}:{}", n.channel(), n.payload()),
                _ => continue,
            };
            let _ = tx.send(text);
        }
    });
    listener
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'hello'; END $$")
        .await
        .unwrap();
    assert_eq!(rx.recv().await.as_deref(), Some("notice:hello"));
    listener.batch_execute("LISTEN jobs").await.unwrap();
    let sender = proxy.client().await;
    sender.batch_execute("NOTIFY jobs, 'ready'").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("notification arrives");
    assert_eq!(got.as_deref(), Some("notify:jobs:ready"));
}
