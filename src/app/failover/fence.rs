//! Keeping fenced nodes away from writes, on the control path. The monitor decides who
//! is fenced (control/monitor/fence.rs: timeline and system identifier, not
//! `pg_is_in_recovery()` alone) and publishes it; this task acts on it every
//! `lag_check_interval`, with or without `failover.auto`:
//! - a fenced node of the map that answers as a primary is made read-only on the server
//!   (`ALTER SYSTEM SET default_transaction_read_only = on`, reload, and its client
//!   sessions ended so none keeps writing). It survives restarts of the node and of the
//!   proxy; a promotion by the proxy resets it on the node it promotes;
//! - when the fenced node is the map's primary and one of the map's replicas is the
//!   newer, unfenced primary, that replica is adopted as the shard's primary
//!   (`failover.auto` only): the map is written and published as after a promotion, so
//!   the data path's writes go to it;
//! - old primaries a promotion took out of the map (`Frontend::fenced`) are checked
//!   every `RECHECK` and made read-only when they come back as primaries (a crash
//!   restart, or the end of a partition).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{connect, is_fenced, run, scalar, Failover, FailoverError};
use crate::control::monitor::MonitorNode;

/// How often a fenced node already made read-only is checked again.
const RECHECK: Duration = Duration::from_secs(5);

pub(super) async fn run_fencer(failover: Arc<Failover>, mut stop: watch::Receiver<bool>) {
    let mut checked: HashMap<String, Instant> = HashMap::new();
    let mut adoptions: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(failover.config.routing.lag_check_interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
        for node in fenced_primaries(&failover, &mut checked) {
            make_read_only(&node, failover.config.pool.connect_timeout).await;
        }
        if failover.config.failover.auto {
            adopt_newer_primaries(&failover, &mut adoptions);
        }
    }
}

/// Nodes to make read-only now: fenced nodes of the map the monitor saw answer as a
/// primary, and old primaries outside the map, each at most every `RECHECK`.
fn fenced_primaries(
    failover: &Failover,
    checked: &mut HashMap<String, Instant>,
) -> Vec<MonitorNode> {
    let topology = failover.fe.topology.load_full();
    let map = &topology.map;
    let mut due = Vec::new();
    let mut in_map = Vec::new();
    for shard in &topology.shards {
        let Some(spec) = map.shards.get(&shard.name) else {
            continue;
        };
        let fresh = shard.fresh.load();
        for (i, node) in super::monitor_nodes(&failover.config, map, spec)
            .into_iter()
            .enumerate()
        {
            in_map.push(super::addr(&node));
            let answers_as_primary = fresh
                .nodes
                .get(i)
                .is_some_and(|n| n.healthy && !n.in_recovery);
            if answers_as_primary && is_fenced(&fresh, i) {
                due.push(node);
            }
        }
    }
    let outside = failover
        .fe
        .fenced
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for (_, address) in outside {
        if in_map.contains(&address) {
            continue;
        }
        if let Some(node) = outside_node(failover, &map.database, &address) {
            due.push(node);
        }
    }
    let now = Instant::now();
    due.retain(|n| {
        let key = super::addr(n);
        let recent = checked.get(&key).is_some_and(|t| now < *t + RECHECK);
        if !recent {
            checked.insert(key, now);
        }
        !recent
    });
    due
}

/// How to reach an old primary that is no longer in the map: the control user.
fn outside_node(failover: &Failover, database: &str, address: &str) -> Option<MonitorNode> {
    let (host, port) = address.rsplit_once(':')?;
    let config = &failover.config;
    Some(MonitorNode {
        host: host.to_owned(),
        port: port.parse().ok()?,
        user: config.control.user.clone(),
        password: config
            .user(&config.control.user)
            .map(|u| u.password.clone()),
        database: database.to_owned(),
    })
}

/// Makes a node that answers as a primary refuse writes, unless it already does.
async fn make_read_only(node: &MonitorNode, timeout: Duration) {
    let Some(client) = connect(node, timeout).await else {
        return;
    };
    let state = scalar(
        &client,
        "SELECT pg_is_in_recovery()::text || ' ' || current_setting('default_transaction_read_only')",
    )
    .await;
    if state.as_deref() != Some("false off") {
        return;
    }
    let fenced = async {
        run(
            &client,
            "ALTER SYSTEM SET default_transaction_read_only = on",
        )
        .await?;
        run(&client, "SELECT pg_reload_conf()").await?;
        // Sessions opened before the reload keep their own default: end them.
        run(
            &client,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
        )
        .await
    }
    .await;
    match fenced {
        Ok(()) => {
            tracing::error!(node = %super::addr(node), "fenced node answered as a primary: made it read-only")
        }
        Err(error) => {
            tracing::error!(node = %super::addr(node), %error, "fenced node answers as a primary and could not be made read-only")
        }
    }
}

/// With `failover.auto`: a shard whose map primary is fenced while one of its replicas
/// answers as an unfenced primary gets that replica as its primary (a promotion that
/// finds it adopts it instead of promoting).
/// One attempt per shard every `RECHECK`.
fn adopt_newer_primaries(failover: &Arc<Failover>, attempts: &mut HashMap<String, Instant>) {
    let topology = failover.fe.topology.load_full();
    let now = Instant::now();
    for shard in &topology.shards {
        let fresh = shard.fresh.load();
        let newer = (1..fresh.nodes.len()).any(|i| {
            let n = &fresh.nodes[i];
            n.healthy && !n.in_recovery && !is_fenced(&fresh, i)
        });
        let recent = attempts
            .get(&shard.name)
            .is_some_and(|t| now < *t + RECHECK);
        if !is_fenced(&fresh, 0) || !newer || recent {
            continue;
        }
        attempts.insert(shard.name.clone(), now);
        let failover = failover.clone();
        let name = shard.name.clone();
        tokio::spawn(async move {
            match failover.promote(&name, None, false).await {
                // Another promotion of this shard is running: it will adopt the node.
                Ok(_) | Err(FailoverError::Busy(_)) => {}
                Err(error) => {
                    tracing::warn!(%error, shard = %name, "adopting the newer primary failed")
                }
            }
        });
    }
}
