//! Errors from loading `shardgate.yaml`: every problem names the file, the line (and
//! column when known) and the reason, so `shardgate check` output can be acted on directly.

use std::fmt;
use std::io;
use std::path::PathBuf;

use serde_saphyr::{Location, Spanned};

/// A 1-based line and (when known) column in the YAML source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    pub line: u32,
    pub column: Option<u32>,
}

impl Position {
    /// serde-saphyr marks "unknown" with line 0; that becomes `None`.
    pub(crate) fn from_location(loc: &Location) -> Option<Position> {
        let line = u32::try_from(loc.line()).ok().filter(|l| *l > 0)?;
        let column = u32::try_from(loc.column()).ok().filter(|c| *c > 0);
        Some(Position { line, column })
    }

    pub(crate) fn of<T>(spanned: &Spanned<T>) -> Option<Position> {
        Position::from_location(&spanned.referenced)
    }
}

/// Why `shardgate.yaml` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The YAML is malformed, has an unknown or mistyped field, or fails validation.
    #[error("{}{}: {message}", path.display(), At(*line, *column))]
    Invalid {
        path: PathBuf,
        /// 1-based; `None` only when the YAML parser could not tell.
        line: Option<u32>,
        column: Option<u32>,
        message: String,
    },
}

impl ConfigError {
    /// The line the error points at, if it points anywhere.
    pub fn line(&self) -> Option<u32> {
        match self {
            ConfigError::Io { .. } => None,
            ConfigError::Invalid { line, .. } => *line,
        }
    }
}

/// Renders `:line:column` (or `:line`) after the file name, nothing when unknown.
struct At(Option<u32>, Option<u32>);

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            (Some(line), Some(column)) => write!(f, ":{line}:{column}"),
            (Some(line), None) => write!(f, ":{line}"),
            _ => Ok(()),
        }
    }
}

/// A problem found before the file name is attached; validation code deals only in these.
#[derive(Debug)]
pub(crate) struct Issue {
    pub at: Option<Position>,
    pub message: String,
}

impl Issue {
    pub(crate) fn new(at: Option<Position>, message: impl Into<String>) -> Issue {
        Issue {
            at,
            message: message.into(),
        }
    }

    pub(crate) fn at<T>(spanned: &Spanned<T>, message: impl Into<String>) -> Issue {
        Issue::new(Position::of(spanned), message)
    }

    /// serde-saphyr appends " at line L, column C" to its messages; we carry the position
    /// separately so the text is cut to keep `file:line:col: reason` free of repetition.
    pub(crate) fn from_yaml(err: &serde_saphyr::Error, text: &str) -> Issue {
        let at = err.location().as_ref().and_then(Position::from_location);
        let mut message = err.without_snippet().to_string();
        if let Some(loc) = err.location() {
            let suffix = format!(" at line {}, column {}", loc.line(), loc.column());
            if let Some(stripped) = message.strip_suffix(&suffix) {
                message = stripped.to_string();
            }
        }
        if is_blank_yaml(text) {
            message = "the file is empty; at least `users` and `shard_map` are required".into();
        }
        Issue { at, message }
    }

    pub(crate) fn into_error(self, path: PathBuf) -> ConfigError {
        ConfigError::Invalid {
            path,
            line: self.at.map(|p| p.line),
            column: self.at.and_then(|p| p.column),
            message: self.message,
        }
    }
}

fn is_blank_yaml(text: &str) -> bool {
    text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "---" || l == "..."
    })
}
