//! Errors from loading `shardgate.yaml`: every problem names the file, the line (and
//! column when known) and the reason, so `shardgate check` output can be acted on directly.

use std::io;
use std::path::PathBuf;

use crate::shard_map::yaml::{At, Issue};

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
    pub(crate) fn invalid(path: PathBuf, issue: Issue) -> ConfigError {
        ConfigError::Invalid {
            path,
            line: issue.line(),
            column: issue.column(),
            message: issue.message,
        }
    }

    /// The line the error points at, if it points anywhere.
    pub fn line(&self) -> Option<u32> {
        match self {
            ConfigError::Io { .. } => None,
            ConfigError::Invalid { line, .. } => *line,
        }
    }
}
