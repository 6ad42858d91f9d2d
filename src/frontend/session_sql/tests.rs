use super::*;

fn set(name: &str, value: &str) -> SessionEffect {
    SessionEffect::Set {
        name: name.into(),
        value: value.into(),
    }
}

#[test]
fn set_forms_are_recognised() {
    assert_eq!(
        analyze("SET statement_timeout = 100").effects,
        vec![set("statement_timeout", "100")]
    );
    assert_eq!(
        analyze("set Statement_Timeout to '5s';").effects,
        vec![set("statement_timeout", "'5s'")]
    );
    assert_eq!(
        analyze("SET SESSION search_path=a, b").effects,
        vec![set("search_path", "a, b")]
    );
    assert_eq!(
        analyze("SET TIME ZONE 'UTC'").effects,
        vec![set("timezone", "'UTC'")]
    );
    assert_eq!(
        analyze("SET NAMES 'UTF8'").effects,
        vec![set("client_encoding", "'UTF8'")]
    );
    assert_eq!(
        analyze("SET SCHEMA 'x'").effects,
        vec![set("search_path", "'x'")]
    );
    assert_eq!(
        analyze("SET work_mem TO DEFAULT").effects,
        vec![SessionEffect::Reset {
            name: "work_mem".into()
        }]
    );
    assert_eq!(
        analyze("/* c */ RESET search_path").effects,
        vec![SessionEffect::Reset {
            name: "search_path".into()
        }]
    );
    assert_eq!(analyze("RESET ALL").effects, vec![SessionEffect::ResetAll]);
}

#[test]
fn transaction_scoped_sets_have_no_session_effect() {
    for sql in [
        "SET LOCAL statement_timeout = 1",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "SET CONSTRAINTS ALL DEFERRED",
    ] {
        assert!(analyze(sql).is_empty(), "{sql}");
    }
}

#[test]
fn untracked_session_state_taints() {
    for sql in [
        "CREATE TEMP TABLE t (a int)",
        "create temporary table t (a int)",
        "CREATE LOCAL TEMP TABLE t (a int)",
        "LISTEN chan",
        "PREPARE p AS SELECT 1",
        "SELECT set_config('work_mem', '1MB', false)",
        "SELECT pg_advisory_lock(1)",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "SET ROLE other",
        "SET SESSION AUTHORIZATION other",
        "SET x = 1 -- trailing comment",
        "DISCARD TEMP",
    ] {
        assert!(analyze(sql).taints, "{sql}");
    }
    assert!(!analyze("SELECT pg_advisory_xact_lock(1)").taints);
    assert!(!analyze("SELECT 1").taints);
}

#[test]
fn multi_statement_queries_are_split_outside_quotes_and_comments() {
    let parts = split_statements(
        "SET a = 1; SELECT ';' ; -- x;\n SELECT $f$ ; $f$; /* ; */ SELECT E'\\';'",
    );
    assert_eq!(
        parts,
        vec![
            "SET a = 1",
            "SELECT ';' ",
            "SELECT $f$ ; $f$",
            "SELECT E'\\';'"
        ]
    );
    let effects = analyze("SET a = 1; SET b TO 'x;y'; SELECT 1");
    assert_eq!(effects.effects, vec![set("a", "1"), set("b", "'x;y'")]);
}

#[test]
fn discard_and_deallocate_all() {
    assert_eq!(
        analyze("DISCARD ALL").effects,
        vec![SessionEffect::DiscardAll]
    );
    assert_eq!(
        analyze("deallocate all").effects,
        vec![SessionEffect::DeallocateAll]
    );
    assert!(analyze("DEALLOCATE p1").taints);
}

#[test]
fn session_characteristics_become_default_transaction_settings() {
    assert_eq!(
        analyze("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY").effects,
        vec![set("default_transaction_read_only", "on")]
    );
    assert_eq!(
        analyze("set session characteristics as transaction isolation level repeatable read, read write, not deferrable;").effects,
        vec![
            set("default_transaction_isolation", "'repeatable read'"),
            set("default_transaction_read_only", "off"),
            set("default_transaction_deferrable", "off"),
        ]
    );
    let odd = analyze("SET SESSION CHARACTERISTICS AS TRANSACTION SNAPSHOT x");
    assert!(odd.taints && odd.effects.is_empty());
}

#[test]
fn listen_and_held_cursors_are_tracked() {
    let listen = analyze("LISTEN Jobs");
    assert!(listen.taints);
    assert_eq!(
        listen.effects,
        vec![SessionEffect::Listen {
            channel: "jobs".into()
        }]
    );
    assert_eq!(
        analyze("UNLISTEN \"Jobs\"").effects,
        vec![SessionEffect::Unlisten {
            channel: Some("Jobs".into())
        }]
    );
    assert_eq!(
        analyze("UNLISTEN *").effects,
        vec![SessionEffect::Unlisten { channel: None }]
    );
    assert_eq!(
        analyze("DECLARE c1 CURSOR WITH HOLD FOR SELECT 1").effects,
        vec![SessionEffect::HoldCursor { name: "c1".into() }]
    );
    assert!(analyze("DECLARE c1 CURSOR FOR SELECT 1").is_empty());
    assert_eq!(
        analyze("close C1;").effects,
        vec![SessionEffect::CloseCursor {
            name: Some("c1".into())
        }]
    );
    assert_eq!(
        analyze("CLOSE ALL").effects,
        vec![SessionEffect::CloseCursor { name: None }]
    );
}
