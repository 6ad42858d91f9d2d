//! Fencing by timeline and system identity: which nodes of a shard answer as a primary
//! but must not be treated as one. Part of the monitor's round (monitor.rs): the verdicts
//! become `Exclusion::Fenced` in the published snapshot, and the failover supervisor
//! (app/failover/fence.rs) keeps writes away from such a node.
//!
//! `pg_is_in_recovery() = false` alone proves nothing after a promotion: an old primary
//! that comes back from a crash or a partition says the same. What tells them apart is
//! the timeline (a promotion starts a new one, and timelines only grow within one
//! database system) and the system identifier (shared by a primary and its physical
//! replicas). The rules, per round:
//! - a node whose system identifier differs from the shard's (the map's primary's, or
//!   the last one it showed) is fenced, replica or not;
//! - a node answering as a primary on a timeline older than the newest one seen in the
//!   shard (this round, by any node, or earlier in this monitor's life) is fenced; a
//!   replica's timeline counts as a lower bound (its last restart point or the timeline
//!   it receives), so a replica following a newer primary fences a stale one too;
//! - a replica of the map answering as a primary on the newest timeline is fenced when
//!   the map's primary also answers as a live primary (the map wins a tie). When the
//!   map's primary is down or itself fenced, it is not: it may be a promotion the map
//!   has not recorded yet, which failover adopts instead of promoting a second node.

use super::Sample;

/// What the fence remembers between rounds (reset when the shard's system changes).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FenceMemory {
    /// The shard's system identifier: the map primary's when it answers.
    pub system: Option<i64>,
    /// The newest timeline any node of that system has shown.
    pub newest_timeline: Option<u32>,
}

/// Per node (map order, index 0 the map's primary): why it is fenced, or None.
pub fn verdicts(
    samples: &[Result<Sample, String>],
    memory: &mut FenceMemory,
) -> Vec<Option<String>> {
    let ok = |i: usize| samples.get(i).and_then(|s| s.as_ref().ok());
    if let Some(system) = ok(0).and_then(|s| s.system) {
        if memory.system != Some(system) {
            // Another system at the primary's address (rebuilt from scratch): what we
            // knew of the old one's timelines says nothing about it.
            *memory = FenceMemory {
                system: Some(system),
                newest_timeline: None,
            };
        }
    }
    let same_system = |s: &Sample| match (s.system, memory.system) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    let newest = samples
        .iter()
        .filter_map(|s| s.as_ref().ok())
        .filter(|s| same_system(s))
        .filter_map(|s| s.timeline)
        .chain(memory.newest_timeline)
        .max();
    memory.newest_timeline = newest;
    let mut out: Vec<Option<String>> = vec![None; samples.len()];
    for (i, verdict) in out.iter_mut().enumerate() {
        let Some(s) = ok(i) else { continue };
        if !same_system(s) {
            *verdict = Some(format!(
                "another database system (system identifier {}, the shard's is {})",
                s.system.unwrap_or_default(),
                memory.system.unwrap_or_default()
            ));
        } else if !s.in_recovery {
            *verdict = stale(s, newest);
        }
    }
    // A second primary on the newest timeline while the map's own primary is live.
    let map_primary_live = ok(0).is_some_and(|s| !s.in_recovery) && out[0].is_none();
    if map_primary_live {
        for (i, verdict) in out.iter_mut().enumerate().skip(1) {
            if verdict.is_none() && ok(i).is_some_and(|s| !s.in_recovery) {
                *verdict = Some("answers as a primary, but the map names another one".into());
            }
        }
    }
    out
}

/// A primary on a timeline older than the shard's newest.
fn stale(s: &Sample, newest: Option<u32>) -> Option<String> {
    match (s.timeline, newest) {
        (Some(own), Some(newest)) if own < newest => Some(format!(
            "answers as a primary on timeline {own}, but the shard is on timeline {newest}"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(in_recovery: bool, timeline: u32, system: i64) -> Result<Sample, String> {
        Ok(Sample {
            in_recovery,
            lsn: 1,
            received: None,
            timeline: Some(timeline),
            system: Some(system),
            sent: std::time::Instant::now(),
        })
    }

    fn fenced(v: &[Option<String>]) -> Vec<bool> {
        v.iter().map(Option::is_some).collect()
    }

    #[test]
    fn a_healthy_shard_has_no_fenced_node() {
        let mut m = FenceMemory::default();
        let v = verdicts(&[node(false, 1, 7), node(true, 1, 7)], &mut m);
        assert_eq!(fenced(&v), [false, false]);
        assert_eq!(m.newest_timeline, Some(1));
    }

    #[test]
    fn an_old_primary_listed_as_a_replica_is_fenced_by_its_timeline() {
        let mut m = FenceMemory::default();
        let v = verdicts(
            &[node(false, 2, 7), node(true, 2, 7), node(false, 1, 7)],
            &mut m,
        );
        assert_eq!(fenced(&v), [false, false, true]);
        assert!(v[2].as_deref().unwrap().contains("timeline 1"));
    }

    #[test]
    fn a_map_primary_on_an_older_timeline_is_fenced_and_the_newer_one_is_not() {
        // A stale map: it still names the old primary; the promoted node is a "replica".
        let mut m = FenceMemory::default();
        let v = verdicts(
            &[node(false, 1, 7), node(false, 2, 7), node(true, 2, 7)],
            &mut m,
        );
        assert_eq!(fenced(&v), [true, false, false]);
        // Replicas following the newer primary are enough to tell, even when it is not
        // in the map at all.
        let mut m = FenceMemory::default();
        let v = verdicts(&[node(false, 1, 7), node(true, 2, 7)], &mut m);
        assert_eq!(fenced(&v), [true, false]);
    }

    #[test]
    fn the_newest_timeline_is_remembered_while_the_new_primary_is_down() {
        let mut m = FenceMemory::default();
        verdicts(&[node(false, 2, 7), node(true, 2, 7)], &mut m);
        let v = verdicts(
            &[Err("down".into()), node(true, 2, 7), node(false, 1, 7)],
            &mut m,
        );
        assert_eq!(fenced(&v), [false, false, true]);
    }

    #[test]
    fn a_second_primary_on_the_same_timeline_loses_to_the_map() {
        let mut m = FenceMemory::default();
        let v = verdicts(&[node(false, 2, 7), node(false, 2, 7)], &mut m);
        assert_eq!(fenced(&v), [false, true]);
        // With the map's primary down it may be an unrecorded promotion: not fenced.
        let v = verdicts(&[Err("down".into()), node(false, 3, 7)], &mut m);
        assert_eq!(fenced(&v), [false, false]);
    }

    #[test]
    fn a_node_of_another_system_is_fenced() {
        let mut m = FenceMemory::default();
        let v = verdicts(&[node(false, 1, 7), node(true, 5, 8)], &mut m);
        assert_eq!(fenced(&v), [false, true]);
        // Its timeline does not count against the shard's own nodes.
        assert_eq!(m.newest_timeline, Some(1));
        // A primary rebuilt from scratch starts the shard's memory over.
        let v = verdicts(&[node(false, 1, 9)], &mut m);
        assert_eq!(fenced(&v), [false]);
        assert_eq!(
            m,
            FenceMemory {
                system: Some(9),
                newest_timeline: Some(1)
            }
        );
    }

    #[test]
    fn unknown_timelines_fence_nothing_by_timeline() {
        let mut m = FenceMemory::default();
        let mut old = node(false, 1, 7).unwrap();
        old.timeline = None;
        let v = verdicts(&[node(false, 2, 7), Ok(old)], &mut m);
        // Still a second primary while the map's is live.
        assert_eq!(fenced(&v), [false, true]);
        let v = verdicts(&[Ok(old)], &mut m);
        assert_eq!(fenced(&v), [false]);
    }
}
