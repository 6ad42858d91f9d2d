//! The analysis cache: statement text -> `Analyzed`, so a repeated simple query is
//! parsed once. Bounded, approximately least-recently-used, and cheap on a hit.
//!
//! The key is the text with its literals blanked (`WHERE aid = 48211` and
//! `WHERE aid = 7` share `WHERE aid = ?`): classification never depends on a literal's
//! value, and simple-protocol clients that inline values (pgbench -M simple, many ORMs)
//! would otherwise miss every time. `SET shardgate.target`, whose value matters, is
//! recognised before the cache. Texts the blanking cannot treat safely (backslash
//! escapes, dollar quoting, unterminated quotes) and very long texts are keyed by
//! their full text or not cached.
//!
//! Each shard keeps two generations of entries. Lookups search the young generation,
//! then the old one (promoting the hit). When the young generation reaches half the
//! shard's capacity the old one is dropped and the young one becomes old. An entry
//! used at least once per generation therefore stays; one not used for two
//! generations goes. Every operation is O(1) and a shard never holds more than its
//! capacity, unlike an exact LRU that needs a linked list or an O(n) eviction scan.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;

use super::analyze::{analyze, set_target, Analyzed, StatementClass};

/// Longer texts (bulk INSERTs, generated SQL) are analysed every time, not cached.
const MAX_KEY_LEN: usize = 16 * 1024;

thread_local! {
    /// Scratch space for building keys without an allocation per lookup.
    static KEY: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Independent shards, so sessions on different threads rarely meet on one lock.
const SHARDS: usize = 8;

pub struct AnalysisCache {
    analyses: ShapeCache<Analyzed>,
}

/// A bounded map from statement shape (the text with literals blanked) to what was
/// computed from the first text of that shape: the analysis, or a shard plan.
pub struct ShapeCache<V> {
    shards: Vec<Mutex<Generations<V>>>,
    hasher: RandomState,
    /// Entries per generation per shard.
    half: usize,
}

struct Generations<V> {
    young: HashMap<Box<str>, V>,
    old: HashMap<Box<str>, V>,
}

impl<V> Default for Generations<V> {
    fn default() -> Self {
        Generations {
            young: HashMap::new(),
            old: HashMap::new(),
        }
    }
}

impl AnalysisCache {
    /// A cache holding at most about `capacity` statement texts.
    pub fn new(capacity: usize) -> Self {
        AnalysisCache {
            analyses: ShapeCache::new(capacity),
        }
    }

    /// The analysis of `sql`, from the cache or computed now (outside the lock).
    pub fn get_or_analyze(&self, sql: &str) -> Analyzed {
        if let Some(mode) = set_target(sql) {
            return Analyzed {
                class: StatementClass::SessionSet,
                hint: None,
                set_target: Some(mode),
                parsed: true,
            };
        }
        self.analyses.get_or_compute(sql, analyze)
    }

    /// Texts currently cached (both generations).
    pub fn len(&self) -> usize {
        self.analyses.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<V: Clone> ShapeCache<V> {
    /// A cache holding at most about `capacity` statement shapes.
    pub fn new(capacity: usize) -> Self {
        let per_shard = capacity.div_ceil(SHARDS).max(2);
        ShapeCache {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            half: per_shard / 2,
        }
    }

    /// The value for `sql`'s shape, from the cache or computed now from `sql`
    /// (outside the lock). Texts the blanking cannot treat safely are keyed by their
    /// full text; very long ones are computed every time.
    pub fn get_or_compute(&self, sql: &str, compute: impl FnOnce(&str) -> V) -> V {
        self.get_or_compute_with(sql, None, compute)
    }

    /// `get_or_compute`, also filling `spans` with the literals' byte ranges found by
    /// the same scan that builds the key (left empty when the text is keyed whole).
    pub fn get_or_compute_spans(
        &self,
        sql: &str,
        spans: &mut Vec<std::ops::Range<usize>>,
        compute: impl FnOnce(&str) -> V,
    ) -> V {
        self.get_or_compute_with(sql, Some(spans), compute)
    }

    fn get_or_compute_with(
        &self,
        sql: &str,
        mut spans: Option<&mut Vec<std::ops::Range<usize>>>,
        compute: impl FnOnce(&str) -> V,
    ) -> V {
        if sql.len() > MAX_KEY_LEN {
            // Not cached, but the caller still needs this text's literal positions.
            if let Some(spans) = spans {
                spans.clear();
                if !scan_literals(sql, |span| spans.push(span)) {
                    spans.clear();
                }
            }
            return compute(sql);
        }
        KEY.with_borrow_mut(|key| {
            if !key_and_spans(sql, key, spans.as_deref_mut()) {
                key.clear();
                key.push_str(sql);
                if let Some(spans) = spans {
                    spans.clear();
                }
            }
            let shard = &self.shards[self.hasher.hash_one(key.as_str()) as usize % SHARDS];
            if let Some(hit) = self.lookup(shard, key) {
                return hit;
            }
            let value = compute(sql);
            let mut gens = shard.lock().unwrap_or_else(|e| e.into_inner());
            gens.insert(key.as_str().into(), value.clone(), self.half);
            value
        })
    }

    fn lookup(&self, shard: &Mutex<Generations<V>>, sql: &str) -> Option<V> {
        // A std Mutex: held for two hash lookups, never across .await.
        let mut gens = shard.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hit) = gens.young.get(sql) {
            return Some(hit.clone());
        }
        let (key, hit) = gens.old.remove_entry(sql)?;
        gens.insert(key, hit.clone(), self.half);
        Some(hit)
    }

    /// Shapes currently cached (both generations).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let g = s.lock().unwrap_or_else(|e| e.into_inner());
                g.young.len() + g.old.len()
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Writes `sql` with every string and numeric literal replaced by `?` into `out`.
/// Returns false when that cannot be done safely (see `scan_literals`). Comments and
/// quoted identifiers are kept verbatim, so hints stay part of the key.
#[cfg(test)]
pub(crate) fn cache_key(sql: &str, out: &mut String) -> bool {
    key_and_spans(sql, out, None)
}

/// `cache_key`, also collecting the literals' byte ranges into `spans` when given.
fn key_and_spans(
    sql: &str,
    out: &mut String,
    mut spans: Option<&mut Vec<std::ops::Range<usize>>>,
) -> bool {
    out.clear();
    if let Some(spans) = spans.as_deref_mut() {
        spans.clear();
    }
    let mut copied = 0;
    let ok = scan_literals(sql, |span| {
        out.push_str(&sql[copied..span.start]);
        out.push_str(if sql.as_bytes()[span.start] == b'\'' {
            "'?'"
        } else {
            "?"
        });
        copied = span.end;
        if let Some(spans) = spans.as_deref_mut() {
            spans.push(span);
        }
    });
    out.push_str(&sql[copied..]);
    ok
}

/// Calls `on_literal` with the byte range of every string and numeric literal of
/// `sql`, in text order: the one definition of "literal" that statement shapes (the
/// cache key) and the shard planner's literal positions share. Returns false when the
/// text cannot be scanned safely: a backslash (E'' strings and
/// `standard_conforming_strings = off` let it hide a quote's end), `$` quoting, or an
/// unterminated quote or comment.
pub(crate) fn scan_literals(sql: &str, mut on_literal: impl FnMut(std::ops::Range<usize>)) -> bool {
    let bytes = sql.as_bytes();
    let mut i = 0;
    let mut prev_ident = false;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'\\' => return false,
            b'$' if !bytes.get(i + 1).is_some_and(u8::is_ascii_digit) => return false,
            b'\'' => {
                // '' inside a string is an escaped quote: skip pairs until a lone one.
                let mut j = i + 1;
                loop {
                    match bytes[j..].iter().position(|&c| c == b'\'') {
                        None => return false,
                        Some(k) if bytes[j..j + k].contains(&b'\\') => return false,
                        Some(k) if bytes.get(j + k + 1) == Some(&b'\'') => j += k + 2,
                        Some(k) => {
                            j += k + 1;
                            break;
                        }
                    }
                }
                on_literal(i..j);
                i = j;
                prev_ident = false;
                continue;
            }
            b'"' | b'-' | b'/' => {
                let end = match (b, bytes.get(i + 1)) {
                    (b'"', _) => sql[i + 1..].find('"').map(|k| i + 1 + k + 1),
                    (b'-', Some(b'-')) => {
                        Some(sql[i..].find('\n').map_or(sql.len(), |k| i + k + 1))
                    }
                    (b'/', Some(b'*')) => sql[i + 2..].find("*/").map(|k| i + 2 + k + 2),
                    _ => Some(i + 1),
                };
                let Some(end) = end else {
                    return false;
                };
                prev_ident = b == b'"';
                i = end;
                continue;
            }
            b'0'..=b'9' if !prev_ident => {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
                    i += 1;
                }
                on_literal(start..i);
                prev_ident = false;
                continue;
            }
            _ => {}
        }
        // Step one character (multi-byte ones whole).
        let len = sql[i..].chars().next().map_or(1, char::len_utf8);
        prev_ident = b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80;
        i += len;
    }
    true
}

impl<V> Generations<V> {
    fn insert(&mut self, key: Box<str>, value: V, half: usize) {
        if self.young.len() >= half {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::analyze::StatementClass;

    #[test]
    fn hits_return_the_same_analysis() {
        let cache = AnalysisCache::new(64);
        let a = cache.get_or_analyze("SELECT 1");
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get_or_analyze("SELECT 1"), a);
        assert_eq!(cache.len(), 1);
        assert_eq!(
            cache.get_or_analyze("INSERT INTO t VALUES (1)").class,
            StatementClass::Write
        );
        assert_eq!(cache.len(), 2);
    }

    fn key(sql: &str) -> Option<String> {
        let mut out = String::new();
        cache_key(sql, &mut out).then_some(out)
    }

    #[test]
    fn keys_blank_literals_but_keep_names_comments_and_hints() {
        assert_eq!(
            key("SELECT abalance FROM pgbench_accounts WHERE aid = 48211;").as_deref(),
            Some("SELECT abalance FROM pgbench_accounts WHERE aid = ?;")
        );
        assert_eq!(
            key("SELECT 'it''s', 1.5, t2.c3, $1").as_deref(),
            Some("SELECT '?', ?, t2.c3, $1")
        );
        assert_eq!(
            key("/* shardgate: primary */ SELECT \"a'1\" -- 42\nFROM t").as_deref(),
            Some("/* shardgate: primary */ SELECT \"a'1\" -- 42\nFROM t")
        );
        assert_eq!(
            key("SELECT nextval('s1')").as_deref(),
            Some("SELECT nextval('?')")
        );
        for unsafe_text in [
            "SELECT E'\\''; DELETE FROM t; --'",
            "SELECT $$x$$",
            "SELECT 'open",
            "/* open",
        ] {
            assert_eq!(key(unsafe_text), None, "{unsafe_text}");
        }
    }

    #[test]
    fn the_key_scan_also_gives_literal_positions_for_short_and_long_texts() {
        let cache: ShapeCache<u8> = ShapeCache::new(16);
        let mut spans = Vec::new();
        let sql = "SELECT 'a''b', x1 FROM t WHERE id = 42";
        cache.get_or_compute_spans(sql, &mut spans, |_| 0);
        let found: Vec<&str> = spans.iter().map(|r| &sql[r.clone()]).collect();
        assert_eq!(found, ["'a''b'", "42"]);
        let long = format!("SELECT 7 /* {} */", "x".repeat(MAX_KEY_LEN));
        cache.get_or_compute_spans(&long, &mut spans, |_| 0);
        assert_eq!(
            spans.iter().map(|r| &long[r.clone()]).collect::<Vec<_>>(),
            ["7"]
        );
        cache.get_or_compute_spans("SELECT $$x$$", &mut spans, |_| 0);
        assert!(spans.is_empty());
    }

    #[test]
    fn texts_differing_only_in_literals_share_an_entry_but_targets_do_not() {
        let cache = AnalysisCache::new(64);
        cache.get_or_analyze("SELECT * FROM t WHERE id = 1");
        cache.get_or_analyze("SELECT * FROM t WHERE id = 2");
        assert_eq!(cache.len(), 1);
        use crate::routing::analyze::TargetMode;
        assert_eq!(
            cache
                .get_or_analyze("SET shardgate.target = 'primary'")
                .set_target,
            Some(TargetMode::Primary)
        );
        assert_eq!(
            cache
                .get_or_analyze("SET shardgate.target = 'replica'")
                .set_target,
            Some(TargetMode::Replica)
        );
        // The backslash trick keeps its full text as the key and is a write.
        let sneaky = cache.get_or_analyze("SELECT E'\\''; DELETE FROM t; --'");
        assert_eq!(sneaky.class, StatementClass::Write);
        assert_eq!(
            cache.get_or_analyze("SELECT E'x'").class,
            StatementClass::Read
        );
    }

    #[test]
    fn stays_bounded_and_keeps_hot_entries() {
        let cache = AnalysisCache::new(64);
        for i in 0..10_000 {
            cache.get_or_analyze("SELECT 42 FROM hot");
            cache.get_or_analyze(&format!("SELECT 1 FROM t{i}"));
            assert!(cache.len() <= 64 + SHARDS, "len {}", cache.len());
        }
        let inner = &cache.analyses;
        let shard = &inner.shards[inner.hasher.hash_one("SELECT ? FROM hot") as usize % SHARDS];
        assert!(inner.lookup(shard, "SELECT ? FROM hot").is_some());
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    /// Statement shapes with literal slots (`#` a number, `@` a string).
    const TEMPLATES: &[&str] = &[
        "SELECT * FROM t WHERE id = # AND name = @",
        "SELECT @ || x FROM t LIMIT #",
        "INSERT INTO t VALUES (#, @)",
        "/* shardgate: primary */ SELECT @",
        "SELECT nextval(@), #",
        "UPDATE t SET v = @ WHERE id = #",
        "SELECT # FROM t FOR UPDATE",
        "SELECT @; DELETE FROM t WHERE id = #",
        "SELECT x FROM t -- @\nWHERE y = #",
        "BEGIN READ ONLY; SELECT @",
    ];

    fn fill(template: &str, numbers: &[u64], strings: &[String]) -> String {
        let (mut n, mut s) = (0, 0);
        let mut out = String::new();
        for c in template.chars() {
            match c {
                '#' => {
                    out.push_str(&numbers[n % numbers.len()].to_string());
                    n += 1;
                }
                '@' => {
                    out.push('\'');
                    out.push_str(&strings[s % strings.len()].replace('\'', "''"));
                    out.push('\'');
                    s += 1;
                }
                c => out.push(c),
            }
        }
        out
    }

    proptest! {
        /// The safety claim of literal blanking: two texts with the same key are
        /// analysed alike, whatever their literals hold (quotes, comment markers,
        /// backslashes, semicolons).
        #[test]
        fn same_key_same_analysis(
            t in 0..TEMPLATES.len(),
            a_num in proptest::collection::vec(any::<u64>(), 1..3),
            b_num in proptest::collection::vec(any::<u64>(), 1..3),
            a_str in proptest::collection::vec("[a-z';\\\\*/ -]{0,12}", 1..3),
            b_str in proptest::collection::vec("[a-z';\\\\*/ -]{0,12}", 1..3),
        ) {
            let a = fill(TEMPLATES[t], &a_num, &a_str);
            let b = fill(TEMPLATES[t], &b_num, &b_str);
            let (mut ka, mut kb) = (String::new(), String::new());
            if cache_key(&a, &mut ka) && cache_key(&b, &mut kb) && ka == kb {
                prop_assert_eq!(analyze(&a), analyze(&b), "{} vs {}", a, b);
            }
        }

        /// Nothing a client sends makes analysis or key building panic.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
            let cache = AnalysisCache::new(16);
            let _ = cache.get_or_analyze(&text);
            let mut key = String::new();
            let _ = cache_key(&text, &mut key);
        }
    }
}
