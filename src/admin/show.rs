//! The `SHOW` tables, built from what the proxy already publishes: the topology and
//! each shard's freshness snapshot, the pools' counters, the registries. One row per
//! object; column names are part of the interface (docs/admin.md) and only grow.

use crate::admin::commands::{Show, USAGE};
use crate::admin::format_time;
use crate::admin::table::{Cell, ColumnType as T, Table};
use crate::frontend::Frontend;
use crate::routing::route::RouteReason;
use crate::topology::{BackendNode, Exclusion, NodeFreshness};

/// The result sets of one `SHOW` (only `SHOW LAG` has two).
pub fn show(fe: &Frontend, what: Show) -> Vec<Table> {
    match what {
        Show::Shards => vec![shards(fe)],
        Show::Nodes => vec![nodes(fe)],
        Show::Lag => vec![lag(fe), routes(fe)],
        Show::Pools => vec![pools(fe)],
        Show::Clients => vec![clients(fe)],
        Show::Map => vec![map(fe)],
        Show::Reshard => vec![reshard(fe)],
        Show::Help => vec![help()],
    }
}

fn address(node: &BackendNode) -> String {
    format!("{}:{}", node.host, node.port)
}

fn role(index: usize) -> &'static str {
    if index == 0 {
        "primary"
    } else {
        "replica"
    }
}

fn health(node: Option<&NodeFreshness>) -> &'static str {
    match node {
        Some(n) if n.healthy => "up",
        Some(NodeFreshness {
            excluded: Some(Exclusion::Unknown),
            ..
        })
        | None => "unknown",
        Some(_) => "down",
    }
}

/// Why a node gets no reads (replicas) or cannot take writes (the primary); None when
/// it serves.
fn why_excluded(index: usize, node: Option<&NodeFreshness>) -> Option<String> {
    let node = node?;
    if let Some(Exclusion::Fenced(why)) = &node.excluded {
        return Some(format!("fenced: {why}"));
    }
    if index == 0 {
        return match (node.healthy, node.in_recovery) {
            (false, _) => Some("down".into()),
            (true, true) => Some("in recovery: not writable".into()),
            (true, false) => None,
        };
    }
    node.excluded.as_ref().map(|e| match e {
        Exclusion::Unknown => "not probed yet".to_owned(),
        Exclusion::Down(why) => format!("down: {why}"),
        Exclusion::NotReplica => "not in recovery (not a replica)".to_owned(),
        Exclusion::Fenced(why) => format!("fenced: {why}"),
        Exclusion::Lagging { bytes, millis } => {
            format!("lagging: {bytes} bytes, {millis} ms behind")
        }
    })
}

/// Server connections to one node, over every pool (user) that connects to it.
fn connections(fe: &Frontend, node: &BackendNode) -> (u64, u64) {
    fe.pools
        .all()
        .iter()
        .filter(|p| p.target.host == node.host && p.target.port == node.port)
        .fold((0, 0), |(used, idle), p| {
            (used + p.in_use() as u64, idle + p.idle_count() as u64)
        })
}

/// The primary is reachable, not in recovery and not fenced, per the latest probe.
pub fn writable(fresh: &crate::topology::Freshness) -> bool {
    fresh
        .nodes
        .first()
        .is_some_and(|p| p.healthy && !p.in_recovery && p.excluded.is_none())
}

fn shards(fe: &Frontend) -> Table {
    let mut t = Table::new(&[
        ("shard", T::Text),
        ("is_default", T::Bool),
        ("primary", T::Text),
        ("replicas", T::Int8),
        ("nodes_up", T::Int8),
        ("readable_replicas", T::Int8),
        ("writable", T::Bool),
        ("paused", T::Bool),
    ]);
    let topology = fe.topology.load();
    for (i, shard) in topology.shards.iter().enumerate() {
        let fresh = shard.fresh.load();
        t.push(vec![
            shard.name.as_str().into(),
            (i == topology.default_shard).into(),
            shard.nodes.first().map(address).into(),
            (shard.nodes.len().saturating_sub(1) as u64).into(),
            (fresh.nodes.iter().filter(|n| n.healthy).count() as u64).into(),
            (fresh.eligible_replicas().count() as u64).into(),
            writable(&fresh).into(),
            fe.pauses.is_paused(&shard.name).into(),
        ]);
    }
    t
}

fn nodes(fe: &Frontend) -> Table {
    let mut t = Table::new(&[
        ("shard", T::Text),
        ("node", T::Int8),
        ("address", T::Text),
        ("role", T::Text),
        ("health", T::Text),
        ("in_recovery", T::Bool),
        ("lsn", T::Text),
        ("lag_bytes", T::Int8),
        ("lag_ms", T::Int8),
        ("in_use", T::Int8),
        ("idle", T::Int8),
        ("excluded", T::Text),
        ("fenced", T::Bool),
    ]);
    let topology = fe.topology.load();
    for shard in &topology.shards {
        let fresh = shard.fresh.load();
        for (i, node) in shard.nodes.iter().enumerate() {
            let f = fresh.nodes.get(i);
            let (in_use, idle) = connections(fe, node);
            t.push(vec![
                shard.name.as_str().into(),
                (i as u64).into(),
                address(node).into(),
                role(i).into(),
                health(f).into(),
                Cell(f.map(|f| bool_text(f.in_recovery))),
                Cell(
                    f.filter(|f| f.lsn > 0)
                        .map(|f| crate::topology::format_lsn(f.lsn)),
                ),
                Cell(f.map(|f| f.lag_bytes.to_string())),
                Cell(f.map(|f| f.lag_millis.to_string())),
                in_use.into(),
                idle.into(),
                why_excluded(i, f).into(),
                f.is_some_and(|f| matches!(f.excluded, Some(Exclusion::Fenced(_))))
                    .into(),
            ]);
        }
    }
    // Old primaries a promotion took out of the map: never routed to again. One that
    // is back in the map (as a replica) has its row above already.
    let fenced = fe.fenced.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let listed: std::collections::HashSet<(String, String)> = topology
        .shards
        .iter()
        .flat_map(|s| s.nodes.iter().map(|n| (s.name.clone(), address(n))))
        .collect();
    for (shard, address) in fenced {
        if listed.contains(&(shard.clone(), address.clone())) {
            continue;
        }
        t.push(vec![
            shard.into(),
            Cell(None),
            address.into(),
            "fenced".into(),
            "fenced".into(),
            Cell(None),
            Cell(None),
            Cell(None),
            Cell(None),
            0u64.into(),
            0u64.into(),
            "fenced after a promotion".into(),
            true.into(),
        ]);
    }
    t
}

fn bool_text(v: bool) -> String {
    if v { "t" } else { "f" }.to_owned()
}

fn lag(fe: &Frontend) -> Table {
    let mut t = Table::new(&[
        ("shard", T::Text),
        ("address", T::Text),
        ("lag_bytes", T::Int8),
        ("lag_ms", T::Int8),
        ("max_lag_bytes", T::Int8),
        ("max_lag_ms", T::Int8),
        ("gets_reads", T::Bool),
        ("reason", T::Text),
    ]);
    let topology = fe.topology.load();
    let max_ms = fe.admin.max_lag.as_millis() as u64;
    for shard in &topology.shards {
        let fresh = shard.fresh.load();
        for (i, node) in shard.nodes.iter().enumerate().skip(1) {
            let f = fresh.nodes.get(i);
            let serves = f.is_some_and(|f| f.healthy && f.excluded.is_none());
            let reason = if serves {
                Some("within the lag limits".to_owned())
            } else {
                why_excluded(i, f).or(Some("not probed yet".to_owned()))
            };
            t.push(vec![
                shard.name.as_str().into(),
                address(node).into(),
                Cell(f.map(|f| f.lag_bytes.to_string())),
                Cell(f.map(|f| f.lag_millis.to_string())),
                fe.admin.max_lag_bytes.into(),
                max_ms.into(),
                serves.into(),
                reason.into(),
            ]);
        }
    }
    t
}

/// Routing decisions since start, by reason (why reads went to the primary).
fn routes(fe: &Frontend) -> Table {
    let mut t = Table::new(&[("route_reason", T::Text), ("count", T::Int8)]);
    for reason in RouteReason::ALL {
        t.push(vec![
            reason.as_str().into(),
            fe.route_stats.count(reason).into(),
        ]);
    }
    t
}

fn pools(fe: &Frontend) -> Table {
    let mut t = Table::new(&[
        ("shard", T::Text),
        ("role", T::Text),
        ("address", T::Text),
        ("user", T::Text),
        ("database", T::Text),
        ("in_use", T::Int8),
        ("idle", T::Int8),
        ("size", T::Int8),
    ]);
    let topology = fe.topology.load();
    let mut pools = fe.pools.all();
    pools.sort_by(|a, b| {
        (&a.target.host, a.target.port, &a.target.user).cmp(&(
            &b.target.host,
            b.target.port,
            &b.target.user,
        ))
    });
    for pool in pools {
        let place = topology.shards.iter().find_map(|s| {
            s.nodes
                .iter()
                .position(|n| n.host == pool.target.host && n.port == pool.target.port)
                .map(|i| (s.name.clone(), role(i)))
        });
        t.push(vec![
            place.as_ref().map(|(s, _)| s.clone()).into(),
            place.map(|(_, r)| r.to_owned()).into(),
            pool.target.addr().into(),
            pool.target.user.as_str().into(),
            pool.target.database.as_str().into(),
            (pool.in_use() as u64).into(),
            (pool.idle_count() as u64).into(),
            (fe.settings.pool.size as u64).into(),
        ]);
    }
    t
}

fn clients(fe: &Frontend) -> Table {
    let mut t = Table::new(&[
        ("id", T::Int8),
        ("pid", T::Int8),
        ("user", T::Text),
        ("database", T::Text),
        ("address", T::Text),
        ("tls", T::Bool),
        ("state", T::Text),
        ("server", T::Text),
        ("connected_at", T::Text),
    ]);
    for c in fe.clients.list() {
        let state = if c.server.is_some() { "active" } else { "idle" };
        t.push(vec![
            c.id.into(),
            u64::from(c.pid).into(),
            c.user.into(),
            c.database.into(),
            c.addr.into(),
            c.tls.into(),
            state.into(),
            c.server.into(),
            format_time(c.connected_at).into(),
        ]);
    }
    t
}

fn map(fe: &Frontend) -> Table {
    let mut t = Table::new(&[
        ("version", T::Int8),
        ("file", T::Text),
        ("database", T::Text),
        ("shards", T::Int8),
        ("default_shard", T::Text),
        ("generation", T::Int8),
        ("loaded_at", T::Text),
        ("last_reload_at", T::Text),
        ("last_reload_result", T::Text),
        ("last_reload_error", T::Text),
    ]);
    let topology = fe.topology.load();
    let reloads = fe.admin.reloads();
    let map = &topology.map;
    let file = if map.source.as_os_str().is_empty() {
        &fe.admin.map_file
    } else {
        &map.source
    };
    t.push(vec![
        map.version.into(),
        file.display().to_string().into(),
        map.database.as_str().into(),
        (map.shards.len() as u64).into(),
        map.default_shard.as_str().into(),
        topology.generation.into(),
        format_time(reloads.loaded_at).into(),
        reloads.last_attempt.map(format_time).into(),
        reloads.last_result.map(str::to_owned).into(),
        reloads.last_error.into(),
    ]);
    t
}

/// The running reshard job, or the last one this process ran or found (one row; none
/// before any job).
fn reshard(fe: &Frontend) -> Table {
    let mut t = Table::new(&[
        ("job", T::Text),
        ("phase", T::Text),
        ("source", T::Text),
        ("target", T::Text),
        ("progress", T::Text),
        ("rows_copied", T::Int8),
        ("rows_estimate", T::Int8),
        ("bytes_copied", T::Int8),
        ("bytes_estimate", T::Int8),
        ("rows_per_second", T::Int8),
        ("lag_bytes", T::Int8),
        ("eta_seconds", T::Int8),
        ("cutover_attempts", T::Int8),
        ("pause_ms", T::Int8),
        ("verify", T::Text),
        ("started_at", T::Text),
        ("error", T::Text),
    ]);
    let Some(s) = fe.reshard.status() else {
        return t;
    };
    let progress = (s.rows_copied.min(s.rows_estimate) * 100)
        .checked_div(s.rows_estimate)
        .map(|p| format!("{p}%"))
        .unwrap_or_default();
    let started = std::time::UNIX_EPOCH + std::time::Duration::from_secs(s.started_at);
    t.push(vec![
        s.job.to_string().into(),
        s.phase.into(),
        s.sources.into(),
        s.targets.into(),
        progress.into(),
        s.rows_copied.into(),
        s.rows_estimate.into(),
        s.bytes_copied.into(),
        s.bytes_estimate.into(),
        (s.rate as u64).into(),
        s.lag_bytes.into(),
        s.eta_seconds.into(),
        u64::from(s.cutover_attempts).into(),
        s.pause_ms.into(),
        s.verify.into(),
        format_time(started).into(),
        s.error.into(),
    ]);
    t
}

fn help() -> Table {
    let mut t = Table::new(&[("command", T::Text), ("description", T::Text)]);
    for (command, what) in USAGE {
        t.push(vec![command.into(), what.into()]);
    }
    t
}
