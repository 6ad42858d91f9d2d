//! The classifier over a corpus: every case DESIGN 5.1 lists, and the everyday
//! statements of ORMs, drivers and psql.

use super::*;
use StatementClass::*;

fn class(sql: &str) -> StatementClass {
    analyze(sql).class
}

const READS: &[&str] = &[
    "SELECT 1",
    "select abalance from pgbench_accounts where aid = $1",
    "SELECT * FROM users WHERE id = 42",
    "SELECT id, name FROM users ORDER BY name LIMIT 10 OFFSET 20",
    "SELECT count(*) FROM orders GROUP BY user_id HAVING count(*) > 2",
    "SELECT u.id, o.total FROM users u JOIN orders o ON o.user_id = u.id",
    "SELECT * FROM users WHERE id IN (SELECT user_id FROM orders)",
    "WITH recent AS (SELECT * FROM orders WHERE ts > now() - interval '1 day') SELECT * FROM recent",
    "WITH RECURSIVE t(n) AS (VALUES (1) UNION ALL SELECT n + 1 FROM t WHERE n < 5) SELECT * FROM t",
    "SELECT inet_server_port()",
    "SELECT now()",
    "SELECT current_setting('search_path')",
    "SELECT pg_is_in_recovery()",
    "SELECT pg_last_wal_replay_lsn()",
    "SELECT version()",
    "SELECT $1::int + $2::int",
    "SELECT '{1,2,3}'::int[]",
    "SELECT jsonb_build_object('a', 1)",
    "SELECT * FROM generate_series(1, 10)",
    "SELECT DISTINCT ON (user_id) * FROM orders ORDER BY user_id, ts DESC",
    "SELECT a FROM t1 UNION SELECT b FROM t2",
    "SELECT a FROM t1 INTERSECT SELECT b FROM t2",
    "SELECT a FROM t1 EXCEPT SELECT b FROM t2",
    "SELECT * FROM users WHERE name LIKE 'a%'",
    "SELECT * FROM users WHERE email ILIKE '%@x.org'",
    "SELECT row_number() OVER (PARTITION BY user_id ORDER BY ts) FROM orders",
    "SELECT CASE WHEN a > 1 THEN 'x' ELSE 'y' END FROM t",
    "SELECT EXISTS (SELECT 1 FROM users WHERE id = 1)",
    "SELECT * FROM users WHERE created_at BETWEEN '2026-01-01' AND '2026-02-01'",
    "SELECT * FROM users WHERE id = ANY($1)",
    "SELECT coalesce(max(id), 0) FROM users",
    "SELECT * FROM pg_catalog.pg_tables",
    "SELECT t.oid, t.typname FROM pg_type t WHERE t.oid = $1",
    "SELECT 'nextval' AS word",
    "SELECT * FROM users FETCH FIRST 5 ROWS ONLY",
    "VALUES (1, 'a'), (2, 'b')",
    "SHOW search_path",
    "SHOW ALL",
    "SHOW transaction_isolation",
    "EXPLAIN SELECT * FROM users",
    "EXPLAIN ANALYZE SELECT * FROM users",
    "COPY users TO STDOUT",
    "COPY (SELECT * FROM users) TO STDOUT WITH (FORMAT csv)",
    "",
    ";",
    "-- only a comment",
    "SELECT 1; SELECT 2",
    "/* leading */ SELECT 1",
    "SELECT pg_sleep(1)",
    "SELECT md5('x')",
    "SELECT * FROM users u LEFT JOIN LATERAL (SELECT * FROM orders o WHERE o.user_id = u.id LIMIT 1) x ON true",
];

const WRITES: &[&str] = &[
    "INSERT INTO users (id, name) VALUES (1, 'a')",
    "INSERT INTO users VALUES (1, 'a') ON CONFLICT (id) DO NOTHING",
    "INSERT INTO users VALUES (1, 'a') ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name",
    "INSERT INTO t SELECT * FROM s",
    "INSERT INTO t VALUES (1) RETURNING id",
    "UPDATE users SET name = 'b' WHERE id = 1",
    "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
    "DELETE FROM users WHERE id = 1",
    "DELETE FROM users USING orders WHERE orders.user_id = users.id",
    "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET v = s.v WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.v)",
    "TRUNCATE users",
    "TRUNCATE TABLE a, b RESTART IDENTITY",
    "SELECT * FROM users WHERE id = 1 FOR UPDATE",
    "SELECT * FROM users WHERE id = 1 FOR SHARE",
    "SELECT * FROM users FOR NO KEY UPDATE SKIP LOCKED",
    "SELECT * FROM users FOR KEY SHARE NOWAIT",
    "SELECT * FROM (SELECT * FROM users FOR UPDATE) s",
    "WITH moved AS (DELETE FROM a RETURNING *) INSERT INTO b SELECT * FROM moved",
    "WITH moved AS (DELETE FROM a RETURNING *) SELECT * FROM moved",
    "WITH ins AS (INSERT INTO a VALUES (1) RETURNING id) SELECT id FROM ins",
    "WITH up AS (UPDATE a SET v = 1 RETURNING id) SELECT count(*) FROM up",
    "SELECT nextval('users_id_seq')",
    "SELECT setval('users_id_seq', 100)",
    "SELECT currval('users_id_seq')",
    "SELECT lastval()",
    "SELECT public.nextval('s')",
    "SELECT * FROM nextval('s')",
    "SELECT x FROM (SELECT nextval('s') AS x) sub",
    "SELECT pg_advisory_lock(1)",
    "SELECT pg_advisory_xact_lock(1)",
    "SELECT pg_try_advisory_lock(1, 2)",
    "SELECT pg_advisory_unlock_all()",
    "SELECT pg_notify('chan', 'payload')",
    "SELECT txid_current()",
    "SELECT pg_current_xact_id()",
    "SELECT pg_current_wal_lsn()",
    "SELECT set_config('search_path', 'x', false)",
    "SELECT lo_create(0)",
    "SELECT pg_create_logical_replication_slot('s', 'pgoutput')",
    "SELECT * INTO newtable FROM users",
    "SELECT 1; INSERT INTO t VALUES (1)",
    "INSERT INTO t VALUES (1); SELECT 1",
    "EXPLAIN ANALYZE INSERT INTO t VALUES (1)",
    "EXPLAIN ANALYZE DELETE FROM t",
    "COPY users FROM STDIN",
    "COPY users (id, name) FROM STDIN WITH (FORMAT csv)",
    "this is not sql",
    "INSERT INTO",
    "SELEC 1",
    "SELECT (1",
    "BEGIN; INSERT INTO t VALUES (1); COMMIT",
];

const UTILITY: &[&str] = &[
    "CREATE TABLE t (id int primary key, v text)",
    "CREATE TABLE IF NOT EXISTS t (id serial)",
    "CREATE INDEX ON t (v)",
    "CREATE UNIQUE INDEX CONCURRENTLY i ON t (v)",
    "CREATE VIEW v AS SELECT * FROM t",
    "CREATE SEQUENCE s",
    "CREATE SCHEMA app",
    "CREATE TABLE t2 AS SELECT * FROM t",
    "ALTER TABLE t ADD COLUMN w int",
    "ALTER TABLE t RENAME TO t3",
    "DROP TABLE t",
    "DROP TABLE IF EXISTS t CASCADE",
    "DROP INDEX i",
    "GRANT SELECT ON t TO app",
    "REVOKE ALL ON t FROM app",
    "VACUUM t",
    "ANALYZE t",
    "CALL do_something(1)",
    "LISTEN chan",
    "NOTIFY chan, 'x'",
    "UNLISTEN *",
    "PREPARE p AS SELECT 1",
    "EXECUTE p",
    "DEALLOCATE p",
    "LOCK TABLE t IN ACCESS EXCLUSIVE MODE",
    "CREATE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql",
    "COMMENT ON TABLE t IS 'x'",
];

const SESSION: &[&str] = &[
    "SET statement_timeout = 100",
    "SET search_path TO a, b",
    "SET SESSION work_mem = '64MB'",
    "SET LOCAL lock_timeout = '1s'",
    "SET TIME ZONE 'UTC'",
    "RESET ALL",
    "RESET search_path",
    "DISCARD ALL",
    "SET application_name = 'x'",
];

#[test]
fn reads() {
    for sql in READS {
        let a = analyze(sql);
        assert_eq!(a.class, Read, "{sql:?}");
        assert!(a.parsed, "{sql:?}");
    }
}

#[test]
fn writes() {
    for sql in WRITES {
        assert_eq!(class(sql), Write, "{sql:?}");
    }
}

#[test]
fn utility_and_ddl_go_to_the_primary() {
    for sql in UTILITY {
        let c = class(sql);
        assert!(c == Utility || c == Write, "{sql:?}: {c:?}");
        assert!(!crate::routing::route::is_read(c), "{sql:?}");
    }
}

#[test]
fn session_settings() {
    for sql in SESSION {
        assert_eq!(class(sql), SessionSet, "{sql:?}");
    }
}

#[test]
fn transaction_control() {
    for (sql, want) in [
        ("BEGIN", Begin { read_only: false }),
        ("begin transaction", Begin { read_only: false }),
        ("BEGIN READ WRITE", Begin { read_only: false }),
        ("BEGIN READ ONLY", Begin { read_only: true }),
        ("START TRANSACTION READ ONLY", Begin { read_only: true }),
        (
            "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE",
            Begin { read_only: true },
        ),
        (
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            Begin { read_only: true },
        ),
        ("START TRANSACTION", Begin { read_only: false }),
        ("COMMIT", TxnControl),
        ("END", TxnControl),
        ("ROLLBACK", TxnControl),
        ("ABORT", TxnControl),
        ("SAVEPOINT a", TxnControl),
        ("RELEASE SAVEPOINT a", TxnControl),
        ("ROLLBACK TO SAVEPOINT a", TxnControl),
    ] {
        assert_eq!(class(sql), want, "{sql:?}");
    }
}

#[test]
fn unparsable_sql_is_a_write_and_says_so() {
    let a = analyze("SELEC 1");
    assert_eq!(a.class, Write);
    assert!(!a.parsed);
}

#[test]
fn hints_in_a_leading_comment() {
    assert_eq!(
        analyze("/* shardgate: primary */ SELECT 1").hint,
        Some(TargetHint::Primary)
    );
    assert_eq!(
        analyze("  /*shardgate:replica*/SELECT 1").hint,
        Some(TargetHint::Replica)
    );
    assert_eq!(
        analyze("/* ShardGate: PRIMARY */ SELECT 1").hint,
        Some(TargetHint::Primary)
    );
    assert_eq!(analyze("/* shardgate: primary */ SELECT 1").class, Read);
    assert_eq!(analyze("SELECT 1 /* shardgate: primary */").hint, None);
    assert_eq!(analyze("/* other: primary */ SELECT 1").hint, None);
    assert_eq!(analyze("/* shardgate: elsewhere */ SELECT 1").hint, None);
}

#[test]
fn set_shardgate_target() {
    for (sql, want) in [
        (
            "SET shardgate.target = 'primary'",
            Some(TargetMode::Primary),
        ),
        ("set shardgate.target to replica", Some(TargetMode::Replica)),
        (
            "SET SESSION shardgate.target = 'auto';",
            Some(TargetMode::Auto),
        ),
        (
            "/* x */ SET shardgate.target TO 'REPLICA'",
            Some(TargetMode::Replica),
        ),
        ("RESET shardgate.target", Some(TargetMode::Auto)),
        ("SET shardgate.target = 'nowhere'", None),
        ("SET shardgate.targets = 'primary'", None),
        ("SET shardgate.target = 'primary'; SELECT 1", None),
        ("SET search_path = 'primary'", None),
    ] {
        assert_eq!(analyze(sql).set_target, want, "{sql:?}");
    }
}

#[test]
fn the_corpus_is_large_enough() {
    let n = READS.len() + WRITES.len() + UTILITY.len() + SESSION.len() + 15;
    assert!(n >= 100, "{n}");
}

/// The fuzz target `statement_analysis` as a property test on stable: any text is
/// analysed (or found unparsable) without a panic.
mod properties {
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn analysis_never_panics(sql in "\\PC{0,200}") {
            let _ = crate::routing::analyze::analyze(&sql);
            let _ = crate::frontend::session_sql::analyze(&sql);
        }

        #[test]
        fn sql_like_text_never_panics(
            sql in "(SELECT|INSERT|UPDATE|DELETE|WITH|BEGIN|SET|COPY|/\\*|--|'|\\$\\$|;| |[a-z_0-9(),.*=<>$]){0,60}",
        ) {
            let _ = crate::routing::analyze::analyze(&sql);
            let _ = crate::frontend::session_sql::analyze(&sql);
        }
    }
}
