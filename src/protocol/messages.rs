//! The few messages the proxy must understand or create. Everything else crosses the
//! proxy as an opaque frame. Decoders borrow from the frame; encoders append to a
//! `BytesMut` so callers batch several messages into one write.

use bytes::{BufMut, BytesMut};

use super::frame::{take_cbytes, take_cstr, take_i16, take_i32, Frame};
use super::ProtocolError;

/// Frontend (client -> server) message tags.
pub mod tag {
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const CLOSE: u8 = b'C';
    pub const SYNC: u8 = b'S';
    pub const FLUSH: u8 = b'H';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const TERMINATE: u8 = b'X';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
    pub const PASSWORD: u8 = b'p';
}

/// Backend (server -> client) message tags.
pub mod btag {
    pub const AUTHENTICATION: u8 = b'R';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const NOTIFICATION: u8 = b'A';
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const BIND_COMPLETE: u8 = b'2';
    pub const CLOSE_COMPLETE: u8 = b'3';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const EMPTY_QUERY: u8 = b'I';
    pub const PORTAL_SUSPENDED: u8 = b's';
    pub const ROW_DESCRIPTION: u8 = b'T';
    pub const NO_DATA: u8 = b'n';
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    pub const DATA_ROW: u8 = b'D';
    pub const COPY_IN: u8 = b'G';
    pub const COPY_OUT: u8 = b'H';
    pub const COPY_BOTH: u8 = b'W';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
}

/// A decoded Parse message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse<'a> {
    pub name: &'a str,
    pub query: &'a str,
    pub param_types: Vec<u32>,
}

pub fn decode_query(frame: &Frame) -> Result<&str, ProtocolError> {
    let mut body = frame.body();
    take_cstr(&mut body)
}

/// A Query's text as bytes. A client whose `client_encoding` is not UTF-8 (LATIN1,
/// SQL_ASCII) may send bytes that are no UTF-8 in a literal; they are the server's to
/// read, not an error.
pub fn decode_query_bytes(frame: &Frame) -> Result<&[u8], ProtocolError> {
    let mut body = frame.body();
    take_cbytes(&mut body)
}

/// A Parse with its text as bytes (see `decode_query_bytes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseBytes<'a> {
    pub name: &'a str,
    pub query: &'a [u8],
    pub param_types: Vec<u32>,
}

pub fn decode_parse(frame: &Frame) -> Result<Parse<'_>, ProtocolError> {
    let parse = decode_parse_bytes(frame)?;
    let query =
        std::str::from_utf8(parse.query).map_err(|_| ProtocolError::Malformed("invalid UTF-8"))?;
    Ok(Parse {
        name: parse.name,
        query,
        param_types: parse.param_types,
    })
}

pub fn decode_parse_bytes(frame: &Frame) -> Result<ParseBytes<'_>, ProtocolError> {
    let mut body = frame.body();
    let name = take_cstr(&mut body)?;
    let query = take_cbytes(&mut body)?;
    let n = take_i16(&mut body)?;
    if n < 0 {
        return Err(ProtocolError::Malformed("negative parameter count"));
    }
    let mut param_types = Vec::with_capacity(n as usize);
    for _ in 0..n {
        param_types.push(take_i32(&mut body)? as u32);
    }
    Ok(ParseBytes {
        name,
        query,
        param_types,
    })
}

/// The routing-relevant head of a Bind: portal and statement names, plus the offset
/// where the rest (formats, values) starts so it can be copied without decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindHead<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    pub rest: &'a [u8],
}

pub fn decode_bind(frame: &Frame) -> Result<BindHead<'_>, ProtocolError> {
    let mut body = frame.body();
    let portal = take_cstr(&mut body)?;
    let statement = take_cstr(&mut body)?;
    Ok(BindHead {
        portal,
        statement,
        rest: body,
    })
}

/// A Bind's parameters: per parameter its format code (Bind's 0/1/N rule expanded)
/// and its value (`None` = NULL).
pub struct BindParams<'a> {
    pub formats: Vec<i16>,
    pub values: Vec<Option<&'a [u8]>>,
}

/// Reads the parameter part of a Bind (`BindHead::rest`).
pub fn decode_bind_params(rest: &[u8]) -> Result<BindParams<'_>, ProtocolError> {
    let malformed = || ProtocolError::Malformed("Bind parameters");
    let mut body = rest;
    let mut take = |n: usize| -> Result<&[u8], ProtocolError> {
        if body.len() < n {
            return Err(malformed());
        }
        let (head, tail) = body.split_at(n);
        body = tail;
        Ok(head)
    };
    let i16_at = |b: &[u8]| i16::from_be_bytes([b[0], b[1]]);
    let nformats = usize::try_from(i16_at(take(2)?)).map_err(|_| malformed())?;
    let mut codes = Vec::with_capacity(nformats);
    for _ in 0..nformats {
        codes.push(i16_at(take(2)?));
    }
    let nparams = usize::try_from(i16_at(take(2)?)).map_err(|_| malformed())?;
    let mut values = Vec::with_capacity(nparams);
    for _ in 0..nparams {
        let len = take(4)?;
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        values.push(match usize::try_from(len) {
            Ok(n) => Some(take(n)?),
            Err(_) => None,
        });
    }
    let formats = match codes.as_slice() {
        [] => vec![0; nparams],
        [one] => vec![*one; nparams],
        many if many.len() == nparams => many.to_vec(),
        _ => return Err(malformed()),
    };
    Ok(BindParams { formats, values })
}

/// Describe and Close share a shape: a kind byte ('S' statement, 'P' portal) and a name.
pub fn decode_target(frame: &Frame) -> Result<(u8, &str), ProtocolError> {
    let (&kind, mut rest) = frame
        .body()
        .split_first()
        .ok_or(ProtocolError::Malformed("empty Describe/Close"))?;
    if kind != b'S' && kind != b'P' {
        return Err(ProtocolError::Malformed(
            "Describe/Close kind must be S or P",
        ));
    }
    let name = take_cstr(&mut rest)?;
    Ok((kind, name))
}

/// Appends a tagged message whose body `fill` writes; the length is patched in after.
pub fn put_msg(buf: &mut BytesMut, tag: u8, fill: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    fill(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn put_cstr(buf: &mut BytesMut, s: &str) {
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
}

// ---- backend messages the proxy writes to clients ----

pub fn auth_request(buf: &mut BytesMut, code: i32, data: &[u8]) {
    put_msg(buf, btag::AUTHENTICATION, |b| {
        b.put_i32(code);
        b.put_slice(data);
    });
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    put_msg(buf, btag::PARAMETER_STATUS, |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

pub fn backend_key_data(buf: &mut BytesMut, pid: u32, secret: u32) {
    put_msg(buf, btag::BACKEND_KEY_DATA, |b| {
        b.put_u32(pid);
        b.put_u32(secret);
    });
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    put_msg(buf, btag::READY_FOR_QUERY, |b| b.put_u8(status));
}

pub fn empty_msg(buf: &mut BytesMut, tag: u8) {
    put_msg(buf, tag, |_| {});
}

pub fn command_complete(buf: &mut BytesMut, command_tag: &str) {
    put_msg(buf, btag::COMMAND_COMPLETE, |b| put_cstr(b, command_tag));
}

/// ErrorResponse (or NoticeResponse with `tag = 'N'`) with the fields clients show.
pub fn error_fields(buf: &mut BytesMut, tag: u8, severity: &str, code: &str, message: &str) {
    put_msg(buf, tag, |b| {
        b.put_u8(b'S');
        put_cstr(b, severity);
        b.put_u8(b'V');
        put_cstr(b, severity);
        b.put_u8(b'C');
        put_cstr(b, code);
        b.put_u8(b'M');
        put_cstr(b, message);
        b.put_u8(0);
    });
}

/// Reads the SQLSTATE and message out of an ErrorResponse/NoticeResponse body.
pub fn decode_error_fields(frame: &Frame) -> (String, String) {
    let mut body = frame.body();
    let (mut code, mut message) = (String::new(), String::new());
    while let Some((&field, rest)) = body.split_first() {
        if field == 0 {
            break;
        }
        body = rest;
        let Ok(value) = take_cstr(&mut body) else {
            break;
        };
        match field {
            b'C' => code = value.to_owned(),
            b'M' => message = value.to_owned(),
            _ => {}
        }
    }
    (code, message)
}

// ---- frontend messages the proxy writes to servers ----

pub fn startup(buf: &mut BytesMut, params: &[(&str, &str)]) {
    let at = buf.len();
    buf.put_i32(0);
    buf.put_i32(196608);
    for (k, v) in params {
        put_cstr(buf, k);
        put_cstr(buf, v);
    }
    buf.put_u8(0);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn cancel_request(buf: &mut BytesMut, pid: u32, secret: u32) {
    buf.put_i32(16);
    buf.put_i32(80877102);
    buf.put_u32(pid);
    buf.put_u32(secret);
}

pub fn query(buf: &mut BytesMut, sql: &str) {
    put_msg(buf, tag::QUERY, |b| put_cstr(b, sql));
}

pub fn parse(buf: &mut BytesMut, name: &str, sql: &str, param_types: &[u32]) {
    parse_bytes(buf, name, sql.as_bytes(), param_types)
}

/// A Parse of a text kept as the client's bytes (see `decode_query_bytes`).
pub fn parse_bytes(buf: &mut BytesMut, name: &str, sql: &[u8], param_types: &[u32]) {
    put_msg(buf, tag::PARSE, |b| {
        put_cstr(b, name);
        b.put_slice(sql);
        b.put_u8(0);
        b.put_i16(param_types.len() as i16);
        for t in param_types {
            b.put_u32(*t);
        }
    });
}

/// Re-emits a Bind with another statement name, copying formats and values verbatim.
pub fn bind_renamed(buf: &mut BytesMut, head: &BindHead<'_>, statement: &str) {
    put_msg(buf, tag::BIND, |b| {
        put_cstr(b, head.portal);
        put_cstr(b, statement);
        b.put_slice(head.rest);
    });
}

/// Describe or Close (`tag`) of statement or portal (`kind`) under another name.
pub fn target_renamed(buf: &mut BytesMut, tag: u8, kind: u8, name: &str) {
    put_msg(buf, tag, |b| {
        b.put_u8(kind);
        put_cstr(b, name);
    });
}

pub fn password(buf: &mut BytesMut, data: &[u8]) {
    put_msg(buf, tag::PASSWORD, |b| b.put_slice(data));
}

pub fn sasl_initial_response(buf: &mut BytesMut, mechanism: &str, data: &[u8]) {
    put_msg(buf, tag::PASSWORD, |b| {
        put_cstr(b, mechanism);
        b.put_i32(data.len() as i32);
        b.put_slice(data);
    });
}
