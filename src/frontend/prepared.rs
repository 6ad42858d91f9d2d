//! Pool-wide prepared statements. A client's `Parse "P_0"` is registered by its text and
//! parameter types and gets a process-wide name `sg_<id>`; any server connection that
//! lacks that statement is sent a `Parse` for it on demand. This is what lets a client
//! prepare once and bind many times while its transactions land on different server
//! connections, and lets two clients that both call their statement "P_0" coexist.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::session_sql::{self, SessionEffects};
use crate::routing::analyze::{self, Analyzed};

/// Above this many distinct statement texts the registry starts over. Statements held
/// by sessions stay valid (they own an Arc); a re-registered text just gets a new id.
const MAX_REGISTERED: usize = 10_000;

#[derive(Debug)]
pub struct PreparedStatement {
    pub id: u64,
    /// `sg_<id>`, the name used on every server connection.
    pub server_name: String,
    pub query: String,
    pub param_types: Vec<u32>,
    /// Analysis done once per statement text, not per execution.
    pub effects: SessionEffects,
    pub analyzed: Arc<Analyzed>,
    /// Some server accepted this Parse: later Parses of it can be answered by the
    /// proxy without borrowing a server connection (the statement is created on a
    /// connection when a Bind or Describe needs it).
    validated: AtomicBool,
}

impl PreparedStatement {
    pub fn is_validated(&self) -> bool {
        self.validated.load(Ordering::Relaxed)
    }

    pub fn mark_validated(&self) {
        self.validated.store(true, Ordering::Relaxed);
    }
}

#[derive(Default)]
pub struct StatementRegistry {
    /// A std Mutex: held for one hash lookup (or insert), never across .await and
    /// never while a statement is parsed.
    inner: Mutex<Registry>,
    hasher: std::hash::RandomState,
}

#[derive(Default)]
struct Registry {
    /// Keyed by a hash of (text, parameter types), so a lookup borrows the client's
    /// bytes instead of copying them; equal hashes are told apart by comparing.
    by_text: HashMap<u64, Vec<Arc<PreparedStatement>>>,
    count: usize,
    next_id: u64,
}

impl StatementRegistry {
    pub fn register(&self, query: &str, param_types: &[u32]) -> Arc<PreparedStatement> {
        let hash = self.hasher.hash_one((query, param_types));
        if let Some(stmt) = self.lock().find(hash, query, param_types) {
            return stmt;
        }
        // A new text: analyse it without holding the lock other sessions' Parses need.
        let effects = session_sql::analyze(query);
        let analyzed = Arc::new(analyze::analyze(query));
        let mut reg = self.lock();
        if let Some(stmt) = reg.find(hash, query, param_types) {
            return stmt; // another session registered it meanwhile
        }
        if reg.count >= MAX_REGISTERED {
            reg.by_text.clear();
            reg.count = 0;
        }
        reg.next_id += 1;
        reg.count += 1;
        let id = reg.next_id;
        let stmt = Arc::new(PreparedStatement {
            id,
            server_name: format!("sg_{id}"),
            query: query.to_owned(),
            param_types: param_types.to_vec(),
            effects,
            analyzed,
            validated: AtomicBool::new(false),
        });
        reg.by_text.entry(hash).or_default().push(stmt.clone());
        stmt
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Registry {
    fn find(&self, hash: u64, query: &str, param_types: &[u32]) -> Option<Arc<PreparedStatement>> {
        self.by_text
            .get(&hash)?
            .iter()
            .find(|s| s.query == query && s.param_types == param_types)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_text_and_types_share_one_name() {
        let reg = StatementRegistry::default();
        let a = reg.register("select $1", &[23]);
        let b = reg.register("select $1", &[23]);
        let c = reg.register("select $1", &[25]);
        assert_eq!(a.server_name, b.server_name);
        assert_ne!(a.server_name, c.server_name);
        assert!(reg.register("SET x = 1", &[]).effects.effects.len() == 1);
    }
}
