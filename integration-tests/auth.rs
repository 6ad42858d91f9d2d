//! Client-facing connection setup: SCRAM passwords, TLS, channel binding, the
//! connection limits (logged-in clients and connections still logging in).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use common::proxy::{pg_bin, run_cmd, start_proxy, temp_dir, ProxyOptions, TempDir};
use common::shared_cluster;
use shardgate::protocol::messages;

const SSL_REQUEST: u32 = 80877103;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_unknown_user_get_28p01() {
    let cluster = shared_cluster();
    let proxy = start_proxy(cluster, ProxyOptions::default()).await;
    for (user, password) in [(cluster.app_user.as_str(), "wrong"), ("nobody", "whatever")] {
        let dsn = format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname={}",
            proxy.port(),
            cluster.database
        );
        let err = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
            .await
            .err()
            .expect("login must fail");
        assert_eq!(err.code().map(|c| c.code()), Some("28P01"), "{user}: {err}");
    }
    // The right password works, and an unknown database is refused clearly.
    proxy.client().await.simple_query("SELECT 1").await.unwrap();
    let dsn = format!(
        "host=127.0.0.1 port={} user={} password={} dbname=nope",
        proxy.port(),
        cluster.app_user,
        cluster.app_password
    );
    let err = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code().map(|c| c.code()), Some("3D000"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_clients_get_53300() {
    let cluster = shared_cluster();
    let proxy = start_proxy(
        cluster,
        ProxyOptions {
            max_client_connections: 2,
            ..Default::default()
        },
    )
    .await;
    let a = proxy.client().await;
    let b = proxy.client().await;
    let err = tokio_postgres::connect(&proxy.dsn(), tokio_postgres::NoTls)
        .await
        .err()
        .expect("third client refused");
    assert_eq!(err.code().map(|c| c.code()), Some("53300"), "{err}");
    drop(a);
    // The slot frees once the first session has ended.
    common::wait_for(
        "a free client slot",
        std::time::Duration::from_secs(10),
        || async {
            tokio_postgres::connect(&proxy.dsn(), tokio_postgres::NoTls)
                .await
                .is_ok()
        },
    )
    .await;
    b.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_when_configured_and_a_plain_no_otherwise() {
    let cluster = shared_cluster();
    let dir = temp_dir("tls");
    let (cert, key) = (dir.0.join("server.crt"), dir.0.join("server.key"));
    let (ok, _, stderr) = run_cmd(
        std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=localhost",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    );
    assert!(ok, "openssl: {stderr}");
    let proxy = start_proxy(
        cluster,
        ProxyOptions {
            tls: Some((cert, key)),
            ..Default::default()
        },
    )
    .await;
    let (ok, stdout, stderr) = run_cmd(
        std::process::Command::new(pg_bin("psql"))
            .arg(format!("{}?sslmode=require", proxy.url()))
            .args(["-X", "-At", "-c", "SELECT 40 + 2", "-c", "\\conninfo"]),
    );
    assert!(ok, "psql over TLS: {stderr}");
    assert!(stdout.contains("42"), "{stdout}");
    assert!(stdout.contains("SSL connection"), "{stdout}");

    let plain = start_proxy(cluster, ProxyOptions::default()).await;
    let (ok, _, stderr) = run_cmd(
        std::process::Command::new(pg_bin("psql"))
            .arg(format!("{}?sslmode=require", plain.url()))
            .args(["-X", "-At", "-c", "SELECT 1"]),
    );
    assert!(!ok);
    assert!(stderr.contains("does not support SSL"), "{stderr}");
    let (ok, stdout, _) = run_cmd(
        std::process::Command::new(pg_bin("psql"))
            .arg(format!("{}?sslmode=prefer", plain.url()))
            .args(["-X", "-At", "-c", "SELECT 1"]),
    );
    assert!(ok && stdout.trim() == "1");
}

/// A proxy like `start_proxy`'s with more `limits:` settings than ProxyOptions has
/// (`"startup_wait: 1s, login_timeout: 60s"`); keep the pair alive as long as the proxy.
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

/// The app user's DSN for a proxy on `port`.
fn app_dsn(port: u16) -> String {
    let cluster = shared_cluster();
    format!(
        "host=127.0.0.1 port={port} user={} password={} dbname={}",
        cluster.app_user, cluster.app_password, cluster.database
    )
}

/// A self-signed certificate made by openssl with `key_args` (e.g. `["-newkey",
/// "rsa:2048"]`) and `digest` (e.g. `-sha256`): (dir, cert, key).
fn self_signed(key_args: &[&str], digest: &str) -> (TempDir, PathBuf, PathBuf) {
    let dir = temp_dir("auth-tls");
    let (cert, key) = (dir.0.join("server.crt"), dir.0.join("server.key"));
    let (ok, _, stderr) = run_cmd(
        std::process::Command::new("openssl")
            .args(["req", "-x509", "-nodes", "-days", "2", digest])
            .args(key_args)
            .args(["-subj", "/CN=localhost", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    );
    assert!(ok, "openssl: {stderr}");
    (dir, cert, key)
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

fn ssl_request() -> [u8; 8] {
    let mut packet = [0u8; 8];
    packet[..4].copy_from_slice(&8u32.to_be_bytes());
    packet[4..].copy_from_slice(&SSL_REQUEST.to_be_bytes());
    packet
}

/// Issue 10 item 7: sockets that connect and say nothing hold login slots, never
/// client slots. With 200 of them open and 50 client slots, real clients (a driver and
/// psql) log in at once, while the silent sockets are all still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_do_not_lock_out_real_clients() {
    let opts = ProxyOptions {
        max_client_connections: 50,
        ..Default::default()
    };
    // Room for every silent socket and long waits: the clients get in beside them, not
    // after the proxy gave up on them.
    let limits = "max_unauthenticated: 300, startup_wait: 60s, login_timeout: 60s";
    let (proxy, _dir) = start_proxy_with_limits(opts, limits).await;
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(TcpStream::connect(proxy.local_addr).await.unwrap());
    }
    let started = Instant::now();
    let dsn = app_dsn(proxy.local_addr.port());
    let client = common::proxy::connect(&dsn).await;
    client.simple_query("SELECT 1").await.unwrap();
    let psql = std::process::Command::new(pg_bin("psql"))
        .arg(&dsn)
        .args(["-X", "-At", "-c", "SELECT 40 + 2"])
        .output()
        .unwrap();
    assert!(
        psql.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&psql.stderr)
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "logins took {took:?}");
    for s in &silent {
        let mut byte = [0u8; 1];
        let still_open =
            matches!(s.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        assert!(still_open, "a silent socket was closed before startup_wait");
    }
}

/// Over either bound, a new socket gets 53300 at once, before it has sent anything,
/// and a client asking for TLS gets the error instead of a handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_either_limit_a_socket_gets_53300_at_once() {
    let (_certs, cert, key) = self_signed(
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "-sha256",
    );
    let opts = ProxyOptions {
        max_client_connections: 2,
        tls: Some((cert, key)),
        ..Default::default()
    };
    let limits = "max_unauthenticated: 3, startup_wait: 60s, login_timeout: 60s";
    let (proxy, _dir) = start_proxy_with_limits(opts, limits).await;
    let addr = proxy.local_addr;
    let refused_at_once = |what: &'static str| async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let (got, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
        assert!(closed, "{what}: left open");
        assert_eq!(sqlstate(&got).as_deref(), Some("53300"), "{what}: {got:?}");
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&ssl_request()).await.unwrap();
        let (got, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
        assert!(closed, "{what}, SSLRequest: left open");
        assert_eq!(
            sqlstate(&got).as_deref(),
            Some("53300"),
            "{what}, SSLRequest: {got:?}"
        );
    };

    // Three silent sockets hold every login slot.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    refused_at_once("login slots taken").await;
    drop(silent);

    // Two logged-in clients hold every client slot (logins work again once the silent
    // sockets' slots are back).
    let dsn = app_dsn(addr.port());
    let clients = std::sync::Mutex::new(Vec::new());
    let (dsn, logged_in) = (&dsn, &clients);
    common::wait_for(
        "two clients logged in",
        Duration::from_secs(10),
        || async move {
            if let Ok((client, conn)) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await {
                tokio::spawn(conn);
                logged_in.lock().unwrap().push(client);
            }
            logged_in.lock().unwrap().len() == 2
        },
    )
    .await;
    refused_at_once("client slots taken").await;
    for client in clients.into_inner().unwrap() {
        client.simple_query("SELECT 1").await.unwrap();
    }
}

/// A socket that does not send a whole first message within `startup_wait` is closed,
/// long before `login_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_silent_past_startup_wait_is_closed() {
    let limits = "startup_wait: 1s, login_timeout: 60s";
    let (proxy, _dir) = start_proxy_with_limits(ProxyOptions::default(), limits).await;
    // Nothing at all, and half a startup packet (its length only).
    for first in [&[][..], &[0, 0, 0, 40][..]] {
        let mut s = TcpStream::connect(proxy.local_addr).await.unwrap();
        s.write_all(first).await.unwrap();
        let (got, closed) = read_until_closed(&mut s, Duration::from_secs(30)).await;
        assert!(closed, "still open after 30s");
        assert!(got.is_empty(), "{got:?}");
    }
}

/// The next whole message from the proxy, or None once it has closed.
async fn next_frame<S: AsyncRead + Unpin>(
    s: &mut S,
    inbuf: &mut BytesMut,
) -> Option<shardgate::protocol::Frame> {
    loop {
        if let Some(frame) = shardgate::protocol::decode_frame(inbuf, 1 << 20).unwrap() {
            return Some(frame);
        }
        if s.read_buf(inbuf).await.unwrap_or(0) == 0 {
            return None;
        }
    }
}

/// The SQLSTATE of an ErrorResponse body.
fn error_code(body: &[u8]) -> String {
    let mut fields = body.split(|&b| b == 0);
    let code = fields.find(|f| f.first() == Some(&b'C')).unwrap();
    String::from_utf8_lossy(&code[1..]).into_owned()
}

/// Sends the app user's startup packet; returns the mechanisms AuthenticationSASL
/// offers.
async fn offered_mechanisms<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    inbuf: &mut BytesMut,
) -> Vec<String> {
    let cluster = shared_cluster();
    let mut out = BytesMut::new();
    let params = [
        ("user", &*cluster.app_user),
        ("database", &cluster.database),
    ];
    messages::startup(&mut out, &params);
    s.write_all(&out).await.unwrap();
    let frame = next_frame(s, inbuf).await.expect("AuthenticationSASL");
    let body = frame.body();
    assert_eq!((frame.tag, &body[..4]), (b'R', &[0, 0, 0, 10][..]));
    body[4..]
        .split(|&b| b == 0)
        .filter(|m| !m.is_empty())
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect()
}

/// A SCRAM login with postgres-protocol's client choosing `mechanism` and binding as
/// `binding`: Ok once ReadyForQuery arrives, else the SQLSTATE of the refusal.
async fn scram_login<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    mechanism: &str,
    binding: ChannelBinding,
) -> Result<(), String> {
    let mut inbuf = BytesMut::new();
    offered_mechanisms(s, &mut inbuf).await;
    let password = shared_cluster().app_password.clone();
    let mut scram = ScramSha256::new(password.as_bytes(), binding);
    let mut out = BytesMut::new();
    messages::sasl_initial_response(&mut out, mechanism, scram.message());
    s.write_all(&out).await.unwrap();
    while let Some(frame) = next_frame(s, &mut inbuf).await {
        let body = frame.body();
        out.clear();
        match (frame.tag, body.get(..4)) {
            (b'R', Some([0, 0, 0, 11])) => {
                scram.update(&body[4..]).unwrap();
                messages::put_msg(&mut out, b'p', |b| b.extend_from_slice(scram.message()));
                s.write_all(&out).await.unwrap();
            }
            (b'R', Some([0, 0, 0, 12])) => scram.finish(&body[4..]).unwrap(),
            (b'E', _) => return Err(error_code(body)),
            (b'Z', _) => return Ok(()),
            _ => {}
        }
    }
    Err("closed without an answer".into())
}

/// What the proxy answers a SASLInitialResponse of `mechanism` and client-first
/// `first`: the SQLSTATE of its error, or "continue" for a server-first-message.
async fn answer_to<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    mechanism: &str,
    first: &str,
) -> String {
    let mut inbuf = BytesMut::new();
    offered_mechanisms(s, &mut inbuf).await;
    let mut out = BytesMut::new();
    messages::sasl_initial_response(&mut out, mechanism, first.as_bytes());
    s.write_all(&out).await.unwrap();
    match next_frame(s, &mut inbuf).await {
        Some(f) if f.tag == b'E' => error_code(f.body()),
        Some(f) if f.tag == b'R' && f.body().get(..4) == Some(&[0, 0, 0, 11]) => "continue".into(),
        other => panic!("unexpected answer {:?}", other.map(|f| f.tag)),
    }
}

/// The tls-server-end-point data of a PEM certificate signed with SHA-256.
fn sha256_end_point(cert: &std::path::Path) -> Vec<u8> {
    use sha2::Digest;
    let pem = std::fs::read(cert).unwrap();
    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .unwrap()
        .unwrap();
    sha2::Sha256::digest(der.as_ref()).to_vec()
}

/// Issue 10 item 5: over TLS the proxy offers SCRAM-SHA-256-PLUS, so libpq clients that
/// require channel binding log in, for certificates signed with SHA-256 (RSA) and with
/// SHA-384 (ECDSA), whose end-point hash is SHA-384. Plain SCRAM stays offered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_require_logs_in_over_tls() {
    let certs = [
        self_signed(&["-newkey", "rsa:2048"], "-sha256"),
        self_signed(
            &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
            "-sha384",
        ),
    ];
    for (_dir, cert, key) in certs {
        let opts = ProxyOptions {
            tls: Some((cert.clone(), key)),
            ..Default::default()
        };
        let proxy = start_proxy(shared_cluster(), opts).await;
        for binding in ["require", "disable"] {
            let (ok, stdout, stderr) = run_cmd(
                std::process::Command::new(pg_bin("psql"))
                    .arg(format!(
                        "{}?sslmode=require&channel_binding={binding}",
                        proxy.url()
                    ))
                    .args(["-X", "-At", "-c", "SELECT 40 + 2"]),
            );
            assert!(
                ok,
                "{}, channel_binding={binding}: {stderr}",
                cert.display()
            );
            assert_eq!(stdout.trim(), "42");
        }
    }
}

/// SCRAM-SHA-256-PLUS is offered over TLS only, beside SCRAM-SHA-256; a client that
/// binds to another certificate than the proxy's (what a man in the middle with his own
/// TLS session shows it) is refused with 08P01 although its proof is valid for what it
/// signed; binding to the proxy's certificate logs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plus_is_offered_over_tls_and_bound_to_the_proxys_certificate() {
    let (_dir, cert, key) = self_signed(&["-newkey", "rsa:2048"], "-sha256");
    let opts = ProxyOptions {
        tls: Some((cert.clone(), key)),
        ..Default::default()
    };
    let proxy = start_proxy(shared_cluster(), opts).await;
    let mut inbuf = BytesMut::new();
    let mut plain = TcpStream::connect(proxy.addr).await.unwrap();
    assert_eq!(
        offered_mechanisms(&mut plain, &mut inbuf).await,
        ["SCRAM-SHA-256"]
    );
    let mut inbuf = BytesMut::new();
    let mut tls = common::tls::tls_connect(proxy.addr).await;
    assert_eq!(
        offered_mechanisms(&mut tls, &mut inbuf).await,
        ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    );

    let ours = sha256_end_point(&cert);
    let mut theirs = ours.clone();
    theirs[0] ^= 1;
    let plus = "SCRAM-SHA-256-PLUS";
    let bound = |data: &[u8]| ChannelBinding::tls_server_end_point(data.to_vec());
    let mut tls = common::tls::tls_connect(proxy.addr).await;
    assert_eq!(
        scram_login(&mut tls, plus, bound(&theirs)).await,
        Err("08P01".into())
    );
    let mut tls = common::tls::tls_connect(proxy.addr).await;
    assert_eq!(scram_login(&mut tls, plus, bound(&ours)).await, Ok(()));
    let mut tls = common::tls::tls_connect(proxy.addr).await;
    let unbound = ChannelBinding::unsupported();
    assert_eq!(
        scram_login(&mut tls, "SCRAM-SHA-256", unbound).await,
        Ok(())
    );
}

/// As PostgreSQL: a client that could bind ("y") but saw no PLUS offered, where PLUS
/// was offered, is a downgrade and refused (08P01); an authzid or a mandatory extension
/// is an unsupported feature (0A000); a malformed message is a protocol violation
/// (08P01), never a wrong password (28P01).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_negotiation_errors_are_refused_as_postgresql_does() {
    let (_dir, cert, key) = self_signed(
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "-sha256",
    );
    let opts = ProxyOptions {
        tls: Some((cert, key)),
        ..Default::default()
    };
    let proxy = start_proxy(shared_cluster(), opts).await;
    let plain = "SCRAM-SHA-256";
    let cases = [
        (plain, "y,,n=,r=abc", "08P01", "continue"),
        (plain, "n,a=app,n=,r=abc", "0A000", "0A000"),
        (plain, "n,,m=x,n=,r=abc", "0A000", "0A000"),
        (plain, "n,,garbage", "08P01", "08P01"),
        (plain, "p=tls-server-end-point,,n=,r=abc", "08P01", "08P01"),
        ("SCRAM-SHA-256-PLUS", "n,,n=,r=abc", "08P01", "08P01"),
        ("SCRAM-SHA-1", "n,,n=,r=abc", "08P01", "08P01"),
        (plain, "n,,n=,r=abc", "continue", "continue"),
    ];
    for (mechanism, first, over_tls, without_tls) in cases {
        let mut tls = common::tls::tls_connect(proxy.addr).await;
        assert_eq!(
            answer_to(&mut tls, mechanism, first).await,
            over_tls,
            "TLS: {mechanism} {first}"
        );
        let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(
            answer_to(&mut tcp, mechanism, first).await,
            without_tls,
            "TCP: {mechanism} {first}"
        );
    }
}
