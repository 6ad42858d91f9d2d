//! Per-execution value extraction for the shard planner: where a literal sits in a
//! simple-protocol text (the same scan as the analysis cache's key), and how a literal
//! or a bound parameter (text or binary format) becomes a sharding key value.
//!
//! Everything here runs on the hot path of a cached statement: no parsing of SQL, and
//! no allocation except for a text literal that contains `''`.

use std::borrow::Cow;
use std::ops::Range;

use super::{TimeColumn, Val, ValueRef, Values};

/// Microseconds between 1970-01-01 and PostgreSQL's epoch 2000-01-01.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
const MICROS_PER_DAY: i64 = 86_400_000_000;
/// How far a time literal's instant may move with the column type and the session
/// TimeZone (PostgreSQL accepts UTC offsets up to 15:59:59): a time value whose reading
/// is not certain is treated as `[t - 16h, t + 16h]`.
pub(super) const TIME_SLACK_MICROS: i64 = 16 * 3_600_000_000;

/// How a time value compared with one table's key is read.
pub(super) struct TimeRead<'a> {
    /// The key column's type, when the catalog told the session.
    pub(super) column: Option<TimeColumn>,
    /// The session's TimeZone as seconds east of UTC, when a fixed offset.
    pub(super) utc_offset: Option<i32>,
    pub(super) param_types: &'a [u32],
}

const OID_INT2: u32 = 21;
const OID_INT4: u32 = 23;
const OID_INT8: u32 = 20;
const OID_DATE: u32 = 1082;
const OID_TIMESTAMP: u32 = 1114;
const OID_TIMESTAMPTZ: u32 = 1184;
const OID_UUID: u32 = 2950;

/// Byte ranges of the literals of `sql` in text order, by exactly the rules of the
/// analysis cache's key (one scanner, `cache::scan_literals`), so a plan made from one
/// text of a shape finds its literals in every other text of that shape. `None` when
/// the key would be the full text (a backslash, `$` quoting, an unterminated quote or
/// comment).
pub fn literal_spans(sql: &str) -> Option<Vec<Range<usize>>> {
    let mut spans = Vec::new();
    crate::routing::cache::scan_literals(sql, |span| spans.push(span)).then_some(spans)
}

/// The text of a literal span: a string's body with `''` undoubled, or a number.
pub(super) fn literal_text(raw: &str) -> Cow<'_, str> {
    match raw.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
        Some(body) if body.contains("''") => Cow::Owned(body.replace("''", "'")),
        Some(body) => Cow::Borrowed(body),
        None => Cow::Borrowed(raw),
    }
}

/// One value as found for one execution.
pub(super) enum Raw<'a> {
    Null,
    Text(Cow<'a, str>),
    /// Binary-format parameter with the type OID from Parse (0 when unspecified).
    Binary(&'a [u8], u32),
}

/// Looks a value source up in this execution's values. `None`: not available (an
/// index out of range, a literal that is not where the plan expects it).
pub(super) fn fetch<'a>(src: &'a ValueRef, values: &Values<'a>) -> Option<Raw<'a>> {
    match src {
        ValueRef::Null => Some(Raw::Null),
        ValueRef::Const(text) => Some(Raw::Text(Cow::Borrowed(text))),
        ValueRef::Literal(i) => {
            let span = values.literals.get(usize::from(*i))?;
            let raw = values.text.get(span.clone())?;
            Some(Raw::Text(literal_text(raw)))
        }
        ValueRef::Param(i) => {
            let i = usize::from(*i);
            let param = values.params.get(i)?;
            let Some(bytes) = param else {
                return Some(Raw::Null);
            };
            let format = values.param_formats.get(i).copied().unwrap_or(0);
            let oid = values.param_types.get(i).copied().unwrap_or(0);
            if format == 1 {
                Some(Raw::Binary(bytes, oid))
            } else {
                std::str::from_utf8(bytes)
                    .ok()
                    .map(|t| Raw::Text(Cow::Borrowed(t)))
            }
        }
    }
}

/// A decoded value: `Some(None)` is SQL NULL (compares true with nothing), `None` a
/// value that is not understood.
pub(super) type Decoded<T> = Option<Option<T>>;

/// An integer key (smallint/integer/bigint).
pub(super) fn int_of(raw: Raw, val: &Val) -> Decoded<i64> {
    // Wider than the key so that `-9223372036854775808` (minus applied to a literal
    // one past i64::MAX, which PostgreSQL folds into bigint's minimum) is a key.
    let v = match raw {
        Raw::Null => return Some(None),
        Raw::Text(t) => parse_wide_int(&t)?,
        Raw::Binary(b, oid) => i128::from(binary_int(b, oid)?),
    };
    let v = if val.negate { -v } else { v };
    i64::try_from(v).ok().map(Some)
}

/// int2/int4/int8 text input: optional sign, digits, surrounding blanks allowed.
pub(super) fn parse_wide_int(text: &str) -> Option<i128> {
    // The common literal or text parameter: up to 18 plain digits, which cannot
    // overflow an i64. Same value as the general path below, without its i128 parse.
    let digits = text.as_bytes();
    if (1..=18).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit) {
        let v = digits
            .iter()
            .fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0'));
        return Some(i128::from(v));
    }
    parse_int_text(text)
}

/// [`parse_wide_int`] for any text.
pub(super) fn parse_int_text(text: &str) -> Option<i128> {
    let t = text.trim_matches(|c: char| c.is_ascii_whitespace());
    if t.is_empty() || t.contains('_') {
        return None;
    }
    t.parse::<i128>().ok()
}

fn binary_int(b: &[u8], oid: u32) -> Option<i64> {
    // With an unspecified type the server inferred the column's type, and only accepts
    // the length of that type, so the length tells which one it was.
    match (oid, b.len()) {
        (OID_INT8 | 0, 8) => Some(i64::from_be_bytes(b.try_into().ok()?)),
        (OID_INT4 | 0, 4) => Some(i64::from(i32::from_be_bytes(b.try_into().ok()?))),
        (OID_INT2 | 0, 2) => Some(i64::from(i16::from_be_bytes(b.try_into().ok()?))),
        _ => None,
    }
}

/// A text key (text/varchar). Binary text is its bytes in the client encoding;
/// shardgate assumes UTF-8.
pub(super) fn text_of<'a>(raw: Raw<'a>, val: &Val) -> Decoded<Cow<'a, str>> {
    if val.negate {
        return None;
    }
    match raw {
        Raw::Null => Some(None),
        Raw::Text(t) => Some(Some(t)),
        Raw::Binary(b, _) => std::str::from_utf8(b).ok().map(|t| Some(Cow::Borrowed(t))),
    }
}

/// A uuid key from its text form (as uuid_in accepts) or its 16 binary bytes.
pub(super) fn uuid_of(raw: Raw, val: &Val) -> Decoded<[u8; 16]> {
    if val.negate {
        return None;
    }
    match raw {
        Raw::Null => Some(None),
        Raw::Text(t) => parse_uuid(&t).map(Some),
        Raw::Binary(b, OID_UUID | 0) => b.try_into().ok().map(Some),
        Raw::Binary(..) => None,
    }
}

pub(super) fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let t = text.trim_matches(|c: char| c.is_ascii_whitespace());
    let t = t
        .strip_prefix('{')
        .and_then(|r| r.strip_suffix('}'))
        .unwrap_or(t);
    let mut out = [0u8; 16];
    let mut n = 0;
    let mut half: Option<u8> = None;
    for c in t.chars() {
        if c == '-' && half.is_none() {
            continue;
        }
        let d = c.to_digit(16)? as u8;
        match half.take() {
            None => half = Some(d),
            Some(h) => {
                *out.get_mut(n)? = h << 4 | d;
                n += 1;
            }
        }
    }
    (n == 16 && half.is_none()).then_some(out)
}

/// A time key as microseconds since 1970 on the map's axis (the instant for
/// `timestamptz`, the wall-clock time read as UTC for `timestamp` and `date`, which is
/// how the servers compare such columns with the map's bounds), and how far it may be
/// off (0, or [`TIME_SLACK_MICROS`] when the reading is not certain).
///
/// Certain: a value PostgreSQL reads as the column's own type (a literal, or a
/// parameter whose declared type is unspecified or the column's) when the column's
/// type is known and, for `timestamptz`, the text has an explicit offset or the
/// session's TimeZone is a fixed offset. A `timestamp` or `date` column ignores a
/// text's offset, as PostgreSQL does.
pub(super) fn time_of(raw: Raw, val: &Val, time: &TimeRead) -> Decoded<(i64, i64)> {
    if val.negate {
        return None;
    }
    let declared = match &val.src {
        ValueRef::Param(i) => time.param_types.get(usize::from(*i)).copied().unwrap_or(0),
        _ => 0,
    };
    let column = time
        .column
        .filter(|c| !val.cast && (declared == 0 || declared == column_oid(*c)));
    let (micros, certain) = match raw {
        Raw::Null => return Some(None),
        Raw::Text(t) => {
            let (wall, offset) = parse_time_parts(&t)?;
            let offset = offset.map(|secs| secs * 1_000_000);
            match (column, offset) {
                (Some(TimeColumn::Timestamp | TimeColumn::Date), _) => (wall, true),
                (Some(TimeColumn::Timestamptz), Some(offset)) => (wall.checked_sub(offset)?, true),
                (Some(TimeColumn::Timestamptz), None) => match time.utc_offset {
                    Some(secs) => (wall.checked_sub(i64::from(secs) * 1_000_000)?, true),
                    None => (wall, false),
                },
                (None, offset) => (wall.checked_sub(offset.unwrap_or(0))?, false),
            }
        }
        Raw::Binary(b, oid) => (binary_time(b, oid)?, column.is_some()),
    };
    let to_date = val.to_date || column == Some(TimeColumn::Date);
    let micros = if to_date {
        micros.div_euclid(MICROS_PER_DAY) * MICROS_PER_DAY
    } else {
        micros
    };
    Some(Some((micros, if certain { 0 } else { TIME_SLACK_MICROS })))
}

fn column_oid(column: TimeColumn) -> u32 {
    match column {
        TimeColumn::Timestamptz => OID_TIMESTAMPTZ,
        TimeColumn::Timestamp => OID_TIMESTAMP,
        TimeColumn::Date => OID_DATE,
    }
}

/// A binary timestamp, timestamptz or date as microseconds since 1970.
fn binary_time(b: &[u8], oid: u32) -> Option<i64> {
    match (oid, b.len()) {
        (OID_TIMESTAMP | OID_TIMESTAMPTZ | 0, 8) => {
            i64::from_be_bytes(b.try_into().ok()?).checked_add(PG_EPOCH_MICROS)
        }
        (OID_DATE | 0, 4) => i64::from(i32::from_be_bytes(b.try_into().ok()?))
            .checked_mul(MICROS_PER_DAY)?
            .checked_add(PG_EPOCH_MICROS),
        _ => None,
    }
}

/// PostgreSQL's ISO input forms: `YYYY-MM-DD`, then optionally `T` or a space and
/// `HH:MM[:SS[.ffffff]]`, then optionally `Z` or `±HH[[:]MM]`, as the wall-clock time
/// read as UTC and the text's offset in seconds east of UTC when it has one. Anything
/// else (`now`, `infinity`, month names, zone names, BC) is not understood: the caller
/// then treats the value as unknown, which is always safe.
pub(super) fn parse_time_parts(text: &str) -> Option<(i64, Option<i64>)> {
    let t = text.trim_matches(|c: char| c.is_ascii_whitespace());
    let date = t.get(..10)?;
    let day_start = crate::shard_map::time::parse_timestamp(date).ok()?;
    let rest = &t.as_bytes()[10..];
    let Some((&sep, rest)) = rest.split_first() else {
        return Some((day_start, None));
    };
    if !matches!(sep, b'T' | b't' | b' ') {
        return None;
    }
    let (h, rest) = two_digits(rest)?;
    let rest = rest.strip_prefix(b":")?;
    let (m, mut rest) = two_digits(rest)?;
    let mut s = 0;
    let mut frac = 0;
    if let Some(r) = rest.strip_prefix(b":") {
        let (sec, r) = two_digits(r)?;
        s = sec;
        rest = r;
        if let Some(r) = rest.strip_prefix(b".") {
            let len = r.iter().take_while(|c| c.is_ascii_digit()).count();
            if len == 0 || len > 6 {
                return None;
            }
            let digits = std::str::from_utf8(&r[..len]).ok()?.parse::<i64>().ok()?;
            frac = digits * 10i64.pow(6 - len as u32);
            rest = &r[len..];
        }
    }
    if h > 24 || m > 59 || s > 60 {
        return None;
    }
    let offset = parse_offset(rest)?;
    let time = ((h * 60 + m) * 60 + s) * 1_000_000 + frac;
    Some((day_start.checked_add(time)?, offset))
}

fn two_digits(b: &[u8]) -> Option<(i64, &[u8])> {
    match b {
        [a @ b'0'..=b'9', c @ b'0'..=b'9', rest @ ..] => {
            Some((i64::from(a - b'0') * 10 + i64::from(c - b'0'), rest))
        }
        _ => None,
    }
}

/// Seconds east of UTC: `Some(None)` when the text has no offset, `None` when what
/// follows the time is not an offset.
fn parse_offset(b: &[u8]) -> Option<Option<i64>> {
    let b = b.strip_prefix(b" ").unwrap_or(b);
    match b {
        [] => Some(None),
        [b'Z' | b'z'] => Some(Some(0)),
        [sign @ (b'+' | b'-'), rest @ ..] => {
            let (h, rest) = two_digits(rest)?;
            let rest = rest.strip_prefix(b":").unwrap_or(rest);
            let m = match rest {
                [] => 0,
                _ => {
                    let (m, rest) = two_digits(rest)?;
                    if !rest.is_empty() {
                        return None;
                    }
                    m
                }
            };
            if h > 15 || m > 59 {
                return None;
            }
            let secs = h * 3600 + m * 60;
            Some(Some(if *sign == b'-' { -secs } else { secs }))
        }
        _ => None,
    }
}

/// The elements of an array value (`= ANY($1)`, `= ANY('{1,2}')`): text form
/// `{a,b,"c d",NULL}` or PostgreSQL's binary array format (one dimension). Elements
/// are handed to `each` as values of their own; returns false when the array is not
/// understood.
pub(super) fn array_elements<'a>(raw: Raw<'a>, each: &mut dyn FnMut(Raw<'a>) -> bool) -> bool {
    match raw {
        Raw::Null => true,
        Raw::Text(Cow::Borrowed(t)) => text_array(t, each),
        Raw::Text(Cow::Owned(t)) => {
            // A literal with '' escapes: rare; elements are copied.
            let mut ok = true;
            let mut owned: Vec<String> = Vec::new();
            text_array(&t, &mut |e| {
                match e {
                    Raw::Text(s) => owned.push(s.into_owned()),
                    Raw::Null => {}
                    Raw::Binary(..) => ok = false,
                }
                true
            }) && ok
                && owned.into_iter().all(|s| each(Raw::Text(Cow::Owned(s))))
        }
        Raw::Binary(b, _) => binary_array(b, each),
    }
}

fn text_array<'a>(t: &'a str, each: &mut dyn FnMut(Raw<'a>) -> bool) -> bool {
    let t = t.trim();
    let Some(body) = t.strip_prefix('{').and_then(|r| r.strip_suffix('}')) else {
        return false;
    };
    if body.trim().is_empty() {
        return true;
    }
    if body.contains(['{', '\\']) {
        return false;
    }
    let bytes = body.as_bytes();
    let mut i = 0;
    loop {
        while i < bytes.len() && bytes[i] == b' ' {
            i += 1;
        }
        let (element, quoted) = if bytes.get(i) == Some(&b'"') {
            let Some(k) = body[i + 1..].find('"') else {
                return false;
            };
            let e = &body[i + 1..i + 1 + k];
            i += k + 2;
            (e, true)
        } else {
            let k = body[i..].find(',').unwrap_or(body.len() - i);
            let e = body[i..i + k].trim_end();
            i += k;
            (e, false)
        };
        let raw = if !quoted && element.eq_ignore_ascii_case("null") {
            Raw::Null
        } else {
            Raw::Text(Cow::Borrowed(element))
        };
        if !each(raw) {
            return false;
        }
        while i < bytes.len() && bytes[i] == b' ' {
            i += 1;
        }
        match bytes.get(i) {
            None => return true,
            Some(b',') => i += 1,
            Some(_) => return false,
        }
    }
}

fn binary_array<'a>(b: &'a [u8], each: &mut dyn FnMut(Raw<'a>) -> bool) -> bool {
    let be_i32 = |at: usize| -> Option<i32> {
        Some(i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    let (Some(ndim), Some(elem_oid)) = (be_i32(0), be_i32(8)) else {
        return false;
    };
    if ndim == 0 {
        return true;
    }
    let Some(count) = be_i32(12).filter(|_| ndim == 1) else {
        return false;
    };
    let mut at = 20;
    for _ in 0..count.max(0) {
        let Some(len) = be_i32(at) else {
            return false;
        };
        at += 4;
        let raw = if len < 0 {
            Raw::Null
        } else {
            let Some(bytes) = b.get(at..at + len as usize) else {
                return false;
            };
            at += len as usize;
            Raw::Binary(bytes, elem_oid as u32)
        };
        if !each(raw) {
            return false;
        }
    }
    true
}
