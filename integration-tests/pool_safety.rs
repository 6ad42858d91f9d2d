//! Transaction pooling never hands a server connection that is mid-batch, stale or dead
//! to another client (issue 6). Raw-protocol tests against real PostgreSQL, each one
//! written against a bug real drivers found: a connection released after Flush while
//! the server still held the batch's implicit transaction, prepared statements that
//! broke (or silently changed shape) after ALTER TABLE, and dead connections pooled.

mod common;

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::proxy::{start_proxy, ProxyOptions, TestProxy};
use common::{shared_cluster, superuser_client, unique_name, wait_for};
use shardgate::protocol::messages::{self, put_cstr, put_msg};

/// A client speaking the protocol message by message.
struct Raw {
    s: TcpStream,
    inbuf: BytesMut,
    out: BytesMut,
}

impl Raw {
    async fn connect(proxy: &TestProxy) -> Raw {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        common::raw::login(&mut s, proxy).await;
        Raw {
            s,
            inbuf: BytesMut::new(),
            out: BytesMut::new(),
        }
    }

    fn parse(&mut self, name: &str, sql: &str) -> &mut Self {
        messages::parse(&mut self.out, name, sql, &[]);
        self
    }

    fn bind(&mut self, portal: &str, statement: &str) -> &mut Self {
        put_msg(&mut self.out, b'B', |b| {
            put_cstr(b, portal);
            put_cstr(b, statement);
            b.put_i16(0); // parameter formats
            b.put_i16(0); // parameters
            b.put_i16(0); // result formats: all text
        });
        self
    }

    fn describe(&mut self, kind: u8, name: &str) -> &mut Self {
        put_msg(&mut self.out, b'D', |b| {
            b.put_u8(kind);
            put_cstr(b, name);
        });
        self
    }

    fn execute(&mut self, portal: &str, max_rows: i32) -> &mut Self {
        put_msg(&mut self.out, b'E', |b| {
            put_cstr(b, portal);
            b.put_i32(max_rows);
        });
        self
    }

    fn close(&mut self, kind: u8, name: &str) -> &mut Self {
        put_msg(&mut self.out, b'C', |b| {
            b.put_u8(kind);
            put_cstr(b, name);
        });
        self
    }

    fn flush(&mut self) -> &mut Self {
        messages::empty_msg(&mut self.out, b'H');
        self
    }

    fn sync(&mut self) -> &mut Self {
        messages::empty_msg(&mut self.out, b'S');
        self
    }

    fn query(&mut self, sql: &str) -> &mut Self {
        messages::query(&mut self.out, sql);
        self
    }

    async fn send(&mut self) {
        self.s.write_all(&self.out).await.unwrap();
        self.out.clear();
    }

    /// Reads messages up to and including the first one tagged `last`, or an error.
    async fn read_until(&mut self, last: u8) -> Vec<(u8, Vec<u8>)> {
        let mut got = Vec::new();
        loop {
            while let Some(f) = shardgate::protocol::decode_frame(&mut self.inbuf, 1 << 30).unwrap()
            {
                let tag = f.tag;
                got.push((tag, f.body().to_vec()));
                if tag == last || (tag == b'E' && last != b'Z') {
                    return got;
                }
            }
            let read =
                tokio::time::timeout(Duration::from_secs(20), self.s.read_buf(&mut self.inbuf))
                    .await
                    .unwrap_or_else(|_| {
                        panic!("no {:?} within 20 s; got {:?}", last as char, tags(&got))
                    })
                    .unwrap();
            assert!(
                read > 0,
                "proxy closed the connection; got {:?}",
                tags(&got)
            );
        }
    }
}

fn tags(msgs: &[(u8, Vec<u8>)]) -> String {
    msgs.iter().map(|(t, _)| *t as char).collect()
}

/// The SQLSTATE of the first ErrorResponse among `msgs`.
fn error_code(msgs: &[(u8, Vec<u8>)]) -> Option<String> {
    let (_, body) = msgs.iter().find(|(t, _)| *t == b'E')?;
    let mut fields = body.split(|&b| b == 0);
    fields.find_map(|f| {
        f.strip_prefix(b"C")
            .map(|c| String::from_utf8_lossy(c).into_owned())
    })
}

/// Text values of every DataRow among `msgs`, per row.
fn rows(msgs: &[(u8, Vec<u8>)]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter(|(t, _)| *t == b'D')
        .map(|(_, body)| {
            let n = u16::from_be_bytes([body[0], body[1]]) as usize;
            let mut at = 2;
            (0..n)
                .map(|_| {
                    let len = i32::from_be_bytes(body[at..at + 4].try_into().unwrap());
                    at += 4;
                    if len < 0 {
                        return None;
                    }
                    let v = String::from_utf8_lossy(&body[at..at + len as usize]).into_owned();
                    at += len as usize;
                    Some(v)
                })
                .collect()
        })
        .collect()
}

async fn count_rows(table: &str) -> i64 {
    let cluster = shared_cluster();
    let su = superuser_client(cluster, cluster.primary.1, &cluster.database).await;
    su.query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

fn one_connection() -> ProxyOptions {
    ProxyOptions {
        pool_size: 1,
        acquire_timeout: "20s",
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_then_sync_commits_on_the_clients_own_connection() {
    let cluster = shared_cluster();
    let proxy = start_proxy(cluster, one_connection()).await;
    let table = unique_name("flush_sync");
    let setup = proxy.client().await;
    setup
        .batch_execute(&format!("CREATE TABLE {table} (id int)"))
        .await
        .unwrap();

    let mut a = Raw::connect(&proxy).await;
    a.parse("", &format!("INSERT INTO {table} VALUES (1)"))
        .bind("", "")
        .execute("", 0)
        .flush()
        .send()
        .await;
    let got = a.read_until(b'C').await;
    assert_eq!(
        tags(&got),
        "12C",
        "answers to Parse/Bind/Execute before Sync"
    );
    // The insert is not committed until the client's Sync reaches the server.
    assert_eq!(count_rows(&table).await, 0);
    a.sync().send().await;
    let got = a.read_until(b'Z').await;
    assert_eq!(got.last().map(|m| m.1.clone()), Some(b"I".to_vec()));
    assert_eq!(
        count_rows(&table).await,
        1,
        "the client's Sync must commit its insert on its own server connection"
    );
    // The one pooled connection is clean for the next client.
    let other = proxy.client().await;
    other
        .batch_execute(&format!("INSERT INTO {table} VALUES (2)"))
        .await
        .unwrap();
    assert_eq!(count_rows(&table).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_portal_read_with_flush_keeps_its_server_connection() {
    let cluster = shared_cluster();
    let proxy = start_proxy(cluster, one_connection()).await;
    let table = unique_name("flush_cursor");
    let setup = proxy.client().await;
    setup
        .batch_execute(&format!("CREATE TABLE {table} (id int)"))
        .await
        .unwrap();

    // pg-cursor outside a transaction: Parse/Bind/Describe/Execute(n)/Flush, and the
    // next Execute(n)/Flush later, Sync only at the end.
    let mut a = Raw::connect(&proxy).await;
    a.parse(
        "",
        "/* shardgate: primary */ SELECT g FROM generate_series(1, 10) g",
    )
    .bind("c1", "")
    .describe(b'P', "c1")
    .execute("c1", 3)
    .flush()
    .send()
    .await;
    let got = a.read_until(b's').await;
    assert_eq!(rows(&got).len(), 3);

    // Another client wants the only server connection meanwhile: it must wait for
    // A's Sync, not commit A's implicit transaction under A's feet.
    let dsn = proxy.dsn();
    let insert = format!("INSERT INTO {table} VALUES (1)");
    let mut b = tokio::spawn(async move {
        let client = common::proxy::connect(&dsn).await;
        client.batch_execute(&insert).await
    });
    let early = tokio::time::timeout(Duration::from_millis(500), &mut b).await;
    assert!(
        early.is_err(),
        "another client got the server connection while A's batch was open"
    );

    a.execute("c1", 3).flush().send().await;
    let got = a.read_until(b's').await;
    assert_eq!(error_code(&got), None, "portal lost: {got:?}");
    let values: Vec<_> = rows(&got).into_iter().map(|r| r[0].clone()).collect();
    assert_eq!(values, ["4", "5", "6"].map(|v| Some(v.to_owned())));
    a.close(b'P', "c1").sync().send().await;
    let got = a.read_until(b'Z').await;
    assert_eq!(tags(&got), "3Z");
    b.await.unwrap().unwrap();
    assert_eq!(count_rows(&table).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_batch_rolls_back_and_pools_nothing_dirty() {
    let cluster = shared_cluster();
    let proxy = start_proxy(cluster, one_connection()).await;
    let table = unique_name("flush_leave");
    let setup = proxy.client().await;
    setup
        .batch_execute(&format!("CREATE TABLE {table} (id int)"))
        .await
        .unwrap();
    let mut a = Raw::connect(&proxy).await;
    a.parse("", &format!("INSERT INTO {table} VALUES (1)"))
        .bind("", "")
        .execute("", 0)
        .flush()
        .send()
        .await;
    a.read_until(b'C').await;
    drop(a);
    // The next client gets a working connection, and A's insert never commits.
    let next = proxy.client().await;
    next.batch_execute(&format!("INSERT INTO {table} VALUES (2)"))
        .await
        .unwrap();
    let su = superuser_client(cluster, cluster.primary.1, &cluster.database).await;
    let ids: Vec<i32> = su
        .query(&format!("SELECT id FROM {table} ORDER BY id"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_idle_connections_are_never_handed_out() {
    // Terminates backends: a cluster of its own, so no other test's connection dies.
    let own = tokio::task::spawn_blocking(|| common::own_cluster(0))
        .await
        .unwrap();
    let cluster = &own;
    let proxy = start_proxy(
        cluster,
        ProxyOptions {
            pool_size: 4,
            ..Default::default()
        },
    )
    .await;
    let table = unique_name("dead_idle");
    let app_name = unique_name("deadpool");
    // Clients with their own settings: every checkout runs a SET first (the path that
    // used to pool the dead socket again), and some without.
    let mut clients = Vec::new();
    for i in 0..8 {
        let c = proxy.client().await;
        if i % 2 == 0 {
            c.batch_execute(&format!("SET application_name = '{app_name}'"))
                .await
                .unwrap();
        }
        clients.push(c);
    }
    clients[0]
        .batch_execute(&format!("CREATE TABLE {table} (id int)"))
        .await
        .unwrap();
    // Fill the pool: several connections busy at once, then idle.
    let warm = clients
        .iter()
        .map(|c| c.batch_execute("SELECT /* shardgate: primary */ pg_sleep(0.2)"));
    for r in futures_util::future::join_all(warm).await {
        r.unwrap();
    }
    let su = superuser_client(cluster, cluster.primary.1, "postgres").await;
    let killed: i64 = su
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = $1 AND datname = $2 AND application_name <> 'shardgate-monitor'",
            &[&cluster.app_user, &cluster.database],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        killed >= 2,
        "expected pooled app connections to terminate, got {killed}"
    );
    wait_for(
        "terminated backends to exit",
        Duration::from_secs(10),
        || {
            let su = &su;
            async move {
                let n: i64 = su
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND datname = $2 AND application_name <> 'shardgate-monitor'",
                        &[&cluster.app_user, &cluster.database],
                    )
                    .await
                    .unwrap()
                    .get(0);
                n == 0
            }
        },
    )
    .await;
    for (i, c) in clients.iter().enumerate() {
        c.batch_execute(&format!("INSERT INTO {table} VALUES ({i})"))
            .await
            .unwrap_or_else(|e| panic!("client {i} after the server closed idle connections: {e}"));
    }
    let db = superuser_client(cluster, cluster.primary.1, &cluster.database).await;
    let n: i64 = db
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 8);
}

/// Column names of the RowDescription among `msgs`.
fn columns(msgs: &[(u8, Vec<u8>)]) -> Vec<String> {
    let Some((_, body)) = msgs.iter().find(|(t, _)| *t == b'T') else {
        return Vec::new();
    };
    let n = u16::from_be_bytes([body[0], body[1]]) as usize;
    let mut at = 2;
    (0..n)
        .map(|_| {
            let end = at + body[at..].iter().position(|&b| b == 0).unwrap();
            let name = String::from_utf8_lossy(&body[at..end]).into_owned();
            at = end + 1 + 18;
            name
        })
        .collect()
}

impl Raw {
    /// A session whose statements all go to the primary (no replica pools involved).
    async fn on_primary(proxy: &TestProxy) -> Raw {
        let mut raw = Raw::connect(proxy).await;
        raw.query("SET shardgate.target = primary").send().await;
        raw.read_until(b'Z').await;
        raw
    }

    /// Parse + Describe S + Sync: the statement's column names.
    async fn prepare(&mut self, name: &str, sql: &str) -> Vec<String> {
        self.parse(name, sql)
            .describe(b'S', name)
            .sync()
            .send()
            .await;
        let got = self.read_until(b'Z').await;
        assert_eq!(error_code(&got), None, "prepare {sql}: {got:?}");
        columns(&got)
    }

    /// Bind + Execute + Sync of a prepared statement: its rows, or the error code.
    async fn run(&mut self, name: &str) -> Result<Vec<Vec<Option<String>>>, String> {
        self.bind("", name).execute("", 0).sync().send().await;
        let got = self.read_until(b'Z').await;
        match error_code(&got) {
            Some(code) => Err(code),
            None => Ok(rows(&got)),
        }
    }
}

async fn primary_client(proxy: &TestProxy) -> tokio_postgres::Client {
    let c = proxy.client().await;
    c.batch_execute("SET shardgate.target = primary")
        .await
        .unwrap();
    c
}

fn row(values: &[Option<&str>]) -> Vec<Option<String>> {
    values.iter().map(|v| v.map(str::to_owned)).collect()
}

/// `(a, b)` becomes `(b, a)`: the shape of `SELECT *` changes, its types do not.
async fn swap_columns(ddl: &tokio_postgres::Client, table: &str) {
    ddl.batch_execute(&format!(
        "ALTER TABLE {table} DROP COLUMN a; ALTER TABLE {table} ADD COLUMN a int; UPDATE {table} SET a = 1"
    ))
    .await
    .unwrap();
}

async fn table_ab(proxy: &TestProxy, prefix: &str) -> String {
    let table = unique_name(prefix);
    primary_client(proxy)
        .await
        .batch_execute(&format!(
            "CREATE TABLE {table} (a int, b int); INSERT INTO {table} VALUES (1, 2)"
        ))
        .await
        .unwrap();
    table
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_whose_shape_changed_fails_like_postgres_and_reprepares() {
    let cluster = shared_cluster();
    let proxy = start_proxy(cluster, one_connection()).await;
    let table = table_ab(&proxy, "stale_same").await;
    let mut x = Raw::on_primary(&proxy).await;
    let sql = format!("SELECT * FROM {table}");
    assert_eq!(x.prepare("s1", &sql).await, ["a", "b"]);
    assert_eq!(x.run("s1").await, Ok(vec![row(&[Some("1"), Some("2")])]));
    // DDL on a direct connection: the proxy does not see it.
    let su = superuser_client(cluster, cluster.primary.1, &cluster.database).await;
    swap_columns(&su, &table).await;
    // The connection holds the statement: PostgreSQL itself refuses it.
    assert_eq!(x.run("s1").await, Err("0A000".into()));
    // As on a direct connection, Close + Parse of the same text re-prepares it.
    x.close(b'S', "s1").sync().send().await;
    x.read_until(b'Z').await;
    assert_eq!(x.prepare("s1", &sql).await, ["b", "a"]);
    assert_eq!(x.run("s1").await, Ok(vec![row(&[Some("2"), Some("1")])]));
    // A new client preparing the text now gets the new statement, with no error.
    let mut w = Raw::on_primary(&proxy).await;
    assert_eq!(w.prepare("w1", &sql).await, ["b", "a"]);
    assert_eq!(w.run("w1").await, Ok(vec![row(&[Some("2"), Some("1")])]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_recreated_on_another_connection_never_returns_a_new_shape() {
    let cluster = shared_cluster();
    let proxy = start_proxy(
        cluster,
        ProxyOptions {
            pool_size: 2,
            acquire_timeout: "20s",
            ..Default::default()
        },
    )
    .await;
    let table = table_ab(&proxy, "stale_other").await;
    let sql = format!("SELECT * FROM {table}");
    // Y holds one connection while X prepares on the other; Y lets go last, so the
    // pool hands out Y's connection (without X's statement) next.
    let y = primary_client(&proxy).await;
    y.batch_execute("BEGIN").await.unwrap();
    y.batch_execute("SELECT 1").await.unwrap();
    let mut x = Raw::on_primary(&proxy).await;
    assert_eq!(x.prepare("s1", &sql).await, ["a", "b"]);
    y.batch_execute("COMMIT").await.unwrap();
    // The DDL goes through the proxy on Y's connection, which becomes idle again.
    swap_columns(&y, &table).await;
    // X binds its statement on a connection that must re-create it: the rows would
    // come as (b, a) under X's (a, b) description. PostgreSQL says 0A000; so do we.
    assert_eq!(x.run("s1").await, Err("0A000".into()));
    assert_eq!(x.run("s1").await, Err("0A000".into()), "still stale");
    // Re-prepared, it works on whichever connection it lands.
    x.close(b'S', "s1").sync().send().await;
    x.read_until(b'Z').await;
    assert_eq!(x.prepare("s1", &sql).await, ["b", "a"]);
    for _ in 0..3 {
        assert_eq!(x.run("s1").await, Ok(vec![row(&[Some("2"), Some("1")])]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_statement_fails_the_transaction_on_the_server_too() {
    let cluster = shared_cluster();
    let proxy = start_proxy(cluster, one_connection()).await;
    let table = table_ab(&proxy, "stale_txn").await;
    let mut x = Raw::on_primary(&proxy).await;
    let sql = format!("SELECT * FROM {table}");
    x.prepare("s1", &sql).await;
    let su = superuser_client(cluster, cluster.primary.1, &cluster.database).await;
    swap_columns(&su, &table).await;
    x.run("s1").await.unwrap_err(); // learns it is stale (server's 0A000)
                                    // In one batch: an insert, then the stale statement. As directly, the batch's
                                    // implicit transaction fails and the insert is not committed.
    x.parse("", &format!("INSERT INTO {table} (b) VALUES (99)"))
        .bind("", "")
        .execute("", 0)
        .bind("", "s1")
        .execute("", 0)
        .sync()
        .send()
        .await;
    let got = x.read_until(b'Z').await;
    assert_eq!(error_code(&got), Some("0A000".into()));
    let su_rows: i64 = su
        .query_one(&format!("SELECT count(*) FROM {table} WHERE b = 99"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(su_rows, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listening_client_keeps_its_connection_and_gets_notifications() {
    let cluster = shared_cluster();
    let proxy = start_proxy(
        cluster,
        ProxyOptions {
            pool_size: 1,
            acquire_timeout: "1s",
            ..Default::default()
        },
    )
    .await;
    let channel = unique_name("chan");
    let mut l = Raw::connect(&proxy).await;
    l.query(&format!("LISTEN {channel}")).send().await;
    l.read_until(b'Z').await;
    let su = superuser_client(cluster, cluster.primary.1, &cluster.database).await;
    su.batch_execute(&format!("NOTIFY {channel}, 'one'"))
        .await
        .unwrap();
    let got = l.read_until(b'A').await;
    let (_, body) = got.last().unwrap();
    assert!(
        body.windows(3).any(|w| w == b"one"),
        "notification payload: {body:?}"
    );
    // The only primary connection is the listener's: another client waits for it.
    let other = primary_client(&proxy).await;
    let err = other.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("53300"));
    // Between its own transactions too, the listener keeps its server connection.
    l.query("SELECT 1").send().await;
    l.read_until(b'Z').await;
    su.batch_execute(&format!("NOTIFY {channel}, 'two'"))
        .await
        .unwrap();
    let got = l.read_until(b'A').await;
    assert!(got.last().unwrap().1.windows(3).any(|w| w == b"two"));
    // UNLISTEN * gives it back to the pool.
    l.query("UNLISTEN *").send().await;
    l.read_until(b'Z').await;
    let after = primary_client(&proxy).await;
    after.batch_execute("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_with_hold_cursor_survives_its_transaction() {
    let cluster = shared_cluster();
    let proxy = start_proxy(
        cluster,
        ProxyOptions {
            pool_size: 2,
            ..Default::default()
        },
    )
    .await;
    let c = proxy.client().await;
    c.batch_execute("DECLARE held CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 6) g")
        .await
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        // Other clients use the pool in between.
        let others = (0..4).map(|_| async {
            let o = primary_client(&proxy).await;
            o.batch_execute("SELECT 1").await.unwrap();
        });
        futures_util::future::join_all(others).await;
        let rows = c.simple_query("FETCH 2 FROM held").await.unwrap();
        for m in rows {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                seen.push(r.get(0).unwrap().to_owned());
            }
        }
    }
    assert_eq!(seen, ["1", "2", "3", "4", "5", "6"]);
    c.batch_execute("CLOSE held").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_characteristics_read_only_follows_the_client() {
    let cluster = shared_cluster();
    let proxy = start_proxy(
        cluster,
        ProxyOptions {
            pool_size: 2,
            ..Default::default()
        },
    )
    .await;
    let table = unique_name("readonly");
    let c = proxy.client().await;
    c.batch_execute(&format!("CREATE TABLE {table} (id int)"))
        .await
        .unwrap();
    c.batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        .await
        .unwrap();
    for i in 0..4 {
        // Other clients churn the pool, so the next insert runs on another connection.
        let others = (0..3).map(|_| async {
            let o = primary_client(&proxy).await;
            o.batch_execute("SELECT pg_sleep(0.01)").await.unwrap();
        });
        futures_util::future::join_all(others).await;
        let err = c
            .batch_execute(&format!("INSERT INTO {table} VALUES ({i})"))
            .await
            .unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("25006"), "round {i}");
    }
    c.batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE")
        .await
        .unwrap();
    c.batch_execute(&format!("INSERT INTO {table} VALUES (1)"))
        .await
        .unwrap();
}

/// tokio-postgres returns a statement's error at its ErrorResponse and may send the
/// next query before the ReadyForQuery has arrived: the SET behind the failed statement
/// must still become the session's setting (it used to be counted in the failed
/// statement's transaction and dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_sent_behind_a_failing_statement_is_kept() {
    let cluster = shared_cluster();
    let proxy = start_proxy(
        cluster,
        ProxyOptions {
            pool_size: 1,
            ..Default::default()
        },
    )
    .await;
    let name = unique_name("behind");
    let mut a = Raw::connect(&proxy).await;
    a.query("SELECT 1/0")
        .query(&format!("SET application_name = '{name}'"));
    a.send().await;
    let first = a.read_until(b'Z').await;
    assert_eq!(error_code(&first).as_deref(), Some("22012"));
    let second = a.read_until(b'Z').await;
    assert_eq!(error_code(&second), None, "{}", tags(&second));
    // Another client in between: the one server connection serves it with its own
    // settings, so the next statement must have the SET replayed.
    let other = proxy.client().await;
    other.batch_execute("SELECT 1").await.unwrap();
    a.query("SHOW application_name");
    a.send().await;
    let shown = a.read_until(b'Z').await;
    assert_eq!(rows(&shown), [row(&[Some(&name)])]);
    // The same in the extended protocol: two batches in one write.
    let second_name = unique_name("behind_ext");
    a.parse("", "SELECT 1/0").bind("", "").execute("", 0).sync();
    a.parse("", &format!("SET application_name = '{second_name}'"))
        .bind("", "")
        .execute("", 0)
        .sync();
    a.send().await;
    let first = a.read_until(b'Z').await;
    assert_eq!(error_code(&first).as_deref(), Some("22012"));
    let second = a.read_until(b'Z').await;
    assert_eq!(error_code(&second), None, "{}", tags(&second));
    other.batch_execute("SELECT 1").await.unwrap();
    a.query("SHOW application_name");
    a.send().await;
    let shown = a.read_until(b'Z').await;
    assert_eq!(rows(&shown), [row(&[Some(&second_name)])]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_streamed_without_waiting_leaves_the_session_in_step() {
    let cluster = shared_cluster();
    let proxy = start_proxy(
        cluster,
        ProxyOptions {
            pool_size: 1,
            acquire_timeout: "3s",
            ..Default::default()
        },
    )
    .await;
    let table = unique_name("eager_copy");
    primary_client(&proxy)
        .await
        .batch_execute(&format!("CREATE TABLE {table} (id int)"))
        .await
        .unwrap();
    // asyncpg's copy_records_to_table: the COPY, its data and CopyDone in one write,
    // before the server's CopyInResponse.
    let mut a = Raw::connect(&proxy).await;
    a.query(&format!("COPY {table} FROM STDIN"));
    for i in 0..100 {
        put_msg(&mut a.out, b'd', |b| {
            b.put_slice(format!("{i}\n").as_bytes())
        });
    }
    messages::empty_msg(&mut a.out, b'c');
    a.send().await;
    let got = a.read_until(b'Z').await;
    assert_eq!(error_code(&got), None, "{got:?}");
    // Then an extended-protocol statement: its Sync must be the server's again.
    a.parse("", &format!("INSERT INTO {table} VALUES (1000)"))
        .bind("", "")
        .execute("", 0)
        .sync()
        .send()
        .await;
    let got = a.read_until(b'Z').await;
    assert_eq!(tags(&got), "12CZ");
    // ... and the one server connection went back to the pool.
    let other = primary_client(&proxy).await;
    let n: i64 = other
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_a_flushed_describe_on_a_replica_goes_to_the_primary() {
    let cluster = shared_cluster();
    let proxy = start_proxy(cluster, ProxyOptions::default()).await;
    let table = unique_name("flush_then_write");
    proxy
        .client()
        .await
        .batch_execute(&format!("CREATE TABLE {table} (id int)"))
        .await
        .unwrap();
    // Both replicas serve reads and have the table.
    wait_for(
        "replicas to have the table",
        Duration::from_secs(20),
        || {
            let table = table.clone();
            let fresh = proxy.handle.frontend.default_fresh().load_full();
            async move {
                if fresh.eligible_replicas().count() != cluster.replicas.len() {
                    return false;
                }
                for (_, port) in &cluster.replicas {
                    let r = superuser_client(cluster, *port, &cluster.database).await;
                    let found = r
                        .query_one(
                            "SELECT count(*) FROM pg_class WHERE relname = $1",
                            &[&table],
                        )
                        .await
                        .map(|row| row.get::<_, i64>(0) == 1)
                        .unwrap_or(false);
                    if !found {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await;
    // asyncpg's copy_records_to_table: it describes the table (a read, held with
    // Flush), then runs a write as a simple Query without a Sync in between.
    let mut a = Raw::connect(&proxy).await;
    a.parse("", &format!("SELECT * FROM {table} LIMIT 1"))
        .describe(b'S', "")
        .flush()
        .send()
        .await;
    let got = a.read_until(b'T').await;
    assert_eq!(error_code(&got), None, "{got:?}");
    a.query(&format!("INSERT INTO {table} VALUES (1)"))
        .send()
        .await;
    let got = a.read_until(b'Z').await;
    assert_eq!(
        error_code(&got),
        None,
        "the write went to a replica: {got:?}"
    );
    assert_eq!(count_rows(&table).await, 1);
}
