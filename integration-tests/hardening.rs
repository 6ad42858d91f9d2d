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

/// Starts a SCRAM login as `user` and returns the server-first-message's salt and
/// iteration count ("s=...,i=...") without finishing the exchange.
async fn scram_salt(proxy: &common::proxy::TestProxy, user: &str) -> String {
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
    let server_first = std::str::from_utf8(&frame.body()[4..]).unwrap();
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
