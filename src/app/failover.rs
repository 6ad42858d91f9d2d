//! Replica promotion, manual (`Failover::promote`, the console's PROMOTE) and
//! automatic (`failover.auto`: the shard's primary unreachable for `failover.after`).
//! Each shard fails over on its own; the others keep serving.
//!
//! 1. Guard: never while the old primary is reachable and writable (automatic), never
//!    twice at once for one shard. A manual switchover first makes the old primary
//!    read-only and waits until the candidate has everything it wrote.
//! 2. Choose: the replica with the highest received (then replayed) WAL position; with
//!    synchronous replication that is a standby holding every acknowledged commit.
//! 3. Promote: `pg_promote(true, 60)`, confirmed with `pg_is_in_recovery()`.
//! 4. Fence and persist: the shard map is written back with the new primary and
//!    without the old one (version + 1, backup kept, atomic rename) and published like
//!    a reload, so held writes resume at once. The old primary is in no map the proxy
//!    routes by, so it never receives writes through the proxy again, whatever it
//!    believes when it comes back; it is listed in `Frontend::fenced`.
//! 5. Re-point: the other replicas get the new primary in `primary_conninfo`
//!    (`ALTER SYSTEM` + `pg_reload_conf()`; they follow the new timeline), and we wait
//!    until they stream from it.
//! 6. Keep fencing (failover/fence.rs): the monitor fences by timeline and system
//!    identifier, not by `pg_is_in_recovery()` alone (control/monitor/fence.rs). A
//!    fenced node that answers as a primary is made read-only on the server; a map whose
//!    primary is fenced while one of its replicas is the newer primary (a stale map, a
//!    promotion the map did not record) gets that replica adopted as the primary without
//!    promoting anything; old primaries outside the map are checked the same way.
//!
//! While a shard has no primary, sessions hold its writes for `failover.buffer` and
//! then fail them with 57P03 (session/mod.rs); reads keep going to replicas.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::monitor_nodes;
use super::reload::Reloader;
use crate::config::Config;
use crate::control::monitor::MonitorNode;
use crate::frontend::Frontend;
use crate::shard_map::{NodeAddr, ShardMap};
use crate::topology::{Exclusion, Freshness};

mod fence;
mod server;

use server::{choose, connect, quiesce, repoint, run, scalar, wait_replayed, writable};

/// How long the other replicas get to stream from the new primary before we report
/// them as not following (the promotion stands).
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    #[error("no shard {0:?}")]
    NoShard(String),
    #[error("shard {0}: a promotion is already running")]
    Busy(String),
    #[error("shard {0}: the primary {1} is reachable and writable; not promoting (split brain)")]
    PrimaryAlive(String, String),
    #[error("shard {0}: no replica can be promoted ({1})")]
    NoCandidate(String, String),
    #[error("shard {shard}: promoting {node} failed: {reason}")]
    Promote {
        shard: String,
        node: String,
        reason: String,
    },
    #[error("shard {0}: writing the shard map failed: {1}")]
    Persist(String, String),
}

/// What a promotion did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promotion {
    pub shard: String,
    pub old_primary: String,
    pub new_primary: String,
    /// Replicas now streaming from the new primary.
    pub following: Vec<String>,
    /// Replicas that did not confirm within the timeout (re-point them by hand).
    pub not_following: Vec<String>,
    pub map_version: u64,
}

pub struct Failover {
    fe: Arc<Frontend>,
    config: Config,
    reloader: Arc<Reloader>,
    /// Shards with a promotion running: one per outage.
    running: Mutex<HashSet<String>>,
}

impl Failover {
    pub(super) fn new(fe: Arc<Frontend>, config: Config, reloader: Arc<Reloader>) -> Failover {
        Failover {
            fe,
            config,
            reloader,
            running: Mutex::new(HashSet::new()),
        }
    }

    /// Promotes a replica of `shard` (`node`: that one, as `host:port`; otherwise the
    /// most advanced). Automatic failovers pass `manual = false`.
    pub async fn promote(
        &self,
        shard: &str,
        node: Option<&str>,
        manual: bool,
    ) -> Result<Promotion, FailoverError> {
        {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            if !running.insert(shard.to_owned()) {
                return Err(FailoverError::Busy(shard.to_owned()));
            }
        }
        self.fe
            .failovers_running
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let result = self.promote_inner(shard, node, manual).await;
        self.fe
            .failovers_running
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(shard);
        match &result {
            Ok(p) => {
                tracing::warn!(shard, old = %p.old_primary, new = %p.new_primary, version = p.map_version, "failover done")
            }
            Err(error) => tracing::error!(%error, shard, "failover failed"),
        }
        result
    }

    async fn promote_inner(
        &self,
        shard: &str,
        node: Option<&str>,
        manual: bool,
    ) -> Result<Promotion, FailoverError> {
        let topology = self.fe.topology.load_full();
        let map = topology.map.clone();
        let spec = map
            .shards
            .get(shard)
            .ok_or_else(|| FailoverError::NoShard(shard.to_owned()))?;
        let nodes = monitor_nodes(&self.config, &map, spec);
        let old = &nodes[0];
        let timeout = self.config.pool.connect_timeout;
        let fresh = topology
            .shards
            .iter()
            .find(|s| s.name == shard)
            .map(|s| s.fresh.load_full());
        // A fenced old primary may answer as a writable primary: it is no primary.
        let old_fenced = fresh.as_deref().is_some_and(|f| is_fenced(f, 0));
        let alive = match old_fenced {
            true => None,
            false => writable(old, timeout).await,
        };
        if let Some(primary) = alive {
            if !manual {
                return Err(FailoverError::PrimaryAlive(shard.to_owned(), addr(old)));
            }
            // A switchover: nothing new may commit on the old primary from here on.
            let candidates = &nodes[1..];
            let target = quiesce(&primary)
                .await
                .map_err(|reason| FailoverError::Promote {
                    shard: shard.to_owned(),
                    node: addr(old),
                    reason,
                })?;
            let _ = wait_replayed(candidates, target, timeout).await;
        }
        // A replica already promoted (by a run of ours that could not record it, or by
        // hand) and not fenced is adopted: promoting another would make two primaries.
        let adopted = fresh
            .as_deref()
            .and_then(|f| promoted_replica(f, &nodes, node));
        let (index, candidate) = match adopted {
            Some(index) => {
                let client = writable(&nodes[1 + index], timeout).await.ok_or_else(|| {
                    FailoverError::NoCandidate(
                        shard.to_owned(),
                        format!(
                            "{} is no longer a reachable primary",
                            addr(&nodes[1 + index])
                        ),
                    )
                })?;
                tracing::warn!(shard, node = %addr(&nodes[1 + index]), "adopting a replica that is already a primary");
                (index, client)
            }
            None => choose(&nodes[1..], node, timeout)
                .await
                .map_err(|why| FailoverError::NoCandidate(shard.to_owned(), why))?,
        };
        let promote_error = |reason: String| FailoverError::Promote {
            shard: shard.to_owned(),
            node: addr(&nodes[1 + index]),
            reason,
        };
        if adopted.is_none() {
            run(&candidate, "SELECT pg_promote(true, 60)")
                .await
                .map_err(&promote_error)?;
        }
        if scalar(&candidate, "SELECT pg_is_in_recovery()::text")
            .await
            .as_deref()
            != Some("false")
        {
            return Err(promote_error("still in recovery after pg_promote".into()));
        }
        // A node fenced or switched over earlier was made read-only with ALTER SYSTEM, and
        // a replica rebuilt from it may carry that: the new primary must take writes.
        // (Two statements: ALTER SYSTEM cannot run in a multi-statement batch.)
        for sql in [
            "ALTER SYSTEM RESET default_transaction_read_only",
            "SELECT pg_reload_conf()",
        ] {
            run(&candidate, sql).await.map_err(&promote_error)?;
        }
        let new_primary = &nodes[1 + index];
        let others: Vec<&MonitorNode> = nodes[1..]
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .map(|(_, n)| n)
            .collect();
        // The map first: writes held for this shard resume on the new primary while the
        // other replicas are re-pointed (up to FOLLOW_TIMEOUT each).
        let version = self.persist(&map, shard, index).await?;
        let (following, not_following) = repoint(&others, new_primary, timeout).await;
        Ok(Promotion {
            shard: shard.to_owned(),
            old_primary: addr(old),
            new_primary: addr(new_primary),
            following,
            not_following,
            map_version: version,
        })
    }

    /// Writes the map with the promoted replica as primary (the old primary fenced:
    /// left out), then publishes it.
    async fn persist(
        &self,
        map: &ShardMap,
        shard: &str,
        index: usize,
    ) -> Result<u64, FailoverError> {
        let mut next = map.clone();
        next.version = map.version + 1;
        let persist_error = |e: String| FailoverError::Persist(shard.to_owned(), e);
        let spec = next
            .shards
            .get_mut(shard)
            .ok_or_else(|| FailoverError::NoShard(shard.to_owned()))?;
        let promoted: NodeAddr = spec.replicas.remove(index);
        let old = std::mem::replace(&mut spec.primary, promoted);
        self.fe
            .fenced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((shard.to_owned(), old.endpoint()));
        let path = self.config.shard_map.clone();
        let version = map.version;
        let written = tokio::task::spawn_blocking(move || next.write_file(&path, version))
            .await
            .map_err(|e| persist_error(e.to_string()))?;
        written.map_err(|e| persist_error(e.to_string()))?;
        match self.reloader.reload().await {
            Ok(_) => Ok(map.version + 1),
            Err(error) => Err(persist_error(error.to_string())),
        }
    }
}

/// The console's `PROMOTE <shard> [<node>]`.
pub(super) struct ConsolePromoter(pub Arc<Failover>);

impl crate::admin::Promoter for ConsolePromoter {
    fn promote<'a>(
        &'a self,
        shard: &'a str,
        node: Option<&'a str>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send + 'a>>
    {
        Box::pin(async move {
            match self.0.promote(shard, node, true).await {
                Ok(p) => Ok(format!(
                    "promoted {} on shard {} (was {}); map version {}; following: {}; not following: {}",
                    p.new_primary,
                    p.shard,
                    p.old_primary,
                    p.map_version,
                    p.following.join(" "),
                    p.not_following.join(" ")
                )),
                Err(error) => Err(error.to_string()),
            }
        })
    }
}

/// Keeps fenced nodes away from writes (always, fence.rs) and, with `failover.auto`,
/// promotes: a shard whose primary the monitor has seen down for `failover.after` gets
/// a promotion (one at a time per shard).
pub(super) fn spawn_supervisor(
    failover: Arc<Failover>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let fencer = tokio::spawn(fence::run_fencer(failover.clone(), stop.clone()));
        let after = failover.config.failover.after;
        let mut down_since: HashMap<String, Instant> = HashMap::new();
        let mut tick = tokio::time::interval(failover.config.routing.lag_check_interval);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    fencer.abort();
                    return;
                }
            }
            if !failover.config.failover.auto {
                continue;
            }
            let topology = failover.fe.topology.load_full();
            for shard in &topology.shards {
                let fresh = shard.fresh.load();
                let primary_up = fresh.nodes.first().is_none_or(|n| n.healthy);
                if primary_up || fresh.generation == 0 {
                    down_since.remove(&shard.name);
                    continue;
                }
                let since = *down_since
                    .entry(shard.name.clone())
                    .or_insert_with(Instant::now);
                if since.elapsed() < after || shard.nodes.len() < 2 {
                    continue;
                }
                down_since.remove(&shard.name);
                let failover = failover.clone();
                let name = shard.name.clone();
                tokio::spawn(async move {
                    let _ = failover.promote(&name, None, false).await;
                });
            }
        }
    })
}

fn addr(node: &MonitorNode) -> String {
    format!("{}:{}", node.host, node.port)
}

/// The monitor fenced node `i` (control/monitor/fence.rs).
fn is_fenced(fresh: &Freshness, i: usize) -> bool {
    fresh
        .nodes
        .get(i)
        .is_some_and(|n| matches!(n.excluded, Some(Exclusion::Fenced(_))))
}

/// A replica of the map (index into the replicas) that the monitor saw answer as an
/// unfenced primary: a promotion the map does not record yet. `wanted` (host:port)
/// restricts it to that node.
fn promoted_replica(
    fresh: &Freshness,
    nodes: &[MonitorNode],
    wanted: Option<&str>,
) -> Option<usize> {
    (1..nodes.len().min(fresh.nodes.len()))
        .find(|&i| {
            let n = &fresh.nodes[i];
            n.healthy
                && !n.in_recovery
                && !is_fenced(fresh, i)
                && wanted.is_none_or(|w| w == addr(&nodes[i]))
        })
        .map(|i| i - 1)
}
