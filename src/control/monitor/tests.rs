use super::*;
use std::time::Instant;

fn settings() -> MonitorSettings {
    MonitorSettings {
        interval: Duration::from_millis(100),
        max_lag: Duration::from_secs(1),
        max_lag_bytes: 1000,
        connect_timeout: Duration::from_secs(1),
    }
}

fn nodes() -> Vec<MonitorNode> {
    (0..2)
        .map(|i| MonitorNode {
            host: "127.0.0.1".into(),
            port: 5432 + i,
            user: "u".into(),
            password: None,
            database: "d".into(),
        })
        .collect()
}

fn primary(lsn: u64) -> Result<Sample, String> {
    Ok(Sample {
        in_recovery: false,
        lsn,
        received: None,
        timeline: Some(1),
        system: Some(1),
        sent: std::time::Instant::now(),
    })
}

/// A primary probe sent at `at`.
fn probe(at: Instant, lsn: u64) -> Sample {
    Sample {
        in_recovery: false,
        lsn,
        received: None,
        timeline: Some(1),
        system: Some(1),
        sent: at,
    }
}

fn replica(lsn: u64, received: u64) -> Result<Sample, String> {
    Ok(Sample {
        in_recovery: true,
        lsn,
        received: Some(received),
        timeline: Some(1),
        system: Some(1),
        sent: std::time::Instant::now(),
    })
}

#[test]
fn before_any_probe_only_the_primary_serves() {
    let f = initial_freshness(&nodes());
    assert!(f.nodes[0].excluded.is_none());
    assert_eq!(f.nodes[1].excluded, Some(Exclusion::Unknown));
    assert_eq!(f.eligible_replicas().count(), 0);
}

#[test]
fn time_lag_counts_from_when_the_primary_passed_the_replay_position() {
    let t0 = Instant::now();
    let mut h = PrimaryHistory::default();
    h.observe(&probe(t0, 100), Duration::from_secs(10));
    h.observe(
        &probe(t0 + Duration::from_secs(1), 200),
        Duration::from_secs(10),
    );
    h.observe(
        &probe(t0 + Duration::from_secs(2), 200),
        Duration::from_secs(10),
    );
    let now = t0 + Duration::from_secs(3);
    assert_eq!(h.lag(now, 200), Duration::ZERO);
    assert_eq!(h.lag(now, 150), Duration::from_secs(2));
    assert_eq!(h.lag(now, 50), Duration::from_secs(3));
}

#[test]
fn an_idle_caught_up_replica_has_no_lag_however_old_its_last_replay() {
    let t0 = Instant::now();
    let mut h = PrimaryHistory::default();
    h.observe(&probe(t0, 500), Duration::from_secs(2));
    let now = t0 + Duration::from_secs(3600);
    let prev = initial_freshness(&nodes());
    let next = assess(
        &prev,
        &[primary(500), replica(500, 500)],
        &h,
        &settings(),
        now,
    );
    assert_eq!(next.nodes[1].lag_millis, 0);
    assert_eq!(next.nodes[1].lag_bytes, 0);
    assert!(next.nodes[1].excluded.is_none());
    assert_eq!(next.generation, 1);
}

#[test]
fn a_replica_excluded_for_lag_returns_only_well_under_the_limit() {
    let t0 = Instant::now();
    let mut h = PrimaryHistory::default();
    let s = settings();
    h.observe(&probe(t0, 100), Duration::from_secs(10));
    h.observe(
        &probe(t0 + Duration::from_millis(100), 5000),
        Duration::from_secs(10),
    );
    let now = t0 + Duration::from_millis(200);
    let prev = initial_freshness(&nodes());
    // 4900 bytes behind: over the 1000-byte limit.
    let f1 = assess(&prev, &[primary(5000), replica(100, 5000)], &h, &s, now);
    assert!(matches!(
        f1.nodes[1].excluded,
        Some(Exclusion::Lagging { bytes: 4900, .. })
    ));
    // 700 behind: under the limit but not under half of it: still out.
    let f2 = assess(&f1, &[primary(5000), replica(4300, 5000)], &h, &s, now);
    assert!(matches!(
        f2.nodes[1].excluded,
        Some(Exclusion::Lagging { .. })
    ));
    // 400 behind: comfortably under, back in.
    let f3 = assess(&f2, &[primary(5000), replica(4600, 5000)], &h, &s, now);
    assert!(f3.nodes[1].excluded.is_none());
    // And a replica that was never excluded may go up to the limit itself.
    let f4 = assess(&f3, &[primary(5000), replica(4100, 5000)], &h, &s, now);
    assert!(f4.nodes[1].excluded.is_none());
}

#[test]
fn paused_replay_is_lag_in_time() {
    let t0 = Instant::now();
    let mut h = PrimaryHistory::default();
    h.observe(&probe(t0, 100), Duration::from_secs(10));
    h.observe(
        &probe(t0 + Duration::from_millis(50), 110),
        Duration::from_secs(10),
    );
    let now = t0 + Duration::from_millis(1500);
    let prev = initial_freshness(&nodes());
    // Only 10 bytes behind, but received WAL has waited 1.45 s to be replayed.
    let f = assess(
        &prev,
        &[primary(110), replica(100, 110)],
        &h,
        &settings(),
        now,
    );
    assert_eq!(f.nodes[1].lag_millis, 1450);
    assert!(matches!(
        f.nodes[1].excluded,
        Some(Exclusion::Lagging { .. })
    ));
}

#[test]
fn failed_probes_and_promoted_replicas_are_excluded() {
    let h = PrimaryHistory::default();
    let prev = initial_freshness(&nodes());
    let now = Instant::now();
    let f = assess(
        &prev,
        &[primary(1), Err("connect: refused".into())],
        &h,
        &settings(),
        now,
    );
    assert!(!f.nodes[1].healthy);
    assert_eq!(
        f.nodes[1].excluded,
        Some(Exclusion::Down("connect: refused".into()))
    );
    let f = assess(&f, &[primary(1), primary(1)], &h, &settings(), now);
    assert_eq!(f.nodes[1].excluded, Some(Exclusion::NotReplica));
    // The primary is never excluded from writes by the monitor.
    let f = assess(
        &f,
        &[Err("down".into()), replica(1, 1)],
        &h,
        &settings(),
        now,
    );
    assert!(f.nodes[0].excluded.is_none() && !f.nodes[0].healthy);
}

#[test]
fn primary_probes_are_published_as_marks_for_read_your_writes() {
    let mut h = PrimaryHistory::default();
    let before = Instant::now();
    let retain = Duration::from_millis(1);
    let mut f = initial_freshness(&nodes());
    for lsn in 0..(MAX_MARKS as u64 + 10) {
        h.observe(&probe(Instant::now(), lsn), retain);
        f = assess(
            &f,
            &[primary(lsn), replica(0, 0)],
            &h,
            &settings(),
            Instant::now(),
        );
    }
    assert_eq!(f.primary_marks.len(), MAX_MARKS);
    assert_eq!(
        f.primary_marks.last().map(|m| m.1),
        Some(MAX_MARKS as u64 + 9)
    );
    // A write before every retained probe is bounded by the oldest one.
    assert_eq!(f.position_after(before), Some(10));
    // A write after the last probe has no bound yet.
    assert_eq!(f.position_after(Instant::now()), None);
    // A probe of a node in recovery is not a primary position.
    let marks = f.primary_marks.clone();
    h.observe(&replica(1 << 40, 1 << 40).unwrap(), retain);
    assert_eq!(h.recent(MAX_MARKS), marks);
}

#[test]
fn a_primary_whose_position_goes_back_starts_the_history_over() {
    let t0 = Instant::now();
    let mut h = PrimaryHistory::default();
    let retain = Duration::from_secs(10);
    h.observe(&probe(t0, 1000), retain);
    h.observe(&probe(t0 + Duration::from_secs(1), 10), retain);
    assert_eq!(h.recent(10), vec![(t0 + Duration::from_secs(1), 10)]);
}
