//! Session settings as an ordered list of `name -> SQL value` with a fingerprint, so
//! checking "does this server connection already carry this client's settings?" is one
//! integer comparison on the hot path; the SQL to converge is built only on mismatch.

use std::hash::{Hash, Hasher};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionParams {
    /// Sorted by name; names are lower-case identifiers, values are SQL text as the
    /// client wrote them after `TO`/`=` (or quoted literals for startup parameters).
    entries: Vec<(String, String)>,
    fingerprint: u64,
}

impl SessionParams {
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    pub fn entries(&self) -> &[(String, String)] {
        &self.entries
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .map(|i| self.entries[i].1.as_str())
    }

    pub fn set(&mut self, name: &str, value: &str) {
        match self.entries.binary_search_by(|(n, _)| n.as_str().cmp(name)) {
            Ok(i) => self.entries[i].1 = value.to_owned(),
            Err(i) => self.entries.insert(i, (name.to_owned(), value.to_owned())),
        }
        self.refresh();
    }

    pub fn remove(&mut self, name: &str) {
        if let Ok(i) = self.entries.binary_search_by(|(n, _)| n.as_str().cmp(name)) {
            self.entries.remove(i);
            self.refresh();
        }
    }

    fn refresh(&mut self) {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.entries.hash(&mut h);
        self.fingerprint = if self.entries.is_empty() {
            0
        } else {
            h.finish() | 1
        };
    }

    /// The statements that turn a connection carrying `from` into one carrying `self`.
    /// Empty when nothing differs.
    pub fn diff_sql(&self, from: &SessionParams) -> String {
        let mut sql = String::new();
        for (name, value) in &self.entries {
            if from.get(name) != Some(value.as_str()) {
                sql.push_str(&format!("SET {name} = {value};"));
            }
        }
        for (name, _) in &from.entries {
            if self.get(name).is_none() {
                sql.push_str(&format!("RESET {name};"));
            }
        }
        sql
    }
}

/// Quotes a string as a SQL literal.
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_sets_changed_and_resets_removed() {
        let mut a = SessionParams::default();
        a.set("statement_timeout", "100");
        a.set("application_name", "'x'");
        let mut b = SessionParams::default();
        b.set("application_name", "'x'");
        b.set("search_path", "public");
        assert_eq!(
            a.diff_sql(&b),
            "SET statement_timeout = 100;RESET search_path;"
        );
        assert_eq!(a.diff_sql(&a), "");
        assert_ne!(a.fingerprint(), b.fingerprint());
        b.remove("search_path");
        b.set("statement_timeout", "100");
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(SessionParams::default().fingerprint(), 0);
    }

    #[test]
    fn literals_are_quoted() {
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
