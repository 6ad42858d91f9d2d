//! Hardening of the client edge (issue 10): what an attacker on the network can do
//! before logging in. Each test talks raw protocol to a proxy in front of real
//! PostgreSQL, so it controls exactly which bytes go out and when.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::proxy::{run_cmd, start_proxy, temp_dir, ProxyOptions, TempDir};
use common::shared_cluster;
use shardgate::protocol::messages;

const SSL_REQUEST: u32 = 80877103;
const GSSENC_REQUEST: u32 = 80877104;

/// A self-signed certificate and key for a TLS-enabled proxy: (dir, cert, key).
fn self_signed() -> (TempDir, PathBuf, PathBuf) {
    let dir = temp_dir("hardening-tls");
    let (cert, key) = (dir.0.join("server.crt"), dir.0.join("server.key"));
    let (ok, _, stderr) = run_cmd(
        std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=localhost", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    );
    assert!(ok, "openssl: {stderr}");
    (dir, cert, key)
}

fn request(code: u32) -> [u8; 8] {
    let mut packet = [0u8; 8];
    packet[..4].copy_from_slice(&8u32.to_be_bytes());
    packet[4..].copy_from_slice(&code.to_be_bytes());
    packet
}

/// What the proxy sends until it closes the connection, and whether it closed within
/// `limit` (false: it was still open, waiting for more).
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let closed = tokio::time::timeout(limit, async {
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = s.read(&mut chunk).await {
            got.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .is_ok();
    (got, closed)
}

/// The SQLSTATE of an ErrorResponse at the start of `bytes`.
fn sqlstate(bytes: &[u8]) -> Option<String> {
    let mut buf = BytesMut::from(bytes);
    let frame = shardgate::protocol::decode_frame(&mut buf, 1 << 20).ok()??;
    if frame.tag != b'E' {
        return None;
    }
    // Fields: a type byte, a NUL-terminated value; a lone NUL ends the list.
    let mut fields = frame.body().split(|&b| b == 0);
    fields
        .find(|f| f.first() == Some(&b'C'))
        .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
}

/// CVE-2021-23214 class: a man in the middle appends a plaintext startup packet to the
/// client's SSLRequest (or GSSENCRequest). The proxy must not answer the request, let
/// alone read the injected bytes as if they had come through the encrypted channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_ssl_or_gssenc_request_close_the_connection() {
    let cluster = shared_cluster();
    let (_dir, cert, key) = self_signed();
    let proxy = start_proxy(
        cluster,
        ProxyOptions {
            tls: Some((cert, key)),
            ..Default::default()
        },
    )
    .await;
    for code in [SSL_REQUEST, GSSENC_REQUEST] {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        let mut out = BytesMut::new();
        out.put_slice(&request(code));
        messages::startup(
            &mut out,
            &[("user", &proxy.user), ("database", &proxy.database)],
        );
        s.write_all(&out).await.unwrap();
        let (got, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
        assert!(
            closed,
            "request {code}: the proxy kept the connection open after answering {:?}",
            String::from_utf8_lossy(&got)
        );
        assert_eq!(
            sqlstate(&got).as_deref(),
            Some("08P01"),
            "request {code}: expected a protocol violation and close, got {:?}",
            String::from_utf8_lossy(&got)
        );
        let mut rest = BytesMut::from(&got[..]);
        let first = shardgate::protocol::decode_frame(&mut rest, 1 << 20)
            .unwrap()
            .unwrap();
        assert!(
            first.tag == b'E' && rest.is_empty(),
            "nothing after the error"
        );
    }
    // A well-behaved client (request, wait for the answer) still gets TLS.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&request(SSL_REQUEST)).await.unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"S");
}

/// Reads one whole message, failing the test if the proxy closes first.
async fn read_frame(s: &mut TcpStream, inbuf: &mut BytesMut) -> shardgate::protocol::Frame {
    loop {
        if let Some(frame) = shardgate::protocol::decode_frame(inbuf, 1 << 20).unwrap() {
            return frame;
        }
        assert!(s.read_buf(inbuf).await.unwrap() > 0, "closed during login");
    }
}

/// Starts a SCRAM login as `user` with client nonce "clientnonce"; returns the
/// connection, its receive buffer and the server-first-message.
async fn scram_first(
    proxy: &common::proxy::TestProxy,
    user: &str,
) -> (TcpStream, BytesMut, String) {
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut out = BytesMut::new();
    messages::startup(&mut out, &[("user", user), ("database", &proxy.database)]);
    s.write_all(&out).await.unwrap();
    let mut inbuf = BytesMut::new();
    let frame = read_frame(&mut s, &mut inbuf).await;
    assert_eq!((frame.tag, &frame.body()[..4]), (b'R', &[0, 0, 0, 10][..]));
    out.clear();
    messages::sasl_initial_response(&mut out, "SCRAM-SHA-256", b"n,,n=,r=clientnonce");
    s.write_all(&out).await.unwrap();
    let frame = read_frame(&mut s, &mut inbuf).await;
    assert_eq!((frame.tag, &frame.body()[..4]), (b'R', &[0, 0, 0, 11][..]));
    let server_first = String::from_utf8(frame.body()[4..].to_vec()).unwrap();
    (s, inbuf, server_first)
}

/// The salt and iteration count ("s=...,i=...") the proxy offers `user`.
async fn scram_salt(proxy: &common::proxy::TestProxy, user: &str) -> String {
    let (_, _, server_first) = scram_first(proxy, user).await;
    let (_, salt_and_rounds) = server_first.split_once(",s=").unwrap();
    salt_and_rounds.to_owned()
}

/// User enumeration: an unknown user must get a salt that is as stable as a real
/// user's (the same on every attempt) and as distinct (its own per name), so the
/// server-first-message does not tell which names exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_users_get_a_stable_salt_of_their_own() {
    let cluster = shared_cluster();
    let proxy = start_proxy(cluster, ProxyOptions::default()).await;
    let ghost = scram_salt(&proxy, "ghost").await;
    assert_eq!(
        ghost,
        scram_salt(&proxy, "ghost").await,
        "same name, same salt"
    );
    let other = scram_salt(&proxy, "phantom").await;
    assert_ne!(ghost, other, "each unknown name has its own salt");
    let real = scram_salt(&proxy, &proxy.user).await;
    assert_ne!(ghost, real);
    assert_eq!(real, scram_salt(&proxy, &proxy.user).await);
    let rounds = |m: &str| m.split_once(",i=").map(|(_, i)| i.to_owned());
    assert_eq!(rounds(&ghost), rounds(&real), "same iteration count");
}

/// A proxy like `start_proxy`'s with `limits:` settings added (login_timeout is not
/// one of ProxyOptions'); the handle and its config dir live as long as the pair.
async fn start_proxy_with_limits(
    opts: ProxyOptions,
    limits: &str,
) -> (shardgate::app::ProxyHandle, TempDir) {
    let cluster = shared_cluster();
    let (dir, path) = common::proxy::write_config(cluster, &opts, "127.0.0.1:0");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replacen("limits: { ", &format!("limits: {{ {limits}, "), 1);
    std::fs::write(&path, text).unwrap();
    let config = shardgate::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let map =
        shardgate::shard_map::ShardMap::load(&config.shard_map).unwrap_or_else(|e| panic!("{e}"));
    let handle = shardgate::app::start(&config, &map).await.unwrap();
    (handle, dir)
}

/// A client that completes TLS and then says nothing gets the login-timeout error,
/// flushed and followed by an orderly TLS close (close_notify), not a dropped socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_timeout_error_arrives_over_tls_before_an_orderly_close() {
    let (_dir, cert, key) = self_signed();
    let opts = ProxyOptions {
        tls: Some((cert, key)),
        ..Default::default()
    };
    let (proxy, _config) = start_proxy_with_limits(opts, "login_timeout: 2s").await;
    let mut tls = common::tls::tls_connect(proxy.local_addr).await;
    let mut got = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut got))
        .await
        .expect("the proxy closes the connection after the login timeout");
    assert_eq!(
        sqlstate(&got).as_deref(),
        Some("08006"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        String::from_utf8_lossy(&got).contains("login timed out"),
        "{got:?}"
    );
    // Without close_notify, rustls reports the end as an unexpected EOF: the client
    // cannot tell a complete error message from a truncated stream.
    end.expect("TLS closed with close_notify");
}

/// A client-final-message whose nonce or channel binding does not belong to the
/// exchange is a protocol violation (08P01), as in PostgreSQL, for real and unknown
/// users alike; only a wrong proof is a wrong password (28P01).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_scram_nonce_or_binding_is_a_protocol_error() {
    let cluster = shared_cluster();
    let proxy = start_proxy(cluster, ProxyOptions::default()).await;
    let zeros = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    // (what, client-final without proof from the exchange's nonce, expected SQLSTATE)
    type Forge = fn(&str) -> String;
    let cases: [(&str, Forge, &str); 3] = [
        (
            "wrong nonce",
            |_| "c=biws,r=clientnonceFORGED".into(),
            "08P01",
        ),
        ("wrong c=", |r| format!("c=eSws,r={r}"), "08P01"),
        ("wrong proof", |r| format!("c=biws,r={r}"), "28P01"),
    ];
    for user in [proxy.user.clone(), "ghost".to_owned()] {
        for (what, without_proof, code) in cases {
            let (mut s, _, server_first) = scram_first(&proxy, &user).await;
            let nonce = server_first
                .strip_prefix("r=")
                .and_then(|r| r.split(',').next())
                .unwrap();
            let mut out = BytesMut::new();
            let message = format!("{},p={zeros}", without_proof(nonce));
            messages::put_msg(&mut out, b'p', |b| b.extend_from_slice(message.as_bytes()));
            s.write_all(&out).await.unwrap();
            let (got, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
            assert!(closed, "{user}, {what}: connection left open");
            assert_eq!(sqlstate(&got).as_deref(), Some(code), "{user}, {what}");
        }
    }
}

/// One connection's worth of abuse, picked by `kind`: random bytes before or after a
/// login, truncated frames, lengths up to 2^31, an abandoned transaction, a query whose
/// answer is never read, or a socket left half-open until the end of the soak.
async fn abuse(
    addr: std::net::SocketAddr,
    proxy: &common::proxy::TestProxy,
    kind: u32,
    held: &tokio::sync::Mutex<Vec<TcpStream>>,
) {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return;
    };
    let noise: Vec<u8> = (0..(rand::random::<usize>() % 4096 + 1))
        .map(|_| rand::random())
        .collect();
    let mut frame = BytesMut::new();
    let tag = rand::random::<u8>();
    frame.put_u8(tag);
    let len = match rand::random::<u32>() % 4 {
        0 => 4,
        1 => rand::random::<u32>() % 100_000,
        2 => 0x7fff_ffff,
        _ => u32::MAX,
    };
    frame.put_u32(len);
    frame.extend_from_slice(&noise[..noise.len().min(64)]);
    let _ = match kind {
        0 => s.write_all(&noise).await,
        1 => {
            // A startup packet claiming 2^31 bytes.
            let mut p = BytesMut::new();
            p.put_u32(0x7fff_ffff);
            p.put_u32(196_608);
            s.write_all(&p).await
        }
        2 => {
            // Half a startup packet, then silence: held open until the end.
            let _ = s.write_all(&request(196_608)[..6]).await;
            held.lock().await.push(s);
            return;
        }
        3 | 4 => {
            common::raw::login(&mut s, proxy).await;
            if kind == 3 {
                s.write_all(&frame).await
            } else {
                s.write_all(&noise).await
            }
        }
        5 => {
            // A transaction holding a server connection, then the client vanishes.
            common::raw::login(&mut s, proxy).await;
            let mut out = BytesMut::new();
            messages::query(
                &mut out,
                "BEGIN; SELECT pg_advisory_xact_lock(42); SELECT 1",
            );
            s.write_all(&out).await
        }
        _ => {
            // A query whose (large) answer is never read.
            common::raw::login(&mut s, proxy).await;
            let mut out = BytesMut::new();
            messages::query(
                &mut out,
                "SELECT repeat('x', 1000) FROM generate_series(1, 20000)",
            );
            s.write_all(&out).await
        }
    };
    let mut sink = [0u8; 512];
    let _ = tokio::time::timeout(Duration::from_millis(20), s.read(&mut sink)).await;
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Random bytes, truncated frames, huge lengths, abandoned transactions and half-open
/// sockets thrown at a running proxy for a few seconds, while a normal client keeps
/// querying: the normal client never fails, and afterwards no server connection is
/// still lent out, a new client is served, and memory is back near where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_soak_of_garbage_leaves_the_proxy_serving_and_clean() {
    let cluster = shared_cluster();
    let proxy = std::sync::Arc::new(
        start_proxy(
            cluster,
            ProxyOptions {
                pool_size: 4,
                max_client_connections: 200,
                ..Default::default()
            },
        )
        .await,
    );
    let addr = proxy.addr;
    let normal = proxy.client().await;
    normal.simple_query("SELECT 1").await.unwrap();
    let rss_before = rss_kb();
    let held = std::sync::Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let until = tokio::time::Instant::now() + Duration::from_secs(6);
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let (proxy, held) = (proxy.clone(), held.clone());
            tokio::spawn(async move {
                let mut n = 0u32;
                while tokio::time::Instant::now() < until {
                    // A panicking login (the proxy refused it) must not end the soak.
                    let (proxy2, held2) = (proxy.clone(), held.clone());
                    let kind = (rand::random::<u32>() + w) % 7;
                    let _ =
                        tokio::spawn(async move { abuse(addr, &proxy2, kind, &held2).await }).await;
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut normal_queries = 0;
    while tokio::time::Instant::now() < until {
        let rows = normal
            .simple_query("SELECT count(*) FROM generate_series(1, 100)")
            .await
            .expect("the normal client is served during the soak");
        assert!(!rows.is_empty());
        normal_queries += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut attacks = 0;
    for w in workers {
        attacks += w.await.unwrap();
    }
    held.lock().await.clear();
    eprintln!("{attacks} abusive connections, {normal_queries} normal queries");
    assert!(attacks > 50, "only {attacks} abusive connections");
    assert!(normal_queries > 10);
    // Every server connection comes back (abandoned ones rolled back or closed).
    let pools = proxy.handle.frontend.pools.all();
    common::wait_for(
        "no server connection lent out",
        Duration::from_secs(20),
        || {
            let pools = pools.clone();
            async move { pools.iter().all(|p| p.in_use() == 0) }
        },
    )
    .await;
    let fresh = proxy.client().await;
    let row = fresh.query_one("SELECT 41 + 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    // The advisory lock of an abandoned transaction is gone (rolled back on the server).
    let free: bool = fresh
        .query_one("SELECT pg_try_advisory_lock(42)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(free, "an abandoned transaction still holds its lock");
    fresh
        .execute("SELECT pg_advisory_unlock(42)", &[])
        .await
        .unwrap();
    let growth = rss_kb().saturating_sub(rss_before);
    assert!(growth < 64 << 10, "RSS grew by {growth} kB over the soak");
}
