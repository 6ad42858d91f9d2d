//! Positions and messages for YAML errors, shared by the shard map and `config` loaders
//! so both report `file:line:column: reason` the same way. It lives here because the shard
//! map may depend on nothing else in the crate, while `config` may depend on it.

use std::fmt;

use serde_saphyr::{Location, Spanned};

/// A 1-based line and (when known) column in the YAML source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    pub line: u32,
    pub column: Option<u32>,
}

impl Position {
    /// serde-saphyr marks "unknown" with line 0; that becomes `None`.
    fn from_location(loc: &Location) -> Option<Position> {
        let line = u32::try_from(loc.line()).ok().filter(|l| *l > 0)?;
        let column = u32::try_from(loc.column()).ok().filter(|c| *c > 0);
        Some(Position { line, column })
    }

    pub(crate) fn of<T>(spanned: &Spanned<T>) -> Option<Position> {
        Position::from_location(&spanned.referenced)
    }
}

/// A problem found before the file name is attached; validation code deals only in these
/// and each loader turns them into its own error type.
#[derive(Debug)]
pub(crate) struct Issue {
    pub at: Option<Position>,
    pub message: String,
}

impl Issue {
    pub(crate) fn at<T>(spanned: &Spanned<T>, message: impl Into<String>) -> Issue {
        Issue {
            at: Position::of(spanned),
            message: message.into(),
        }
    }

    /// `empty_file` replaces serde-saphyr's "unexpected end of input" for a file with no
    /// content, and should say what the file needs at least.
    pub(crate) fn from_yaml(err: &serde_saphyr::Error, text: &str, empty_file: &str) -> Issue {
        let (at, message) = describe_error(err, text);
        let message = if is_blank(text) {
            empty_file.to_string()
        } else {
            message
        };
        Issue { at, message }
    }

    pub(crate) fn line(&self) -> Option<u32> {
        self.at.map(|p| p.line)
    }

    pub(crate) fn column(&self) -> Option<u32> {
        self.at.and_then(|p| p.column)
    }
}

/// "line N" for cross-references inside messages ("assigned to s0 (line N)").
pub(crate) fn line_of<T>(spanned: &Spanned<T>) -> String {
    Position::of(spanned).map_or_else(|| "an earlier entry".into(), |p| format!("line {}", p.line))
}

/// Renders `:line:column` (or `:line`) after a file name, nothing when unknown.
pub(crate) struct At(pub Option<u32>, pub Option<u32>);

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            (Some(line), Some(column)) => write!(f, ":{line}:{column}"),
            (Some(line), None) => write!(f, ":{line}"),
            _ => Ok(()),
        }
    }
}

/// Position and reason of a serde-saphyr error, with the position kept out of the text.
fn describe_error(err: &serde_saphyr::Error, text: &str) -> (Option<Position>, String) {
    let at = err.location().as_ref().and_then(Position::from_location);
    let mut message = err.without_snippet().to_string();
    if let Some(loc) = err.location() {
        // serde-saphyr appends the position to its message; we print it once, up front.
        let suffix = format!(" at line {}, column {}", loc.line(), loc.column());
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message = stripped.to_string();
        }
    }
    if let Some(rest) = message.strip_prefix("unexpected event: expected ") {
        message = format!("expected a {rest} here");
    }
    let at = match (unknown_field_name(&message), at) {
        (Some(key), Some(from)) => find_key(text, from, key).or(Some(from)),
        _ => at,
    };
    (at, message)
}

/// True when the text has no YAML content at all.
fn is_blank(text: &str) -> bool {
    text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "---" || l == "..."
    })
}

fn unknown_field_name(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split_once('`').map(|(name, _)| name)
}

/// serde-saphyr 0.0.16 attributes an unknown field after the first key of a block mapping
/// to the mapping's first key. The offending key is the first occurrence, at or after that
/// point, of `key` in key position (line start, after `{`, `,`, `-` or `?`) followed by `:`.
fn find_key(text: &str, from: Position, key: &str) -> Option<Position> {
    let first = usize::try_from(from.line).ok()?.checked_sub(1)?;
    for (index, line) in text.lines().enumerate().skip(first) {
        let start = match (index == first, from.column) {
            (true, Some(column)) => usize::try_from(column).ok()?.saturating_sub(1),
            _ => 0,
        };
        let mut columns = line.char_indices().enumerate().skip(start);
        if let Some((column, _)) = columns.find(|(_, (byte, _))| is_key_at(line, *byte, key)) {
            let line = u32::try_from(index + 1).ok()?;
            let column = u32::try_from(column + 1).ok();
            return Some(Position { line, column });
        }
    }
    None
}

fn is_key_at(line: &str, byte: usize, key: &str) -> bool {
    let rest = &line[byte..];
    let after = rest.strip_prefix(key).or_else(|| {
        ['"', '\'']
            .into_iter()
            .find_map(|q| rest.strip_prefix(q)?.strip_prefix(key)?.strip_prefix(q))
    });
    if !after.is_some_and(|a| a.trim_start().starts_with(':')) {
        return false;
    }
    let before = line[..byte].trim_end().chars().next_back();
    matches!(before, None | Some('{' | ',' | '-' | '?'))
}
