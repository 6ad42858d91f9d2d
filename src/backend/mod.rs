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
    #[error("server protocol error: {0}")]
    Protocol(#[from] crate::protocol::ProtocolError),
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
                | BackendError::Protocol(_)
                | BackendError::Unexpected(..)
        )
    }
}
