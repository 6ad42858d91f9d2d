//! Result values decoded by their column type so that rows from different shards
//! compare as the server compares them (ORDER BY, min, max), and the encoders for
//! the values the merge computes itself (count, sum, avg).
//!
//! Orders, per type (text format 0 and binary format 1 alike):
//! - int2/int4/int8/oid as integers, float4/float8 with NaN above every number and
//!   -0 = 0, numeric exactly (see `numeric`), date/timestamp/timestamptz/time/timetz
//!   as instants (see `datetime`);
//! - text/varchar/name/"char"/bool/uuid/bytea and every unknown type by the bytes of
//!   the value. For text types that equals the server's order only under the `C`
//!   (or `C.UTF-8`) collation; bpchar ignores trailing spaces as the server does.
//!   bytea text must be in the default `hex` output.
//!
//! A value of a known type that does not parse (another DateStyle, a corrupt binary
//! value) sorts after every value that does, by its bytes: the order stays total.

use std::cmp::Ordering;

use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::types as pg;

use super::datetime;
use super::numeric::{Decimal, Numeric};
use super::wire::ColumnType;

/// The built-in type OIDs the merge understands (pg_type.oid).
pub(crate) mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const TIMETZ: u32 = 1266;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
}

/// How values of a type are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Int,
    Float,
    Numeric,
    Date,
    Timestamp,
    Time,
    TimeTz,
    Bpchar,
    /// Byte order: text types, bool, uuid, bytea, unknown types.
    Raw,
}

impl Kind {
    pub fn of(type_oid: u32) -> Kind {
        match type_oid {
            oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => Kind::Int,
            oid::FLOAT4 | oid::FLOAT8 => Kind::Float,
            oid::NUMERIC => Kind::Numeric,
            oid::DATE => Kind::Date,
            oid::TIMESTAMP | oid::TIMESTAMPTZ => Kind::Timestamp,
            oid::TIME => Kind::Time,
            oid::TIMETZ => Kind::TimeTz,
            oid::BPCHAR => Kind::Bpchar,
            oid::TEXT | oid::VARCHAR | oid::NAME | oid::BOOL | oid::UUID | oid::BYTEA => Kind::Raw,
            _ => Kind::Raw,
        }
    }
}

/// A non-NULL value ready to compare.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    Int(i64),
    Float(f64),
    Numeric(Numeric),
    /// Microseconds, see `datetime`.
    Instant(i128),
    /// (UTC microseconds of the day, zone in seconds west of UTC).
    TimeTz(i128, i128),
    Raw(Bytes),
    /// A value of a known type that did not parse; sorts last, by bytes.
    Unparsed(Bytes),
}

impl Value {
    pub fn parse(ty: ColumnType, raw: Bytes) -> Value {
        let kind = Kind::of(ty.oid);
        let parsed = if ty.format == 1 {
            parse_binary(ty.oid, kind, &raw)
        } else {
            parse_text(kind, &raw)
        };
        match (parsed, kind) {
            (Some(v), _) => v,
            (None, Kind::Raw) => Value::Raw(raw),
            (None, Kind::Bpchar) => {
                let end = raw.iter().rposition(|&b| b != b' ').map_or(0, |p| p + 1);
                Value::Raw(raw.slice(..end))
            }
            (None, _) => Value::Unparsed(raw),
        }
    }

    fn rank(&self) -> u8 {
        match self {
            Value::Int(_) => 0,
            Value::Float(_) => 1,
            Value::Numeric(_) => 2,
            Value::Instant(_) => 3,
            Value::TimeTz(..) => 4,
            Value::Raw(_) => 5,
            Value::Unparsed(_) => 6,
        }
    }
}

/// Total order over values of one column (see the module header).
pub(crate) fn compare(a: &Value, b: &Value) -> Ordering {
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => x.cmp(y),
        (Value::Float(x), Value::Float(y)) => compare_f64(*x, *y),
        (Value::Numeric(x), Value::Numeric(y)) => x.cmp(y),
        (Value::Instant(x), Value::Instant(y)) => x.cmp(y),
        (Value::TimeTz(x, xz), Value::TimeTz(y, yz)) => (x, xz).cmp(&(y, yz)),
        (Value::Raw(x), Value::Raw(y)) | (Value::Unparsed(x), Value::Unparsed(y)) => x.cmp(y),
        _ => a.rank().cmp(&b.rank()),
    }
}

/// PostgreSQL's float order: NaN equals NaN and is above everything; -0 = 0.
fn compare_f64(x: f64, y: f64) -> Ordering {
    match (x.is_nan(), y.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
    }
}

fn parse_text(kind: Kind, raw: &[u8]) -> Option<Value> {
    let text = || std::str::from_utf8(raw).ok();
    Some(match kind {
        Kind::Int => Value::Int(text()?.parse().ok()?),
        Kind::Float => Value::Float(parse_float_text(text()?)?),
        Kind::Numeric => Value::Numeric(Numeric::parse_text(raw)?),
        Kind::Date => Value::Instant(datetime::parse_date_text(raw)?),
        Kind::Timestamp => Value::Instant(datetime::parse_timestamp_text(raw)?),
        Kind::Time => Value::Instant(datetime::parse_time_text(raw)?),
        Kind::TimeTz => {
            let (t, z) = datetime::parse_timetz_text(raw)?;
            Value::TimeTz(t, z)
        }
        Kind::Bpchar | Kind::Raw => return None,
    })
}

/// float4out/float8out spellings, then Rust's parser for the digits.
pub(crate) fn parse_float_text(s: &str) -> Option<f64> {
    match s {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

fn parse_binary(type_oid: u32, kind: Kind, raw: &[u8]) -> Option<Value> {
    Some(match (kind, type_oid) {
        (Kind::Int, oid::INT2) => Value::Int(pg::int2_from_sql(raw).ok()?.into()),
        (Kind::Int, oid::INT4) => Value::Int(pg::int4_from_sql(raw).ok()?.into()),
        (Kind::Int, oid::OID) => Value::Int(pg::oid_from_sql(raw).ok()?.into()),
        (Kind::Int, _) => Value::Int(pg::int8_from_sql(raw).ok()?),
        (Kind::Float, oid::FLOAT4) => Value::Float(pg::float4_from_sql(raw).ok()?.into()),
        (Kind::Float, _) => Value::Float(pg::float8_from_sql(raw).ok()?),
        (Kind::Numeric, _) => Value::Numeric(Numeric::decode_binary(raw)?),
        (Kind::Date, _) => Value::Instant(datetime::date_from_binary(pg::date_from_sql(raw).ok()?)),
        (Kind::Timestamp, _) => Value::Instant(datetime::timestamp_from_binary(
            pg::timestamp_from_sql(raw).ok()?,
        )),
        (Kind::Time, _) => Value::Instant(pg::time_from_sql(raw).ok()?.into()),
        (Kind::TimeTz, _) => {
            let bytes: [u8; 12] = raw.try_into().ok()?;
            let usecs = i64::from_be_bytes(bytes[..8].try_into().ok()?);
            let zone = i32::from_be_bytes(bytes[8..].try_into().ok()?);
            let (t, z) = datetime::timetz_from_binary(usecs, zone);
            Value::TimeTz(t, z)
        }
        (Kind::Bpchar | Kind::Raw, _) => return None,
    })
}

/// A computed value that does not fit its column's type; reported to the client as
/// SQLSTATE 22003 with the server's wording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OutOfRange(pub &'static str);

/// An integer result (count, sum of integers) in the column's type and format.
pub(crate) fn encode_integer(v: i128, ty: ColumnType) -> Result<Bytes, OutOfRange> {
    let binary = ty.format == 1;
    let mut out = BytesMut::new();
    match ty.oid {
        oid::INT2 => {
            let v = i16::try_from(v).map_err(|_| OutOfRange("smallint out of range"))?;
            put_int(&mut out, binary, v.into(), |b| b.put_i16(v));
        }
        oid::INT4 => {
            let v = i32::try_from(v).map_err(|_| OutOfRange("integer out of range"))?;
            put_int(&mut out, binary, v.into(), |b| b.put_i32(v));
        }
        oid::NUMERIC => {
            return encode_numeric(&Numeric::Finite(Decimal::from_i128(v)), ty);
        }
        oid::FLOAT4 | oid::FLOAT8 => return Ok(encode_float(v as f64, ty)),
        _ => {
            let v = i64::try_from(v).map_err(|_| OutOfRange("bigint out of range"))?;
            put_int(&mut out, binary, v.into(), |b| b.put_i64(v));
        }
    }
    Ok(out.freeze())
}

fn put_int(out: &mut BytesMut, binary: bool, v: i128, put_binary: impl FnOnce(&mut BytesMut)) {
    if binary {
        put_binary(out);
    } else {
        out.put_slice(v.to_string().as_bytes());
    }
}

pub(crate) fn encode_numeric(v: &Numeric, ty: ColumnType) -> Result<Bytes, OutOfRange> {
    if ty.format != 1 {
        return Ok(Bytes::from(v.to_text()));
    }
    let mut out = BytesMut::new();
    v.encode_binary(&mut out)
        .ok_or(OutOfRange("value overflows numeric format"))?;
    Ok(out.freeze())
}

/// A float result in the column's type (float4 or float8) and format.
pub(crate) fn encode_float(v: f64, ty: ColumnType) -> Bytes {
    let single = ty.oid == oid::FLOAT4;
    let mut out = BytesMut::new();
    match (ty.format == 1, single) {
        (true, true) => pg::float4_to_sql(v as f32, &mut out),
        (true, false) => pg::float8_to_sql(v, &mut out),
        (false, _) => out.put_slice(format_float(v, single).as_bytes()),
    }
    out.freeze()
}

/// float8out/float4out with the default `extra_float_digits = 1`: the shortest text
/// that reads back as the same value, in exponent form when the decimal exponent is
/// below -4 or at least 15 (float8) / 6 (float4) digits: `1e+15`, `1.5e-07`.
pub(crate) fn format_float(v: f64, single: bool) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let (sci, plain) = if single {
        let f = v as f32;
        (format!("{f:e}"), format!("{f}"))
    } else {
        (format!("{v:e}"), format!("{v}"))
    };
    let Some((mantissa, exp)) = sci.split_once('e') else {
        return plain;
    };
    let exp: i32 = exp.parse().unwrap_or(0);
    let plain_below = if single { 6 } else { 15 };
    if v == 0.0 || (-4..plain_below).contains(&exp) {
        plain
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.unsigned_abs())
    }
}
