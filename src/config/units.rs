//! Parsers for the human-friendly values in `shardgate.yaml`: durations (`250ms`, `1s`,
//! `2m`) and byte sizes (`16MB`, `64kB`, or a plain byte count).

use std::time::Duration;

/// Parses `<integer><unit>` with unit `us`, `ms`, `s`, `m`, `h` or `d`.
///
/// A unit is mandatory: a bare `5` is ambiguous between seconds and milliseconds, and
/// guessing wrong by a factor of 1000 on a timeout is worse than a load error.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = split_number(text)?;
    let micros_per_unit: u64 = match unit {
        "us" | "µs" => 1,
        "ms" => 1_000,
        "s" => 1_000_000,
        "m" | "min" => 60_000_000,
        "h" => 3_600_000_000,
        "d" => 86_400_000_000,
        "" => return Err("a unit is required (us, ms, s, m, h or d), e.g. `5s`".into()),
        other => {
            return Err(format!(
                "unknown unit \"{other}\" (expected us, ms, s, m, h or d)"
            ))
        }
    };
    number
        .checked_mul(micros_per_unit)
        .map(Duration::from_micros)
        .ok_or_else(|| "duration is too large".to_string())
}

/// Parses a byte count: a plain integer, or an integer followed by `B`, `kB`, `MB`, `GB`,
/// `TB` (or `KB`, `KiB`, `MiB`, `GiB`, `TiB`).
///
/// Multiples are powers of 1024, as in `postgresql.conf`, so `16MB` means the same
/// here as it does to the operator's Postgres.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let (number, unit) = split_number(text)?;
    let shift: u32 = match unit {
        "" | "B" => 0,
        "kB" | "KB" | "KiB" => 10,
        "MB" | "MiB" => 20,
        "GB" | "GiB" => 30,
        "TB" | "TiB" => 40,
        other => {
            return Err(format!(
                "unknown unit \"{other}\" (expected B, kB, MB, GB or TB)"
            ))
        }
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| "size is too large".to_string())
}

/// Splits `" 16 MB "` into `(16, "MB")`; one optional space between number and unit is
/// tolerated because operators write both `16MB` and `16 MB`.
fn split_number(text: &str) -> Result<(u64, &str), String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    if digits_end == 0 {
        return Err("expected a non-negative integer followed by a unit".into());
    }
    let (digits, unit) = text.split_at(digits_end);
    let number = digits
        .parse::<u64>()
        .map_err(|_| "number is too large".to_string())?;
    Ok((number, unit.strip_prefix(' ').unwrap_or(unit)))
}
