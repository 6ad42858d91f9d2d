//! The routing decision as a pure function: which node of the shard runs the next
//! transaction (or autocommit statement). Everything it needs is an argument, so it is
//! tested without sockets; the session calls it once per server-connection loan.

use super::analyze::{Analyzed, StatementClass, TargetHint, TargetMode};
use std::time::Instant;

use crate::topology::Freshness;

/// Node index 0 is always the shard's primary.
pub const PRIMARY: usize = 0;

/// The per-session inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionRoute {
    /// `SET shardgate.target`.
    pub mode: TargetMode,
    /// Read-your-writes: when this session's last writing transaction had ended on
    /// the primary (None when it never wrote). Replicas must have replayed a primary
    /// position observed after that instant (`Freshness::position_after`).
    pub wrote_at: Option<Instant>,
}

impl Default for SessionRoute {
    fn default() -> Self {
        SessionRoute {
            mode: TargetMode::Auto,
            wrote_at: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum RouteReason {
    /// The statement writes or needs the primary (DESIGN 5.1).
    Write,
    /// A `/* shardgate: primary */` comment.
    HintPrimary,
    /// `SET shardgate.target = 'primary'`.
    SessionPrimary,
    /// A read served by a fresh replica.
    Replica,
    /// A read, but the shard has no replicas.
    NoReplicas,
    /// A read, but no replica is healthy and within the lag limits.
    NoFreshReplica,
    /// A read, but no eligible replica has replayed this session's last write yet.
    NotCaughtUp,
}

impl RouteReason {
    pub const ALL: [RouteReason; 7] = [
        RouteReason::Write,
        RouteReason::HintPrimary,
        RouteReason::SessionPrimary,
        RouteReason::Replica,
        RouteReason::NoReplicas,
        RouteReason::NoFreshReplica,
        RouteReason::NotCaughtUp,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RouteReason::Write => "write",
            RouteReason::HintPrimary => "hint primary",
            RouteReason::SessionPrimary => "session target primary",
            RouteReason::Replica => "replica",
            RouteReason::NoReplicas => "no replicas",
            RouteReason::NoFreshReplica => "no fresh replica",
            RouteReason::NotCaughtUp => "no replica has this session's last write",
        }
    }
}

/// How many routing decisions ended for each reason, since start: why reads went to
/// the primary is kept here for the admin console and metrics. Relaxed atomics: the
/// counts are statistics, not synchronisation.
#[derive(Debug, Default)]
pub struct RouteStats {
    counts: [std::sync::atomic::AtomicU64; RouteReason::ALL.len()],
}

impl RouteStats {
    pub fn record(&self, reason: RouteReason) {
        self.counts[reason as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn count(&self, reason: RouteReason) -> u64 {
        self.counts[reason as usize].load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub node: usize,
    pub reason: RouteReason,
}

impl Route {
    fn primary(reason: RouteReason) -> Route {
        Route {
            node: PRIMARY,
            reason,
        }
    }
}

/// Whether a statement of this class may run on a replica.
pub fn is_read(class: StatementClass) -> bool {
    matches!(
        class,
        StatementClass::Read | StatementClass::Begin { read_only: true }
    )
}

/// Picks the node. `load[i]` is node i's outstanding server connections (least first;
/// ties rotate with `tiebreak` so sequential reads spread); `skip` is a bit mask of
/// nodes that already failed for this transaction.
pub fn route(
    analyzed: &Analyzed,
    session: &SessionRoute,
    fresh: &Freshness,
    load: &[usize],
    skip: u64,
    tiebreak: usize,
) -> Route {
    let wants_replica = match (analyzed.hint, session.mode) {
        (Some(TargetHint::Primary), _) => return Route::primary(RouteReason::HintPrimary),
        (Some(TargetHint::Replica), _) | (None, TargetMode::Replica) => true,
        (None, TargetMode::Primary) => return Route::primary(RouteReason::SessionPrimary),
        (None, TargetMode::Auto) => is_read(analyzed.class),
    };
    if !wants_replica {
        return Route::primary(RouteReason::Write);
    }
    if fresh.nodes.len() <= 1 {
        return Route::primary(RouteReason::NoReplicas);
    }
    // Not yet observed past the write: no replica can be proven to have it.
    let min_lsn = match session.wrote_at {
        None => 0,
        Some(t) => fresh.position_after(t).unwrap_or(u64::MAX),
    };
    let mut fresh_enough = false;
    let mut best: Option<(usize, usize)> = None; // (load, rotated index) -> node
    let replicas = fresh.nodes.len() - 1;
    for (node, state) in fresh.eligible_replicas() {
        if node >= 64 || skip & (1 << node) != 0 {
            continue;
        }
        fresh_enough = true;
        if state.lsn < min_lsn {
            continue;
        }
        let rotated = (node - 1 + replicas - tiebreak % replicas) % replicas;
        let key = (load.get(node).copied().unwrap_or(0), rotated);
        if best.is_none_or(|(l, r)| key < (l, r)) {
            best = Some(key);
        }
    }
    match best {
        Some((_, rotated)) => Route {
            node: (rotated + tiebreak % replicas) % replicas + 1,
            reason: RouteReason::Replica,
        },
        None if fresh_enough => Route::primary(RouteReason::NotCaughtUp),
        None => Route::primary(RouteReason::NoFreshReplica),
    }
}

#[cfg(test)]
mod tests;
