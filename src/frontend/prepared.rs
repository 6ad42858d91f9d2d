//! Pool-wide prepared statements. A client's `Parse "P_0"` is registered by its text and
//! parameter types and gets a process-wide name `sg_<id>`; any server connection that
//! lacks that statement is sent a `Parse` for it on demand. This is what lets a client
//! prepare once and bind many times while its transactions land on different server
//! connections, and lets two clients that both call their statement "P_0" coexist.
//!
//! A statement's result shape is fixed when it is prepared, as in PostgreSQL: the
//! registry records it (a hash of the RowDescription) the first time a server describes
//! the statement, and a server connection that re-creates the statement later must
//! describe the same shape, or the statement is stale. A stale statement is retired:
//! clients that hold it get `0A000 cached plan must not change result type` (as from
//! PostgreSQL itself), and a new Parse of the same text gets a new statement. DDL that
//! can change shapes (ALTER, DROP, CREATE OR REPLACE) starts a new epoch, so statements
//! prepared after it never reuse one registered before it.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::session_sql::{self, SessionEffects};
use crate::routing::analyze::{self, Analyzed};

/// Default of `limits.max_prepared_statements`: above this many distinct statement
/// texts the registry starts over. Statements held by sessions stay valid (they own an
/// Arc); a re-registered text just gets a new id.
const MAX_REGISTERED: usize = 10_000;

#[derive(Debug)]
pub struct PreparedStatement {
    pub id: u64,
    /// `sg_<id>`, the name used on every server connection.
    pub server_name: String,
    pub query: String,
    /// The text as the client sent it when it is not UTF-8 (a LATIN1 or SQL_ASCII
    /// client): what every server gets; `query` is then a lossy rendering for logs.
    pub raw_query: Option<bytes::Bytes>,
    pub param_types: Vec<u32>,
    /// Analysis done once per statement text, not per execution.
    pub effects: SessionEffects,
    pub analyzed: Arc<Analyzed>,
    /// Some server accepted this Parse: later Parses of it can be answered by the
    /// proxy without borrowing a server connection (the statement is created on a
    /// connection when a Bind or Describe needs it).
    validated: AtomicBool,
    /// The result shape (see `shape_of`) the first server that described it returned.
    shape: OnceLock<u64>,
    /// The shape changed under it (DDL): never bound again; see the module comment.
    stale: AtomicBool,
    /// The registry epoch it was registered in.
    epoch: u64,
    /// Sharded maps: where the statement's keys are, planned on first use, with the
    /// byte ranges of its literals (a literal key or LIMIT is read from the text).
    shard_plan: OnceLock<(
        Arc<crate::routing::shard_plan::ShardPlan>,
        Vec<std::ops::Range<usize>>,
    )>,
}

impl PreparedStatement {
    pub fn shape(&self) -> Option<u64> {
        self.shape.get().copied()
    }

    /// Records `shape` if none is known; returns whether it agrees with the record.
    pub fn check_shape(&self, shape: u64) -> bool {
        *self.shape.get_or_init(|| shape) == shape
    }

    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }

    /// The statement's shard plan and literal spans (sharded maps only), made once.
    pub fn shard_plan(
        &self,
    ) -> (
        &Arc<crate::routing::shard_plan::ShardPlan>,
        &[std::ops::Range<usize>],
    ) {
        let (plan, spans) = self.shard_plan.get_or_init(|| {
            let plan = Arc::new(crate::routing::shard_plan::plan(&self.query));
            let spans = crate::routing::shard_plan::literal_spans(&self.query).unwrap_or_default();
            (plan, spans)
        });
        (plan, spans)
    }

    /// The text as servers get it.
    pub fn wire_query(&self) -> &[u8] {
        match &self.raw_query {
            Some(raw) => raw,
            None => self.query.as_bytes(),
        }
    }

    pub fn is_validated(&self) -> bool {
        self.validated.load(Ordering::Relaxed)
    }

    pub fn mark_validated(&self) {
        self.validated.store(true, Ordering::Relaxed);
    }
}

pub struct StatementRegistry {
    /// `limits.max_prepared_statements`.
    limit: usize,
    /// A std Mutex: held for one hash lookup (or insert), never across .await and
    /// never while a statement is parsed.
    inner: Mutex<Registry>,
    hasher: std::hash::RandomState,
    /// Bumped by DDL that may change result shapes; see the module comment.
    epoch: AtomicU64,
}

#[derive(Default)]
struct Registry {
    /// Keyed by a hash of (text, parameter types), so a lookup borrows the client's
    /// bytes instead of copying them; equal hashes are told apart by comparing.
    by_text: HashMap<u64, Vec<Arc<PreparedStatement>>>,
    count: usize,
    next_id: u64,
}

impl Default for StatementRegistry {
    fn default() -> Self {
        StatementRegistry::with_limit(MAX_REGISTERED)
    }
}

impl StatementRegistry {
    pub fn with_limit(limit: usize) -> StatementRegistry {
        StatementRegistry {
            limit: limit.max(1),
            inner: Mutex::default(),
            hasher: std::hash::RandomState::default(),
            epoch: AtomicU64::default(),
        }
    }

    pub fn register(&self, query: &str, param_types: &[u32]) -> Arc<PreparedStatement> {
        let hash = self.hasher.hash_one((query, param_types));
        let epoch = self.epoch.load(Ordering::Acquire);
        if let Some(stmt) = self.lock().find(hash, query, param_types, epoch) {
            return stmt;
        }
        // A new text: analyse it without holding the lock other sessions' Parses need.
        let effects = session_sql::analyze(query);
        let analyzed = Arc::new(analyze::analyze(query));
        let mut reg = self.lock();
        if let Some(stmt) = reg.find(hash, query, param_types, epoch) {
            return stmt; // another session registered it meanwhile
        }
        if reg.count >= self.limit {
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
            raw_query: None,
            param_types: param_types.to_vec(),
            effects,
            analyzed,
            validated: AtomicBool::new(false),
            shape: OnceLock::new(),
            stale: AtomicBool::new(false),
            epoch,
            shard_plan: OnceLock::new(),
        });
        reg.by_text.entry(hash).or_default().push(stmt.clone());
        stmt
    }

    /// A statement whose text is not UTF-8: kept as the client's bytes, routed to the
    /// primary (`analyze::NOT_UTF8`), never shared with other texts. Its session effects
    /// (a SET of a LATIN1 value...) cannot be carried as text to other connections, so
    /// any makes its server connection tainted instead (DISCARD ALL before reuse).
    pub fn register_raw(&self, query: &[u8], param_types: &[u32]) -> Arc<PreparedStatement> {
        let lossy = String::from_utf8_lossy(query).into_owned();
        let seen = session_sql::analyze(&lossy);
        let effects = SessionEffects {
            effects: Vec::new(),
            taints: !seen.is_empty(),
            changes_shapes: seen.changes_shapes,
        };
        let id = {
            let mut reg = self.lock();
            reg.next_id += 1;
            reg.next_id
        };
        Arc::new(PreparedStatement {
            id,
            server_name: format!("sg_{id}"),
            query: lossy,
            raw_query: Some(bytes::Bytes::copy_from_slice(query)),
            param_types: param_types.to_vec(),
            effects,
            analyzed: Arc::new(analyze::NOT_UTF8),
            validated: AtomicBool::new(false),
            shape: OnceLock::new(),
            stale: AtomicBool::new(false),
            epoch: self.epoch.load(Ordering::Acquire),
            shard_plan: OnceLock::new(),
        })
    }

    /// `stmt`'s text and parameter types registered afresh (a new statement once the
    /// old one is retired).
    pub fn register_again(&self, stmt: &PreparedStatement) -> Arc<PreparedStatement> {
        match &stmt.raw_query {
            Some(raw) => self.register_raw(raw, &stmt.param_types),
            None => self.register(&stmt.query, &stmt.param_types),
        }
    }

    /// The statement's shape changed: nobody gets it from the registry again, and
    /// sessions that hold it answer its Binds with 0A000.
    pub fn retire(&self, stmt: &PreparedStatement) {
        stmt.stale.store(true, Ordering::Relaxed);
        let hash = self
            .hasher
            .hash_one((stmt.query.as_str(), stmt.param_types.as_slice()));
        let mut reg = self.lock();
        if let Some(list) = reg.by_text.get_mut(&hash) {
            let before = list.len();
            list.retain(|s| s.id != stmt.id);
            let removed = before - list.len();
            reg.count -= removed;
        }
    }

    /// DDL that may change result shapes ran: statements registered from now on are
    /// new ones, re-prepared (and re-described) on every server connection.
    pub fn new_epoch(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Bumped by every [`new_epoch`](Self::new_epoch): DDL ran through the proxy.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Registry {
    /// A current statement for the text; entries from older epochs are dropped on the way.
    fn find(
        &mut self,
        hash: u64,
        query: &str,
        param_types: &[u32],
        epoch: u64,
    ) -> Option<Arc<PreparedStatement>> {
        let list = self.by_text.get_mut(&hash)?;
        let before = list.len();
        list.retain(|s| s.epoch == epoch && !s.is_stale());
        let found = list
            .iter()
            .find(|s| s.query == query && s.param_types == param_types)
            .cloned();
        self.count -= before - list.len();
        found
    }
}

/// A result shape: a hash of a RowDescription (or NoData) by column names and types
/// only. Format codes are left out, so a statement's description (formats unknown, all
/// zero) and a portal's (the client's chosen formats) compare equal; so are the source
/// table's OID and column number, which differ between shards (each shard's table is
/// its own object) while the result is the same.
pub fn shape_of(message: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let Some((&tag, rest)) = message.split_first() else {
        return 0;
    };
    h.write_u8(tag);
    // RowDescription: count, then per column name\0, table oid (4), attnum (2), type
    // oid (4), type size (2), typmod (4), format (2).
    let body = rest.get(4..).unwrap_or_default();
    let mut at = 2.min(body.len());
    h.write(&body[..at]);
    while at < body.len() {
        let name_end = body[at..]
            .iter()
            .position(|&b| b == 0)
            .map_or(body.len(), |p| at + p + 1);
        h.write(&body[at..name_end]);
        // Skip table OID (4) and column number (2); keep type OID, size and modifier.
        let types = (name_end + 6).min(body.len());
        let types_end = (types + 10).min(body.len());
        h.write(&body[types..types_end]);
        at = (types_end + 2).min(body.len());
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A LATIN1 client's text: servers get its bytes, routing sends it to the primary,
    /// and a session effect in it taints the connection instead of being replayed.
    #[test]
    fn non_utf8_texts_keep_their_bytes() {
        let reg = StatementRegistry::default();
        let insert = reg.register_raw(b"INSERT INTO t VALUES ('caf\xe9')", &[]);
        assert_eq!(insert.wire_query(), b"INSERT INTO t VALUES ('caf\xe9')");
        assert_eq!(*insert.analyzed, analyze::NOT_UTF8);
        assert!(insert.effects.is_empty());
        let again = reg.register_raw(b"INSERT INTO t VALUES ('caf\xe9')", &[]);
        assert_ne!(insert.id, again.id, "never shared");
        assert_eq!(
            reg.register_again(&insert).wire_query(),
            insert.wire_query()
        );
        let set = reg.register_raw(b"SET application_name = 'caf\xe9'", &[]);
        assert!(set.effects.taints && set.effects.effects.is_empty());
    }

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

    #[test]
    fn retired_and_old_epoch_statements_are_not_handed_out_again() {
        let reg = StatementRegistry::default();
        let a = reg.register("select * from t", &[]);
        reg.retire(&a);
        assert!(a.is_stale());
        let b = reg.register("select * from t", &[]);
        assert_ne!(a.id, b.id);
        assert_eq!(reg.register("select * from t", &[]).id, b.id);
        reg.new_epoch();
        let c = reg.register("select * from t", &[]);
        assert_ne!(b.id, c.id);
        assert!(
            !b.is_stale(),
            "an old epoch's statement stays usable by its holders"
        );
        assert_eq!(reg.lock().count, 1);
    }

    fn row_description(columns: &[(&str, u32, i16)]) -> Vec<u8> {
        let mut body = (columns.len() as i16).to_be_bytes().to_vec();
        for (name, type_oid, format) in columns {
            body.extend_from_slice(name.as_bytes());
            body.push(0);
            body.extend_from_slice(&[0, 0, 0, 1, 0, 1]);
            body.extend_from_slice(&type_oid.to_be_bytes());
            body.extend_from_slice(&[0, 4, 255, 255, 255, 255]);
            body.extend_from_slice(&format.to_be_bytes());
        }
        let mut msg = vec![b'T'];
        msg.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        msg.extend_from_slice(&body);
        msg
    }

    #[test]
    fn shapes_ignore_the_source_table() {
        let mut other_shard = row_description(&[("a", 23, 0), ("b", 23, 0)]);
        // Same columns, another table OID and column numbers (another shard's table).
        let first_column = 5 + 2 + 2;
        other_shard[first_column..first_column + 6].copy_from_slice(&[0, 0, 0x40, 0x12, 0, 7]);
        assert_eq!(
            shape_of(&other_shard),
            shape_of(&row_description(&[("a", 23, 0), ("b", 23, 0)]))
        );
    }

    #[test]
    fn shapes_ignore_formats_and_see_order_names_and_types() {
        let ab = shape_of(&row_description(&[("a", 23, 0), ("b", 23, 0)]));
        assert_eq!(
            ab,
            shape_of(&row_description(&[("a", 23, 1), ("b", 23, 1)]))
        );
        assert_ne!(
            ab,
            shape_of(&row_description(&[("b", 23, 0), ("a", 23, 0)]))
        );
        assert_ne!(
            ab,
            shape_of(&row_description(&[("a", 23, 0), ("b", 25, 0)]))
        );
        assert_ne!(ab, shape_of(&row_description(&[("a", 23, 0)])));
        assert_ne!(ab, shape_of(&[b'n', 0, 0, 0, 4]));
    }

    #[test]
    fn the_first_shape_recorded_is_the_statements() {
        let reg = StatementRegistry::default();
        let s = reg.register("select 1", &[]);
        assert_eq!(s.shape(), None);
        assert!(s.check_shape(7));
        assert!(s.check_shape(7));
        assert!(!s.check_shape(8));
        assert_eq!(s.shape(), Some(7));
    }
}
