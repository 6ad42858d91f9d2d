//! A raw protocol client for tests that must control exactly which bytes are sent and
//! when they are read (backpressure, FunctionCall), where a driver would hide that.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::proxy::TestProxy;

/// Startup + SCRAM with postgres-protocol's client, on a raw socket.
pub async fn login(s: &mut tokio::net::TcpStream, proxy: &TestProxy) {
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

/// Reads whole messages until ReadyForQuery; returns them as (tag, body).
pub async fn read_until_ready(
    s: &mut tokio::net::TcpStream,
    inbuf: &mut BytesMut,
) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        while let Some(f) = shardgate::protocol::decode_frame(inbuf, 1 << 30).unwrap() {
            let done = f.tag == b'Z';
            out.push((f.tag, f.body().to_vec()));
            if done {
                return out;
            }
        }
        assert!(
            s.read_buf(inbuf).await.unwrap() > 0,
            "closed before ReadyForQuery"
        );
    }
}
