//! The proxy's metrics, with the `metrics` crate and a Prometheus recorder of its own
//! (one per proxy, not the process-global one: several proxies in one process, as in
//! the tests, keep separate figures).
//!
//! Two kinds of figures:
//! - events the data and control paths report as they happen (`query`, `latency`,
//!   `error`, `failover`): counters and a histogram, recorded through this type;
//! - state that already lives elsewhere (pools, clients, node freshness, the map,
//!   route and reload counts): read at scrape time (`render`) and set as gauges or
//!   absolute counters, so the hot path pays nothing for them.
//!
//! Names and labels are documented in docs/admin.md.

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::frontend::Frontend;
use crate::routing::route::RouteReason;

/// Seconds; from a pooled point query to a slow report.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Where a transaction (or autocommit statement) ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryRoute {
    Primary,
    Replica,
    /// On several shards at once (keyless reads, DDL, split writes).
    FanOut,
}

impl QueryRoute {
    const ALL: [QueryRoute; 3] = [QueryRoute::Primary, QueryRoute::Replica, QueryRoute::FanOut];

    fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            QueryRoute::Primary => "primary",
            QueryRoute::Replica => "replica",
            QueryRoute::FanOut => "fanout",
        }
    }
}

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Handles registered once, so the per-transaction calls are an atomic add (a
    /// registry lookup with labels costs allocations and a lock each time).
    latency: [metrics::Histogram; 3],
    queries: std::sync::RwLock<std::collections::HashMap<String, [metrics::Counter; 3]>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let builder = PrometheusBuilder::new();
        let builder = match builder.set_buckets_for_metric(
            Matcher::Full("shardgate_query_duration_seconds".into()),
            &LATENCY_BUCKETS,
        ) {
            Ok(b) => b,
            // Only for an empty bucket list; the constant is not empty.
            Err(_) => PrometheusBuilder::new(),
        };
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let latency = metrics::with_local_recorder(&recorder, || {
            QueryRoute::ALL.map(
                |route| histogram!("shardgate_query_duration_seconds", "route" => route.as_str()),
            )
        });
        let m = Metrics {
            recorder,
            handle,
            latency,
            queries: Default::default(),
        };
        m.with(describe);
        m
    }

    fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.recorder, f)
    }

    /// A transaction or autocommit statement was routed to `shard` (one count per
    /// server-connection loan; a fan-out counts once per shard it runs on).
    pub fn query(&self, route: QueryRoute, shard: &str) {
        let known = self.queries.read().unwrap_or_else(|e| e.into_inner());
        if let Some(counters) = known.get(shard) {
            counters[route.index()].increment(1);
            return;
        }
        drop(known);
        let counters = self.with(|| {
            QueryRoute::ALL.map(|r| {
                counter!("shardgate_queries_total", "route" => r.as_str(), "shard" => shard.to_owned())
            })
        });
        counters[route.index()].increment(1);
        self.queries
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(shard.to_owned(), counters);
    }

    /// How long a query took, from the client's message to the server's
    /// ReadyForQuery.
    pub fn latency(&self, route: QueryRoute, elapsed: Duration) {
        self.latency[route.index()].record(elapsed.as_secs_f64());
    }

    /// An ErrorResponse reached a client (from a server or from the proxy), by the
    /// SQLSTATE's class (its first two characters).
    pub fn error(&self, sqlstate: &str) {
        let class = sqlstate.get(..2).unwrap_or("??").to_owned();
        self.with(|| counter!("shardgate_errors_total", "class" => class).increment(1));
    }

    /// A promotion of `shard` ended: `outcome` is `promoted`, `refused` or `failed`.
    pub fn failover(&self, shard: &str, outcome: &'static str) {
        self.with(|| {
            counter!("shardgate_failovers_total", "shard" => shard.to_owned(), "outcome" => outcome)
                .increment(1)
        });
    }

    /// The Prometheus text exposition, after reading the state kept elsewhere.
    pub fn render(&self, fe: &Frontend) -> String {
        self.with(|| collect(fe));
        self.handle.run_upkeep();
        self.handle.render()
    }
}

fn describe() {
    describe_counter!(
        "shardgate_queries_total",
        "Transactions and autocommit statements routed, by route and shard"
    );
    describe_histogram!(
        "shardgate_query_duration_seconds",
        "Query latency through the proxy, by route"
    );
    describe_counter!(
        "shardgate_errors_total",
        "Errors sent to clients, by SQLSTATE class"
    );
    describe_counter!(
        "shardgate_failovers_total",
        "Replica promotions, by shard and outcome"
    );
    describe_counter!("shardgate_routes_total", "Routing decisions by reason");
    describe_counter!("shardgate_reloads_total", "Shard map reloads, by result");
    describe_gauge!("shardgate_map_version", "Version of the shard map in use");
    describe_gauge!(
        "shardgate_clients",
        "Client connections, by user, database and state"
    );
    describe_gauge!(
        "shardgate_server_connections",
        "Server connections, by shard, node, user and state"
    );
    describe_gauge!(
        "shardgate_node_up",
        "1 when the node's last probe succeeded"
    );
    describe_gauge!(
        "shardgate_node_serving_reads",
        "1 when the replica gets reads"
    );
    describe_gauge!(
        "shardgate_node_lag_bytes",
        "Replica replay lag behind the primary, in bytes"
    );
    describe_gauge!(
        "shardgate_node_lag_seconds",
        "Replica replay lag, in seconds"
    );
    describe_gauge!(
        "shardgate_shard_writable",
        "1 when the shard's primary is reachable and not in recovery"
    );
    describe_gauge!(
        "shardgate_shard_paused",
        "1 while the shard is paused from the console"
    );
    describe_gauge!(
        "shardgate_pinned_sessions",
        "Clients whose server connection stays with them between transactions (LISTEN, WITH HOLD cursors)"
    );
    describe_gauge!("shardgate_reshard_running", "1 while a reshard job runs");
    describe_gauge!(
        "shardgate_reshard_rows_copied",
        "Rows the running (or last) reshard job has copied"
    );
    describe_gauge!(
        "shardgate_reshard_rows_estimate",
        "Rows the running (or last) reshard job moves, estimated"
    );
    describe_gauge!(
        "shardgate_reshard_lag_bytes",
        "How far the reshard targets are behind their sources"
    );
    describe_gauge!(
        "shardgate_reshard_cutover_pause_seconds",
        "How long the last cutover held new transactions"
    );
}

/// Sets the scrape-time figures (called under the proxy's recorder).
fn collect(fe: &Frontend) {
    for reason in RouteReason::ALL {
        counter!("shardgate_routes_total", "reason" => reason.as_str())
            .absolute(fe.route_stats.count(reason));
    }
    let reloads = fe.admin.reloads();
    for (result, n) in [
        ("applied", reloads.applied),
        ("unchanged", reloads.unchanged),
        ("refused", reloads.refused),
    ] {
        counter!("shardgate_reloads_total", "result" => result).absolute(n);
    }
    for ((user, database), (active, idle)) in fe.clients.counts() {
        for (state, n) in [("active", active), ("idle", idle)] {
            gauge!("shardgate_clients", "user" => user.clone(), "database" => database.clone(), "state" => state)
                .set(n as f64);
        }
    }
    gauge!("shardgate_pinned_sessions").set(
        fe.pinned_sessions
            .load(std::sync::atomic::Ordering::Relaxed) as f64,
    );
    if let Some(job) = fe.reshard.status() {
        gauge!("shardgate_reshard_running").set(f64::from(u8::from(fe.reshard.running())));
        gauge!("shardgate_reshard_rows_copied").set(job.rows_copied as f64);
        gauge!("shardgate_reshard_rows_estimate").set(job.rows_estimate as f64);
        gauge!("shardgate_reshard_lag_bytes").set(job.lag_bytes.unwrap_or(0) as f64);
        gauge!("shardgate_reshard_cutover_pause_seconds")
            .set(job.pause_ms.unwrap_or(0) as f64 / 1000.0);
    }
    let topology = fe.topology.load();
    gauge!("shardgate_map_version").set(topology.map.version as f64);
    for shard in &topology.shards {
        collect_shard(fe, shard);
    }
}

fn collect_shard(fe: &Frontend, shard: &crate::topology::ShardRuntime) {
    let fresh = shard.fresh.load();
    let name = shard.name.clone();
    gauge!("shardgate_shard_writable", "shard" => name.clone())
        .set(f64::from(u8::from(super::show::writable(&fresh))));
    gauge!("shardgate_shard_paused", "shard" => name.clone())
        .set(f64::from(u8::from(fe.pauses.is_paused(&name))));
    let pools = fe.pools.all();
    for (i, node) in shard.nodes.iter().enumerate() {
        let addr = format!("{}:{}", node.host, node.port);
        let role = if i == 0 { "primary" } else { "replica" };
        let labels = [
            ("shard", name.clone()),
            ("node", addr.clone()),
            ("role", role.to_owned()),
        ];
        if let Some(f) = fresh.nodes.get(i) {
            gauge!("shardgate_node_up", &labels).set(f64::from(u8::from(f.healthy)));
            if i > 0 {
                let serving = f.healthy && f.excluded.is_none();
                gauge!("shardgate_node_serving_reads", &labels).set(f64::from(u8::from(serving)));
                gauge!("shardgate_node_lag_bytes", &labels).set(f.lag_bytes as f64);
                gauge!("shardgate_node_lag_seconds", &labels).set(f.lag_millis as f64 / 1000.0);
            }
        }
        for pool in pools
            .iter()
            .filter(|p| p.target.host == node.host && p.target.port == node.port)
        {
            for (state, n) in [("in_use", pool.in_use()), ("idle", pool.idle_count())] {
                gauge!(
                    "shardgate_server_connections",
                    "shard" => name.clone(),
                    "node" => addr.clone(),
                    "user" => pool.target.user.clone(),
                    "state" => state
                )
                .set(n as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_show_in_the_exposition() {
        let m = Metrics::new();
        m.query(QueryRoute::Replica, "s0");
        m.query(QueryRoute::Replica, "s0");
        m.error("57P03");
        m.latency(QueryRoute::Primary, Duration::from_millis(3));
        m.failover("s1", "promoted");
        let text = m.handle.render();
        assert!(
            text.contains("shardgate_queries_total{route=\"replica\",shard=\"s0\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("shardgate_errors_total{class=\"57\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "shardgate_query_duration_seconds_bucket{route=\"primary\",le=\"0.005\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("shardgate_failovers_total{shard=\"s1\",outcome=\"promoted\"} 1"),
            "{text}"
        );
        assert!(text.contains("# HELP shardgate_errors_total"), "{text}");
    }
}
