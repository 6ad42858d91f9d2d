//! Routing: statement analysis (sqlparser, cached by text) and the pure routing
//! decision that picks a node for each transaction.

pub mod analyze;
pub mod cache;
pub mod route;
pub mod shard_plan;
