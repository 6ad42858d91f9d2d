//! The tagged-message decoder on both edges: the bytes a client sends (bounded by a
//! small `max_message_size`, then Query/Parse/Bind/Describe decoded as the session
//! does) and the bytes a server sends (bounded by the 1 GB server limit, ErrorResponse
//! fields decoded). Any input must end in frames, `Ok(None)` or an error: never a
//! panic, and never a frame longer than the limit.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shardgate::backend::conn::MAX_SERVER_MESSAGE;
use shardgate::protocol::{decode_frame, messages, Frame};

/// A client-side limit small enough that fuzzed lengths cross it.
const CLIENT_MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    // Fed in two pieces, as a socket may deliver it: a partial frame is not an error.
    let split = data.first().map_or(0, |&b| b as usize % (data.len() + 1));
    for max in [CLIENT_MAX, MAX_SERVER_MESSAGE] {
        let mut buf = BytesMut::from(&data[..split]);
        let mut frames = Vec::new();
        if drain(&mut buf, max, &mut frames) {
            buf.extend_from_slice(&data[split..]);
            drain(&mut buf, max, &mut frames);
        }
        for frame in &frames {
            assert!(frame.raw.len() <= max);
            if max == CLIENT_MAX {
                client_message(frame);
            } else if frame.tag == b'E' || frame.tag == b'N' {
                let _ = messages::decode_error_fields(frame);
            }
        }
    }
});

/// Splits off every whole frame; false once the decoder reports an error (the caller
/// would close the connection).
fn drain(buf: &mut BytesMut, max: usize, frames: &mut Vec<Frame>) -> bool {
    loop {
        match decode_frame(buf, max) {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => return true,
            Err(_) => return false,
        }
    }
}

fn client_message(frame: &Frame) {
    match frame.tag {
        b'Q' => {
            let _ = messages::decode_query(frame);
        }
        b'P' => {
            let _ = messages::decode_parse(frame);
        }
        b'B' => {
            if let Ok(head) = messages::decode_bind(frame) {
                let _ = messages::decode_bind_params(head.rest);
            }
        }
        b'D' | b'C' => {
            let _ = messages::decode_target(frame);
        }
        _ => {}
    }
}
