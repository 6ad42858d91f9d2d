//! Client (downstream) side of the data path: accepting connections, startup and
//! authentication, and the per-client session loop that forwards frames to pooled
//! server connections.

pub mod session_sql;
