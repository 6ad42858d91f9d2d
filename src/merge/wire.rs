//! The four backend messages a merge reads (RowDescription, NoData, DataRow,
//! CommandComplete) decoded just enough to merge them, and the two it writes
//! (RowDescription or DataRow without the hidden trailing columns, merged DataRows).
//! Decoders validate every length against the frame: a malformed frame is an error,
//! never a panic or an out-of-bounds slice.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

use crate::protocol::frame::{take_cstr, take_i16, take_i32, HEADER_LEN};
use crate::protocol::messages::{btag, put_msg};
use crate::protocol::peek_frame;

/// Where the field values of a DataRow start: header plus the 2-byte field count.
const DATA_ROW_FIELDS_AT: usize = HEADER_LEN + 2;

/// A column's type as far as merging cares: the type OID and the format code the
/// client asked for (0 text, 1 binary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ColumnType {
    pub oid: u32,
    pub format: i16,
}

impl ColumnType {
    /// A column known only by position (rows arrived without any RowDescription).
    pub const UNKNOWN: ColumnType = ColumnType { oid: 0, format: 0 };
}

/// A decoded RowDescription: the column types, and the frame re-encoded without the
/// hidden trailing columns, ready to send.
#[derive(Debug, Clone)]
pub(crate) struct Description {
    pub columns: Vec<ColumnType>,
    pub visible_frame: Bytes,
}

/// Checks that `frame` is exactly one whole message and returns its tag.
pub(crate) fn check_frame(frame: &[u8]) -> Result<u8, String> {
    match peek_frame(frame, usize::MAX) {
        Ok(Some(h)) if h.len == frame.len() => Ok(h.tag),
        Ok(Some(h)) => Err(format!(
            "frame holds {} bytes but its header declares {}",
            frame.len(),
            h.len
        )),
        Ok(None) => Err("truncated frame".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Decodes a RowDescription and re-encodes it with only its first `len - hidden`
/// fields (the field descriptions are copied verbatim).
pub(crate) fn decode_row_description(frame: &[u8], hidden: usize) -> Result<Description, String> {
    let mut body = &frame[HEADER_LEN..];
    let count = take_i16(&mut body).map_err(|e| e.to_string())?;
    let count = usize::try_from(count).map_err(|_| "negative field count".to_string())?;
    if hidden > count {
        return Err(format!(
            "{hidden} hidden columns but the result has only {count}"
        ));
    }
    let visible = count - hidden;
    let mut columns = Vec::with_capacity(count.min(body.len() / 19));
    let mut visible_end = frame.len();
    for i in 0..count {
        if i == visible {
            visible_end = frame.len() - body.len();
        }
        skip_cstr(&mut body)?;
        let _table = take_i32(&mut body).map_err(|e| e.to_string())?;
        let _attnum = take_i16(&mut body).map_err(|e| e.to_string())?;
        let oid = take_i32(&mut body).map_err(|e| e.to_string())? as u32;
        let _typlen = take_i16(&mut body).map_err(|e| e.to_string())?;
        let _typmod = take_i32(&mut body).map_err(|e| e.to_string())?;
        let format = take_i16(&mut body).map_err(|e| e.to_string())?;
        columns.push(ColumnType { oid, format });
    }
    if !body.is_empty() {
        return Err("trailing bytes after the last field".into());
    }
    let visible_frame = if hidden == 0 {
        Bytes::copy_from_slice(frame)
    } else {
        let mut out = BytesMut::with_capacity(visible_end);
        put_msg(&mut out, btag::ROW_DESCRIPTION, |b| {
            b.put_i16(visible as i16);
            b.put_slice(&frame[DATA_ROW_FIELDS_AT..visible_end]);
        });
        out.freeze()
    };
    Ok(Description {
        columns,
        visible_frame,
    })
}

/// A DataRow kept as its original frame, with the byte range of every field value
/// (`None` for NULL) and where the hidden trailing fields begin.
#[derive(Debug, Clone)]
pub(crate) struct DataRow {
    pub raw: Bytes,
    pub fields: Vec<Option<Range<usize>>>,
    pub visible: usize,
    pub visible_end: usize,
}

impl DataRow {
    /// The value of field `i` (None for NULL or a column that does not exist).
    pub fn field(&self, i: usize) -> Option<Bytes> {
        match self.fields.get(i) {
            Some(Some(r)) => Some(self.raw.slice(r.clone())),
            _ => None,
        }
    }

    /// Appends the row as the client sees it: without the hidden trailing fields.
    pub fn put_visible(&self, out: &mut BytesMut) {
        if self.visible == self.fields.len() {
            out.put_slice(&self.raw);
            return;
        }
        put_msg(out, btag::DATA_ROW, |b| {
            b.put_i16(self.visible as i16);
            b.put_slice(&self.raw[DATA_ROW_FIELDS_AT..self.visible_end]);
        });
    }
}

/// Splits a DataRow frame into fields. `columns` is the column count every row must
/// have; `hidden` trailing fields are kept (aggregates and sorts may read them) but
/// marked for removal on the way to the client.
pub(crate) fn decode_data_row(
    raw: Bytes,
    columns: usize,
    hidden: usize,
) -> Result<DataRow, String> {
    let mut at = HEADER_LEN;
    let count = read_i16(&raw, &mut at)?;
    if usize::try_from(count).ok() != Some(columns) {
        return Err(format!(
            "{count} fields where the result has {columns} columns"
        ));
    }
    let visible = columns.saturating_sub(hidden);
    let mut fields = Vec::with_capacity(columns);
    let mut visible_end = raw.len();
    for i in 0..columns {
        if i == visible {
            visible_end = at;
        }
        let len = read_i32(&raw, &mut at)?;
        if len == -1 {
            fields.push(None);
            continue;
        }
        let len = usize::try_from(len).map_err(|_| format!("field {i} has length {len}"))?;
        let end = at
            .checked_add(len)
            .filter(|&end| end <= raw.len())
            .ok_or_else(|| format!("field {i} runs past the end of the frame"))?;
        fields.push(Some(at..end));
        at = end;
    }
    if at != raw.len() {
        return Err("trailing bytes after the last field".into());
    }
    Ok(DataRow {
        raw,
        fields,
        visible,
        visible_end,
    })
}

/// Skips a NUL-terminated name without requiring it to be UTF-8 (column names are
/// in the client encoding and the merge never looks at them).
fn skip_cstr(body: &mut &[u8]) -> Result<(), String> {
    let nul = body
        .iter()
        .position(|&b| b == 0)
        .ok_or("missing string terminator")?;
    *body = &body[nul + 1..];
    Ok(())
}

fn read_i16(raw: &[u8], at: &mut usize) -> Result<i16, String> {
    let bytes = raw.get(*at..*at + 2).ok_or("truncated field count")?;
    *at += 2;
    Ok(i16::from_be_bytes([bytes[0], bytes[1]]))
}

fn read_i32(raw: &[u8], at: &mut usize) -> Result<i32, String> {
    let bytes = raw.get(*at..*at + 4).ok_or("truncated field length")?;
    *at += 4;
    Ok(i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// A CommandComplete tag split into the words to keep and whether it ends in a row
/// count: "SELECT 42" -> ("SELECT", true), "INSERT 0 5" -> ("INSERT 0", true).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CommandTag {
    pub words: String,
    pub counted: bool,
}

impl CommandTag {
    pub fn with_count(&self, rows: u64) -> String {
        if self.counted {
            format!("{} {rows}", self.words)
        } else {
            self.words.clone()
        }
    }
}

pub(crate) fn decode_command_complete(frame: &[u8]) -> Result<CommandTag, String> {
    let mut body = &frame[HEADER_LEN..];
    let tag = take_cstr(&mut body).map_err(|e| e.to_string())?;
    if !body.is_empty() {
        return Err("trailing bytes after the command tag".into());
    }
    Ok(match tag.rsplit_once(' ') {
        Some((words, n)) if n.parse::<u64>().is_ok() => CommandTag {
            words: words.to_owned(),
            counted: true,
        },
        _ => CommandTag {
            words: tag.to_owned(),
            counted: false,
        },
    })
}

/// Appends a DataRow with the given field values (`None` is NULL).
pub(crate) fn put_data_row(out: &mut BytesMut, fields: &[Option<Bytes>]) {
    put_msg(out, btag::DATA_ROW, |b| {
        b.put_i16(fields.len() as i16);
        for field in fields {
            match field {
                None => b.put_i32(-1),
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.put_slice(v);
                }
            }
        }
    });
}
