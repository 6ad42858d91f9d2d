//! Errors from loading a shard map: every problem names the file, the line (and column
//! when known) and the reason. An operator editing a map to move data must be told
//! exactly which entry is wrong before anything moves.

use std::io;
use std::path::PathBuf;

use super::yaml::{At, Issue};

/// Why a shard map could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ShardMapError {
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

impl ShardMapError {
    pub(crate) fn invalid(path: PathBuf, issue: Issue) -> ShardMapError {
        ShardMapError::Invalid {
            path,
            line: issue.line(),
            column: issue.column(),
            message: issue.message,
        }
    }

    /// The line the error points at, if it points anywhere.
    pub fn line(&self) -> Option<u32> {
        match self {
            ShardMapError::Io { .. } => None,
            ShardMapError::Invalid { line, .. } => *line,
        }
    }
}
