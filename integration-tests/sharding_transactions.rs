//! Explicit transactions over a sharded map, against two real shards: a transaction
//! writes on one shard but reads from any, each other shard it reads from inside the
//! transaction (a keyless read, or a keyed read of another shard) answers from a
//! transaction held there until the client's ends: one snapshot per shard for
//! REPEATABLE READ, a failed read aborts the whole transaction, nothing stays open on
//! a server afterwards. And a driver's extended-protocol BEGIN (pgjdbc,
//! tokio-postgres `execute("BEGIN")`) waits, like a simple-query one, for the first
//! statement to say which shard the transaction runs on.

mod common;

use std::time::Duration;

use common::sharded::{on_shard, setup, shard_of};
use common::wait_for;
use tokio_postgres::{Client, SimpleQueryMessage};

async fn scalar(c: &Client, sql: &str) -> Option<String> {
    let messages = c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_owned)),
        _ => None,
    })?
}

async fn count(c: &Client, sql: &str) -> i64 {
    scalar(c, sql)
        .await
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{sql}: no count"))
}

/// Two user ids: the first on shard s0, the second on s1.
fn ids_on_both_shards() -> (i64, i64) {
    let a = (1..1000).find(|&i| shard_of(i) == 0).unwrap_or(0);
    let b = (1..1000).find(|&i| shard_of(i) == 1).unwrap_or(0);
    (a, b)
}

/// `users` with ids 1..=n, on both shards.
async fn users(c: &Client, n: i64) {
    c.batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, name text)")
        .await
        .unwrap();
    let values: Vec<String> = (1..=n).map(|i| format!("({i}, 'u{i}')")).collect();
    c.batch_execute(&format!(
        "INSERT INTO users (id, name) VALUES {}",
        values.join(", ")
    ))
    .await
    .unwrap();
}

/// Waits until no connection of database `db` is inside a transaction on either
/// shard: the proxy ended every connection the client's transactions held.
async fn no_open_transactions(db: &str) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' \
         AND state LIKE 'idle in transaction%'"
    );
    let shards = [on_shard(0, db).await, on_shard(1, db).await];
    wait_for(
        "no transaction left open on the shards",
        Duration::from_secs(10),
        || {
            let shards = &shards;
            let sql = &sql;
            async move {
                let mut open = 0;
                for s in shards {
                    let n: i64 = s.query_one(sql.as_str(), &[]).await.unwrap().get(0);
                    open += n;
                }
                open == 0
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeatable_read_transaction_reads_each_shard_from_one_snapshot() {
    let (proxy, db) = setup().await;
    let writer = proxy.client().await;
    users(&writer, 100).await;
    let (_, b) = ids_on_both_shards();
    let reader = proxy.client().await;
    reader
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    assert_eq!(count(&reader, "SELECT count(*) FROM users").await, 100);
    // Rows committed on both shards after the transaction's first read.
    let values: Vec<String> = (1001..=1050).map(|i| format!("({i}, 'new')")).collect();
    writer
        .batch_execute(&format!(
            "INSERT INTO users (id, name) VALUES {}",
            values.join(", ")
        ))
        .await
        .unwrap();
    writer
        .batch_execute(&format!("UPDATE users SET name = 'changed' WHERE id = {b}"))
        .await
        .unwrap();
    // Every shard answers from the snapshot the transaction took there.
    assert_eq!(count(&reader, "SELECT count(*) FROM users").await, 100);
    assert_eq!(
        count(&reader, "SELECT count(*) FROM users WHERE id > 1000").await,
        0
    );
    assert_eq!(
        scalar(&reader, &format!("SELECT name FROM users WHERE id = {b}")).await,
        Some(format!("u{b}"))
    );
    reader.batch_execute("COMMIT").await.unwrap();
    // (The writer reads its own writes; the reader's next read may go to a replica.)
    assert_eq!(count(&writer, "SELECT count(*) FROM users").await, 150);
    no_open_transactions(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_reads_keys_of_both_shards_and_writes_on_one() {
    let (proxy, db) = setup().await;
    let mut c = proxy.client().await;
    users(&c, 100).await;
    let (a, b) = ids_on_both_shards();
    // Simple protocol: the first keyed statement puts the transaction on s0.
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute(&format!("UPDATE users SET name = 'mine' WHERE id = {a}"))
        .await
        .unwrap();
    let read = |id: i64| format!("SELECT name FROM users WHERE id = {id}");
    assert_eq!(scalar(&c, &read(b)).await, Some(format!("u{b}")));
    assert_eq!(scalar(&c, &read(a)).await, Some("mine".to_owned()));
    assert_eq!(scalar(&c, &read(b)).await, Some(format!("u{b}")));
    // A write on the second shard is refused, and fails the transaction as one
    // server's error would.
    let err = c
        .batch_execute(&format!("UPDATE users SET name = 'x' WHERE id = {b}"))
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("0A000"), "{err}");
    let err = c.batch_execute(&read(b)).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("25P02"), "{err}");
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(scalar(&c, &read(a)).await, Some(format!("u{a}")));

    // Extended protocol (a driver's transaction): the first statement reads s1, the
    // second reads s0, the write goes to s1.
    let t = c.transaction().await.unwrap();
    let name = |row: tokio_postgres::Row| row.get::<_, String>(0);
    let select = "SELECT name FROM users WHERE id = $1";
    assert_eq!(
        name(t.query_one(select, &[&b]).await.unwrap()),
        format!("u{b}")
    );
    assert_eq!(
        name(t.query_one(select, &[&a]).await.unwrap()),
        format!("u{a}")
    );
    t.execute("UPDATE users SET name = 'ext' WHERE id = $1", &[&b])
        .await
        .unwrap();
    assert_eq!(name(t.query_one(select, &[&b]).await.unwrap()), "ext");
    let err = t
        .execute("UPDATE users SET name = 'x' WHERE id = $1", &[&a])
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("0A000"), "{err}");
    t.rollback().await.unwrap();

    let t = c.transaction().await.unwrap();
    t.execute("UPDATE users SET name = 'ext' WHERE id = $1", &[&b])
        .await
        .unwrap();
    assert_eq!(
        name(t.query_one(select, &[&a]).await.unwrap()),
        format!("u{a}")
    );
    t.commit().await.unwrap();
    let s1 = on_shard(1, &db).await;
    let on_s1: String = s1
        .query_one("SELECT name FROM users WHERE id = $1", &[&b])
        .await
        .unwrap()
        .get(0);
    assert_eq!(on_s1, "ext");
    no_open_transactions(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_read_on_another_shard_aborts_the_transaction() {
    let (proxy, db) = setup().await;
    let c = proxy.client().await;
    users(&c, 100).await;
    let (a, b) = ids_on_both_shards();
    // New ids on s0.
    let mut fresh = (5000..).filter(|&i| shard_of(i) == 0);
    let mut insert = || {
        let id = fresh.next().unwrap_or(0);
        format!("INSERT INTO users (id, name) VALUES ({id}, 'gone')")
    };
    // A keyed read on the other shard fails.
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute(&insert()).await.unwrap();
    let err = c
        .batch_execute(&format!("SELECT 10 / (id - {b}) FROM users WHERE id = {b}"))
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22012"), "{err}");
    let err = c
        .batch_execute(&format!("SELECT name FROM users WHERE id = {a}"))
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("25P02"), "{err}");
    c.batch_execute("COMMIT").await.unwrap();
    // A keyless read fails on one shard only, before the transaction has a shard.
    c.batch_execute("BEGIN").await.unwrap();
    let err = c
        .batch_execute(&format!("SELECT 10 / (id - {b}) FROM users"))
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22012"), "{err}");
    let err = c.batch_execute(&insert()).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("25P02"), "{err}");
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        count(&c, "SELECT count(*) FROM users WHERE name = 'gone'").await,
        0
    );
    no_open_transactions(&db).await;
}

/// tokio-postgres runs `execute("BEGIN")` through the extended protocol (Parse,
/// Describe, Sync, then Bind, Execute, Sync), as pgjdbc does every BEGIN: the
/// transaction must still run on the shard of its first statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extended_protocol_begin_runs_where_the_first_statement_belongs() {
    let (proxy, db) = setup().await;
    let c = proxy.client().await;
    users(&c, 10).await;
    // New ids on s1 (not the default shard).
    let mut fresh = (10_000..).filter(|&i| shard_of(i) == 1);
    let (first, second) = (fresh.next().unwrap_or(0), fresh.next().unwrap_or(0));
    c.execute("BEGIN", &[]).await.unwrap();
    c.execute(
        "INSERT INTO users (id, name) VALUES ($1, 'ext-begin')",
        &[&first],
    )
    .await
    .unwrap();
    c.execute("COMMIT", &[]).await.unwrap();
    // The same pipelined: BEGIN, the write and COMMIT sent before any answer.
    let begin = c.prepare("BEGIN").await.unwrap();
    let insert = c
        .prepare("INSERT INTO users (id, name) VALUES ($1, 'ext-begin')")
        .await
        .unwrap();
    let commit = c.prepare("COMMIT").await.unwrap();
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&second];
    let (_, inserted, _) = tokio::try_join!(
        c.execute(&begin, &[]),
        c.execute(&insert, &params),
        c.execute(&commit, &[]),
    )
    .unwrap();
    assert_eq!(inserted, 1);
    let s1 = on_shard(1, &db).await;
    let n: i64 = s1
        .query_one("SELECT count(*) FROM users WHERE name = 'ext-begin'", &[])
        .await
        .unwrap()
        .get(0);
    let s0 = on_shard(0, &db).await;
    let elsewhere: i64 = s0
        .query_one("SELECT count(*) FROM users WHERE name = 'ext-begin'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!((n, elsewhere), (2, 0), "rows on s1 and s0");
    no_open_transactions(&db).await;
}

/// asyncpg (and other drivers that prepare with Flush) send Parse/Describe/Flush, wait
/// for the description, then Bind/Execute/Sync: the connection that described the
/// statement is held but ran nothing, so a statement over both shards is not "inside
/// a transaction" and runs (it used to be refused with 0A000 when that connection was
/// the primary). Both with the Describe on a replica (auto) and on the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_prepared_with_flush_runs_over_both_shards() {
    use bytes::{BufMut, BytesMut};
    use shardgate::protocol::messages::{self, put_msg};
    use tokio::io::AsyncWriteExt;

    let (proxy, _db) = setup().await;
    let c = proxy.client().await;
    users(&c, 40).await;
    c.batch_execute("CREATE TABLE countries (code text PRIMARY KEY, name text)")
        .await
        .unwrap();
    // A new session reads from replicas: wait until they replayed the setup.
    for (shard, cluster) in common::shard_clusters().iter().enumerate() {
        let lsn: String = on_shard(shard, &_db)
            .await
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        for (_, port) in &cluster.replicas {
            let replica = common::superuser_client(cluster, *port, &_db).await;
            wait_for(
                "the replica replays the setup",
                Duration::from_secs(20),
                || {
                    let (replica, lsn) = (&replica, &lsn);
                    async move {
                        replica
                            .query_one(
                                "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                                &[lsn],
                            )
                            .await
                            .is_ok_and(|r| r.get::<_, bool>(0))
                    }
                },
            )
            .await;
        }
    }
    for mode in ["auto", "primary"] {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        common::raw::login(&mut s, &proxy).await;
        let mut inbuf = BytesMut::new();
        let mut out = BytesMut::new();
        messages::query(&mut out, &format!("SET shardgate.target = {mode}"));
        s.write_all(&out).await.unwrap();
        read_until_any(&mut s, &mut inbuf, b"Z").await;
        let statements = [
            // A simple query first: the connection it ran on is the next one borrowed.
            ("SELECT 1", "Q"),
            ("SELECT count(*) FROM users", "X"),
            ("SELECT count(*) FROM users", "Q"),
            ("INSERT INTO countries (code, name) VALUES ('x1', 'one') ON CONFLICT (code) DO UPDATE SET name = 'again'", "X"),
            ("SELECT name FROM users ORDER BY id DESC LIMIT 1", "Q"),
            // Keyed, one row on each shard: the describing connection's shard or not.
            ("SELECT name FROM users WHERE id = $1", "K0"),
            ("SELECT name FROM users WHERE id = $1", "K1"),
        ];
        for (sql, how) in statements {
            // The prepare, as asyncpg does it.
            out.clear();
            messages::parse(&mut out, "", sql, &[]);
            put_msg(&mut out, b'D', |b| {
                b.put_u8(b'S');
                b.put_u8(0);
            });
            messages::empty_msg(&mut out, b'H');
            s.write_all(&out).await.unwrap();
            out.clear();
            // ParameterDescription, then RowDescription or NoData.
            let described = read_until_any(&mut s, &mut inbuf, b"TnE").await;
            assert!(
                !described.iter().any(|(t, _)| *t == b'E'),
                "{mode} {sql}: describe failed: {described:?}"
            );
            if how == "Q" {
                // A simple query next, with the described statement left unused.
                messages::query(&mut out, sql);
            } else {
                let key = match how {
                    "K0" => Some(ids_on_both_shards().0),
                    "K1" => Some(ids_on_both_shards().1),
                    _ => None,
                };
                put_msg(&mut out, b'B', |b| {
                    b.put_u8(0); // portal
                    b.put_u8(0); // statement
                    b.put_i16(0); // parameter formats: text
                    match key {
                        Some(id) => {
                            let text = id.to_string();
                            b.put_i16(1);
                            b.put_i32(text.len() as i32);
                            b.put_slice(text.as_bytes());
                        }
                        None => b.put_i16(0),
                    }
                    b.put_i16(0);
                });
                put_msg(&mut out, b'E', |b| {
                    b.put_u8(0);
                    b.put_i32(0);
                });
                messages::empty_msg(&mut out, b'S');
            }
            s.write_all(&out).await.unwrap();
            let got = read_until_any(&mut s, &mut inbuf, b"Z").await;
            let errors = errors(&got);
            assert!(errors.is_empty(), "{mode} {sql} ({how}): {errors:?}");
            if let Some(id) = how.strip_prefix('K').map(|_| match how {
                "K0" => ids_on_both_shards().0,
                _ => ids_on_both_shards().1,
            }) {
                let rows: Vec<&Vec<u8>> = got
                    .iter()
                    .filter(|(t, _)| *t == b'D')
                    .map(|(_, b)| b)
                    .collect();
                let want = format!("u{id}");
                assert!(
                    rows.len() == 1 && rows[0].ends_with(want.as_bytes()),
                    "{mode} {sql} ({how}, id {id}): rows {rows:?}, all {got:?}"
                );
            }
            if sql.starts_with("SELECT count") {
                let row = got.iter().find(|(t, _)| *t == b'D').expect("a row");
                assert!(row.1.ends_with(b"40"), "{mode} {sql}: {:?}", row.1);
            }
            assert_idle(&got);
        }
    }
    for shard in 0..2 {
        let name: String = on_shard(shard, &_db)
            .await
            .query_one("SELECT name FROM countries WHERE code = 'x1'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(name, "again", "shard {shard}");
    }
    no_open_transactions(&_db).await;
}

/// A count on each shard's primary directly.
async fn per_shard(db: &str, sql: &str) -> [i64; 2] {
    [
        count(&on_shard(0, db).await, sql).await,
        count(&on_shard(1, db).await, sql).await,
    ]
}

/// The ErrorResponses among `msgs`, their fields as text.
fn errors(msgs: &[(u8, Vec<u8>)]) -> Vec<String> {
    msgs.iter()
        .filter(|(t, _)| *t == b'E')
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        .collect()
}

/// The answer ends with ReadyForQuery 'I': no transaction is left open.
fn assert_idle(msgs: &[(u8, Vec<u8>)]) {
    assert_eq!(
        msgs.last().map(|(_, b)| b.as_slice()),
        Some(&b"I"[..]),
        "{msgs:?}"
    );
}

/// Reads messages until one whose tag is in `tags` (inclusive).
async fn read_until_any(
    s: &mut tokio::net::TcpStream,
    inbuf: &mut bytes::BytesMut,
    tags: &[u8],
) -> Vec<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    loop {
        while let Some(f) = shardgate::protocol::decode_frame(inbuf, 1 << 30).unwrap() {
            let done = tags.contains(&f.tag);
            out.push((f.tag, f.body().to_vec()));
            if done {
                return out;
            }
        }
        let read = tokio::time::timeout(Duration::from_secs(20), s.read_buf(inbuf))
            .await
            .unwrap_or_else(|_| panic!("nothing within 20 s after {out:?}"))
            .unwrap();
        assert!(read > 0, "closed after {out:?}");
    }
}

/// Bind/Execute of one statement row after row and a single Sync, as asyncpg's and
/// psycopg 3's `executemany` and pgjdbc's `executeBatch` send them outside a
/// transaction: one implicit transaction whose rows belong to both shards. Each row
/// lands on its shard; when one fails, none of the batch stays on either shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_rows_for_both_shards_runs_as_one() {
    use bytes::{BufMut, BytesMut};
    use shardgate::protocol::messages::{self, put_msg};
    use tokio::io::AsyncWriteExt;

    let (proxy, db) = setup().await;
    let c = proxy.client().await;
    users(&c, 4).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    common::raw::login(&mut s, &proxy).await;
    let mut inbuf = BytesMut::new();
    let mut out = BytesMut::new();
    let batch = |out: &mut BytesMut, rows: &[(i64, String)]| {
        messages::parse(
            out,
            "ins",
            "INSERT INTO users (id, name) VALUES ($1, $2)",
            &[],
        );
        for (id, name) in rows {
            put_msg(out, b'B', |b| {
                b.put_u8(0);
                b.put_slice(b"ins\0");
                b.put_i16(0);
                b.put_i16(2);
                for value in [id.to_string(), name.clone()] {
                    b.put_i32(value.len() as i32);
                    b.put_slice(value.as_bytes());
                }
                b.put_i16(0);
            });
            put_msg(out, b'E', |b| {
                b.put_u8(0);
                b.put_i32(0);
            });
        }
        messages::empty_msg(out, b'S');
        put_msg(out, b'C', |b| {
            b.put_u8(b'S');
            b.put_slice(b"ins\0");
        });
        messages::empty_msg(out, b'S');
    };
    // Alternating shards, coming back to each more than once.
    let mut on: [Vec<i64>; 2] =
        [0, 1].map(|shard| (100..).filter(|&i| shard_of(i) == shard).take(16).collect());
    let ids: Vec<i64> = (0..8).map(|i| on[i % 2].pop().unwrap_or(0)).collect();
    let named = |ids: &[i64], tag: &str| -> Vec<(i64, String)> {
        ids.iter().map(|id| (*id, format!("{tag}{id}"))).collect()
    };
    batch(&mut out, &named(&ids, "ok"));
    s.write_all(&out).await.unwrap();
    let got = read_until_any(&mut s, &mut inbuf, b"Z").await;
    let completes: Vec<String> = got
        .iter()
        .filter(|(t, _)| matches!(*t, b'C' | b'E'))
        .map(|(t, b)| format!("{}{}", *t as char, String::from_utf8_lossy(b)))
        .collect();
    assert_eq!(completes, vec!["CINSERT 0 1\0"; 8], "{got:?}");
    assert_idle(&got);
    read_until_any(&mut s, &mut inbuf, b"Z").await;
    assert_eq!(
        per_shard(&db, "SELECT count(*) FROM users WHERE name LIKE 'ok%'").await,
        [4, 4],
        "rows per shard"
    );
    // The same with the last row failing (its id exists): nothing of it stays.
    let mut failing: Vec<i64> = (0..7).map(|i| on[i % 2].pop().unwrap_or(0)).collect();
    failing.push(ids[1]);
    out.clear();
    batch(&mut out, &named(&failing, "bad"));
    s.write_all(&out).await.unwrap();
    let got = read_until_any(&mut s, &mut inbuf, b"Z").await;
    let codes = errors(&got);
    assert!(
        codes.len() == 1 && codes[0].contains("C23505"),
        "one unique violation: {got:?}"
    );
    assert_idle(&got);
    read_until_any(&mut s, &mut inbuf, b"Z").await;
    assert_eq!(
        per_shard(&db, "SELECT count(*) FROM users WHERE name LIKE 'bad%'").await,
        [0, 0],
        "no shard keeps anything of the failed batch"
    );
    // A part that fails only at its commit (a deferred unique constraint on the
    // first shard, whose connection is parked when the rows go on on the second): the
    // client gets that error and the second shard's part is rolled back too.
    c.batch_execute(
        "ALTER TABLE users ADD CONSTRAINT users_name_once UNIQUE (name) DEFERRABLE INITIALLY DEFERRED",
    )
    .await
    .unwrap();
    let mut first: Vec<(i64, String)> = Vec::new();
    for _ in 0..2 {
        first.push((on[0].pop().unwrap_or(0), "twice".to_owned()));
    }
    for _ in 0..2 {
        let id = on[1].pop().unwrap_or(0);
        first.push((id, format!("late{id}")));
    }
    out.clear();
    batch(&mut out, &first);
    s.write_all(&out).await.unwrap();
    let got = read_until_any(&mut s, &mut inbuf, b"Z").await;
    let errors = errors(&got);
    assert!(
        errors.len() == 1 && errors[0].contains("C23505") && errors[0].contains("users_name_once"),
        "the deferred violation: {errors:?}"
    );
    assert_idle(&got);
    read_until_any(&mut s, &mut inbuf, b"Z").await;
    assert_eq!(
        per_shard(
            &db,
            "SELECT count(*) FROM users WHERE name = 'twice' OR name LIKE 'late%'"
        )
        .await,
        [0, 0],
        "no shard keeps anything of the batch failing at commit"
    );
    // The session goes on, and nothing is left open on the servers.
    assert_eq!(count(&c, "SELECT count(*) FROM users").await, 12);
    no_open_transactions(&db).await;
}
