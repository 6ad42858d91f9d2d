//! PostgreSQL frontend/backend protocol v3: framing, the handful of messages routing
//! needs, and the SCRAM-SHA-256 exchange. No knowledge of pools, routes or shards.

pub mod frame;
pub mod messages;
pub mod scram;

pub use frame::{
    decode_frame, decode_startup, next_client_frame, next_server_frame, peek_frame, Frame,
    FrameHeader, Next, StartupPacket,
};

/// Errors in bytes received from a peer. Any of them ends the connection: after a
/// framing error the stream cannot be trusted to resynchronise.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("message '{}' declares impossible length {len}", *tag as char)]
    BadLength { tag: u8, len: usize },
    #[error("message '{}' of {len} bytes exceeds the limit of {max} bytes", *tag as char)]
    TooLarge { tag: u8, len: usize, max: usize },
    #[error("invalid startup packet: {0}")]
    BadStartup(String),
    #[error("unknown message type '{}'", *tag as char)]
    UnknownType { tag: u8 },
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}
