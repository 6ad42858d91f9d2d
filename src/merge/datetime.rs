//! Dates and times decoded into comparable instants, so a cross-shard ORDER BY on a
//! `timestamptz` printed with different UTC offsets (a daylight-saving change, or
//! `+05:30` against `+00`), on BC dates or on years past 9999 sorts as the server
//! sorts it. Text must be in `DateStyle = ISO` (the server default and what drivers
//! set); any other style does not parse and falls back to byte order.
//!
//! Instants are microseconds since 1970-01-01 00:00:00 (UTC for `timestamptz`), in
//! the proleptic Gregorian calendar, with `infinity`/`-infinity` as the extremes.

/// Microseconds per second and per day.
const USECS_PER_SEC: i128 = 1_000_000;
const USECS_PER_DAY: i128 = 86_400 * USECS_PER_SEC;
/// Days from 1970-01-01 to PostgreSQL's epoch 2000-01-01 (binary values count from it).
const PG_EPOCH_DAYS: i128 = 10_957;

pub(crate) const INFINITY: i128 = i128::MAX;
pub(crate) const NEG_INFINITY: i128 = i128::MIN;

/// Text `date`: `YYYY-MM-DD[ BC]`, `infinity`, `-infinity`.
pub(crate) fn parse_date_text(s: &[u8]) -> Option<i128> {
    if let Some(inf) = infinity(s) {
        return Some(inf);
    }
    let mut c = Cursor(s);
    let ymd = c.date_parts()?;
    let days = c.era(ymd)?;
    c.end()?;
    Some(days * USECS_PER_DAY)
}

/// Text `timestamp`/`timestamptz`: `YYYY-MM-DD HH:MM:SS[.ffffff][+HH[:MM[:SS]]][ BC]`.
pub(crate) fn parse_timestamp_text(s: &[u8]) -> Option<i128> {
    if let Some(inf) = infinity(s) {
        return Some(inf);
    }
    let mut c = Cursor(s);
    let ymd = c.date_parts()?;
    c.byte(b' ')?;
    let time = c.time()?;
    let offset = c.offset()?;
    let bc = c.bc();
    c.end()?;
    let days = days_from_civil(if bc { 1 - ymd.0 } else { ymd.0 }, ymd.1, ymd.2);
    Some(days * USECS_PER_DAY + time - offset * USECS_PER_SEC)
}

/// Text `time`: `HH:MM:SS[.ffffff]`.
pub(crate) fn parse_time_text(s: &[u8]) -> Option<i128> {
    let mut c = Cursor(s);
    let time = c.time()?;
    c.end()?;
    Some(time)
}

/// Text `timetz`: the instant in UTC and the zone in seconds west of UTC, the pair
/// `timetz_cmp` orders by.
pub(crate) fn parse_timetz_text(s: &[u8]) -> Option<(i128, i128)> {
    let mut c = Cursor(s);
    let time = c.time()?;
    let offset = c.offset()?;
    c.end()?;
    Some((time - offset * USECS_PER_SEC, -offset))
}

/// Binary `date`: days since 2000-01-01; `i32::MAX`/`MIN` are +/-infinity.
pub(crate) fn date_from_binary(days: i32) -> i128 {
    match days {
        i32::MAX => INFINITY,
        i32::MIN => NEG_INFINITY,
        d => (i128::from(d) + PG_EPOCH_DAYS) * USECS_PER_DAY,
    }
}

/// Binary `timestamp`/`timestamptz`: microseconds since 2000-01-01; `i64::MAX`/`MIN`
/// are +/-infinity.
pub(crate) fn timestamp_from_binary(usecs: i64) -> i128 {
    match usecs {
        i64::MAX => INFINITY,
        i64::MIN => NEG_INFINITY,
        u => i128::from(u) + PG_EPOCH_DAYS * USECS_PER_DAY,
    }
}

/// Binary `timetz`: microseconds of the day and the zone in seconds west of UTC.
pub(crate) fn timetz_from_binary(usecs: i64, zone_west: i32) -> (i128, i128) {
    let zone = i128::from(zone_west);
    (i128::from(usecs) + zone * USECS_PER_SEC, zone)
}

fn infinity(s: &[u8]) -> Option<i128> {
    match s {
        b"infinity" => Some(INFINITY),
        b"-infinity" => Some(NEG_INFINITY),
        _ => None,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (astronomical year numbering:
/// 1 BC is year 0). Howard Hinnant's `days_from_civil`.
fn days_from_civil(year: i128, month: i128, day: i128) -> i128 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A forward-only reader over ASCII text; every method returns `None` on a mismatch.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn byte(&mut self, b: u8) -> Option<()> {
        let (&first, rest) = self.0.split_first()?;
        (first == b).then(|| self.0 = rest)
    }

    /// Between `min` and `max` decimal digits.
    fn number(&mut self, min: usize, max: usize) -> Option<i128> {
        let n = self
            .0
            .iter()
            .take(max)
            .take_while(|b| b.is_ascii_digit())
            .count();
        if n < min {
            return None;
        }
        let v = self.0[..n]
            .iter()
            .fold(0i128, |acc, &d| acc * 10 + i128::from(d - b'0'));
        self.0 = &self.0[n..];
        Some(v)
    }

    fn date_parts(&mut self) -> Option<(i128, i128, i128)> {
        let year = self.number(4, 9)?;
        self.byte(b'-')?;
        let month = self.number(2, 2)?;
        self.byte(b'-')?;
        let day = self.number(2, 2)?;
        ((1..=12).contains(&month) && (1..=31).contains(&day)).then_some((year, month, day))
    }

    /// Folds an optional trailing ` BC` into the year and converts to days.
    fn era(&mut self, (year, month, day): (i128, i128, i128)) -> Option<i128> {
        let year = if self.bc() { 1 - year } else { year };
        Some(days_from_civil(year, month, day))
    }

    fn bc(&mut self) -> bool {
        if self.0 == b" BC" {
            self.0 = &[];
            true
        } else {
            false
        }
    }

    /// `HH:MM:SS[.ffffff]` as microseconds (24:00:00 is allowed, as in PostgreSQL).
    fn time(&mut self) -> Option<i128> {
        let h = self.number(2, 2)?;
        self.byte(b':')?;
        let m = self.number(2, 2)?;
        self.byte(b':')?;
        let s = self.number(2, 2)?;
        let mut usecs = 0;
        if self.byte(b'.').is_some() {
            let before = self.0.len();
            let f = self.number(1, 6)?;
            let digits = before - self.0.len();
            usecs = f * 10i128.pow(6 - digits as u32);
        }
        if h > 24 || m > 59 || s > 60 {
            return None;
        }
        Some(((h * 60 + m) * 60 + s) * USECS_PER_SEC + usecs)
    }

    /// An optional UTC offset `+HH[:MM[:SS]]`, in seconds east of UTC (0 if absent).
    fn offset(&mut self) -> Option<i128> {
        let sign = match self.0.first() {
            Some(b'+') => 1,
            Some(b'-') => -1,
            _ => return Some(0),
        };
        self.0 = &self.0[1..];
        let mut secs = self.number(2, 2)? * 3600;
        if self.byte(b':').is_some() {
            secs += self.number(2, 2)? * 60;
            if self.byte(b':').is_some() {
                secs += self.number(2, 2)?;
            }
        }
        Some(sign * secs)
    }

    fn end(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days_match_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 1, 1), PG_EPOCH_DAYS);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        assert_eq!(
            days_from_civil(2024, 3, 1) - days_from_civil(2024, 2, 28),
            2
        );
    }

    #[test]
    fn text_and_binary_agree() {
        let text = parse_timestamp_text(b"2000-01-02 00:00:01.5+00").unwrap();
        assert_eq!(text, timestamp_from_binary(86_401_500_000));
        assert_eq!(parse_date_text(b"2000-01-02").unwrap(), date_from_binary(1));
    }

    #[test]
    fn offsets_and_eras_order_correctly() {
        // 01:30+01 is 00:30 UTC, before 01:00+00.
        let a = parse_timestamp_text(b"2024-03-31 01:30:00+01").unwrap();
        let b = parse_timestamp_text(b"2024-03-31 01:00:00+00").unwrap();
        assert!(a < b);
        let bc = parse_date_text(b"0001-01-01 BC").unwrap();
        let ad = parse_date_text(b"0001-01-01").unwrap();
        assert!(bc < ad);
        assert!(parse_date_text(b"10000-01-01").unwrap() > parse_date_text(b"9999-12-31").unwrap());
        assert!(parse_timestamp_text(b"infinity").unwrap() > b);
        assert_eq!(
            parse_timestamp_text(b"1900-01-01 00:00:00+00:53:28"),
            parse_timestamp_text(b"1899-12-31 23:06:32+00")
        );
        assert!(parse_time_text(b"10:00:00.5").unwrap() < parse_time_text(b"10:00:01").unwrap());
        assert!(parse_timestamp_text(b"01/02/2024 10:00").is_none());
    }
}
