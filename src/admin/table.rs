//! A console answer as the text protocol carries it: RowDescription, one DataRow per
//! row, CommandComplete; errors as ErrorResponse. Encoded with pgwire's message types
//! (codec only) so no new hand-written encoders appear here.

use bytes::{BufMut, BytesMut};
use pgwire::messages::data::{DataRow, FieldDescription, RowDescription, FORMAT_CODE_TEXT};
use pgwire::messages::response::{
    CommandComplete, EmptyQueryResponse, ErrorResponse, NoticeResponse, ReadyForQuery,
    TransactionStatus,
};
use pgwire::messages::Message;

/// Column types the console uses: psql aligns numbers right and text left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    Text,
    Int8,
    Bool,
}

impl ColumnType {
    fn oid_and_size(self) -> (u32, i16) {
        match self {
            ColumnType::Text => (25, -1),
            ColumnType::Int8 => (20, 8),
            ColumnType::Bool => (16, 1),
        }
    }
}

/// One value of a row, in text format (None = NULL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell(pub Option<String>);

impl From<&str> for Cell {
    fn from(v: &str) -> Cell {
        Cell(Some(v.to_owned()))
    }
}

impl From<String> for Cell {
    fn from(v: String) -> Cell {
        Cell(Some(v))
    }
}

impl From<Option<String>> for Cell {
    fn from(v: Option<String>) -> Cell {
        Cell(v)
    }
}

impl From<u64> for Cell {
    fn from(v: u64) -> Cell {
        Cell(Some(v.to_string()))
    }
}

impl From<Option<u64>> for Cell {
    fn from(v: Option<u64>) -> Cell {
        Cell(v.map(|v| v.to_string()))
    }
}

impl From<bool> for Cell {
    fn from(v: bool) -> Cell {
        Cell(Some(if v { "t" } else { "f" }.to_owned()))
    }
}

/// A result set: stable column names (scripts parse them) and rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub columns: Vec<(&'static str, ColumnType)>,
    pub rows: Vec<Vec<Cell>>,
    /// CommandComplete's tag; `SHOW` when empty, as PostgreSQL answers SHOW.
    pub tag: &'static str,
}

impl Table {
    pub fn new(columns: &[(&'static str, ColumnType)]) -> Table {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
            tag: "SHOW",
        }
    }

    pub fn push(&mut self, row: Vec<Cell>) {
        debug_assert_eq!(row.len(), self.columns.len(), "row width");
        self.rows.push(row);
    }

    pub fn encode(&self, out: &mut BytesMut) {
        let fields = self
            .columns
            .iter()
            .map(|(name, ty)| {
                let (oid, size) = ty.oid_and_size();
                FieldDescription::new((*name).to_owned(), 0, 0, oid, size, -1, FORMAT_CODE_TEXT)
            })
            .collect();
        put(out, &RowDescription::new(fields));
        for row in &self.rows {
            let mut data = BytesMut::new();
            for Cell(value) in row {
                match value {
                    Some(v) => {
                        data.put_i32(v.len() as i32);
                        data.put_slice(v.as_bytes());
                    }
                    None => data.put_i32(-1),
                }
            }
            put(out, &DataRow::new(data, row.len() as i16));
        }
        command_complete(out, self.tag);
    }
}

/// Encodes one message; pgwire fails only for messages over its size limits, which
/// console answers never reach (a few rows per node).
fn put(out: &mut BytesMut, message: &impl Message) {
    if let Err(error) = message.encode(out) {
        tracing::error!(%error, "admin console answer could not be encoded");
    }
}

pub fn command_complete(out: &mut BytesMut, tag: &str) {
    put(out, &CommandComplete::new(tag.to_owned()));
}

pub fn empty_query(out: &mut BytesMut) {
    put(out, &EmptyQueryResponse::new());
}

pub fn ready_for_query(out: &mut BytesMut) {
    put(out, &ReadyForQuery::new(TransactionStatus::Idle));
}

fn fields(severity: &str, code: &str, message: &str) -> Vec<(u8, String)> {
    vec![
        (b'S', severity.to_owned()),
        (b'V', severity.to_owned()),
        (b'C', code.to_owned()),
        (b'M', message.to_owned()),
    ]
}

pub fn error(out: &mut BytesMut, code: &str, message: &str) {
    put(out, &ErrorResponse::new(fields("ERROR", code, message)));
}

pub fn notice(out: &mut BytesMut, message: &str) {
    put(
        out,
        &NoticeResponse::new(fields("NOTICE", "00000", message)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{decode_frame, messages};

    #[test]
    fn encodes_a_table_that_our_decoder_reads() {
        let mut t = Table::new(&[("name", ColumnType::Text), ("n", ColumnType::Int8)]);
        t.push(vec!["a".into(), 3u64.into()]);
        t.push(vec![Cell(None), 0u64.into()]);
        let mut out = BytesMut::new();
        t.encode(&mut out);
        ready_for_query(&mut out);
        let tags: Vec<u8> = std::iter::from_fn(|| decode_frame(&mut out, 1 << 20).ok().flatten())
            .map(|f| f.tag)
            .collect();
        assert_eq!(tags, b"TDDCZ");
        assert!(out.is_empty());
    }

    #[test]
    fn errors_carry_their_sqlstate() {
        let mut out = BytesMut::new();
        error(&mut out, "42601", "unknown command");
        let frame = decode_frame(&mut out, 1 << 20).unwrap().unwrap();
        assert_eq!(frame.tag, b'E');
        assert_eq!(
            messages::decode_error_fields(&frame),
            ("42601".into(), "unknown command".into())
        );
    }
}
