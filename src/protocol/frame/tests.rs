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
