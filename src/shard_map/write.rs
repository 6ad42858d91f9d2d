//! Writing a shard map back to its file: after a promotion the proxy records the new
//! primary (version + 1) so a restart keeps it. The file is rewritten in a canonical
//! form (comments are not kept); the previous file is kept beside it as
//! `<name>.bak-<version>`, and the new one replaces it atomically (temp file + rename).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::hash::KeyType;
use super::time::format_timestamp;
use super::{Keyspace, ShardMap, TableRule};

impl ShardMap {
    /// The map as YAML that `ShardMap::from_yaml_str` reads back to an equal map.
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# Written by shardgate (the previous file is kept as <file>.bak-<version>).\n",
        );
        out.push_str(&format!("version: {}\n", self.version));
        out.push_str(&format!("database: {}\n", quote(&self.database)));
        out.push_str("shards:\n");
        for (name, spec) in &self.shards {
            let replicas: Vec<String> = spec
                .replicas
                .iter()
                .map(|r| quote(&r.to_map_text()))
                .collect();
            out.push_str(&format!(
                "  {}: {{ primary: {}, replicas: [{}] }}\n",
                quote(name),
                quote(&spec.primary.to_map_text()),
                replicas.join(", ")
            ));
        }
        if !self.keyspaces.is_empty() {
            out.push_str("keyspaces:\n");
            for (name, keyspace) in &self.keyspaces {
                out.push_str(&format!("  {}:\n", quote(name)));
                write_keyspace(&mut out, keyspace);
            }
        }
        if !self.tables.is_empty() {
            out.push_str("tables:\n");
            for (name, rule) in &self.tables {
                let body = match rule {
                    TableRule::Sharded { column, keyspace } => {
                        format!(
                            "{{ column: {}, keyspace: {} }}",
                            quote(column),
                            quote(keyspace)
                        )
                    }
                    TableRule::Reference => "{ reference: true }".to_owned(),
                };
                out.push_str(&format!("  {}: {body}\n", quote(name)));
            }
        }
        out.push_str(&format!("default_shard: {}\n", quote(&self.default_shard)));
        out
    }

    /// Replaces `path` with this map: the old file is copied to `<path>.bak-<old
    /// version>`, the new text is written to a temp file beside it and renamed over.
    pub fn write_file(&self, path: &Path, old_version: u64) -> std::io::Result<PathBuf> {
        let backup = sibling(path, &format!(".bak-{old_version}"));
        if path.exists() {
            std::fs::copy(path, &backup)?;
        }
        let temp = sibling(path, ".tmp");
        {
            let mut file = std::fs::File::create(&temp)?;
            file.write_all(self.to_yaml().as_bytes())?;
            file.sync_all()?;
        }
        std::fs::rename(&temp, path)?;
        Ok(backup)
    }
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

fn write_keyspace(out: &mut String, keyspace: &Keyspace) {
    match keyspace {
        Keyspace::Hash {
            buckets,
            key_type,
            map,
        } => {
            let key_type = match key_type {
                KeyType::Int => "int",
                KeyType::Text => "text",
                KeyType::Uuid => "uuid",
            };
            out.push_str(&format!(
                "    type: hash\n    buckets: {buckets}\n    key_type: {key_type}\n    map:\n"
            ));
            for (range, shard) in map {
                out.push_str(&format!(
                    "      - {{ buckets: {}-{}, shard: {} }}\n",
                    range.start(),
                    range.end(),
                    quote(shard)
                ));
            }
        }
        Keyspace::Range { map } => {
            out.push_str("    type: range\n    map:\n");
            write_line(out, map, |v| v.to_string());
        }
        Keyspace::Time { map } => {
            out.push_str("    type: time\n    map:\n");
            write_line(out, map, |v| quote(&format_timestamp(v)));
        }
    }
}

fn write_line(
    out: &mut String,
    map: &[(Option<i64>, Option<i64>, String)],
    show: impl Fn(i64) -> String,
) {
    for (from, until, shard) in map {
        let mut fields = Vec::new();
        if let Some(from) = from {
            fields.push(format!("from: {}", show(*from)));
        }
        if let Some(until) = until {
            fields.push(format!("until: {}", show(*until)));
        }
        fields.push(format!("shard: {}", quote(shard)));
        out.push_str(&format!("      - {{ {} }}\n", fields.join(", ")));
    }
}

/// A YAML double-quoted scalar.
fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_map_reads_back_equal() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/shard-maps/example.yaml"
        ))
        .unwrap_or_default();
        let path = Path::new("example.yaml");
        let mut map = ShardMap::from_yaml_str(&text, path).unwrap_or_else(|e| panic!("{e}"));
        map.shards
            .get_mut("s1")
            .unwrap_or_else(|| unreachable!())
            .primary = "postgres://rep:s%3Acret@10.0.0.9:6000/other?sslmode=require"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let again = ShardMap::from_yaml_str(&map.to_yaml(), path)
            .unwrap_or_else(|e| panic!("{e}\n{}", map.to_yaml()));
        assert_eq!(again, map);
        assert_eq!(
            again.shards["s1"].primary.password.as_deref(),
            Some("s:cret")
        );
    }

    #[test]
    fn writing_keeps_a_backup_and_replaces_atomically() {
        let dir = std::env::temp_dir().join(format!("sg-write-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("map.yaml");
        let text = "version: 3\ndatabase: app\nshards:\n  s0: { primary: 127.0.0.1:5432 }\ndefault_shard: s0\n";
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
        let mut map = ShardMap::load(&path).unwrap_or_else(|e| panic!("{e}"));
        map.version = 4;
        let backup = map.write_file(&path, 3).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(std::fs::read_to_string(&backup).unwrap_or_default(), text);
        assert_eq!(ShardMap::load(&path).map(|m| m.version).ok(), Some(4));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
