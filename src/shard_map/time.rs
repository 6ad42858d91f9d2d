//! Timestamps for time keyspaces: RFC 3339 (`2026-01-01T00:00:00Z`,
//! `2026-01-01T09:30:00.5+02:00`) or a plain date (`2026-01-01`, midnight UTC), converted
//! to microseconds since the Unix epoch in UTC, PostgreSQL's own timestamp resolution.
//!
//! A time with no offset is rejected rather than assumed to be UTC: a boundary that is
//! silently off by the server's time zone would route rows to the wrong shard.

const MICROS_PER_SECOND: i64 = 1_000_000;
const SECONDS_PER_DAY: i64 = 86_400;

/// Parses an RFC 3339 timestamp or a `YYYY-MM-DD` date into microseconds since
/// 1970-01-01T00:00:00Z.
pub fn parse_timestamp(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let bytes = text.as_bytes();
    let days = parse_date(bytes.get(..10).ok_or_else(too_short)?)?;
    let midnight = days * SECONDS_PER_DAY * MICROS_PER_SECOND;
    let rest = &bytes[10..];
    let Some((&sep, rest)) = rest.split_first() else {
        return Ok(midnight);
    };
    if !matches!(sep, b'T' | b't' | b' ') {
        return Err("expected `T` between date and time".into());
    }
    let (time_of_day, rest) = parse_time(rest)?;
    let offset_seconds = parse_offset(rest)?;
    Ok(midnight + time_of_day - offset_seconds * MICROS_PER_SECOND)
}

/// Formats microseconds since the epoch as RFC 3339 UTC, for error messages.
pub fn format_timestamp(micros: i64) -> String {
    let days = micros.div_euclid(SECONDS_PER_DAY * MICROS_PER_SECOND);
    let in_day = micros.rem_euclid(SECONDS_PER_DAY * MICROS_PER_SECOND);
    let (y, m, d) = civil_from_days(days);
    let secs = in_day / MICROS_PER_SECOND;
    let frac = in_day % MICROS_PER_SECOND;
    let (hh, mm, ss) = (secs / 3600, secs / 60 % 60, secs % 60);
    if frac == 0 {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
    } else {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{frac:06}Z")
    }
}

fn too_short() -> String {
    "expected a date `YYYY-MM-DD` or a timestamp `YYYY-MM-DDTHH:MM:SSZ`".into()
}

/// `YYYY-MM-DD` to days since 1970-01-01.
fn parse_date(b: &[u8]) -> Result<i64, String> {
    if b[4] != b'-' || b[7] != b'-' {
        return Err(too_short());
    }
    let year = digits(&b[0..4])?;
    let month = digits(&b[5..7])?;
    let day = digits(&b[8..10])?;
    if !(1..=12).contains(&month) {
        return Err(format!("month {month} is out of range"));
    }
    if day < 1 || day > days_in_month(year, month) {
        return Err(format!(
            "day {day} is out of range for {year:04}-{month:02}"
        ));
    }
    Ok(days_from_civil(year, month, day))
}

/// `HH:MM:SS[.ffffff]`, returning microseconds into the day and the unparsed rest.
fn parse_time(b: &[u8]) -> Result<(i64, &[u8]), String> {
    let hms = b.get(..8).ok_or_else(too_short)?;
    if hms[2] != b':' || hms[5] != b':' {
        return Err("expected time as HH:MM:SS".into());
    }
    let (h, m, s) = (
        digits(&hms[0..2])?,
        digits(&hms[3..5])?,
        digits(&hms[6..8])?,
    );
    if h > 23 || m > 59 || s > 59 {
        return Err(format!("time {h:02}:{m:02}:{s:02} is out of range"));
    }
    let mut micros = (h * 3600 + m * 60 + s) * MICROS_PER_SECOND;
    let mut rest = &b[8..];
    if let Some(after_dot) = rest.strip_prefix(b".") {
        let len = after_dot.iter().take_while(|c| c.is_ascii_digit()).count();
        if len == 0 || len > 6 {
            return Err("fractional seconds need 1 to 6 digits (microseconds)".into());
        }
        micros += digits(&after_dot[..len])? * 10i64.pow(6 - len as u32);
        rest = &after_dot[len..];
    }
    Ok((micros, rest))
}

/// `Z` or `±HH:MM`, in seconds east of UTC.
fn parse_offset(b: &[u8]) -> Result<i64, String> {
    match b {
        [b'Z' | b'z'] => Ok(0),
        [] => Err("a UTC offset is required (`Z` or `+HH:MM`), e.g. 2026-01-01T00:00:00Z".into()),
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let hours = digits(&[*h1, *h2])?;
            let minutes = digits(&[*m1, *m2])?;
            if hours > 23 || minutes > 59 {
                return Err("UTC offset is out of range".into());
            }
            let seconds = hours * 3600 + minutes * 60;
            Ok(if *sign == b'-' { -seconds } else { seconds })
        }
        _ => Err("expected `Z` or a UTC offset `+HH:MM` after the time".into()),
    }
}

fn digits(b: &[u8]) -> Result<i64, String> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return Err(too_short());
    }
    Ok(b.iter().fold(0, |n, c| n * 10 + i64::from(c - b'0')))
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Howard Hinnant's `days_from_civil`: proleptic Gregorian date to days since 1970-01-01.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Inverse of [`days_from_civil`].
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}
