use super::*;
use crate::topology::{Exclusion, NodeFreshness};

fn node(lsn: u64, excluded: Option<Exclusion>) -> NodeFreshness {
    NodeFreshness {
        addr: "n".into(),
        healthy: !matches!(excluded, Some(Exclusion::Down(_))),
        in_recovery: true,
        lsn,
        lag_bytes: 0,
        lag_millis: 0,
        excluded,
    }
}

fn shard(replicas: Vec<NodeFreshness>) -> Freshness {
    let mut nodes = vec![node(1000, None)];
    nodes[0].in_recovery = false;
    nodes.extend(replicas);
    Freshness {
        nodes,
        generation: 1,
        primary_marks: Vec::new(),
    }
}

fn stmt(class: StatementClass, hint: Option<TargetHint>) -> Analyzed {
    Analyzed {
        class,
        hint,
        set_target: None,
        parsed: true,
    }
}

const READ: StatementClass = StatementClass::Read;

#[test]
fn writes_and_read_write_transactions_go_to_the_primary() {
    let fresh = shard(vec![node(1000, None)]);
    let s = SessionRoute::default();
    for class in [
        StatementClass::Write,
        StatementClass::Utility,
        StatementClass::TxnControl,
        StatementClass::SessionSet,
        StatementClass::Begin { read_only: false },
    ] {
        assert_eq!(
            route(&stmt(class, None), &s, &fresh, &[0, 0], 0, 0),
            Route::primary(RouteReason::Write)
        );
    }
    let ro = stmt(StatementClass::Begin { read_only: true }, None);
    assert_eq!(route(&ro, &s, &fresh, &[0, 0], 0, 0).node, 1);
}

#[test]
fn reads_spread_over_fresh_replicas_by_load_then_rotation() {
    let fresh = shard(vec![node(1000, None), node(1000, None)]);
    let s = SessionRoute::default();
    let read = stmt(READ, None);
    let picks: Vec<usize> = (0..4)
        .map(|t| route(&read, &s, &fresh, &[0, 0, 0], 0, t).node)
        .collect();
    assert!(picks.contains(&1) && picks.contains(&2), "{picks:?}");
    assert_eq!(route(&read, &s, &fresh, &[0, 5, 1], 0, 0).node, 2);
    assert_eq!(route(&read, &s, &fresh, &[0, 1, 5], 0, 1).node, 1);
}

#[test]
fn excluded_down_and_failed_replicas_are_skipped() {
    let lag = Some(Exclusion::Lagging {
        bytes: 1 << 30,
        millis: 0,
    });
    let fresh = shard(vec![node(1000, lag), node(1000, None)]);
    let read = stmt(READ, None);
    let s = SessionRoute::default();
    assert_eq!(route(&read, &s, &fresh, &[], 0, 0).node, 2);
    assert_eq!(
        route(&read, &s, &fresh, &[], 1 << 2, 0),
        Route::primary(RouteReason::NoFreshReplica)
    );
    let down = shard(vec![node(0, Some(Exclusion::Down("x".into())))]);
    assert_eq!(
        route(&read, &s, &down, &[], 0, 0),
        Route::primary(RouteReason::NoFreshReplica)
    );
    assert_eq!(
        route(&read, &s, &shard(vec![]), &[], 0, 0),
        Route::primary(RouteReason::NoReplicas)
    );
}

#[test]
fn read_your_writes_needs_a_replica_past_a_primary_position_seen_after_the_write() {
    let t0 = Instant::now();
    let ms = std::time::Duration::from_millis;
    let mut fresh = shard(vec![node(900, None), node(1200, None)]);
    // Primary probes sent at t0+10ms (position 800) and t0+20ms (position 1000).
    fresh.primary_marks = vec![(t0 + ms(10), 800), (t0 + ms(20), 1000)];
    let read = stmt(READ, None);
    // Wrote at t0+15ms: the probe at t0+20ms bounds it (1000); only node 2 has that.
    let s = SessionRoute {
        mode: TargetMode::Auto,
        wrote_at: Some(t0 + ms(15)),
    };
    for t in 0..4 {
        assert_eq!(route(&read, &s, &fresh, &[], 0, t).node, 2);
    }
    // Wrote before every probe: the oldest bounds it (800); both replicas qualify.
    let s = SessionRoute {
        mode: TargetMode::Auto,
        wrote_at: Some(t0),
    };
    let picks: Vec<usize> = (0..4)
        .map(|t| route(&read, &s, &fresh, &[], 0, t).node)
        .collect();
    assert!(picks.contains(&1) && picks.contains(&2), "{picks:?}");
    // Wrote after the last probe: nothing proves a replica has it yet.
    let s = SessionRoute {
        mode: TargetMode::Auto,
        wrote_at: Some(t0 + ms(25)),
    };
    assert_eq!(
        route(&read, &s, &fresh, &[], 0, 0),
        Route::primary(RouteReason::NotCaughtUp)
    );
    // Writes still go to the primary as writes.
    assert_eq!(
        route(&stmt(StatementClass::Write, None), &s, &fresh, &[], 0, 0),
        Route::primary(RouteReason::Write)
    );
}

#[test]
fn hints_and_session_target_override_the_class() {
    let fresh = shard(vec![node(1000, None)]);
    let auto = SessionRoute::default();
    assert_eq!(
        route(
            &stmt(READ, Some(TargetHint::Primary)),
            &auto,
            &fresh,
            &[],
            0,
            0
        ),
        Route::primary(RouteReason::HintPrimary)
    );
    assert_eq!(
        route(
            &stmt(StatementClass::Write, Some(TargetHint::Replica)),
            &auto,
            &fresh,
            &[],
            0,
            0
        )
        .node,
        1
    );
    let primary = SessionRoute {
        mode: TargetMode::Primary,
        wrote_at: None,
    };
    assert_eq!(
        route(&stmt(READ, None), &primary, &fresh, &[], 0, 0),
        Route::primary(RouteReason::SessionPrimary)
    );
    let replica = SessionRoute {
        mode: TargetMode::Replica,
        wrote_at: None,
    };
    assert_eq!(
        route(
            &stmt(StatementClass::Write, None),
            &replica,
            &fresh,
            &[],
            0,
            0
        )
        .node,
        1
    );
}
