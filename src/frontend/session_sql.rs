//! What a statement does to *session* state, which transaction pooling must carry from
//! one server connection to the next: `SET`/`RESET` are remembered and replayed;
//! `DISCARD ALL`/`DEALLOCATE ALL` clear bookkeeping; anything that leaves state we do
//! not replay (temp tables, LISTEN, SQL-level PREPARE, session advisory locks,
//! `set_config`, `SET ROLE`...) taints the server connection, which then gets
//! `DISCARD ALL` before it serves anyone else. This is a small lexer, not a parser:
//! when unsure it taints, which is always safe.

/// One effect on session state, applied only once the statement has succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEffect {
    Set {
        name: String,
        value: String,
    },
    Reset {
        name: String,
    },
    ResetAll,
    DiscardAll,
    DeallocateAll,
    /// `LISTEN channel`: the client keeps its server connection while it listens.
    Listen {
        channel: String,
    },
    /// `UNLISTEN channel`, or `UNLISTEN *` (None).
    Unlisten {
        channel: Option<String>,
    },
    /// `DECLARE name ... WITH HOLD`: the cursor outlives the transaction, so the client
    /// keeps its server connection until it closes the cursor.
    HoldCursor {
        name: String,
    },
    /// `CLOSE name`, or `CLOSE ALL` (None).
    CloseCursor {
        name: Option<String>,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionEffects {
    pub effects: Vec<SessionEffect>,
    pub taints: bool,
    /// DDL that may change what existing prepared statements return (ALTER, DROP,
    /// CREATE OR REPLACE): see frontend/prepared.rs.
    pub changes_shapes: bool,
}

impl SessionEffects {
    pub fn is_empty(&self) -> bool {
        self.effects.is_empty() && !self.taints
    }
}

/// Analyzes a (possibly multi-statement) query string.
pub fn analyze(sql: &str) -> SessionEffects {
    let mut out = SessionEffects::default();
    for stmt in split_statements(sql) {
        analyze_one(stmt, &mut out);
    }
    out
}

fn analyze_one(stmt: &str, out: &mut SessionEffects) {
    let lower = stmt.to_ascii_lowercase();
    if ["set_config", "pg_advisory_lock", "pg_try_advisory_lock"]
        .iter()
        .any(|f| lower.contains(f))
    {
        out.taints = true;
    }
    let words: Vec<&str> = lower.split_whitespace().take(4).collect();
    if matches!(
        words.as_slice(),
        ["alter", ..] | ["drop", ..] | ["create", "or", "replace", ..]
    ) {
        out.changes_shapes = true;
    }
    match words.as_slice() {
        ["set", ..] => set_effect(stmt.trim_start(), out),
        ["reset", "all", ..] | ["reset", "all;", ..] => out.effects.push(SessionEffect::ResetAll),
        ["reset", name, ..] => match identifier(name.trim_end_matches(';')) {
            Some(name) => out.effects.push(SessionEffect::Reset { name }),
            None => out.taints = true,
        },
        ["discard", "all", ..] | ["discard", "all;", ..] => {
            out.effects.push(SessionEffect::DiscardAll)
        }
        ["deallocate", "all", ..]
        | ["deallocate", "all;", ..]
        | ["deallocate", "prepare", "all", ..] => out.effects.push(SessionEffect::DeallocateAll),
        ["listen", ..] => {
            out.taints = true;
            if let Some(channel) = object_name(stmt, 1) {
                out.effects.push(SessionEffect::Listen { channel });
            }
        }
        ["unlisten", ..] => {
            let channel = object_name(stmt, 1).filter(|c| c != "*");
            out.effects.push(SessionEffect::Unlisten { channel });
        }
        ["close", "all", ..] | ["close", "all;", ..] => {
            out.effects.push(SessionEffect::CloseCursor { name: None })
        }
        ["close", ..] => {
            if let Some(name) = object_name(stmt, 1) {
                out.effects
                    .push(SessionEffect::CloseCursor { name: Some(name) });
            }
        }
        ["declare", ..] if lower.contains("with hold") => {
            out.taints = true;
            if let Some(name) = object_name(stmt, 1) {
                out.effects.push(SessionEffect::HoldCursor { name });
            }
        }
        ["discard" | "deallocate" | "prepare" | "load", ..] => out.taints = true,
        ["create", w, ..] if is_temp(w) => out.taints = true,
        ["create", "local" | "global", w, ..] if is_temp(w) => out.taints = true,
        _ => {}
    }
}

/// The `index`-th word of a statement as an object name: `"Quoted"` as written,
/// anything else folded to lower case as PostgreSQL does.
fn object_name(stmt: &str, index: usize) -> Option<String> {
    let mut rest = stmt.trim_end().trim_end_matches(';');
    for _ in 0..index {
        rest = next_word(rest).1;
    }
    let rest = rest.trim_start();
    if let Some(quoted) = rest.strip_prefix('"') {
        let end = quoted.find('"')?;
        return Some(quoted[..end].to_owned());
    }
    let word = next_word(rest).0.trim_end_matches(';');
    (!word.is_empty()).then(|| word.to_ascii_lowercase())
}

fn is_temp(word: &str) -> bool {
    matches!(word, "temp" | "temporary")
}

/// `SET [SESSION] name {TO|=} value`, `SET TIME ZONE v`, `SET SCHEMA v`, `SET NAMES v`.
fn set_effect(stmt: &str, out: &mut SessionEffects) {
    let body = stmt.trim_end().trim_end_matches(';').trim_end();
    let mut rest = skip_word(body).trim_start(); // past "SET"
    let (first, after_first) = next_word(rest);
    if first.eq_ignore_ascii_case("session") {
        rest = after_first.trim_start();
    }
    let (first, after_first) = next_word(rest);
    if first.eq_ignore_ascii_case("characteristics") {
        session_characteristics(after_first, out);
        return;
    }
    let (name, value) = match first.to_ascii_lowercase().as_str() {
        // Transaction-scoped: nothing outlives the transaction.
        "local" | "transaction" | "constraints" => return,
        "time" => {
            let (zone, value) = next_word(after_first);
            if !zone.eq_ignore_ascii_case("zone") {
                out.taints = true;
                return;
            }
            ("timezone".to_owned(), value.trim())
        }
        "schema" => ("search_path".to_owned(), after_first.trim()),
        "names" => ("client_encoding".to_owned(), after_first.trim()),
        _ => match split_name_value(rest) {
            Some(pair) => pair,
            None => {
                out.taints = true;
                return;
            }
        },
    };
    // A comment inside the value would swallow what we append after it on replay.
    if value.is_empty() || value.contains("--") || value.contains("/*") {
        out.taints = true;
    } else if value.eq_ignore_ascii_case("default") {
        out.effects.push(SessionEffect::Reset { name });
    } else {
        out.effects.push(SessionEffect::Set {
            name,
            value: value.to_owned(),
        });
    }
}

/// `SET SESSION CHARACTERISTICS AS TRANSACTION mode [, ...]`: the same as setting the
/// `default_transaction_*` parameters, and replayed as those.
fn session_characteristics(rest: &str, out: &mut SessionEffects) {
    let lower = rest.to_ascii_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty())
        .collect();
    let Some(["as", "transaction", modes @ ..]) = Some(words.as_slice()) else {
        out.taints = true;
        return;
    };
    let mut effects = Vec::new();
    let mut i = 0;
    while i < modes.len() {
        let (name, value, used) = match &modes[i..] {
            ["isolation", "level", "serializable", ..] => ("isolation", "'serializable'", 3),
            ["isolation", "level", "repeatable", "read", ..] => {
                ("isolation", "'repeatable read'", 4)
            }
            ["isolation", "level", "read", "committed", ..] => ("isolation", "'read committed'", 4),
            ["isolation", "level", "read", "uncommitted", ..] => {
                ("isolation", "'read uncommitted'", 4)
            }
            ["read", "only", ..] => ("read_only", "on", 2),
            ["read", "write", ..] => ("read_only", "off", 2),
            ["deferrable", ..] => ("deferrable", "on", 1),
            ["not", "deferrable", ..] => ("deferrable", "off", 2),
            _ => {
                out.taints = true;
                return;
            }
        };
        effects.push(SessionEffect::Set {
            name: format!("default_transaction_{name}"),
            value: value.to_owned(),
        });
        i += used;
    }
    out.effects.extend(effects);
}

/// Splits `name TO v`, `name = v` or `name=v` into the lower-case name and the value.
fn split_name_value(s: &str) -> Option<(String, &str)> {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .unwrap_or(s.len());
    let name = identifier(&s[..end])?;
    let after = s[end..].trim_start();
    if let Some(value) = after.strip_prefix('=') {
        return Some((name, value.trim()));
    }
    let (op, value) = next_word(after);
    op.eq_ignore_ascii_case("to").then(|| (name, value.trim()))
}

fn identifier(word: &str) -> Option<String> {
    let ok = !word.is_empty()
        && word
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    ok.then(|| word.to_ascii_lowercase())
}

fn skip_word(s: &str) -> &str {
    next_word(s).1
}

/// Splits off the first whitespace-delimited word.
fn next_word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    }
}

/// Splits a query string at top-level semicolons, skipping quotes, dollar quotes and
/// comments. Leading comments and whitespace are stripped from each statement.
pub fn split_statements(sql: &str) -> Vec<&str> {
    let bytes = sql.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        i = match bytes[i] {
            b'\'' | b'"' => skip_quoted(bytes, i),
            b'-' if bytes.get(i + 1) == Some(&b'-') => skip_line_comment(bytes, i),
            b'/' if bytes.get(i + 1) == Some(&b'*') => skip_block_comment(bytes, i),
            b'$' => skip_dollar_quoted(sql, i),
            b';' => {
                push_statement(&sql[start..i], &mut out);
                start = i + 1;
                i + 1
            }
            _ => i + 1,
        };
    }
    push_statement(&sql[start..], &mut out);
    out
}

fn push_statement<'a>(stmt: &'a str, out: &mut Vec<&'a str>) {
    let stmt = strip_leading_comments(stmt);
    if !stmt.is_empty() {
        out.push(stmt);
    }
}

/// Drops leading whitespace and comments (hints such as `/* shardgate: primary */`
/// are read elsewhere).
pub fn strip_leading_comments(mut s: &str) -> &str {
    loop {
        s = s.trim_start();
        if s.starts_with("--") {
            s = s.find('\n').map_or("", |i| &s[i + 1..]);
        } else if s.starts_with("/*") {
            let end = skip_block_comment(s.as_bytes(), 0);
            s = &s[end.min(s.len())..];
        } else {
            return s;
        }
    }
}

fn skip_quoted(bytes: &[u8], i: usize) -> usize {
    let quote = bytes[i];
    // E'...' strings allow backslash escapes.
    let escapes = quote == b'\'' && i > 0 && matches!(bytes[i - 1], b'e' | b'E');
    let mut j = i + 1;
    while j < bytes.len() {
        if escapes && bytes[j] == b'\\' {
            j += 2;
            continue;
        }
        if bytes[j] == quote {
            if bytes.get(j + 1) == Some(&quote) {
                j += 2;
                continue;
            }
            return j + 1;
        }
        j += 1;
    }
    bytes.len()
}

fn skip_line_comment(bytes: &[u8], i: usize) -> usize {
    bytes[i..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(bytes.len(), |p| i + p + 1)
}

fn skip_block_comment(bytes: &[u8], i: usize) -> usize {
    // Block comments nest in PostgreSQL.
    let mut depth = 0;
    let mut j = i;
    while j + 1 < bytes.len() {
        if bytes[j] == b'/' && bytes[j + 1] == b'*' {
            depth += 1;
            j += 2;
        } else if bytes[j] == b'*' && bytes[j + 1] == b'/' {
            depth -= 1;
            j += 2;
            if depth == 0 {
                return j;
            }
        } else {
            j += 1;
        }
    }
    bytes.len()
}

/// `$tag$ ... $tag$`; a `$` that does not open a tag (e.g. `$1`) is skipped alone.
fn skip_dollar_quoted(sql: &str, i: usize) -> usize {
    let rest = &sql[i + 1..];
    let Some(close) = rest.find('$') else {
        return i + 1;
    };
    let tag = &rest[..close];
    if !tag.chars().all(|c| c.is_alphanumeric() || c == '_')
        || tag.starts_with(|c: char| c.is_ascii_digit())
    {
        return i + 1;
    }
    let delim = &sql[i..i + close + 2];
    let body_start = i + delim.len();
    match sql[body_start..].find(delim) {
        Some(p) => body_start + p + delim.len(),
        None => sql.len(),
    }
}

#[cfg(test)]
mod tests;
