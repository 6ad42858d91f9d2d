//! Wire framing: the 5-byte header (`tag`, big-endian length that counts itself) and
//! the untagged startup-phase packets. This is the lowest layer of the data path; it
//! knows bytes and message boundaries, nothing about statements or shards.
//!
//! Decoders take the receive buffer and return `Ok(None)` when more bytes are needed:
//! a partial frame is not an error.

use bytes::{Buf, Bytes, BytesMut};

use super::ProtocolError;

/// Size of a regular message header: one tag byte plus the 4-byte length.
pub const HEADER_LEN: usize = 5;

/// Startup-phase request codes (the "protocol version" slot of an untagged packet).
const SSL_REQUEST: u32 = 80877103;
const GSSENC_REQUEST: u32 = 80877104;
const CANCEL_REQUEST: u32 = 80877102;
/// Protocol 3.0.
const PROTOCOL_V3: u32 = 196608;
/// Startup packets are tiny; PostgreSQL itself caps them at 10 000 bytes.
const MAX_STARTUP_LEN: usize = 10_000;

/// Where the next whole message sits in a buffer: its tag and its total length
/// (header included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub tag: u8,
    pub len: usize,
}

/// Looks at the front of `buf`. `Ok(None)` means the header or the body is not complete
/// yet. A declared length below 4 or above `max_len` is an error: the stream cannot be
/// resynchronised after it, so the caller closes the connection.
pub fn peek_frame(buf: &[u8], max_len: usize) -> Result<Option<FrameHeader>, ProtocolError> {
    let Some(header) = peek_header(buf)? else {
        return Ok(None);
    };
    check_len(header, max_len)?;
    if buf.len() < header.len {
        return Ok(None);
    }
    Ok(Some(header))
}

/// The header at the front of `buf`, whether or not its body has arrived. Only a
/// declared length below 4 is an error here.
pub fn peek_header(buf: &[u8]) -> Result<Option<FrameHeader>, ProtocolError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let tag = buf[0];
    let declared = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if declared < 4 {
        return Err(ProtocolError::BadLength { tag, len: declared });
    }
    Ok(Some(FrameHeader {
        tag,
        len: declared + 1,
    }))
}

fn check_len(header: FrameHeader, max_len: usize) -> Result<(), ProtocolError> {
    if header.len > max_len {
        return Err(ProtocolError::TooLarge {
            tag: header.tag,
            len: header.len,
            max: max_len,
        });
    }
    Ok(())
}

/// A pass-through message longer than this whose body has not all arrived is relayed
/// in pieces (`Next::Stream`) instead of being buffered whole. Shorter ones, most
/// messages, are handled whole: one copy, no per-piece bookkeeping.
pub const STREAM_FROM: usize = 64 * 1024;

/// What to do with the front of a receive buffer on a path that passes some message
/// types on without reading them (see `next_server_frame`, `next_client_frame`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// More bytes are needed before anything can be done.
    More,
    /// A whole message is at the front.
    Whole(FrameHeader),
    /// The head of a long pass-through message whose body is still arriving: pass on
    /// the bytes at hand now and the rest (`len` in all) as they come, so memory does
    /// not grow with the message. Its length is not bounded by `max_len`.
    Stream(FrameHeader),
}

/// Server messages whose size follows the data and which the data path passes to the
/// client unread: DataRow, CopyData and FunctionCallResponse (PostgreSQL sends these
/// up to 1 GB; libpq accepts them at any length).
pub fn is_server_data(tag: u8) -> bool {
    matches!(tag, b'D' | b'd' | b'V')
}

/// Every message type a server sends in protocol 3.0. Anything else means the stream
/// is not a PostgreSQL server's (or lost its framing).
pub fn is_server_message(tag: u8) -> bool {
    matches!(
        tag,
        b'R' | b'K'
            | b'S'
            | b'Z'
            | b'T'
            | b'D'
            | b'C'
            | b'I'
            | b'E'
            | b'N'
            | b'A'
            | b'1'
            | b'2'
            | b'3'
            | b'n'
            | b's'
            | b't'
            | b'G'
            | b'H'
            | b'W'
            | b'd'
            | b'c'
            | b'V'
            | b'v'
    )
}

/// The front of a buffer of server bytes. Data messages (`is_server_data`) longer than
/// `STREAM_FROM` are streamed whatever their length; any other message must fit in
/// `max_len` (the proxy may have to read it whole), and an unknown message type is an
/// error.
pub fn next_server_frame(buf: &[u8], max_len: usize) -> Result<Next, ProtocolError> {
    let Some(header) = peek_header(buf)? else {
        return Ok(Next::More);
    };
    if !is_server_message(header.tag) {
        return Err(ProtocolError::UnknownType { tag: header.tag });
    }
    next_frame(buf, header, max_len, is_server_data(header.tag))
}

/// The front of a buffer of client bytes. With `stream_copy_data`, a CopyData longer
/// than `STREAM_FROM` is streamed whatever its length; any other message must fit in
/// `max_len`. Message types are the caller's to check.
pub fn next_client_frame(
    buf: &[u8],
    max_len: usize,
    stream_copy_data: bool,
) -> Result<Next, ProtocolError> {
    let Some(header) = peek_header(buf)? else {
        return Ok(Next::More);
    };
    next_frame(buf, header, max_len, stream_copy_data && header.tag == b'd')
}

fn next_frame(
    buf: &[u8],
    header: FrameHeader,
    max_len: usize,
    pass_through: bool,
) -> Result<Next, ProtocolError> {
    if pass_through && header.len > STREAM_FROM {
        // Whole when it happens to be here already (no copy saved by streaming).
        return Ok(if buf.len() >= header.len {
            Next::Whole(header)
        } else {
            Next::Stream(header)
        });
    }
    check_len(header, max_len)?;
    Ok(if buf.len() >= header.len {
        Next::Whole(header)
    } else {
        Next::More
    })
}

/// One complete message split off a receive buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    /// The whole message, header included, ready to forward as is.
    pub raw: Bytes,
}

impl Frame {
    /// The payload after the 5-byte header.
    pub fn body(&self) -> &[u8] {
        &self.raw[HEADER_LEN..]
    }
}

/// Splits the next complete frame off `buf`.
pub fn decode_frame(buf: &mut BytesMut, max_len: usize) -> Result<Option<Frame>, ProtocolError> {
    match peek_frame(buf, max_len)? {
        None => Ok(None),
        Some(h) => Ok(Some(Frame {
            tag: h.tag,
            raw: buf.split_to(h.len).freeze(),
        })),
    }
}

/// The first packet a client sends, before any tagged message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel { pid: u32, secret: u32 },
    Startup { params: Vec<(String, String)> },
}

impl StartupPacket {
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            StartupPacket::Startup { params } => params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

/// Decodes an untagged startup-phase packet (length, code, payload).
pub fn decode_startup(buf: &mut BytesMut) -> Result<Option<StartupPacket>, ProtocolError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if !(8..=MAX_STARTUP_LEN).contains(&len) {
        return Err(ProtocolError::BadStartup(format!("length {len}")));
    }
    if buf.len() < len {
        return Ok(None);
    }
    let mut packet = buf.split_to(len);
    packet.advance(4);
    let code = packet.get_u32();
    match code {
        SSL_REQUEST if len == 8 => Ok(Some(StartupPacket::SslRequest)),
        GSSENC_REQUEST if len == 8 => Ok(Some(StartupPacket::GssEncRequest)),
        CANCEL_REQUEST if len == 16 => Ok(Some(StartupPacket::Cancel {
            pid: packet.get_u32(),
            secret: packet.get_u32(),
        })),
        PROTOCOL_V3 => decode_params(&packet).map(|params| Some(StartupPacket::Startup { params })),
        other => Err(ProtocolError::BadStartup(format!(
            "unsupported protocol or request code {other}"
        ))),
    }
}

/// Startup parameters: pairs of NUL-terminated strings ending with an empty name.
fn decode_params(mut body: &[u8]) -> Result<Vec<(String, String)>, ProtocolError> {
    let mut params = Vec::new();
    loop {
        let name = take_cstr(&mut body)?;
        if name.is_empty() {
            return Ok(params);
        }
        let value = take_cstr(&mut body)?;
        params.push((name.to_owned(), value.to_owned()));
    }
}

/// Reads one NUL-terminated UTF-8 string and advances past it.
pub fn take_cstr<'a>(body: &mut &'a [u8]) -> Result<&'a str, ProtocolError> {
    let mut rest = *body;
    let bytes = take_cbytes(&mut rest)?;
    let s = std::str::from_utf8(bytes).map_err(|_| ProtocolError::Malformed("invalid UTF-8"))?;
    *body = rest;
    Ok(s)
}

/// Reads one NUL-terminated string in whatever encoding and advances past it.
pub fn take_cbytes<'a>(body: &mut &'a [u8]) -> Result<&'a [u8], ProtocolError> {
    let nul = body
        .iter()
        .position(|&b| b == 0)
        .ok_or(ProtocolError::Malformed("missing string terminator"))?;
    let bytes = &body[..nul];
    *body = &body[nul + 1..];
    Ok(bytes)
}

/// Reads a big-endian i16/i32 and advances.
pub fn take_i16(body: &mut &[u8]) -> Result<i16, ProtocolError> {
    if body.len() < 2 {
        return Err(ProtocolError::Malformed("truncated int16"));
    }
    let v = i16::from_be_bytes([body[0], body[1]]);
    *body = &body[2..];
    Ok(v)
}

pub fn take_i32(body: &mut &[u8]) -> Result<i32, ProtocolError> {
    if body.len() < 4 {
        return Err(ProtocolError::Malformed("truncated int32"));
    }
    let v = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    *body = &body[4..];
    Ok(v)
}

#[cfg(test)]
mod tests;
