//! Tests for loading `shardgate.yaml`: the documented example and defaults, unit parsing,
//! one test per validation rule checking the reported line, and a no-panic property test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proptest::prelude::*;

use super::units::{parse_duration, parse_size};
use super::{Config, ConfigError, PoolMode};
use crate::shard_map::ShardMap;

const MINIMAL: &str = "\
users:
  - { name: app, password: app-secret }
shard_map: shard-maps/local.yaml
";

/// The example of DESIGN.md section 3, verbatim (including the optional `tls`).
const DESIGN_EXAMPLE: &str = "\
listen: 127.0.0.1:6432
metrics: 127.0.0.1:9930          # HTTP: /metrics (Prometheus), /healthz, /readyz
admin: { user: admin, password: admin-secret }   # the virtual database `shardgate`
tls: { cert: server.crt, key: server.key }       # optional; without it SSLRequest gets 'N'
pool:
  mode: transaction               # transaction | session
  size: 20                        # server connections per (node, user, database)
  acquire_timeout: 5s
users:
  - { name: app, password: app-secret }   # clients authenticate with SCRAM-SHA-256
control: { user: app }            # role for monitor, promotion and resharding SQL; default:
                                  # the first user.
routing:
  max_replica_lag: 1s             # a replica further behind gets no reads
  max_replica_lag_bytes: 16MB
  read_your_writes: true          # see 5.3
  lag_check_interval: 250ms
failover: { auto: true, after: 3s } # promote a replica when the primary is gone this long
shard_map: shard-maps/local.yaml  # relative to this file
";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_yaml_str(text, Path::new("shardgate.yaml"))
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("test address")
}

/// Loads `text`, expecting failure; returns the reported line and the full message.
fn failure(text: &str) -> (Option<u32>, String) {
    match parse(text) {
        Ok(config) => panic!("expected an error, got {config:?}"),
        Err(err) => (err.line(), err.to_string()),
    }
}

fn assert_fails(text: &str, line: u32, needle: &str) {
    let (got_line, message) = failure(text);
    assert_eq!(got_line, Some(line), "wrong line in: {message}");
    assert!(
        message.starts_with(&format!("shardgate.yaml:{line}")),
        "message should start with file:line: {message}"
    );
    assert!(
        message.contains(needle),
        "{message:?} should contain {needle:?}"
    );
}

#[test]
fn design_example_parses() {
    let config = parse(DESIGN_EXAMPLE).expect("DESIGN.md example");
    assert_eq!(config.listen, addr("127.0.0.1:6432"));
    assert_eq!(config.metrics, Some(addr("127.0.0.1:9930")));
    assert_eq!(config.admin.user, "admin");
    assert_eq!(config.admin.password.as_deref(), Some("admin-secret"));
    let tls = config.tls.as_ref().expect("tls");
    assert_eq!(tls.cert, PathBuf::from("server.crt"));
    assert_eq!(tls.key, PathBuf::from("server.key"));
    assert_eq!(config.pool.mode, PoolMode::Transaction);
    assert_eq!(config.pool.size, 20);
    assert_eq!(config.pool.acquire_timeout, Duration::from_secs(5));
    assert_eq!(config.users.len(), 1);
    assert_eq!(
        config.user("app").map(|u| u.password.as_str()),
        Some("app-secret")
    );
    assert!(config.user("nobody").is_none());
    assert_eq!(config.control.user, "app");
    assert_eq!(config.routing.max_replica_lag, Duration::from_secs(1));
    assert_eq!(config.routing.max_replica_lag_bytes, 16 * 1024 * 1024);
    assert!(config.routing.read_your_writes);
    assert_eq!(
        config.routing.lag_check_interval,
        Duration::from_millis(250)
    );
    assert!(config.failover.auto);
    assert_eq!(config.failover.after, Duration::from_secs(3));
    assert_eq!(config.shard_map, PathBuf::from("shard-maps/local.yaml"));
}

#[test]
fn defaults_apply_to_a_minimal_file() {
    let config = parse(MINIMAL).expect("minimal config");
    assert_eq!(config.source, PathBuf::from("shardgate.yaml"));
    assert_eq!(config.listen, addr("127.0.0.1:6432"));
    assert_eq!(config.metrics, None);
    assert_eq!(config.admin.user, "admin");
    assert_eq!(config.admin.password, None);
    assert!(config.tls.is_none());
    let pool = &config.pool;
    assert_eq!(pool.mode, PoolMode::Transaction);
    assert_eq!(pool.size, 20);
    assert_eq!(pool.acquire_timeout, Duration::from_secs(5));
    assert_eq!(pool.connect_timeout, Duration::from_secs(5));
    assert_eq!(pool.idle_timeout, Duration::from_secs(600));
    assert_eq!(pool.server_lifetime, Duration::from_secs(3600));
    assert_eq!(pool.tcp_keepalive, Duration::from_secs(30));
    assert_eq!(pool.tcp_user_timeout, Duration::ZERO);
    let limits = &config.limits;
    assert_eq!(limits.max_client_connections, 1000);
    assert_eq!(limits.max_message_size, 64 * 1024 * 1024);
    assert_eq!(limits.login_timeout, Duration::from_secs(10));
    assert_eq!(limits.shutdown_grace, Duration::from_secs(30));
    assert_eq!(config.control.user, "app");
    assert_eq!(config.routing.max_replica_lag, Duration::from_secs(1));
    assert_eq!(config.routing.max_replica_lag_bytes, 16 << 20);
    assert!(config.routing.read_your_writes);
    assert_eq!(
        config.routing.lag_check_interval,
        Duration::from_millis(250)
    );
    assert!(!config.failover.auto);
    assert_eq!(config.failover.after, Duration::from_secs(3));
}

#[test]
fn every_field_can_be_set() {
    let text = format!(
        "{MINIMAL}pool: {{ mode: session, size: 3, acquire_timeout: 1s, connect_timeout: 2s, \
         idle_timeout: 3m, server_lifetime: 2h, tcp_keepalive: 0s, tcp_user_timeout: 1m }}\n\
         limits: {{ max_client_connections: 7, max_message_size: 1MB, login_timeout: 500ms, \
         shutdown_grace: 0s, statement_cache_size: 10, max_prepared_statements: 20, \
         max_auth_message_size: 2kB, buffer_size: 32kB, max_paused_transactions: 5, \
         max_unauthenticated: 9, startup_wait: 1s, idle_in_transaction_timeout: 0s, \
         client_idle_timeout: 1m }}\n\
         reshard: {{ max_pause: 500ms, catch_up: 300ms, delete_batch: 100, state_file: job.json }}\n\
         routing: {{ max_replica_lag: 0s, max_replica_lag_bytes: 0, read_your_writes: false, \
         lag_check_interval: 100ms }}\n\
         failover: {{ auto: false, after: 10s }}\n\
         control: {{}}\n\
         admin: {{ user: boss }}\n\
         listen: '[::1]:7000'\n"
    );
    let c = parse(&text).expect("full config");
    assert_eq!(c.pool.mode, PoolMode::Session);
    assert_eq!(c.pool.size, 3);
    assert_eq!(c.pool.idle_timeout, Duration::from_secs(180));
    assert_eq!(c.pool.server_lifetime, Duration::from_secs(7200));
    assert_eq!(c.pool.tcp_keepalive, Duration::ZERO);
    assert_eq!(c.pool.tcp_user_timeout, Duration::from_secs(60));
    assert_eq!(c.limits.max_client_connections, 7);
    assert_eq!(c.limits.max_message_size, 1 << 20);
    assert_eq!(c.limits.login_timeout, Duration::from_millis(500));
    assert_eq!(c.limits.shutdown_grace, Duration::ZERO);
    assert_eq!(c.limits.statement_cache_size, 10);
    assert_eq!(c.limits.max_prepared_statements, 20);
    assert_eq!(c.limits.max_auth_message_size, 2 << 10);
    assert_eq!(c.limits.buffer_size, 32 << 10);
    assert_eq!(c.limits.max_paused_transactions, 5);
    assert_eq!(c.limits.max_unauthenticated, 9);
    assert_eq!(c.limits.startup_wait, Duration::from_secs(1));
    assert_eq!(c.limits.idle_in_transaction_timeout, Duration::ZERO);
    assert_eq!(c.limits.client_idle_timeout, Duration::from_secs(60));
    assert_eq!(c.reshard.max_pause, Duration::from_millis(500));
    assert_eq!(c.reshard.catch_up, Duration::from_millis(300));
    assert_eq!(c.reshard.delete_batch, 100);
    assert!(c.reshard.state_file.as_ref().unwrap().ends_with("job.json"));
    assert_eq!(c.routing.max_replica_lag, Duration::ZERO);
    assert_eq!(c.routing.max_replica_lag_bytes, 0);
    assert!(!c.routing.read_your_writes);
    assert_eq!(c.control.user, "app");
    assert_eq!(c.admin.user, "boss");
    assert_eq!(c.listen, addr("[::1]:7000"));
}

#[test]
fn relative_paths_resolve_against_the_config_directory() {
    let text = format!("{MINIMAL}tls: {{ cert: certs/server.crt, key: /abs/server.key }}\n");
    let config =
        Config::from_yaml_str(&text, Path::new("/etc/shardgate/shardgate.yaml")).expect("config");
    assert_eq!(
        config.shard_map,
        PathBuf::from("/etc/shardgate/shard-maps/local.yaml")
    );
    let tls = config.tls.expect("tls");
    assert_eq!(tls.cert, PathBuf::from("/etc/shardgate/certs/server.crt"));
    assert_eq!(tls.key, PathBuf::from("/abs/server.key"));
}

#[test]
fn example_file_and_its_shard_map_load() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("shardgate.example.yaml");
    let config = Config::load(&path).expect("shardgate.example.yaml");
    assert_eq!(config.source, path);
    assert!(config.shard_map.ends_with("shard-maps/local.yaml"));
    let map = ShardMap::load(&config.shard_map).expect("the example's shard map");
    assert_eq!(map.default_shard, "s0");
}

#[test]
fn missing_file_names_the_file_and_the_os_error() {
    let err = Config::load(Path::new("/nonexistent/shardgate.yaml")).expect_err("missing");
    assert!(matches!(err, ConfigError::Io { .. }));
    let message = err.to_string();
    assert!(
        message.starts_with("/nonexistent/shardgate.yaml: cannot read: "),
        "{message}"
    );
    assert!(message.contains("No such file"), "{message}");
}

#[test]
fn durations_parse() {
    let cases = [
        ("500us", Duration::from_micros(500)),
        ("250ms", Duration::from_millis(250)),
        ("1s", Duration::from_secs(1)),
        ("2m", Duration::from_secs(120)),
        ("1h", Duration::from_secs(3600)),
        ("1d", Duration::from_secs(86_400)),
        (" 5 s ", Duration::from_secs(5)),
        ("0s", Duration::ZERO),
    ];
    for (text, want) in cases {
        assert_eq!(parse_duration(text), Ok(want), "{text}");
    }
    for bad in [
        "",
        "5",
        "s",
        "-1s",
        "1.5s",
        "5 parsecs",
        "99999999999999999999s",
        "99999999999999d",
    ] {
        assert!(parse_duration(bad).is_err(), "{bad:?} should not parse");
    }
}

#[test]
fn sizes_parse() {
    let cases = [
        ("512", 512),
        ("512B", 512),
        ("64kB", 64 << 10),
        ("64KB", 64 << 10),
        ("16MB", 16 << 20),
        ("16 MiB", 16 << 20),
        ("1GB", 1 << 30),
        ("2TB", 2 << 40),
    ];
    for (text, want) in cases {
        assert_eq!(parse_size(text), Ok(want), "{text}");
    }
    for bad in ["", "MB", "-1", "1.5MB", "16mb", "16 parsecs", "99999999TB"] {
        assert!(parse_size(bad).is_err(), "{bad:?} should not parse");
    }
}

#[test]
fn unknown_fields_are_errors_with_position() {
    let (line, message) = failure(&format!("{MINIMAL}pool:\n  size: 3\n  pol: 4\n"));
    assert_eq!(line, Some(6));
    assert!(
        message.starts_with("shardgate.yaml:6:3: unknown field `pol`"),
        "{message}"
    );
    assert!(message.contains("expected one of"), "{message}");
    assert_fails(
        &format!("listen: 127.0.0.1:1\npol: {{}}\n{MINIMAL}"),
        2,
        "unknown field `pol`",
    );
    assert_fails(
        &format!("{MINIMAL}routing: {{ lag: 1s }}\n"),
        4,
        "unknown field `lag`",
    );
    assert_fails(
        "users:\n  - { name: a, password: b, role: x }\nshard_map: m\n",
        2,
        "`role`",
    );
    // Not the first key of its block, and its name also appears earlier inside a value.
    let (line, message) = failure(&format!(
        "{MINIMAL}pool:\n  size: 3\n  mode: \"pol: 1\"\n  'pol': 4\n"
    ));
    assert_eq!(line, Some(7), "{message}");
    assert!(
        message.starts_with("shardgate.yaml:7:3: unknown field `pol`"),
        "{message}"
    );
}

#[test]
fn value_errors_point_at_the_value() {
    let (line, message) = failure(&format!("{MINIMAL}pool:\n  acquire_timeout: 5 parsecs\n"));
    assert_eq!(line, Some(5));
    let want = "shardgate.yaml:5:20: pool.acquire_timeout: invalid duration \"5 parsecs\"";
    assert!(message.starts_with(want), "{message}");
    // (appended to MINIMAL, line of the bad value, part of the message)
    let cases = [
        ("pool: { acquire_timeout: 0ms }", 4, "greater than zero"),
        ("routing:\n  lag_check_interval: 0s", 5, "greater than zero"),
        ("failover: { after: 0s }", 4, "failover.after"),
        ("pool:\n  size: 0", 5, "pool.size: must be at least 1"),
        ("pool:\n  size: lots", 5, ""),
        ("pool:\n  mode: statement", 5, "unknown mode \"statement\""),
        ("limits:\n  max_message_size: 1kB", 5, "at least 16kB"),
        ("limits:\n  buffer_size: 1kB", 5, "at least 16384 bytes"),
        ("limits:\n  statement_cache_size: 0", 5, "at least 1"),
        ("reshard:\n  max_pause: 0s", 5, "reshard.max_pause"),
        ("limits:\n  max_message_size: 1 parsec", 5, "invalid size"),
        (
            "routing:\n  max_replica_lag_bytes: 16 mb",
            5,
            "invalid size",
        ),
        ("routing:\n  read_your_writes: maybe", 5, ""),
        ("listen: localhost:6432", 4, "listen: invalid address"),
        ("metrics: 9930", 4, "metrics: invalid address"),
        ("admin: { user: '' }", 4, "admin.user: must not be empty"),
        ("tls: { cert: a.crt }", 4, "missing field `key`"),
        ("pool: 5", 4, "expected a mapping start here"),
    ];
    for (extra, line, needle) in cases {
        assert_fails(&format!("{MINIMAL}{extra}\n"), line, needle);
    }
}

#[test]
fn user_rules_are_enforced() {
    assert_fails("shard_map: m.yaml\nusers: []\n", 2, "at least one user");
    assert_fails(
        "shard_map: m.yaml\nusers:\n  - { name: app, password: a }\n  \
         - { name: ops, password: b }\n  - { name: app, password: c }\n",
        5,
        "user \"app\" is listed twice (first at line 3)",
    );
    assert_fails(
        "shard_map: m.yaml\nusers:\n  - { name: app, password: '' }\n",
        3,
        "users.password: must not be empty",
    );
    assert_fails(
        &format!("{MINIMAL}control:\n  user: root\n"),
        5,
        "control.user: \"root\" is not one of the users (app)",
    );
}

#[test]
fn missing_required_fields_are_reported() {
    assert_fails(
        "listen: 127.0.0.1:1\nshard_map: m.yaml\n",
        1,
        "missing field `users`",
    );
    assert_fails(
        "users:\n  - { name: app, password: a }\n",
        1,
        "missing field `shard_map`",
    );
    assert_fails(
        "users: [{ name: app }]\nshard_map: m\n",
        1,
        "missing field `password`",
    );
    assert_fails(&format!("{MINIMAL}shard_map: other.yaml\n"), 4, "duplicate");
}

#[test]
fn malformed_yaml_is_reported_with_position() {
    assert_fails("users: [\nshard_map: x\n", 2, "");
    assert_fails(
        "users:\n  - { name: app, password: a\nshard_map: m\n",
        2,
        "unclosed bracket",
    );
    assert_fails("- just\n- a list\n", 1, "");
    let (line, message) = failure("# nothing here\n\n");
    assert_eq!(line, Some(3), "{message}");
    assert!(message.contains("the file is empty"), "{message}");
}

/// Edits of a valid file are much likelier than random text to reach deep parser states.
fn mutated_example() -> impl Strategy<Value = String> {
    let edit = (
        any::<prop::sample::Index>(),
        0..3u8,
        "[ -~\n\t:{}\\[\\],#&*!|>'\"%@`-]{0,3}",
    );
    prop::collection::vec(edit, 1..6).prop_map(|edits| {
        let mut text = DESIGN_EXAMPLE.to_string();
        for (at, kind, insert) in edits {
            let pos = at.index(text.len() + 1);
            let pos = (0..=pos)
                .rev()
                .find(|p| text.is_char_boundary(*p))
                .unwrap_or(0);
            match kind {
                0 => text.insert_str(pos, &insert),
                1 => text.truncate(pos),
                _ => {
                    let end = (pos + insert.len()).min(text.len());
                    if text.is_char_boundary(end) {
                        text.replace_range(pos..end, &insert);
                    }
                }
            }
        }
        text
    })
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        let _ = parse(&text);
    }

    #[test]
    fn unit_parsers_never_panic(text in "\\PC{0,30}") {
        let _ = parse_duration(&text);
        let _ = parse_size(&text);
    }

    #[test]
    fn edited_examples_never_panic(text in mutated_example()) {
        if let Err(err) = parse(&text) {
            prop_assert!(err.to_string().starts_with("shardgate.yaml"));
        }
    }
}
