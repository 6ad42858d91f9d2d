//! Tests for the value parsers of shard maps: RFC 3339 timestamps and node addresses,
//! including property tests that they never panic and that `Display` output parses back.

use proptest::prelude::*;

use crate::shard_map::time::{format_timestamp, parse_timestamp};
use crate::shard_map::NodeAddr;

#[test]
fn timestamps_parse() {
    let jan = 1_767_225_600_000_000;
    assert_eq!(parse_timestamp("2026-01-01T00:00:00Z"), Ok(jan));
    assert_eq!(parse_timestamp("2026-01-01"), Ok(jan));
    assert_eq!(parse_timestamp("2026-01-01t00:00:00z"), Ok(jan));
    assert_eq!(parse_timestamp("2026-01-01 02:00:00+02:00"), Ok(jan));
    assert_eq!(parse_timestamp("2025-12-31T19:00:00-05:00"), Ok(jan));
    assert_eq!(parse_timestamp("2026-01-01T00:00:00.5Z"), Ok(jan + 500_000));
    assert_eq!(parse_timestamp("1970-01-01T00:00:00Z"), Ok(0));
    assert_eq!(parse_timestamp("1969-12-31T23:59:59.999999Z"), Ok(-1));
    assert_eq!(parse_timestamp("2024-02-29"), Ok(1_709_164_800_000_000));
    assert_eq!(parse_timestamp("0001-01-01"), Ok(-62_135_596_800_000_000));
    for bad in [
        "",
        "2026",
        "2026-1-1",
        "2026-13-01",
        "2023-02-29",
        "2026-04-31",
        "2026-01-01T24:00:00Z",
        "2026-01-01T00:00:00",
        "2026-01-01T00:00:00.1234567Z",
        "2026-01-01T00:00:00+2:00",
        "2026-01-01X00:00:00Z",
        "2026-01-01T00:00Z",
        "٢٠٢٦-01-01",
        "2026-01-01T00:00:00Zjunk",
    ] {
        assert!(parse_timestamp(bad).is_err(), "{bad:?} should not parse");
    }
    assert_eq!(format_timestamp(jan), "2026-01-01T00:00:00Z");
    assert_eq!(format_timestamp(-1), "1969-12-31T23:59:59.999999Z");
}

#[test]
fn plain_node_addresses_parse() {
    let plain: NodeAddr = "127.0.0.1:5433".parse().expect("host:port");
    assert_eq!((plain.host.as_str(), plain.port), ("127.0.0.1", 5433));
    assert_eq!(plain.to_string(), "127.0.0.1:5433");
    let default_port: NodeAddr = "db.internal".parse().expect("host");
    assert_eq!(default_port.port, 5432);
    let v6: NodeAddr = "[::1]:6000".parse().expect("ipv6");
    assert_eq!(
        (v6.host.as_str(), v6.to_string().as_str()),
        ("::1", "[::1]:6000")
    );
}

#[test]
fn url_node_addresses_parse() {
    let url: NodeAddr =
        "postgres://rep%40l:p%3Ass@db1:5000/app2?sslmode=require&application_name=sg"
            .parse()
            .expect("url");
    assert_eq!(url.user.as_deref(), Some("rep@l"));
    assert_eq!(url.password.as_deref(), Some("p:ss"));
    assert_eq!(url.dbname.as_deref(), Some("app2"));
    assert_eq!(
        url.options,
        vec![
            ("sslmode".into(), "require".into()),
            ("application_name".into(), "sg".into())
        ]
    );
    let shown = url.to_string();
    assert_eq!(
        shown,
        "postgres://rep%40l@db1:5000/app2?sslmode=require&application_name=sg"
    );
    assert!(!format!("{url:?}").contains("p:ss"));
    let query: NodeAddr = "postgresql://h?user=u&password=secret"
        .parse()
        .expect("query creds");
    assert_eq!(
        (query.user.as_deref(), query.password.as_deref()),
        (Some("u"), Some("secret"))
    );
    assert!(query.options.is_empty() && !query.to_string().contains("secret"));
}

#[test]
fn bad_node_addresses_are_rejected() {
    for bad in [
        "",
        ":5432",
        "h:0",
        "h:65536",
        "h:abc",
        "http://h",
        "postgres://u@/db",
        "h h:1",
        "[::1",
        "[::1]5432",
        "postgres://h?x",
        "postgres://h/%zz",
        "postgres://h/%+1",
        "postgres://h/%ff",
    ] {
        assert!(bad.parse::<NodeAddr>().is_err(), "{bad:?} should not parse");
    }
}

proptest! {
    #[test]
    fn value_parsers_never_panic(text in "\\PC{0,40}") {
        let _ = parse_timestamp(&text);
        let _ = text.parse::<NodeAddr>();
    }

    #[test]
    fn node_display_parses_back(
        host in "[a-z][a-z0-9.-]{0,20}",
        port in 1u16..,
        user in proptest::option::of("\\PC{1,12}"),
        dbname in proptest::option::of("\\PC{1,12}"),
        options in prop::collection::vec(("[a-z_]{1,8}", "\\PC{0,8}"), 0..3),
    ) {
        // These three are moved out of `options` by the parser, by design.
        let moved = |k: &str| matches!(k, "user" | "password" | "dbname");
        let options = options.into_iter().filter(|(k, _)| !moved(k)).collect();
        let node = NodeAddr { host, port, user, password: None, dbname, options };
        let reparsed: NodeAddr = node.to_string().parse().map_err(TestCaseError::fail)?;
        prop_assert_eq!(reparsed, node);
    }

    #[test]
    fn timestamps_round_trip(micros in -62_135_596_800_000_000i64..253_402_300_799_999_999) {
        prop_assert_eq!(parse_timestamp(&format_timestamp(micros)), Ok(micros));
    }
}
