//! The data path is transparent: simple and extended protocol, binary values of many
//! types, prepared statements across pooled transactions, COPY both ways, psql, and
//! bad frames — all through the proxy against a real primary.

mod common;

use common::proxy::{pg_bin, run_cmd, start_proxy, ProxyOptions};
use common::{shared_cluster, superuser_client, unique_name};
use futures_util::{pin_mut, SinkExt, TryStreamExt};
use std::collections::HashSet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};

/// Any value as its raw binary wire bytes, to compare proxy output with the server's.
#[derive(Debug, PartialEq)]
struct Raw(Vec<u8>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw.to_vec()))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

impl ToSql for Raw {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }
    fn accepts(_: &Type) -> bool {
        true
    }
    to_sql_checked!();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_queries() {
    let cluster = shared_cluster();
    let proxy = start_proxy(cluster, ProxyOptions::default()).await;
    let client = proxy.client().await;
    let rows = client
        .simple_query("SELECT 1 AS a; SELECT 'x' AS b, NULL AS c")
        .await
        .unwrap();
    let values: Vec<Option<String>> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(String::from)))
            }
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(values, vec![Some("1".into()), Some("x".into()), None]);
    let row = client
        .query_one("SELECT $1::int4 + 1, $2::text || '!'", &[&41i32, &"hi"])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, String>(1), "hi!");
    // An error in the extended protocol leaves the session usable.
    let err = client.query("SELECT 1/0", &[]).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22012"));
    assert_eq!(
        client
            .query_one("SELECT 7", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        7
    );
    // Empty query and a notice pass through.
    client.batch_execute("").await.unwrap();
    client
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'hello'; END $$")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_values_of_many_types_round_trip_byte_for_byte() {
    let cluster = shared_cluster();
    let proxy = start_proxy(cluster, ProxyOptions::default()).await;
    let direct = superuser_client(cluster, cluster.primary.1, &cluster.database).await;
    let client = proxy.client().await;
    let table = unique_name("types");
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (i2 int2, i4 int4, i8 int8, num numeric, t text, b bytea, j jsonb,
             u uuid, ts timestamptz, arr int4[], tarr text[], n int4, f float8, ok bool)"
        ))
        .await
        .unwrap();
    // Binary encodings straight from the server, for the types we pass as raw bytes.
    let samples = direct
        .query_one(
            "SELECT '-12345.678900'::numeric, '{\"k\": [1, \"v\"]}'::jsonb,
                    'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, '2026-11-22 10:11:12.345678+00'::timestamptz",
            &[],
        )
        .await
        .unwrap();
    let (num, j, u, ts): (Raw, Raw, Raw, Raw) = (
        samples.get(0),
        samples.get(1),
        samples.get(2),
        samples.get(3),
    );
    let bytes: Vec<u8> = (0..=255u8).collect();
    client
        .execute(
            &format!("INSERT INTO {table} VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14)"),
            &[
                &-7i16,
                &i32::MIN,
                &i64::MAX,
                &num,
                &"héllo\u{1F600}",
                &bytes,
                &j,
                &u,
                &ts,
                &vec![1i32, -2, 3],
                &vec!["a".to_string(), "b c".into()],
                &None::<i32>,
                &1.5e300f64,
                &true,
            ],
        )
        .await
        .unwrap();
    let row = client
        .query_one(&format!("SELECT * FROM {table}"), &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i16>(0), -7);
    assert_eq!(row.get::<_, i32>(1), i32::MIN);
    assert_eq!(row.get::<_, i64>(2), i64::MAX);
    assert_eq!(row.get::<_, Raw>(3), num);
    assert_eq!(row.get::<_, String>(4), "héllo\u{1F600}");
    assert_eq!(row.get::<_, Vec<u8>>(5), bytes);
    assert_eq!(row.get::<_, Raw>(6), j);
    assert_eq!(row.get::<_, Raw>(7), u);
    assert_eq!(row.get::<_, Raw>(8), ts);
    assert_eq!(row.get::<_, Vec<i32>>(9), vec![1, -2, 3]);
    assert_eq!(
        row.get::<_, Vec<String>>(10),
        vec!["a".to_string(), "b c".into()]
    );
    assert_eq!(row.get::<_, Option<i32>>(11), None);
    assert_eq!(row.get::<_, f64>(12), 1.5e300);
    assert!(row.get::<_, bool>(13));
    // The same row read directly from the server is identical, column by column.
    let through_server = direct
        .query_one(&format!("SELECT * FROM {table}"), &[])
        .await
        .unwrap();
    for i in 0..row.len() {
        assert_eq!(
            row.get::<_, Option<Raw>>(i),
            through_server.get::<_, Option<Raw>>(i),
            "column {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_survive_transactions_on_other_server_connections() {
    let cluster = shared_cluster();
    let proxy = start_proxy(
        cluster,
        ProxyOptions {
            pool_size: 3,
            ..Default::default()
        },
    )
    .await;
    let a = proxy.client().await;
    let b = proxy.client().await;
    let stmt = a
        .prepare("SELECT $1::int8 * 2, pg_backend_pid()")
        .await
        .unwrap();
    // b prepares a different statement that its driver also names "s0".
    let other = b.prepare("SELECT $1::text || '-b'").await.unwrap();
    let mut pids = HashSet::new();
    for i in 0..200i64 {
        // b holds a server connection inside a transaction now and then, so a's next
        // transaction has to run on another one.
        if i % 10 == 0 {
            b.batch_execute("BEGIN").await.unwrap();
        }
        let row = a.query_one(&stmt, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i64>(0), i * 2);
        pids.insert(row.get::<_, i32>(1));
        let brow = b.query_one(&other, &[&i.to_string()]).await.unwrap();
        assert_eq!(brow.get::<_, String>(0), format!("{i}-b"));
        if i % 10 == 5 {
            b.batch_execute("COMMIT").await.unwrap();
        }
    }
    assert!(
        pids.len() >= 2,
        "the statement ran on {} server connection(s)",
        pids.len()
    );
    // Explicit transactions keep working with a prepared statement inside.
    a.batch_execute("BEGIN").await.unwrap();
    let p1 = a.query_one(&stmt, &[&1i64]).await.unwrap().get::<_, i32>(1);
    let p2 = a.query_one(&stmt, &[&2i64]).await.unwrap().get::<_, i32>(1);
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(p1, p2, "one transaction, one server connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_ten_thousand_rows() {
    let cluster = shared_cluster();
    let proxy = start_proxy(cluster, ProxyOptions::default()).await;
    let client = proxy.client().await;
    let table = unique_name("copy");
    client
        .batch_execute(&format!("CREATE TABLE {table} (id int, v text)"))
        .await
        .unwrap();
    let sink = client
        .copy_in(&format!("COPY {table} FROM STDIN"))
        .await
        .unwrap();
    pin_mut!(sink);
    let mut expected = String::new();
    for i in 0..10_000 {
        expected.push_str(&format!("{i}\tvalue {i}\n"));
    }
    for chunk in expected.as_bytes().chunks(7_000) {
        sink.send(bytes::Bytes::copy_from_slice(chunk))
            .await
            .unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), 10_000);
    let stream = client
        .copy_out(&format!(
            "COPY (SELECT * FROM {table} ORDER BY id) TO STDOUT"
        ))
        .await
        .unwrap();
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
    let out: Vec<u8> = chunks.concat();
    assert_eq!(String::from_utf8(out).unwrap(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_works_through_the_proxy() {
    let cluster = shared_cluster();
    let proxy = start_proxy(cluster, ProxyOptions::default()).await;
    let table = unique_name("psql");
    let script = format!(
        "CREATE TABLE {table} (a int);\n\\copy {table} FROM PROGRAM 'seq 1 100'\nSELECT sum(a) FROM {table};\n\\set ON_ERROR_STOP 0\nSELECT 1/0;\n\\set ON_ERROR_STOP 1\nBEGIN;\nINSERT INTO {table} VALUES (1000);\nCOMMIT;\nSELECT count(*) FROM {table};\n"
    );
    let dir = common::proxy::temp_dir("psql");
    let file = dir.0.join("script.sql");
    std::fs::write(&file, &script).unwrap();
    let (ok, stdout, stderr) = run_cmd(
        std::process::Command::new(pg_bin("psql"))
            .arg(proxy.url())
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-f"])
            .arg(&file),
    );
    assert!(ok, "psql failed: {stderr}");
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.is_empty()).collect();
    assert!(lines.contains(&"5050"), "{stdout}");
    assert_eq!(lines.last(), Some(&"101"), "{stdout}");
    assert!(stderr.contains("division by zero"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_message_is_refused_without_harm() {
    let cluster = shared_cluster();
    let proxy = start_proxy(
        cluster,
        ProxyOptions {
            max_message_size: "64kB",
            ..Default::default()
        },
    )
    .await;
    let client = proxy.client().await;
    let big = "x".repeat(100_000);
    let err = client
        .query_one("SELECT length($1::text)", &[&big])
        .await
        .unwrap_err();
    let db = err
        .as_db_error()
        .map(|e| (e.code().code().to_string(), e.message().to_string()));
    let (code, message) = db.unwrap_or_else(|| panic!("expected a server error, got {err}"));
    assert_eq!(code, "08P01");
    assert!(message.contains("exceeds the limit"), "{message}");
    assert!(client.is_closed() || client.simple_query("SELECT 1").await.is_err());
    // The proxy still serves others, and a message under the limit passes.
    let other = proxy.client().await;
    let small = "y".repeat(10_000);
    let row = other
        .query_one("SELECT length($1::text)", &[&small])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_an_error_and_the_proxy_survives() {
    let cluster = shared_cluster();
    let proxy = start_proxy(cluster, ProxyOptions::default()).await;
    // A startup packet with an absurd length.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0])
        .await
        .unwrap();
    let mut reply = Vec::new();
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut reply)).await;
    assert_eq!(
        reply.first(),
        Some(&b'E'),
        "an ErrorResponse, got {reply:?}"
    );
    // Random garbage.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut reply)).await;
    assert_eq!(reply.first(), Some(&b'E'));
    // A GSSENCRequest is declined with 'N'.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&[0, 0, 0, 8, 4, 210, 22, 48]).await.unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"N");
    let client = proxy.client().await;
    assert_eq!(
        client
            .query_one("SELECT 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_queries_keep_their_order_and_errors_stay_local() {
    let cluster = shared_cluster();
    let proxy = start_proxy(
        cluster,
        ProxyOptions {
            pool_size: 2,
            ..Default::default()
        },
    )
    .await;
    let client = proxy.client().await;
    let stmt = client.prepare("SELECT 100 / $1::int4").await.unwrap();
    // tokio-postgres pipelines concurrent requests on one connection: many
    // Bind/Execute/Sync groups are in flight before the first answer arrives.
    let futures = (0..60i32).map(|i| {
        let (client, stmt) = (&client, &stmt);
        async move {
            let divisor = if i == 30 { 0 } else { i % 7 + 1 };
            (divisor, client.query_one(stmt, &[&divisor]).await)
        }
    });
    for (divisor, result) in futures_util::future::join_all(futures).await {
        match result {
            Ok(row) => assert_eq!(row.get::<_, i32>(0), 100 / divisor),
            Err(e) => {
                assert_eq!(divisor, 0);
                assert_eq!(e.code().map(|c| c.code()), Some("22012"));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_call_passes_through() {
    let cluster = shared_cluster();
    let proxy = start_proxy(cluster, ProxyOptions::default()).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    common::raw::login(&mut s, &proxy).await;
    let mut inbuf = bytes::BytesMut::new();
    let mut out = bytes::BytesMut::new();
    shardgate::protocol::messages::query(&mut out, "SELECT 'int4pl'::regproc::oid");
    s.write_all(&out).await.unwrap();
    let msgs = common::raw::read_until_ready(&mut s, &mut inbuf).await;
    let row = msgs.iter().find(|(t, _)| *t == b'D').expect("a row");
    let oid: u32 = std::str::from_utf8(&row.1[6..]).unwrap().parse().unwrap();
    // FunctionCall int4pl(2, 40), arguments and result in text format.
    out.clear();
    shardgate::protocol::messages::put_msg(&mut out, b'F', |b| {
        use bytes::BufMut;
        b.put_u32(oid);
        b.put_i16(1);
        b.put_i16(0);
        b.put_i16(2);
        for arg in [&b"2"[..], b"40"] {
            b.put_i32(arg.len() as i32);
            b.put_slice(arg);
        }
        b.put_i16(0);
    });
    s.write_all(&out).await.unwrap();
    let msgs = common::raw::read_until_ready(&mut s, &mut inbuf).await;
    let (_, body) = msgs
        .iter()
        .find(|(t, _)| *t == b'V')
        .expect("FunctionCallResponse");
    assert_eq!(&body[4..], b"42");
}

/// Issue 10 item 3: values far larger than `limits.max_message_size` (1MB here) pass
/// through both ways — a 200 MB bytea selected in binary format (one 200 MB DataRow), a
/// 200 MB COPY out (one CopyData) and a 200 MB COPY in (one client CopyData) — and the
/// proxy relays them in pieces: its peak RSS grows far less than the value's size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_of_200_mb_stream_through_in_bounded_proxy_memory() {
    const SIZE: usize = 200 << 20;
    const GROWTH_LIMIT_KB: u64 = 64 << 10;
    let cluster = shared_cluster();
    let proxy = common::proxy::ProxyProcess::spawn(
        cluster,
        &common::proxy::single_shard_map(cluster),
        &ProxyOptions::default(),
    )
    .await;
    let client = common::proxy::connect(&format!(
        "host=127.0.0.1 port={} user={} password={} dbname={}",
        proxy.port, cluster.app_user, cluster.app_password, cluster.database
    ))
    .await;
    let table = unique_name("big_copy");
    client
        .batch_execute(&format!("CREATE TABLE {table} (v text)"))
        .await
        .unwrap();
    let peak_before = proxy.status_kb("VmHWM");

    let row = client
        .query_one("SELECT repeat('x', $1)::bytea", &[&(SIZE as i32)])
        .await
        .unwrap();
    let value: &[u8] = row.get(0);
    assert_eq!(value.len(), SIZE);
    assert!(value.iter().all(|&b| b == b'x'), "the bytea arrives intact");
    drop(row);

    let copy_out = client
        .copy_out(&format!("COPY (SELECT repeat('y', {SIZE})) TO STDOUT"))
        .await
        .unwrap();
    pin_mut!(copy_out);
    let mut received = 0usize;
    while let Some(chunk) = copy_out.try_next().await.unwrap() {
        let body = chunk.strip_suffix(b"\n").unwrap_or(&chunk);
        assert!(body.iter().all(|&b| b == b'y'), "COPY out arrives intact");
        received += chunk.len();
    }
    assert_eq!(received, SIZE + 1, "one line and its newline");

    let sink = client
        .copy_in(&format!("COPY {table} FROM STDIN"))
        .await
        .unwrap();
    pin_mut!(sink);
    let mut line = vec![b'z'; SIZE];
    line.push(b'\n');
    sink.send(bytes::Bytes::from(line)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 1);
    let row = client
        .query_one(
            &format!("SELECT length(v), v = repeat('z', {SIZE}) FROM {table}"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), SIZE as i32);
    assert!(row.get::<_, bool>(1), "COPY in arrives intact");

    let peak_after = proxy.status_kb("VmHWM");
    eprintln!("proxy peak RSS {peak_before} kB before, {peak_after} kB after");
    assert!(
        peak_after - peak_before < GROWTH_LIMIT_KB,
        "proxy peak RSS grew by {} kB moving 200 MB values (limit {GROWTH_LIMIT_KB} kB)",
        peak_after - peak_before
    );
    client
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

/// What a misbehaving backend sends in answer to a query containing its trigger word.
const MISBEHAVIOURS: &[(&str, &[u8])] = &[
    // A declared length below the 4 bytes of the length itself.
    ("short_length", &[b'C', 0, 0, 0, 2]),
    // A RowDescription declaring 8 MB, over limits.max_message_size (1MB): the proxy
    // must read such a message whole, so it refuses it at the header.
    ("oversize", &[b'T', 0, 0x80, 0, 0, 0, 1]),
    // No PostgreSQL message has this type.
    ("unknown_type", &[b'!', 0, 0, 0, 4]),
];

/// Connections a misbehaving backend accepted: which sent the garbage, which were
/// closed by the proxy.
#[derive(Default)]
struct BackendLog {
    next_id: usize,
    misbehaved: Vec<(String, usize)>,
    closed: HashSet<usize>,
    /// (query text, connection) of the queries answered normally.
    answered: Vec<(String, usize)>,
}

/// A misbehaving "server": a real TCP listener that speaks just enough of the protocol
/// (trust login, the usual ParameterStatus, a CommandComplete for any query) and sends
/// a broken frame for a query naming one of `MISBEHAVIOURS`. No real PostgreSQL sends a
/// broken frame, and the point is the proxy's own code over real sockets; everything
/// else in this test is the real proxy.
async fn misbehaving_backend() -> (u16, std::sync::Arc<std::sync::Mutex<BackendLog>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let log = std::sync::Arc::new(std::sync::Mutex::new(BackendLog::default()));
    let shared = log.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let id = {
                let mut log = shared.lock().unwrap();
                log.next_id += 1;
                log.next_id
            };
            tokio::spawn(serve_misbehaving(socket, id, shared.clone()));
        }
    });
    (port, log)
}

async fn serve_misbehaving(
    mut s: tokio::net::TcpStream,
    id: usize,
    log: std::sync::Arc<std::sync::Mutex<BackendLog>>,
) {
    use shardgate::protocol::messages;
    let mut len = [0u8; 4];
    if s.read_exact(&mut len).await.is_err() {
        return;
    }
    let mut startup = vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
    if s.read_exact(&mut startup).await.is_err() {
        return;
    }
    let mut out = bytes::BytesMut::new();
    messages::auth_request(&mut out, 0, &[]);
    for (name, value) in [
        ("server_version", "16.0"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        messages::parameter_status(&mut out, name, value);
    }
    messages::backend_key_data(&mut out, 4242, id as u32);
    messages::ready_for_query(&mut out, b'I');
    let _ = s.write_all(&out).await;
    let mut header = [0u8; 5];
    while s.read_exact(&mut header).await.is_ok() {
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        if s.read_exact(&mut body).await.is_err() || header[0] == b'X' {
            break;
        }
        if header[0] != b'Q' {
            continue;
        }
        let text = String::from_utf8_lossy(&body);
        out.clear();
        match MISBEHAVIOURS.iter().find(|(word, _)| text.contains(word)) {
            Some((word, garbage)) => {
                log.lock().unwrap().misbehaved.push((word.to_string(), id));
                out.extend_from_slice(garbage);
            }
            None => {
                log.lock().unwrap().answered.push((text.into_owned(), id));
                messages::command_complete(&mut out, "SELECT 0");
                messages::ready_for_query(&mut out, b'I');
            }
        }
        if s.write_all(&out).await.is_err() {
            break;
        }
    }
    log.lock().unwrap().closed.insert(id);
}

/// Reads frames until the proxy closes the connection (or 10 s pass).
async fn frames_until_close(s: &mut tokio::net::TcpStream) -> Vec<shardgate::protocol::Frame> {
    let mut inbuf = bytes::BytesMut::new();
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        while let Some(f) = shardgate::protocol::decode_frame(&mut inbuf, 1 << 20).unwrap() {
            frames.push(f);
        }
        match tokio::time::timeout_at(deadline, s.read_buf(&mut inbuf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return frames,
        }
    }
}

/// Issue 10 item 10: a backend that breaks the protocol (an impossible length, a
/// message over `limits.max_message_size` the proxy would have to read whole, an
/// unknown message type) is the server's fault: the client gets 08006 naming the
/// node, not the 08P01 of its own protocol errors; that server connection is closed,
/// never pooled; the proxy goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_breaks_the_protocol_is_blamed_and_its_connection_dropped() {
    use shardgate::protocol::messages;
    let cluster = shared_cluster();
    let (port, log) = misbehaving_backend().await;
    let map = format!(
        "version: 1\ndatabase: {}\nshards:\n  s0: {{ primary: \"127.0.0.1:{port}\" }}\ndefault_shard: s0\n",
        cluster.database
    );
    let proxy = common::proxy::start_proxy_with_map(cluster, &map, ProxyOptions::default()).await;
    let node = format!("127.0.0.1:{port}");
    for (word, _) in MISBEHAVIOURS {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        common::raw::login(&mut s, &proxy).await;
        let mut out = bytes::BytesMut::new();
        messages::query(&mut out, &format!("SELECT {word}"));
        s.write_all(&out).await.unwrap();
        let frames = frames_until_close(&mut s).await;
        let error = frames
            .iter()
            .find(|f| f.tag == b'E')
            .unwrap_or_else(|| panic!("{word}: an ErrorResponse, got {frames:?}"));
        let (code, message) = messages::decode_error_fields(error);
        assert_eq!(code, "08006", "{word}: {message}");
        assert!(message.contains(&node), "{word}: names the node: {message}");
        let culprit = log
            .lock()
            .unwrap()
            .misbehaved
            .iter()
            .find(|(w, _)| w == word)
            .map(|(_, id)| *id)
            .expect("the backend got the query");
        common::wait_for(
            "the proxy to close the server connection that broke the protocol",
            std::time::Duration::from_secs(10),
            || {
                let closed = log.lock().unwrap().closed.contains(&culprit);
                async move { closed }
            },
        )
        .await;
        // The proxy still serves, on another server connection.
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        common::raw::login(&mut s, &proxy).await;
        out.clear();
        messages::query(&mut out, "SELECT fine");
        s.write_all(&out).await.unwrap();
        let mut inbuf = bytes::BytesMut::new();
        let answer = common::raw::read_until_ready(&mut s, &mut inbuf).await;
        assert!(answer.iter().any(|(t, _)| *t == b'C'), "{word}: {answer:?}");
        let answered_by = log
            .lock()
            .unwrap()
            .answered
            .iter()
            .rev()
            .find(|(text, _)| text.contains("fine"))
            .map(|(_, id)| *id)
            .expect("the backend answered");
        assert_ne!(
            answered_by, culprit,
            "{word}: the broken connection was reused"
        );
    }
}

/// Sends (tag, body) messages as they are (any bytes), ending with one Query or Sync,
/// and returns the answer up to its ReadyForQuery, failing on an error.
async fn raw_round_trip(
    s: &mut tokio::net::TcpStream,
    inbuf: &mut bytes::BytesMut,
    messages: &[(u8, Vec<u8>)],
) -> Vec<(u8, Vec<u8>)> {
    let mut out = bytes::BytesMut::new();
    for (tag, body) in messages {
        shardgate::protocol::messages::put_msg(&mut out, *tag, |b| b.extend_from_slice(body));
    }
    s.write_all(&out).await.unwrap();
    let answer = common::raw::read_until_ready(s, inbuf).await;
    let errors: Vec<String> = answer
        .iter()
        .filter(|(t, _)| *t == b'E')
        .map(|(_, body)| String::from_utf8_lossy(body).into_owned())
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    answer
}

/// The first column of the first DataRow among `answer`.
fn first_value(answer: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let (_, row) = answer
        .iter()
        .find(|(t, _)| *t == b'D')
        .unwrap_or_else(|| panic!("a row: {answer:?}"));
    let len = i32::from_be_bytes([row[2], row[3], row[4], row[5]]) as usize;
    row[6..6 + len].to_vec()
}

/// Issue 10 item 4: with `client_encoding` LATIN1 a client's literal 'é' is the byte
/// 0xE9, no UTF-8. Such text passes through unchanged, simple and extended protocol
/// (named and unnamed statements), and round-trips byte for byte; the session goes on
/// (it used to end in FATAL 08P01).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latin1_text_passes_through_byte_for_byte() {
    let cluster = shared_cluster();
    let db = unique_name("latin1");
    let port = cluster.primary.1;
    superuser_client(cluster, port, "postgres")
        .await
        .batch_execute(&format!(
            "CREATE DATABASE {db} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0 OWNER {}",
            cluster.app_user
        ))
        .await
        .unwrap();
    let map = format!(
        "version: 1\ndatabase: {db}\nshards:\n  s0: {}\ndefault_shard: s0\n",
        common::proxy::shard_entry(cluster)
    );
    let mut proxy =
        common::proxy::start_proxy_with_map(cluster, &map, ProxyOptions::default()).await;
    proxy.database = db.clone();
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    common::raw::login(&mut s, &proxy).await;
    let mut inbuf = bytes::BytesMut::new();
    let q = |text: &[u8]| (b'Q', [text, b"\0"].concat());
    for setup in [
        &b"SET client_encoding = 'LATIN1'"[..],
        b"CREATE TABLE words (id int, v text)",
    ] {
        raw_round_trip(&mut s, &mut inbuf, &[q(setup)]).await;
    }

    // Simple protocol: an INSERT and a SELECT with 0xE9 in their literals.
    raw_round_trip(
        &mut s,
        &mut inbuf,
        &[q(b"INSERT INTO words VALUES (1, 'caf\xe9')")],
    )
    .await;
    let answer = raw_round_trip(
        &mut s,
        &mut inbuf,
        &[q(b"SELECT v FROM words WHERE v = 'caf\xe9'")],
    )
    .await;
    assert_eq!(first_value(&answer), b"caf\xe9");

    // Extended protocol: a named statement (renamed pool-wide, so the proxy itself
    // writes its Parse) and an unnamed one with a parameter.
    let parse = |name: &[u8], text: &[u8]| (b'P', [name, b"\0", text, b"\0\0\0"].concat());
    let bind = |name: &[u8], param: Option<&[u8]>| {
        let mut body = [b"\0", name, b"\0\0\0"].concat();
        match param {
            Some(p) => {
                body.extend_from_slice(&1i16.to_be_bytes());
                body.extend_from_slice(&(p.len() as i32).to_be_bytes());
                body.extend_from_slice(p);
            }
            None => body.extend_from_slice(&0i16.to_be_bytes()),
        }
        body.extend_from_slice(&0i16.to_be_bytes());
        (b'B', body)
    };
    let execute = (b'E', b"\0\0\0\0\0".to_vec());
    let sync = (b'S', Vec::new());
    raw_round_trip(
        &mut s,
        &mut inbuf,
        &[
            parse(b"ins", b"INSERT INTO words VALUES (2, 'na\xefve')"),
            bind(b"ins", None),
            execute.clone(),
            sync.clone(),
        ],
    )
    .await;
    // The named statement again, in a later transaction.
    raw_round_trip(
        &mut s,
        &mut inbuf,
        &[bind(b"ins", None), execute.clone(), sync.clone()],
    )
    .await;
    let answer = raw_round_trip(
        &mut s,
        &mut inbuf,
        &[
            parse(
                b"",
                b"SELECT $1::text || '\xe9' || count(*) FROM words WHERE v = 'na\xefve'",
            ),
            bind(b"", Some(b"\xc0")),
            execute.clone(),
            sync.clone(),
        ],
    )
    .await;
    assert_eq!(first_value(&answer), b"\xc0\xe92");

    // What the server stored, read directly: the client's bytes, as LATIN1.
    let direct = superuser_client(cluster, port, &db).await;
    let stored: Vec<Vec<u8>> = direct
        .query("SELECT convert_to(v, 'LATIN1') FROM words ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        stored,
        vec![
            b"caf\xe9".to_vec(),
            b"na\xefve".to_vec(),
            b"na\xefve".to_vec()
        ]
    );
}
