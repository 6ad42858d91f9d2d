//! Statement analysis: what routing needs to know about one SQL text (DESIGN 5.1).
//! sqlparser (PostgreSqlDialect) classifies it as a read, a write, transaction control,
//! a session SET or another utility; a leading `/* shardgate: ... */` comment and
//! `SET shardgate.target` are recognised here too. The result is small and `Copy`, and
//! is cached by statement text (`cache.rs`), so each text is parsed once.
//!
//! Everything doubtful is a write: SQL the parser rejects, multi-statement texts with
//! any non-read part, and functions that write or need the primary. A wrong "write"
//! costs a little primary load; a wrong "read" is a failed or stale query.

use std::ops::ControlFlow;

use sqlparser::ast::{
    CopySource, Expr, ObjectName, ObjectNamePart, Query, SetExpr, Statement, TransactionAccessMode,
    TransactionMode, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

/// What a statement is, for routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatementClass {
    /// May run on a replica: SELECT, SHOW, EXPLAIN (without ANALYZE of a write),
    /// COPY ... TO, VALUES.
    Read,
    /// Changes data or needs the primary.
    Write,
    /// BEGIN / START TRANSACTION.
    Begin { read_only: bool },
    /// COMMIT, ROLLBACK, SAVEPOINT, RELEASE, PREPARE TRANSACTION ...
    TxnControl,
    /// SET / RESET / DISCARD: session state, replayed on every server the session uses.
    SessionSet,
    /// Anything else (VACUUM, LISTEN, CALL, SQL-level PREPARE/EXECUTE, cursors ...):
    /// runs on the primary.
    Utility,
}

/// A leading `/* shardgate: primary */` or `/* shardgate: replica */` comment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetHint {
    Primary,
    Replica,
}

/// `SET shardgate.target = 'primary' | 'replica' | 'auto'`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetMode {
    #[default]
    Auto,
    Primary,
    Replica,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Analyzed {
    pub class: StatementClass,
    pub hint: Option<TargetHint>,
    /// The statement is `SET shardgate.target`: the proxy answers it itself.
    pub set_target: Option<TargetMode>,
    /// False when sqlparser could not parse the text (it then counts as a write).
    pub parsed: bool,
}

/// A statement text that is not UTF-8 (a LATIN1 or SQL_ASCII client's literal): it is
/// passed to the server as it is and routed as SQL the parser rejects, to the primary.
pub const NOT_UTF8: Analyzed = Analyzed {
    class: StatementClass::Write,
    hint: None,
    set_target: None,
    parsed: false,
};

/// Functions that write, take locks that only make sense on the primary, or fail on a
/// standby. Matched on the unqualified, lower-cased name.
const PRIMARY_FUNCTIONS: &[&str] = &[
    "nextval",
    "setval",
    "currval",
    "lastval",
    "pg_notify",
    "txid_current",
    "pg_current_xact_id",
    "pg_current_wal_lsn",
    "pg_current_wal_insert_lsn",
    "pg_current_wal_flush_lsn",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_reload_conf",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "set_config",
    "lowrite",
    "dblink_exec",
    "pg_import_system_collations",
    "pg_stat_reset",
];

/// Prefixes of the same kind: advisory locks, large objects, replication slots and
/// origins.
const PRIMARY_FUNCTION_PREFIXES: &[&str] = &[
    "pg_advisory",
    "pg_try_advisory",
    "lo_",
    "pg_create_",
    "pg_drop_",
    "pg_replication_origin",
    "pg_stat_reset",
];

pub fn analyze(sql: &str) -> Analyzed {
    let hint = leading_hint(sql);
    if let Some(mode) = set_target(sql) {
        return Analyzed {
            class: StatementClass::SessionSet,
            hint,
            set_target: Some(mode),
            parsed: true,
        };
    }
    let (class, parsed) = match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(statements) => (classify_all(&statements), true),
        Err(_) => (begin_fallback(sql).unwrap_or(StatementClass::Write), false),
    };
    Analyzed {
        class,
        hint,
        set_target: None,
        parsed,
    }
}

/// One statement keeps its class; several are a read only when every one is.
fn classify_all(statements: &[Statement]) -> StatementClass {
    match statements {
        // An empty query (only comments or semicolons) touches nothing.
        [] => StatementClass::Read,
        [one] => classify(one),
        many => {
            if many.iter().all(|s| classify(s) == StatementClass::Read) {
                StatementClass::Read
            } else {
                StatementClass::Write
            }
        }
    }
}

fn classify(statement: &Statement) -> StatementClass {
    use StatementClass::*;
    match statement {
        Statement::Query(query) => read_unless_writes(query.as_ref()),
        Statement::Explain {
            analyze, statement, ..
        } => {
            // EXPLAIN ANALYZE runs the statement; plain EXPLAIN only plans it.
            if *analyze && classify(statement) != Read {
                Write
            } else {
                read_unless_writes(statement.as_ref())
            }
        }
        Statement::Copy {
            source, to: true, ..
        } => match source {
            CopySource::Table { .. } => Read,
            CopySource::Query(query) => read_unless_writes(query.as_ref()),
        },
        Statement::ShowVariable { .. }
        | Statement::ShowVariables { .. }
        | Statement::ShowStatus { .. } => Read,
        Statement::StartTransaction { modes, .. } => Begin {
            read_only: modes.iter().any(|m| {
                matches!(
                    m,
                    TransactionMode::AccessMode(TransactionAccessMode::ReadOnly)
                )
            }),
        },
        Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. } => TxnControl,
        Statement::Set(_) | Statement::Reset(_) | Statement::Discard { .. } => SessionSet,
        Statement::Insert(_)
        | Statement::Update(_)
        | Statement::Delete(_)
        | Statement::Merge(_)
        | Statement::Truncate(_)
        | Statement::Copy { .. } => Write,
        _ => Utility,
    }
}

/// A read, unless something inside it writes or needs the primary.
fn read_unless_writes<V: Visit>(node: &V) -> StatementClass {
    if node.visit(&mut WriteFinder).is_break() {
        StatementClass::Write
    } else {
        StatementClass::Read
    }
}

/// Breaks at the first sign that a query writes: a locking clause, a data-modifying
/// CTE, `SELECT ... INTO`, or a call of a function that needs the primary.
struct WriteFinder;

impl Visitor for WriteFinder {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if !query.locks.is_empty() || body_writes(&query.body) {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
        // Statements nested in a read (EXPLAIN's target, a CTE's INSERT) count too.
        match classify_shallow(statement) {
            true => ControlFlow::Break(()),
            false => ControlFlow::Continue(()),
        }
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = expr {
            if needs_primary(&f.name) {
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        // `SELECT * FROM nextval('s')` names the function as a relation.
        if needs_primary(relation) {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }
}

fn classify_shallow(statement: &Statement) -> bool {
    matches!(
        statement,
        Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_) | Statement::Merge(_)
    )
}

fn body_writes(body: &SetExpr) -> bool {
    match body {
        SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_) => true,
        SetExpr::Select(select) => select.into.is_some(),
        SetExpr::SetOperation { left, right, .. } => body_writes(left) || body_writes(right),
        _ => false,
    }
}

fn needs_primary(name: &ObjectName) -> bool {
    let Some(ObjectNamePart::Identifier(last)) = name.0.last() else {
        return false;
    };
    let name = last.value.to_ascii_lowercase();
    PRIMARY_FUNCTIONS.contains(&name.as_str())
        || PRIMARY_FUNCTION_PREFIXES
            .iter()
            .any(|p| name.starts_with(p))
}

/// sqlparser does not know every transaction mode (`DEFERRABLE`): a lone
/// `BEGIN`/`START TRANSACTION` it rejects is still a BEGIN, read-only when it says so.
fn begin_fallback(sql: &str) -> Option<StatementClass> {
    let mut words = Words(skip_blanks(sql)).filter(|w| *w != ",");
    let first = words.next()?;
    let begin = first.eq_ignore_ascii_case("begin")
        || (first.eq_ignore_ascii_case("start")
            && words.next()?.eq_ignore_ascii_case("transaction"));
    if !begin {
        return None;
    }
    let mut read_only = false;
    let mut prev = "";
    for word in words {
        if word == ";" {
            // More after it: a multi-statement text, not a lone BEGIN.
            return None;
        }
        if !word.chars().all(|c| c.is_ascii_alphabetic()) {
            return None;
        }
        read_only |= prev.eq_ignore_ascii_case("read") && word.eq_ignore_ascii_case("only");
        prev = word;
    }
    Some(StatementClass::Begin { read_only })
}

/// Skips whitespace and comments at the start of `sql`, returning the rest.
fn skip_blanks(mut sql: &str) -> &str {
    loop {
        let trimmed = sql.trim_start();
        if let Some(rest) = trimmed.strip_prefix("--") {
            sql = rest.split_once('\n').map_or("", |(_, after)| after);
        } else if let Some(rest) = trimmed.strip_prefix("/*") {
            sql = rest.split_once("*/").map_or("", |(_, after)| after);
        } else {
            return trimmed;
        }
    }
}

/// `/* shardgate: primary */` (case and spacing free) as the first comment.
fn leading_hint(sql: &str) -> Option<TargetHint> {
    let rest = sql.trim_start().strip_prefix("/*")?;
    let (body, _) = rest.split_once("*/")?;
    let body = body.trim();
    let (key, value) = body.split_once(':')?;
    if !key.trim().eq_ignore_ascii_case("shardgate") {
        return None;
    }
    match value.trim().to_ascii_lowercase().as_str() {
        "primary" => Some(TargetHint::Primary),
        "replica" => Some(TargetHint::Replica),
        _ => None,
    }
}

/// Recognises `SET [SESSION] shardgate.target {=|TO} value` and
/// `RESET shardgate.target` (back to auto). Anything else, including an unknown value,
/// is not ours and goes to the server (which then reports the problem).
pub fn set_target(sql: &str) -> Option<TargetMode> {
    let sql = skip_blanks(sql);
    let mut words = Words(sql);
    let verb = words.next()?;
    if verb.eq_ignore_ascii_case("reset") {
        let name = words.next()?;
        let end = words.next();
        return (name.eq_ignore_ascii_case("shardgate.target") && end.is_none_or(|e| e == ";"))
            .then_some(TargetMode::Auto);
    }
    if !verb.eq_ignore_ascii_case("set") {
        return None;
    }
    let mut name = words.next()?;
    if name.eq_ignore_ascii_case("session") {
        name = words.next()?;
    }
    if !name.eq_ignore_ascii_case("shardgate.target") {
        return None;
    }
    let op = words.next()?;
    if op != "=" && !op.eq_ignore_ascii_case("to") {
        return None;
    }
    let value = words.next()?;
    if words.next().is_some_and(|w| w != ";") || words.next().is_some() {
        return None;
    }
    let value = value.trim_matches('\'');
    match value.to_ascii_lowercase().as_str() {
        "primary" => Some(TargetMode::Primary),
        "replica" => Some(TargetMode::Replica),
        "auto" | "default" => Some(TargetMode::Auto),
        _ => None,
    }
}

/// A tiny tokenizer for `set_target`: identifiers (with dots), quoted strings, and
/// single punctuation characters.
struct Words<'a>(&'a str);

impl<'a> Iterator for Words<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let s = self.0.trim_start();
        let first = s.chars().next()?;
        let len = if first == '\'' {
            s[1..].find('\'').map_or(s.len(), |i| i + 2)
        } else if first.is_alphanumeric() || first == '_' {
            s.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
                .unwrap_or(s.len())
        } else {
            first.len_utf8()
        };
        let (word, rest) = s.split_at(len);
        self.0 = rest;
        Some(word)
    }
}

#[cfg(test)]
mod tests;
