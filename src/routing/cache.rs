//! The analysis cache: statement text -> `Analyzed`, so a repeated simple query is
//! parsed once. Bounded, approximately least-recently-used, and cheap on a hit.
//!
//! Each shard keeps two generations of entries. Lookups search the young generation,
//! then the old one (promoting the hit). When the young generation reaches half the
//! shard's capacity the old one is dropped and the young one becomes old. An entry
//! used at least once per generation therefore stays; one not used for two
//! generations goes. Every operation is O(1) and a shard never holds more than its
//! capacity, unlike an exact LRU that needs a linked list or an O(n) eviction scan.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;

use super::analyze::{analyze, Analyzed};

/// Independent shards, so sessions on different threads rarely meet on one lock.
const SHARDS: usize = 8;

pub struct AnalysisCache {
    shards: Vec<Mutex<Generations>>,
    hasher: RandomState,
    /// Entries per generation per shard.
    half: usize,
}

#[derive(Default)]
struct Generations {
    young: HashMap<Box<str>, Analyzed>,
    old: HashMap<Box<str>, Analyzed>,
}

impl AnalysisCache {
    /// A cache holding at most about `capacity` statement texts.
    pub fn new(capacity: usize) -> Self {
        let per_shard = capacity.div_ceil(SHARDS).max(2);
        AnalysisCache {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            half: per_shard / 2,
        }
    }

    /// The analysis of `sql`, from the cache or computed now (outside the lock).
    pub fn get_or_analyze(&self, sql: &str) -> Analyzed {
        let shard = &self.shards[self.hasher.hash_one(sql) as usize % SHARDS];
        if let Some(hit) = self.lookup(shard, sql) {
            return hit;
        }
        let analyzed = analyze(sql);
        let mut gens = shard.lock().unwrap_or_else(|e| e.into_inner());
        gens.insert(sql.into(), analyzed, self.half);
        analyzed
    }

    fn lookup(&self, shard: &Mutex<Generations>, sql: &str) -> Option<Analyzed> {
        // A std Mutex: held for two hash lookups, never across .await.
        let mut gens = shard.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hit) = gens.young.get(sql) {
            return Some(*hit);
        }
        let (key, hit) = gens.old.remove_entry(sql)?;
        gens.insert(key, hit, self.half);
        Some(hit)
    }

    /// Texts currently cached (both generations).
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

impl Generations {
    fn insert(&mut self, key: Box<str>, value: Analyzed, half: usize) {
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

    #[test]
    fn stays_bounded_and_keeps_hot_entries() {
        let cache = AnalysisCache::new(64);
        for i in 0..10_000 {
            cache.get_or_analyze("SELECT 42");
            cache.get_or_analyze(&format!("SELECT {i}"));
            assert!(cache.len() <= 64 + SHARDS, "len {}", cache.len());
        }
        let shard = &cache.shards[cache.hasher.hash_one("SELECT 42") as usize % SHARDS];
        assert!(cache.lookup(shard, "SELECT 42").is_some());
    }
}
