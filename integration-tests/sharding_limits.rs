//! The limits of cross-shard reads (issue 7), against real shards: a sorted read of a
//! million rows streams through the proxy in bounded memory (the proxy runs as its own
//! process so its RSS can be measured), an error on one shard ends the statement with
//! exactly one ErrorResponse and leaves no server busy, a shard dying mid-stream fails
//! the statement without taking the session down, and a satisfied LIMIT cancels the
//! legs still running.

mod common;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, OnceCell};

use common::proxy::{shard_entry, start_proxy_with_map, ProxyOptions, TestProxy};
use common::{create_database, own_cluster, shard_clusters, superuser_client, unique_name};
use common::{wait_for, TestCluster};
use shardgate::protocol::messages::{self, tag};
use shardgate::protocol::{decode_frame, Frame};

/// Rows of the shared table `t` (ids 1..=BIG_ROWS, about half on each shard).
const BIG_ROWS: i64 = 1_000_000;
/// Bytes of filler per row: ~120 MB on the wire for BIG_ROWS, twice the RSS bound, so a
/// proxy that buffered the result could not stay under it.
const PAD: usize = 100;
/// Issue 7: peak RSS of the proxy while it streams BIG_ROWS sorted rows.
const RSS_LIMIT_KB: u64 = 64 * 1024;

/// Buckets 0-511 on s0, 512-1023 on s1 (DESIGN.md 4).
const BUCKETS: [(u32, u32); 2] = [(0, 511), (512, 1023)];

fn map(clusters: &[TestCluster], database: &str) -> String {
    format!(
        "version: 1
database: {database}
shards:
  s0: {}
  s1: {}
keyspaces:
  users:
    type: hash
    buckets: 1024
    map:
      - {{ buckets: 0-511, shard: s0 }}
      - {{ buckets: 512-1023, shard: s1 }}
tables:
  t: {{ column: id, keyspace: users }}
default_shard: s0
",
        shard_entry(&clusters[0]),
        shard_entry(&clusters[1])
    )
}

fn shard_of(id: i64) -> usize {
    let bucket = shardgate::shard_map::hash::bucket(
        shardgate::shard_map::hash::hashint8extended(id, 0),
        1024,
    );
    usize::from(bucket >= 512)
}

async fn proxy_for(clusters: &[TestCluster], db: &str, opts: ProxyOptions) -> TestProxy {
    let mut proxy = start_proxy_with_map(&clusters[0], &map(clusters, db), opts).await;
    proxy.database = db.to_owned();
    proxy
}

/// Creates `t (id bigint PRIMARY KEY, pad text)` through the proxy (so the DDL lands on
/// both shards), then fills ids 1..=rows directly on each shard's primary, each shard
/// generating only its own buckets, and waits for the replicas to replay it.
async fn load(clusters: &[TestCluster], proxy: &TestProxy, db: &str, rows: i64) {
    proxy
        .client()
        .await
        .batch_execute("CREATE TABLE t (id bigint PRIMARY KEY, pad text)")
        .await
        .unwrap();
    let fills = clusters
        .iter()
        .zip(BUCKETS)
        .map(|(c, (lo, hi))| async move {
            let su = superuser_client(c, c.primary.1, db).await;
            let sql = format!(
                "INSERT INTO t SELECT g, repeat('x', {PAD}) FROM generate_series(1, {rows}) g \
             WHERE (hashint8extended(g, 0) & 1023) BETWEEN {lo} AND {hi}; ANALYZE t"
            );
            su.batch_execute(&sql).await.unwrap();
            let here: i64 = su
                .query_one("SELECT count(*) FROM t", &[])
                .await
                .unwrap()
                .get(0);
            assert!(
                here > rows * 2 / 5 && here < rows * 3 / 5,
                "shard on port {} has {here} of {rows} rows",
                c.primary.1
            );
            here
        });
    let counts = futures_util::future::join_all(fills).await;
    assert_eq!(counts.iter().sum::<i64>(), rows);
    for c in clusters {
        if let Some(local) = &c.local {
            local
                .wait_replicas_caught_up(Duration::from_secs(60))
                .unwrap();
        }
    }
}

/// The database holding the shared BIG_ROWS table, loaded once per test binary.
async fn big_database() -> &'static str {
    static BIG: OnceCell<String> = OnceCell::const_new();
    BIG.get_or_init(|| async {
        let clusters = shard_clusters();
        let db = unique_name("limits");
        create_database(clusters, &db).await;
        let proxy = proxy_for(clusters, &db, ProxyOptions::default()).await;
        let started = Instant::now();
        load(clusters, &proxy, &db, BIG_ROWS).await;
        eprintln!("loaded {BIG_ROWS} rows in {:?}", started.elapsed());
        db
    })
    .await
}

/// The tests over the big table take turns: their timings and activity checks must not
/// see each other's streams.
static BIG_TABLE: Mutex<()> = Mutex::const_new(());

/// Superuser connections to every node (primary and replicas) of every shard, in `db`.
async fn every_node(
    clusters: &[TestCluster],
    db: &str,
) -> Vec<(usize, u16, tokio_postgres::Client)> {
    let mut nodes = Vec::new();
    for (shard, c) in clusters.iter().enumerate() {
        for port in std::iter::once(c.primary.1).chain(c.replicas.iter().map(|r| r.1)) {
            nodes.push((shard, port, superuser_client(c, port, db).await));
        }
    }
    nodes
}

/// Backends of `user` in the nodes' database that run a statement or hold a transaction
/// open, described as "shard port: state wait_event query".
async fn busy_backends(nodes: &[(usize, u16, tokio_postgres::Client)], user: &str) -> Vec<String> {
    let mut busy = Vec::new();
    for (shard, port, su) in nodes {
        let rows = su
            .query(
                "SELECT state, coalesce(wait_event, ''), left(query, 80) FROM pg_stat_activity \
                 WHERE datname = current_database() AND usename = $1 AND pid <> pg_backend_pid() \
                 AND (state = 'active' OR state LIKE 'idle in transaction%')",
                &[&user],
            )
            .await
            .unwrap();
        for r in rows {
            busy.push(format!(
                "s{shard} {port}: {} {} {}",
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2)
            ));
        }
    }
    busy
}

async fn wait_no_busy_backends(nodes: &[(usize, u16, tokio_postgres::Client)], user: &str) {
    wait_for(
        "no server connection left running or in a transaction",
        Duration::from_secs(5),
        || async { busy_backends(nodes, user).await.is_empty() },
    )
    .await;
}

/// Shards with a backend of `user` blocked writing its result (to the proxy).
async fn shards_blocked_on_client(
    nodes: &[(usize, u16, tokio_postgres::Client)],
    user: &str,
) -> Vec<usize> {
    let mut shards = Vec::new();
    for (shard, _, su) in nodes {
        let n: i64 = su
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND usename = $1 AND state = 'active' AND wait_event = 'ClientWrite'",
                &[&user],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 && !shards.contains(shard) {
            shards.push(*shard);
        }
    }
    shards
}

/// A protocol-level client, for counting exactly what the proxy sends and for reading
/// a result at the test's pace.
struct Raw {
    s: TcpStream,
    inbuf: BytesMut,
}

impl Raw {
    /// Startup + SCRAM (as `common::raw::login`, for any endpoint).
    async fn connect(port: u16, user: &str, password: &str, db: &str) -> Raw {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut raw = Raw {
            s,
            inbuf: BytesMut::new(),
        };
        let mut out = BytesMut::new();
        messages::startup(&mut out, &[("user", user), ("database", db)]);
        raw.s.write_all(&out).await.unwrap();
        let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        loop {
            let frame = raw.next().await;
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
                (b'Z', _) => return raw,
                (b'E', _) => panic!("login failed: {:?}", messages::decode_error_fields(&frame)),
                _ => {}
            }
            if !out.is_empty() {
                raw.s.write_all(&out).await.unwrap();
            }
        }
    }

    async fn send(&mut self, out: &[u8]) {
        self.s.write_all(out).await.unwrap();
    }

    async fn query(&mut self, sql: &str) {
        let mut out = BytesMut::new();
        messages::query(&mut out, sql);
        self.send(&out).await;
    }

    /// Parse, Bind, Describe, Execute of `sql` (unnamed), without Sync.
    fn extended(out: &mut BytesMut, sql: &str) {
        messages::parse(out, "", sql, &[]);
        messages::put_msg(out, tag::BIND, |b| {
            b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0])
        });
        messages::put_msg(out, tag::DESCRIBE, |b| b.extend_from_slice(&[b'P', 0]));
        messages::put_msg(out, tag::EXECUTE, |b| b.extend_from_slice(&[0, 0, 0, 0, 0]));
    }

    async fn next(&mut self) -> Frame {
        self.try_next()
            .await
            .expect("the proxy closed the connection")
    }

    /// The next message; `None` when the proxy closed the connection.
    async fn try_next(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = decode_frame(&mut self.inbuf, 1 << 30).unwrap() {
                return Some(f);
            }
            let read = self.s.read_buf(&mut self.inbuf);
            let n = tokio::time::timeout(Duration::from_secs(60), read)
                .await
                .expect("the proxy answered within 60s")
                .unwrap();
            if n == 0 {
                return None;
            }
        }
    }

    /// Every message up to and including ReadyForQuery.
    async fn until_ready(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        loop {
            let Some(f) = self.try_next().await else {
                let errors: Vec<_> = frames
                    .iter()
                    .filter(|f: &&Frame| f.tag == b'E')
                    .map(messages::decode_error_fields)
                    .collect();
                panic!(
                    "the proxy closed the connection after '{}' {errors:?}",
                    tags(&frames)
                );
            };
            let done = f.tag == b'Z';
            frames.push(f);
            if done {
                return frames;
            }
        }
    }
}

fn tags(frames: &[Frame]) -> String {
    frames.iter().map(|f| f.tag as char).collect()
}

/// The field count and first field of a DataRow.
fn first_field(row: &Frame) -> (i16, Option<&[u8]>) {
    let b = row.body();
    let count = i16::from_be_bytes([b[0], b[1]]);
    let len = i32::from_be_bytes([b[2], b[3], b[4], b[5]]);
    let field = usize::try_from(len).ok().map(|len| &b[6..6 + len]);
    (count, field)
}

fn int_field(row: &Frame) -> i64 {
    let field = first_field(row).1.expect("not NULL");
    std::str::from_utf8(field).unwrap().parse().unwrap()
}

/// An answer that failed: exactly one ErrorResponse with `code`, followed only by
/// ReadyForQuery (nothing of the statement after the error, no second error).
fn assert_one_error(frames: &[Frame], code: &str, what: &str) {
    let errors: Vec<&Frame> = frames.iter().filter(|f| f.tag == b'E').collect();
    let t = tags(frames);
    assert_eq!(
        errors.len(),
        1,
        "{what}: one ErrorResponse expected, got {}",
        t.replace('D', "")
    );
    let (got, message) = messages::decode_error_fields(errors[0]);
    assert_eq!(got, code, "{what}: {message}");
    assert!(
        t.ends_with("EZ") && t.matches('Z').count() == 1,
        "{what}: the error must be the statement's last message (DataRows left out): {}",
        t.replace('D', "")
    );
}

/// Checks that `row` is t's row `next_id` (two visible columns) and moves on.
fn next_sorted_row(row: &Frame, next_id: &mut i64) {
    let (fields, _) = first_field(row);
    assert_eq!(fields, 2, "the client sees t's two columns only");
    assert_eq!(
        int_field(row),
        *next_id,
        "rows arrive sorted and none is missing"
    );
    *next_id += 1;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sorted_read_of_a_million_rows_streams_in_bounded_proxy_memory() {
    let db = big_database().await;
    let _turn = BIG_TABLE.lock().await;
    let clusters = shard_clusters();
    let c = &clusters[0];
    let proxy = common::proxy::ProxyProcess::spawn(
        &clusters[0],
        &map(clusters, db),
        &ProxyOptions::default(),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut raw = loop {
        if TcpStream::connect(("127.0.0.1", proxy.port)).await.is_ok() {
            break Raw::connect(proxy.port, &c.app_user, &c.app_password, db).await;
        }
        assert!(
            Instant::now() < deadline,
            "the binary never accepted connections"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let nodes = every_node(clusters, db).await;
    let rss_before = proxy.status_kb("VmRSS");
    let started = Instant::now();
    raw.query("SELECT * FROM t ORDER BY id").await;

    let mut next_id = 1i64;
    let description = raw.next().await;
    assert_eq!(description.tag, b'T');
    while next_id <= 1000 {
        let f = raw.next().await;
        assert_eq!(f.tag, b'D', "{:?}", messages::decode_error_fields(&f));
        next_sorted_row(&f, &mut next_id);
    }
    // The client stops reading: the backpressure must reach both shards, which then
    // wait to write to the proxy instead of the proxy buffering their rows.
    wait_for(
        "both shards to block writing to the proxy while the client does not read",
        Duration::from_secs(30),
        || async { shards_blocked_on_client(&nodes, &c.app_user).await.len() == 2 },
    )
    .await;
    let rss_stalled = proxy.status_kb("VmRSS");
    let tag = loop {
        let f = raw.next().await;
        match f.tag {
            b'D' => next_sorted_row(&f, &mut next_id),
            b'C' => break String::from_utf8_lossy(&f.body()[..f.body().len() - 1]).into_owned(),
            other => panic!(
                "unexpected '{}' at id {next_id}: {:?}",
                other as char,
                messages::decode_error_fields(&f)
            ),
        }
    };
    let elapsed = started.elapsed();
    assert_eq!(raw.next().await.tag, b'Z');
    assert_eq!(next_id - 1, BIG_ROWS, "every row arrived");
    assert_eq!(tag, format!("SELECT {BIG_ROWS}"));
    let peak = proxy.status_kb("VmHWM");
    eprintln!(
        "{BIG_ROWS} rows in {elapsed:?}; proxy RSS before {rss_before} kB, stalled {rss_stalled} kB, peak {peak} kB"
    );
    assert!(
        peak < RSS_LIMIT_KB,
        "proxy peak RSS {peak} kB >= {RSS_LIMIT_KB} kB (before {rss_before} kB, while stalled {rss_stalled} kB)"
    );
    // The same session goes on.
    raw.query("SELECT count(*) FROM t WHERE id <= 100").await;
    let frames = raw.until_ready().await;
    let row = frames.iter().find(|f| f.tag == b'D').expect("a row");
    assert_eq!(int_field(row), 100, "{}", tags(&frames));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_on_one_shard_fails_the_statement_once_and_leaves_no_server_busy() {
    const ROWS: i64 = 20_000;
    let clusters = shard_clusters();
    let db = unique_name("limits_err");
    create_database(clusters, &db).await;
    let proxy = proxy_for(clusters, &db, ProxyOptions::default()).await;
    load(clusters, &proxy, &db, ROWS).await;
    let nodes = every_node(clusters, &db).await;
    let user = &clusters[0].app_user;
    // id 5 lives on one shard, id ROWS - 10 decides where the late error comes from.
    eprintln!(
        "id 5 on s{}, id {} on s{}",
        shard_of(5),
        ROWS - 10,
        shard_of(ROWS - 10)
    );
    let failing = [
        "SELECT 1/(id - 5) FROM t".to_owned(),
        "SELECT id, 1/(id - 5) FROM t ORDER BY id".to_owned(),
        format!("SELECT id, pad, 1/(id - {}) FROM t ORDER BY id", ROWS - 10),
        format!("SELECT 1/(id - {}), pad FROM t", ROWS - 10),
        "SELECT count(*), sum(id) FROM t WHERE 1/(id - 5) > 0".to_owned(),
    ];
    let mut raw = Raw::connect(proxy.port(), user, &proxy.password, &db).await;
    for sql in &failing {
        raw.query(sql).await;
        let frames = raw.until_ready().await;
        assert_one_error(&frames, "22012", &format!("simple {sql}"));
        assert_eq!(frames.last().unwrap().body(), b"I");

        raw.query("SELECT count(*) FROM t").await;
        let frames = raw.until_ready().await;
        let row = frames.iter().find(|f| f.tag == b'D');
        assert_eq!(
            row.map(int_field),
            Some(ROWS),
            "after {sql}: {}",
            tags(&frames)
        );
    }
    wait_no_busy_backends(&nodes, user).await;

    // A driver's view, both protocols, each followed at once by a statement on the same
    // session: a cancellation meant for the failed statement must not hit the next one.
    let client = proxy.client().await;
    for round in 0..20 {
        let sql = &failing[round % failing.len()];
        let err = client.simple_query(sql).await.unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("22012"), "{sql}: {err}");
        let n: i64 = client
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap_or_else(|e| panic!("round {round}, the statement after {sql}: {e}"))
            .get(0);
        assert_eq!(n, ROWS);
        let err = client.query(sql.as_str(), &[]).await.unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("22012"), "{sql}: {err}");
        let rows = client
            .simple_query("SELECT id FROM t ORDER BY id LIMIT 3")
            .await
            .unwrap_or_else(|e| panic!("round {round}, the statement after {sql}: {e}"));
        assert_eq!(rows.len(), 3 + 2, "{rows:?}"); // RowDescription, 3 rows, CommandComplete
    }
    wait_no_busy_backends(&nodes, user).await;

    // The extended protocol as libpq's PQexecParams sends it: Parse, Bind, Describe,
    // Execute and Sync in one batch. First a batch that succeeds.
    let mut out = BytesMut::new();
    Raw::extended(&mut out, "SELECT count(*) FROM t");
    messages::empty_msg(&mut out, tag::SYNC);
    raw.send(&out).await;
    let frames = raw.until_ready().await;
    let errors: Vec<_> = frames
        .iter()
        .filter(|f| f.tag == b'E')
        .map(messages::decode_error_fields)
        .collect();
    assert_eq!(
        tags(&frames),
        "12TDCZ",
        "a keyless read in one extended batch: {errors:?}"
    );
    for sql in &failing {
        let mut out = BytesMut::new();
        Raw::extended(&mut out, sql);
        messages::empty_msg(&mut out, tag::SYNC);
        raw.send(&out).await;
        let frames = raw.until_ready().await;
        assert_one_error(&frames, "22012", &format!("extended {sql}"));
        assert!(tags(&frames).starts_with("12"), "{}", tags(&frames));

        // After an error the server skips the rest of the batch up to Sync: the next
        // statement of the same batch must not run.
        let mut out = BytesMut::new();
        Raw::extended(&mut out, sql);
        Raw::extended(&mut out, "SELECT 42");
        messages::empty_msg(&mut out, tag::SYNC);
        raw.send(&out).await;
        let frames = raw.until_ready().await;
        assert_one_error(
            &frames,
            "22012",
            &format!("extended {sql}; SELECT 42 in one batch"),
        );

        raw.query("SELECT count(*) FROM t").await;
        let frames = raw.until_ready().await;
        let row = frames.iter().find(|f| f.tag == b'D');
        assert_eq!(
            row.map(int_field),
            Some(ROWS),
            "after {sql}: {}",
            tags(&frames)
        );
    }
    wait_no_busy_backends(&nodes, user).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_dying_mid_stream_fails_the_statement_and_the_session_goes_on() {
    const ROWS: i64 = 400_000;
    // Clusters of our own: this test kills a node.
    let other = std::thread::spawn(|| own_cluster(0));
    let first = own_cluster(0);
    let clusters = vec![first, other.join().expect("second cluster")];
    let db = unique_name("limits_down");
    create_database(&clusters, &db).await;
    let proxy = proxy_for(
        &clusters,
        &db,
        ProxyOptions {
            acquire_timeout: "2s",
            ..Default::default()
        },
    )
    .await;
    load(&clusters, &proxy, &db, ROWS).await;
    let user = &clusters[0].app_user;
    let on_s0 = (1..).find(|&id| shard_of(id) == 0).unwrap();
    let nodes = every_node(&clusters, &db).await;
    let s0_nodes: Vec<_> = every_node(&clusters[..1], &db).await;

    let mut raw = Raw::connect(proxy.port(), user, &proxy.password, &db).await;
    raw.query("SELECT * FROM t ORDER BY id").await;
    assert_eq!(raw.next().await.tag, b'T');
    for id in 1..=1000 {
        let f = raw.next().await;
        assert_eq!(f.tag, b'D');
        assert_eq!(int_field(&f), id);
    }
    wait_for(
        "both shards to block writing to the proxy",
        Duration::from_secs(30),
        || async { shards_blocked_on_client(&nodes, user).await.len() == 2 },
    )
    .await;
    drop(nodes);
    let s1 = clusters[1].local.as_ref().unwrap();
    s1.kill_node(s1.primary());

    let mut last = 1000;
    let frames = loop {
        let f = raw.next().await;
        if f.tag != b'D' {
            let mut rest = vec![f];
            if rest[0].tag != b'Z' {
                rest.extend(raw.until_ready().await);
            }
            break rest;
        }
        let id = int_field(&f);
        assert!(id > last, "sorted until the failure");
        last = id;
    };
    assert!(last < ROWS, "the stream cannot be complete without s1");
    let errors: Vec<_> = frames.iter().filter(|f| f.tag == b'E').collect();
    assert_eq!(errors.len(), 1, "one ErrorResponse: {}", tags(&frames));
    let (code, message) = messages::decode_error_fields(errors[0]);
    eprintln!("a shard dying mid-stream: {code} {message}, after {last} rows");
    assert!(
        code.starts_with("08") || code.starts_with("57P"),
        "{code} {message}"
    );
    assert_eq!(tags(&frames), "EZ");
    assert_eq!(frames[1].body(), b"I");

    // The session goes on: a statement for s0 works at once, one for both shards fails
    // cleanly and quickly.
    raw.query(&format!("SELECT id FROM t WHERE id = {on_s0}"))
        .await;
    let frames = raw.until_ready().await;
    let row = frames.iter().find(|f| f.tag == b'D');
    assert_eq!(row.map(int_field), Some(on_s0), "{}", tags(&frames));
    let started = Instant::now();
    raw.query("SELECT count(*) FROM t").await;
    let frames = raw.until_ready().await;
    assert_eq!(
        frames.iter().filter(|f| f.tag == b'E').count(),
        1,
        "{}",
        tags(&frames)
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    wait_no_busy_backends(&s0_nodes, user).await;

    // Once s1 is back, reads over both shards work again.
    s1.start_node(s1.primary()).unwrap();
    let client = proxy.client().await;
    wait_for(
        "reads over both shards to work again",
        Duration::from_secs(30),
        || async {
            matches!(client.query_one("SELECT count(*) FROM t", &[]).await,
                Ok(row) if row.get::<_, i64>(0) == ROWS)
        },
    )
    .await;
    raw.query("SELECT count(*) FROM t").await;
    let frames = raw.until_ready().await;
    let row = frames.iter().find(|f| f.tag == b'D');
    assert_eq!(row.map(int_field), Some(ROWS), "{}", tags(&frames));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_satisfied_limit_answers_at_once_and_cancels_the_legs() {
    let db = big_database().await;
    let _turn = BIG_TABLE.lock().await;
    let clusters = shard_clusters();
    let user = &clusters[0].app_user;
    let proxy = proxy_for(clusters, db, ProxyOptions::default()).await;
    let nodes = every_node(clusters, db).await;
    let client = proxy.client().await;
    let count_first_100 = || async {
        let answer = client.query_one("SELECT count(*) FROM t WHERE id <= 100", &[]);
        let row = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("the statement after the LIMIT answered within 10s")
            .unwrap_or_else(|e| panic!("the statement after the LIMIT: {e}"));
        assert_eq!(row.get::<_, i64>(0), 100);
    };

    for extended in [false, true] {
        let sql = "SELECT * FROM t ORDER BY id LIMIT 10";
        let started = Instant::now();
        let ids = tokio::time::timeout(Duration::from_secs(30), read_ids(&client, sql, extended))
            .await
            .unwrap_or_else(|_| panic!("{sql} (extended: {extended}) did not answer in 30s"));
        let elapsed = started.elapsed();
        eprintln!("{sql} over {BIG_ROWS} rows (extended: {extended}): {elapsed:?}");
        assert_eq!(ids, (1..=10).collect::<Vec<_>>(), "extended: {extended}");
        assert!(
            elapsed < Duration::from_secs(2),
            "extended: {extended}: {elapsed:?}"
        );
        count_first_100().await;
        wait_no_busy_backends(&nodes, user).await;
    }

    // Ten rows come from s0 at once; s1 has none to give and would sleep 10 ms per row
    // (over an hour): the statement ends quickly only if the proxy cancels s1's leg
    // once the LIMIT is satisfied.
    let slow = "SELECT id FROM t WHERE ((hashint8extended(id, 0) & 1023) < 512 AND id <= 1000) \
                OR pg_sleep(0.01) IS NULL LIMIT 10";
    for extended in [false, true] {
        let started = Instant::now();
        let answer = read_ids(&client, slow, extended);
        let Ok(ids) = tokio::time::timeout(Duration::from_secs(30), answer).await else {
            panic!(
                "extended: {extended}: no answer in 30s, the slow leg was not cancelled; busy: {:?}",
                busy_backends(&nodes, user).await
            );
        };
        let elapsed = started.elapsed();
        eprintln!("LIMIT with a slow shard (extended: {extended}): {elapsed:?}");
        assert_eq!(ids.len(), 10, "extended: {extended}: {ids:?}");
        assert!(
            ids.iter().all(|&id| shard_of(id) == 0 && id <= 1000),
            "{ids:?}"
        );
        assert!(
            elapsed < Duration::from_secs(5),
            "extended: {extended}: {elapsed:?}, the slow leg was not cancelled"
        );
        count_first_100().await;
        wait_no_busy_backends(&nodes, user).await;
    }
}

/// The first column of every row of `sql` as i64, by the simple or extended protocol.
async fn read_ids(client: &tokio_postgres::Client, sql: &str, extended: bool) -> Vec<i64> {
    if extended {
        let rows = client.query(sql, &[]).await.unwrap();
        return rows.iter().map(|r| r.get::<_, i64>(0)).collect();
    }
    let messages = client.simple_query(sql).await.unwrap();
    messages
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0)?.parse().ok(),
            _ => None,
        })
        .collect()
}
