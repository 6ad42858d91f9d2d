//! Server (upstream) side of the data path: connections to PostgreSQL and the bounded
//! pools that hand them out. A connection goes back to a pool only when it is idle and
//! clean; anything else is closed.

pub mod conn;
pub mod params;
pub mod pool;

pub use conn::{ServerConn, ServerTarget};
pub use pool::{Pool, PoolSettings, PooledConn, Pools};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("connecting to {0} timed out")]
    ConnectTimeout(String),
    #[error("no server connection available within {0:?}")]
    AcquireTimeout(std::time::Duration),
    #[error("server I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("server closed the connection")]
    Closed,
    /// The server broke the protocol (a malformed, oversize or unknown message): the
    /// stream cannot be trusted any more. Named by the node, since the client did
    /// nothing wrong.
    #[error("server {addr} sent an unusable message: {error}")]
    Protocol {
        addr: String,
        error: crate::protocol::ProtocolError,
    },
    #[error("unexpected server message {0:?} during {1}")]
    Unexpected(u8, &'static str),
    #[error("server requires a password for user {0:?} and none is configured")]
    NoPassword(String),
    #[error("unsupported server requirement: {0}")]
    Unsupported(String),
    #[error("SCRAM with server failed: {0}")]
    Scram(std::io::Error),
    #[error("server error {code}: {message}")]
    Server { code: String, message: String },
}

impl BackendError {
    /// The SQLSTATE a client sees for this failure.
    pub fn sqlstate(&self) -> &str {
        match self {
            BackendError::Server { code, .. } => code,
            BackendError::AcquireTimeout(_) => "53300",
            _ => "08006",
        }
    }

    /// The connection itself failed (I/O, protocol, closed), as opposed to an error the
    /// server reported and recovered from, or a pool that had no connection to give.
    pub fn is_connection_failure(&self) -> bool {
        matches!(
            self,
            BackendError::Io(_)
                | BackendError::Closed
                | BackendError::Protocol { .. }
                | BackendError::Unexpected(..)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ProtocolError;

    /// A server's broken frame is the server's failure, named by the node: 08006 for
    /// the client, and the connection counts as failed (never pooled).
    #[test]
    fn server_framing_errors_name_the_node() {
        let error = BackendError::Protocol {
            addr: "10.0.0.7:5432".into(),
            error: ProtocolError::BadLength { tag: b'C', len: 2 },
        };
        assert_eq!(error.sqlstate(), "08006");
        assert!(error.is_connection_failure());
        assert!(
            error.to_string().contains("server 10.0.0.7:5432"),
            "{error}"
        );
    }
}
