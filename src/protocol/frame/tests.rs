use super::*;
use crate::protocol::messages;
use proptest::prelude::*;

#[test]
fn partial_frames_need_more_bytes() {
    let mut whole = BytesMut::new();
    messages::query(&mut whole, "select 1");
    for cut in 0..whole.len() {
        let mut part = BytesMut::from(&whole[..cut]);
        assert_eq!(decode_frame(&mut part, 1024), Ok(None), "cut at {cut}");
        assert_eq!(part.len(), cut, "nothing consumed on a partial frame");
    }
    let frame = decode_frame(&mut whole, 1024).unwrap().unwrap();
    assert_eq!(frame.tag, b'Q');
    assert_eq!(frame.body(), b"select 1\0");
    assert!(whole.is_empty());
}

#[test]
fn oversize_and_impossible_lengths_are_errors() {
    let mut buf = BytesMut::from(&b"Q\x00\x10\x00\x00"[..]);
    assert!(matches!(
        decode_frame(&mut buf, 4096),
        Err(ProtocolError::TooLarge { tag: b'Q', .. })
    ));
    let mut buf = BytesMut::from(&b"Q\x00\x00\x00\x03"[..]);
    assert!(matches!(
        decode_frame(&mut buf, 4096),
        Err(ProtocolError::BadLength { .. })
    ));
}

/// A DataRow header declaring `len` bytes in all, followed by `have` bytes of body.
fn data_row(len: usize, have: usize) -> Vec<u8> {
    let mut buf = vec![b'D'];
    buf.extend_from_slice(&((len - 1) as u32).to_be_bytes());
    buf.resize(HEADER_LEN + have, 0);
    buf
}

#[test]
fn long_data_messages_stream_and_others_stay_bounded() {
    let max = 1024;
    // A DataRow far over the limit streams from its header on; unbounded.
    let big = data_row(1 << 30, 10);
    assert_eq!(
        next_server_frame(&big, max),
        Ok(Next::Stream(FrameHeader {
            tag: b'D',
            len: 1 << 30
        }))
    );
    // Short ones wait to be whole, and are bounded by STREAM_FROM, not streamed.
    assert_eq!(next_server_frame(&data_row(100, 50), max), Ok(Next::More));
    let whole = data_row(100, 95);
    assert!(matches!(
        next_server_frame(&whole, max),
        Ok(Next::Whole(FrameHeader {
            tag: b'D',
            len: 100
        }))
    ));
    // A long data message that is already all here is handled whole.
    let here = data_row(STREAM_FROM + 10, STREAM_FROM + 5);
    assert!(matches!(next_server_frame(&here, max), Ok(Next::Whole(_))));
    // Messages the proxy reads are refused at the header when over the limit.
    let mut description = data_row(1 << 20, 0);
    description[0] = b'T';
    assert_eq!(
        next_server_frame(&description, max),
        Err(ProtocolError::TooLarge {
            tag: b'T',
            len: 1 << 20,
            max
        })
    );
    assert_eq!(
        next_server_frame(b"C\0\0\0\x02", max),
        Err(ProtocolError::BadLength { tag: b'C', len: 2 })
    );
    assert_eq!(
        next_server_frame(b"!\0\0\0\x04", max),
        Err(ProtocolError::UnknownType { tag: b'!' })
    );
    assert_eq!(next_server_frame(b"D\0\0", max), Ok(Next::More));
}

#[test]
fn client_copy_data_streams_only_when_allowed() {
    let max = 1024;
    let mut copy = data_row(1 << 20, 10);
    copy[0] = b'd';
    assert!(matches!(
        next_client_frame(&copy, max, true),
        Ok(Next::Stream(FrameHeader { tag: b'd', .. }))
    ));
    assert!(matches!(
        next_client_frame(&copy, max, false),
        Err(ProtocolError::TooLarge { tag: b'd', .. })
    ));
    // A client 'D' is a Describe, never data.
    let describe = data_row(1 << 20, 10);
    assert!(matches!(
        next_client_frame(&describe, max, true),
        Err(ProtocolError::TooLarge { tag: b'D', .. })
    ));
}

#[test]
fn startup_packets_decode() {
    let mut buf = BytesMut::new();
    messages::startup(&mut buf, &[("user", "app"), ("database", "db")]);
    let packet = decode_startup(&mut buf).unwrap().unwrap();
    assert_eq!(packet.param("user"), Some("app"));
    assert_eq!(packet.param("database"), Some("db"));

    let mut buf = BytesMut::new();
    messages::cancel_request(&mut buf, 7, 9);
    assert_eq!(
        decode_startup(&mut buf).unwrap(),
        Some(StartupPacket::Cancel { pid: 7, secret: 9 })
    );
    let mut ssl = BytesMut::from(&[0, 0, 0, 8, 4, 210, 22, 47][..]);
    assert_eq!(
        decode_startup(&mut ssl).unwrap(),
        Some(StartupPacket::SslRequest)
    );
    let mut gss = BytesMut::from(&[0, 0, 0, 8, 4, 210, 22, 48][..]);
    assert_eq!(
        decode_startup(&mut gss).unwrap(),
        Some(StartupPacket::GssEncRequest)
    );
}

#[test]
fn startup_without_terminator_is_an_error() {
    let mut buf = BytesMut::from(&[0, 0, 0, 12, 0, 3, 0, 0, b'u', b's', b'e', b'r'][..]);
    assert!(decode_startup(&mut buf).is_err());
}

proptest! {
    /// Server bytes: streaming never claims more than was declared, a whole frame is
    /// exactly what its header declared, and nothing panics.
    #[test]
    fn server_framing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), max in 5usize..600) {
        match next_server_frame(&bytes, max) {
            Ok(Next::Whole(h)) => prop_assert!(h.len <= bytes.len() && h.len >= HEADER_LEN - 1),
            Ok(Next::Stream(h)) => prop_assert!(h.len > bytes.len() && is_server_data(h.tag)),
            Ok(Next::More) | Err(_) => {}
        }
    }

    /// Any byte string yields frames, "need more bytes", or an error: never a panic,
    /// and a returned frame is exactly what its header declared.
    #[test]
    fn frame_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::from(&bytes[..]);
        loop {
            let before = buf.len();
            match decode_frame(&mut buf, 256) {
                Ok(Some(frame)) => {
                    let declared = u32::from_be_bytes([frame.raw[1], frame.raw[2], frame.raw[3], frame.raw[4]]) as usize;
                    prop_assert_eq!(frame.raw.len(), declared + 1);
                    prop_assert_eq!(buf.len(), before - frame.raw.len());
                }
                Ok(None) | Err(_) => break,
            }
        }
    }

    #[test]
    fn startup_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = decode_startup(&mut buf);
    }

    #[test]
    fn message_decoders_never_panic(tag in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..128)) {
        let mut raw = BytesMut::new();
        messages::put_msg(&mut raw, tag, |b| b.extend_from_slice(&body));
        let frame = Frame { tag, raw: raw.freeze() };
        let _ = messages::decode_query(&frame);
        let _ = messages::decode_parse(&frame);
        let _ = messages::decode_bind(&frame);
        let _ = messages::decode_target(&frame);
        let _ = messages::decode_error_fields(&frame);
    }
}
