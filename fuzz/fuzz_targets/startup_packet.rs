//! The untagged startup-phase packets: SSLRequest, GSSENCRequest, CancelRequest and
//! the startup packet with its parameters, read before any authentication. Any input
//! must decode, ask for more bytes or fail: never panic, never consume more than it has.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shardgate::protocol::{decode_startup, StartupPacket};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    // A client may send an SSLRequest and then a startup packet: decode until stuck.
    while let Ok(Some(packet)) = decode_startup(&mut buf) {
        let _ = packet.param("user");
        if let StartupPacket::Startup { params } = &packet {
            assert!(params.iter().all(|(name, _)| !name.is_empty()));
        }
    }
});
