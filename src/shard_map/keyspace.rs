//! Validates one keyspace of a shard map and builds its `Keyspace`.
//!
//! The invariant every later stage relies on (routing, `plan`, resharding row filters):
//! each possible key maps to exactly one shard. Hash maps must cover buckets
//! `0..buckets-1` exactly; range and time maps must tile the whole line from -infinity
//! to +infinity with half-open `[from, until)` intervals. Gaps and overlaps are errors
//! pointing at the entry where they show up.

use serde_saphyr::Spanned;

use super::hash::KeyType;
use super::raw::{RawEntry, RawKeyspace, Text};
use super::time::{format_timestamp, parse_timestamp};
use super::yaml::{line_of, Issue};
use super::Keyspace;

/// Resolves a `shard:` reference to a known shard name, or says why it cannot.
pub(crate) type ShardLookup<'a> = &'a dyn Fn(&Text, &str) -> Result<String, Issue>;

type Entry = Spanned<RawEntry>;

pub(crate) fn build(name: &str, raw: &RawKeyspace, shard: ShardLookup) -> Result<Keyspace, Issue> {
    let ctx = format!("keyspaces.{name}");
    if raw.map.value.is_empty() {
        return Err(Issue::at(
            &raw.map,
            format!("{ctx}.map: the map is empty; every key must belong to a shard"),
        ));
    }
    match raw.kind.value.as_str() {
        "hash" => hash(&ctx, raw, shard),
        "range" | "time" if raw.key_type.is_some() => Err(Issue::at(
            raw.key_type.as_ref().unwrap_or(&raw.kind),
            format!("{ctx}.key_type: only hash keyspaces have a key_type (range keys are integers, time keys timestamps)"),
        )),
        "range" => {
            let axis = Axis {
                noun: "keys",
                parse: parse_integer,
                show: |v| v.to_string(),
            };
            let map = line(&ctx, raw, shard, &axis)?;
            Ok(Keyspace::Range { map })
        }
        "time" => {
            let axis = Axis {
                noun: "times",
                parse: parse_timestamp,
                show: format_timestamp,
            };
            let map = line(&ctx, raw, shard, &axis)?;
            Ok(Keyspace::Time { map })
        }
        other => Err(Issue::at(
            &raw.kind,
            format!("{ctx}.type: unknown type \"{other}\", expected hash, range or time"),
        )),
    }
}

fn hash(ctx: &str, raw: &RawKeyspace, shard: ShardLookup) -> Result<Keyspace, Issue> {
    let Some(count) = &raw.buckets else {
        let msg = format!("{ctx}: a hash keyspace needs `buckets` (a power of two, e.g. 1024)");
        return Err(Issue::at(&raw.kind, msg));
    };
    let buckets = count.value;
    if !buckets.is_power_of_two() {
        let msg = format!("{ctx}.buckets: {buckets} is not a power of two");
        return Err(Issue::at(count, msg));
    }
    let mut parts = Vec::with_capacity(raw.map.value.len());
    for entry in &raw.map.value {
        reject(&entry.value.from, "from", ctx, "hash")?;
        reject(&entry.value.until, "until", ctx, "hash")?;
        let Some(text) = &entry.value.buckets else {
            let msg = format!("{ctx}.map: each entry of a hash keyspace needs `buckets: A-B`");
            return Err(Issue::at(entry, msg));
        };
        let (lo, hi) = parse_bucket_range(&text.value)
            .map_err(|why| Issue::at(text, format!("{ctx}.map: {why}")))?;
        if hi >= buckets {
            let msg = format!(
                "{ctx}.map: bucket {hi} is out of range: buckets are 0-{}",
                buckets - 1
            );
            return Err(Issue::at(text, msg));
        }
        let owner = shard(&entry.value.shard, &format!("{ctx}.map"))?;
        parts.push((lo, hi, owner, entry));
    }
    parts.sort_by_key(|p| p.0);
    check_buckets_cover(ctx, &parts, buckets)?;
    let map = parts
        .into_iter()
        .map(|(lo, hi, owner, _)| (lo..=hi, owner))
        .collect();
    let key_type = match raw.key_type.as_ref().map(|t| (t, t.value.as_str())) {
        None | Some((_, "int" | "integer" | "bigint" | "smallint")) => KeyType::Int,
        Some((_, "text" | "varchar")) => KeyType::Text,
        Some((_, "uuid")) => KeyType::Uuid,
        Some((t, other)) => {
            let msg =
                format!("{ctx}.key_type: unknown key type \"{other}\", expected int, text or uuid");
            return Err(Issue::at(t, msg));
        }
    };
    Ok(Keyspace::Hash {
        buckets,
        key_type,
        map,
    })
}

/// `parts` is sorted by first bucket.
fn check_buckets_cover(
    ctx: &str,
    parts: &[(u32, u32, String, &Entry)],
    buckets: u32,
) -> Result<(), Issue> {
    // u64 so that `hi + 1` cannot overflow for the last bucket of a 2^31 keyspace.
    let mut next: u64 = 0;
    let mut previous: Option<&(u32, u32, String, &Entry)> = None;
    for part in parts {
        let (lo, hi) = (u64::from(part.0), u64::from(part.1));
        if lo > next {
            let msg = format!("{ctx}.map: buckets {next}-{} belong to no shard", lo - 1);
            return Err(Issue::at(part.3, msg));
        }
        if let (true, Some(prev)) = (lo < next, previous) {
            let msg = format!(
                "{ctx}.map: buckets {lo}-{} are assigned twice: to {} ({}) and to {}",
                hi.min(next - 1),
                prev.2,
                line_of(prev.3),
                part.2
            );
            return Err(Issue::at(part.3, msg));
        }
        next = next.max(hi + 1);
        previous = Some(part);
    }
    match previous {
        Some(last) if next < u64::from(buckets) => {
            let msg = format!(
                "{ctx}.map: buckets {next}-{} belong to no shard",
                buckets - 1
            );
            Err(Issue::at(last.3, msg))
        }
        _ => Ok(()),
    }
}

/// `N` or `A-B` (inclusive), spaces allowed around the dash.
fn parse_bucket_range(text: &str) -> Result<(u32, u32), String> {
    let number = |s: &str| {
        s.trim()
            .parse::<u32>()
            .map_err(|_| format!("invalid bucket range \"{text}\": expected N or A-B, e.g. 0-511"))
    };
    let (lo, hi) = match text.split_once('-') {
        Some((lo, hi)) => (number(lo)?, number(hi)?),
        None => {
            let n = number(text)?;
            (n, n)
        }
    };
    if lo > hi {
        return Err(format!("bucket range \"{text}\" is reversed"));
    }
    Ok((lo, hi))
}

/// How bounds of a range or time keyspace are read and shown.
struct Axis {
    noun: &'static str,
    parse: fn(&str) -> Result<i64, String>,
    show: fn(i64) -> String,
}

type Interval = (Option<i64>, Option<i64>, String);

fn line(
    ctx: &str,
    raw: &RawKeyspace,
    shard: ShardLookup,
    axis: &Axis,
) -> Result<Vec<Interval>, Issue> {
    let kind = raw.kind.value.as_str();
    if let Some(buckets) = &raw.buckets {
        return Err(Issue::at(
            buckets,
            format!("{ctx}.buckets: only hash keyspaces have buckets"),
        ));
    }
    let mut parts = Vec::with_capacity(raw.map.value.len());
    for entry in &raw.map.value {
        reject(&entry.value.buckets, "buckets", ctx, kind)?;
        let from = bound(&entry.value.from, ctx, axis)?;
        let until = bound(&entry.value.until, ctx, axis)?;
        if let (Some(f), Some(u), Some(text)) = (from, until, &entry.value.from) {
            if f >= u {
                let msg = format!(
                    "{ctx}.map: `from` {} must be below `until` {}",
                    (axis.show)(f),
                    (axis.show)(u)
                );
                return Err(Issue::at(text, msg));
            }
        }
        let owner = shard(&entry.value.shard, &format!("{ctx}.map"))?;
        parts.push(((from, until, owner), entry));
    }
    // Unbounded `from` sorts first, as -infinity should.
    parts.sort_by_key(|p| p.0 .0);
    check_line_covered(ctx, &parts, axis)?;
    Ok(parts.into_iter().map(|(interval, _)| interval).collect())
}

fn bound(text: &Option<Text>, ctx: &str, axis: &Axis) -> Result<Option<i64>, Issue> {
    text.as_ref()
        .map(|t| {
            (axis.parse)(&t.value).map_err(|why| {
                Issue::at(
                    t,
                    format!("{ctx}.map: invalid bound \"{}\": {why}", t.value),
                )
            })
        })
        .transpose()
}

/// `parts` is sorted by `from`. Bounds are widened to i128 so that -infinity and
/// +infinity are ordinary numbers outside the i64 range.
fn check_line_covered(ctx: &str, parts: &[(Interval, &Entry)], axis: &Axis) -> Result<(), Issue> {
    const NEG_INF: i128 = i128::MIN;
    const POS_INF: i128 = i128::MAX;
    let mut next = NEG_INF;
    let mut previous: Option<&(Interval, &Entry)> = None;
    for part in parts {
        let lo = part.0 .0.map_or(NEG_INF, i128::from);
        let hi = part.0 .1.map_or(POS_INF, i128::from);
        if lo > next {
            let msg = format!("{ctx}.map: {} belong to no shard", describe(axis, next, lo));
            return Err(Issue::at(part.1, msg));
        }
        if let (true, Some(prev)) = (lo < next, previous) {
            let msg = format!(
                "{ctx}.map: {} are assigned twice: to {} ({}) and to {}",
                describe(axis, lo, hi.min(next)),
                prev.0 .2,
                line_of(prev.1),
                part.0 .2
            );
            return Err(Issue::at(part.1, msg));
        }
        next = hi;
        previous = Some(part);
    }
    match previous {
        Some(last) if next != POS_INF => {
            let msg = format!(
                "{ctx}.map: {} belong to no shard",
                describe(axis, next, POS_INF)
            );
            Err(Issue::at(last.1, msg))
        }
        _ => Ok(()),
    }
}

/// "keys from 10 until 20", "keys before 10", "times from 2026-01-01T00:00:00Z on".
fn describe(axis: &Axis, lo: i128, hi: i128) -> String {
    let show = |v: i128| i64::try_from(v).map_or_else(|_| "infinity".into(), axis.show);
    match (i64::try_from(lo).is_ok(), i64::try_from(hi).is_ok()) {
        (false, false) => format!("all {}", axis.noun),
        (false, true) => format!("{} before {}", axis.noun, show(hi)),
        (true, false) => format!("{} from {} on", axis.noun, show(lo)),
        (true, true) => format!("{} from {} until {}", axis.noun, show(lo), show(hi)),
    }
}

fn parse_integer(text: &str) -> Result<i64, String> {
    text.trim().parse::<i64>().map_err(|_| {
        "expected an integer between -9223372036854775808 and 9223372036854775807".into()
    })
}

/// A field that belongs to another keyspace type is a mistake, not something to ignore.
fn reject(field: &Option<Text>, name: &str, ctx: &str, kind: &str) -> Result<(), Issue> {
    match field {
        Some(text) => Err(Issue::at(
            text,
            format!("{ctx}.map: `{name}` does not apply to a {kind} keyspace"),
        )),
        None => Ok(()),
    }
}
