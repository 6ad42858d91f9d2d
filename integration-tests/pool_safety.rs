//! Transaction pooling never hands a server connection that is mid-batch, stale or dead
//! to another client (issue 6). Raw-protocol tests against real PostgreSQL.

mod common;
