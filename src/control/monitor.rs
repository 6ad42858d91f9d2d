//! The node monitor (DESIGN 5.2): every `lag_check_interval` it probes every node of
//! the shard over a control connection (tokio-postgres), works out role, health, WAL
//! position and lag, and publishes a new immutable `Freshness` snapshot that sessions
//! read without locks.
//!
//! Lag in time is measured against the primary's own history, not against
//! `pg_last_xact_replay_timestamp()` (which on an idle primary grows forever): the
//! monitor keeps every probe of the primary (when it was sent, the insert position it
//! returned), and a replica that has replayed up to L is as far behind as the time
//! since the first probe that saw the primary past L. The same record, its recent
//! end, is published for read-your-writes. It is zero when the replica has replayed everything it
//! received, or everything the primary had. Lag in bytes is the primary's position
//! minus the replica's replay position.
//!
//! Hysteresis: a replica excluded for lag is re-admitted only once both lags are
//! under half their limits, so a replica hovering at the limit does not flap.
//! A node whose probe fails is marked down and retried with exponential backoff
//! (one interval, doubling, at most `MAX_BACKOFF`).
//!
//! Fencing (monitor/fence.rs): each probe also reads the node's timeline and system
//! identifier; a node answering as a primary that must not be one (an older timeline
//! than the shard's, another system, a second primary) is published `Fenced`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use crate::topology::{parse_lsn, Exclusion, Freshness, NodeFreshness, SharedFreshness};

/// Longest wait between probes of a node that keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Primary positions remembered for time lag, at most.
const MAX_HISTORY: usize = 1 << 16;
/// Recent primary probes published for read-your-writes. A session that wrote before
/// the oldest one uses the oldest (still a valid bound, only more conservative).
const MAX_MARKS: usize = 64;

/// Role, position and receive position in one round trip. On a primary the
/// receive position is NULL, and the position is the insert position: with
/// `synchronous_commit = off` a commit is acknowledged before its WAL is written, and
/// read-your-writes must still count it.
/// Then the timeline and the system identifier, for fencing (monitor/fence.rs): a
/// primary's timeline is the one it writes WAL on (the first 8 hex digits of the WAL file
/// name); a replica's is a lower bound, the newer of its last restart point's and the
/// one it receives. The pg_control functions and `pg_walfile_name` need no privilege.
const PROBE_SQL: &str = "SELECT pg_is_in_recovery()::text, \
     (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_insert_lsn() END)::text, \
     pg_last_wal_receive_lsn()::text, \
     (CASE WHEN pg_is_in_recovery() \
      THEN greatest((SELECT timeline_id FROM pg_control_checkpoint()), (SELECT received_tli FROM pg_stat_wal_receiver)) \
      ELSE ('x' || left(pg_walfile_name(pg_current_wal_insert_lsn()), 8))::bit(32)::int END)::text, \
     (SELECT system_identifier FROM pg_control_system())::text";

/// How the monitor reaches one node: index 0 of the list is the primary.
#[derive(Debug, Clone)]
pub struct MonitorNode {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
}

impl MonitorNode {
    fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct MonitorSettings {
    pub interval: Duration,
    pub max_lag: Duration,
    pub max_lag_bytes: u64,
    /// Bounds connecting and each probe query.
    pub connect_timeout: Duration,
}

/// Stops the monitor when dropped.
pub struct MonitorHandle {
    task: JoinHandle<()>,
}

impl Drop for MonitorHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one probe saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub in_recovery: bool,
    /// Primary: current WAL position. Replica: last replayed position.
    pub lsn: u64,
    /// Replica: last position received from the primary.
    pub received: Option<u64>,
    /// Primary: the timeline it writes on. Replica: a lower bound of its timeline.
    pub timeline: Option<u32>,
    /// `pg_control_system().system_identifier`: shared by a primary and its replicas.
    pub system: Option<i64>,
    /// When the probe query was sent (it ran on the server after this).
    pub sent: std::time::Instant,
}

/// The snapshot before any probe: the primary takes everything, replicas nothing.
pub fn initial_freshness(nodes: &[MonitorNode]) -> Freshness {
    let nodes = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| NodeFreshness {
            addr: n.addr(),
            healthy: i == 0,
            in_recovery: i != 0,
            lsn: 0,
            lag_bytes: 0,
            lag_millis: 0,
            excluded: (i != 0).then_some(Exclusion::Unknown),
        })
        .collect();
    Freshness {
        nodes,
        generation: 0,
        primary_marks: Vec::new(),
    }
}

pub fn spawn_monitor(
    nodes: Vec<MonitorNode>,
    settings: MonitorSettings,
    fresh: SharedFreshness,
) -> MonitorHandle {
    let task = tokio::spawn(run(nodes, settings, fresh));
    MonitorHandle { task }
}

/// Per-node bookkeeping between rounds.
struct NodeState {
    node: Arc<MonitorNode>,
    client: Option<Client>,
    failures: u32,
    retry_at: Instant,
    last_error: Option<String>,
}

async fn run(nodes: Vec<MonitorNode>, settings: MonitorSettings, fresh: SharedFreshness) {
    let mut states: Vec<NodeState> = nodes
        .into_iter()
        .map(|n| NodeState {
            node: Arc::new(n),
            client: None,
            failures: 0,
            retry_at: Instant::now(),
            last_error: None,
        })
        .collect();
    let mut history = PrimaryHistory::default();
    let mut fence_memory = fence::FenceMemory::default();
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let samples = probe_round(&mut states, &settings).await;
        let now = std::time::Instant::now();
        let fenced = fence::verdicts(&samples, &mut fence_memory);
        // A fenced primary's positions are not the shard's: lag is not measured by them.
        if let (Some(Ok(primary)), Some(None)) = (samples.first(), fenced.first()) {
            history.observe(primary, settings.max_lag * 2);
        }
        let prev = fresh.load_full();
        let mut next = assess(&prev, &samples, &history, &settings, now);
        for (node, why) in next.nodes.iter_mut().zip(fenced) {
            if let Some(why) = why {
                node.excluded = Some(Exclusion::Fenced(why));
            }
        }
        log_changes(&prev, &next);
        fresh.store(Arc::new(next));
    }
}

/// Probes every node that is due, concurrently. A node in backoff keeps its last
/// error without being contacted.
async fn probe_round(
    states: &mut [NodeState],
    settings: &MonitorSettings,
) -> Vec<Result<Sample, String>> {
    let now = Instant::now();
    let mut results: Vec<Result<Sample, String>> = states
        .iter()
        .map(|s| {
            Err(s
                .last_error
                .clone()
                .unwrap_or_else(|| "not probed yet".into()))
        })
        .collect();
    let mut set = JoinSet::new();
    for (i, state) in states.iter_mut().enumerate() {
        if now < state.retry_at {
            continue;
        }
        let client = state.client.take();
        let node = state.node.clone();
        let timeout = settings.connect_timeout;
        set.spawn(async move { (i, probe(client, &node, timeout).await) });
    }
    while let Some(joined) = set.join_next().await {
        let Ok((i, (client, result))) = joined else {
            continue;
        };
        let state = &mut states[i];
        state.client = client;
        match &result {
            Ok(_) => {
                state.failures = 0;
                state.last_error = None;
            }
            Err(error) => {
                state.failures = state.failures.saturating_add(1);
                let backoff = settings
                    .interval
                    .saturating_mul(1 << state.failures.min(16).saturating_sub(1))
                    .min(MAX_BACKOFF);
                state.retry_at = Instant::now() + backoff;
                state.last_error = Some(error.clone());
            }
        }
        results[i] = result;
    }
    results
}

/// One probe over the node's control connection, connecting first if needed. The
/// connection is handed back only when the probe succeeded.
async fn probe(
    client: Option<Client>,
    node: &MonitorNode,
    timeout: Duration,
) -> (Option<Client>, Result<Sample, String>) {
    let client = match client {
        Some(c) if !c.is_closed() => c,
        _ => match tokio::time::timeout(timeout, connect(node)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return (None, Err(format!("connect: {e}"))),
            Err(_) => return (None, Err("connect: timed out".into())),
        },
    };
    let sent = std::time::Instant::now();
    match tokio::time::timeout(timeout, client.simple_query(PROBE_SQL)).await {
        Ok(Ok(messages)) => match parse_sample(&messages, sent) {
            Some(sample) => (Some(client), Ok(sample)),
            None => (None, Err("probe: unexpected answer".into())),
        },
        Ok(Err(e)) => (None, Err(format!("probe: {e}"))),
        Err(_) => (None, Err("probe: timed out".into())),
    }
}

async fn connect(node: &MonitorNode) -> Result<Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(&node.host)
        .port(node.port)
        .user(&node.user)
        .dbname(&node.database)
        .application_name("shardgate-monitor");
    if let Some(password) = &node.password {
        config.password(password);
    }
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn parse_sample(messages: &[SimpleQueryMessage], sent: std::time::Instant) -> Option<Sample> {
    let row = messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r),
        _ => None,
    })?;
    Some(Sample {
        in_recovery: row.get(0)? == "true",
        lsn: parse_lsn(row.get(1)?)?,
        received: row.get(2).and_then(parse_lsn),
        timeline: row.get(3).and_then(|t| t.parse().ok()),
        system: row.get(4).and_then(|t| t.parse().ok()),
        sent,
    })
}

/// Every successful probe of the primary, oldest first: when the probe was sent and
/// the WAL insert position it returned. One record serves both uses of the primary's
/// past: time lag (since when has the primary had WAL beyond a replica's position?)
/// and read-your-writes (the snapshot publishes the last `MAX_MARKS` probes).
/// Kept for `retain` (and at least `MAX_MARKS` probes), plus one older probe, so a lag
/// longer than the window still shows as "at least the window".
#[derive(Debug, Default)]
pub struct PrimaryHistory {
    samples: VecDeque<(std::time::Instant, u64)>,
}

impl PrimaryHistory {
    /// Records a primary probe. A position below the last one (the primary was
    /// replaced or restored) starts the history over: positions must not decrease.
    pub fn observe(&mut self, sample: &Sample, retain: Duration) {
        if sample.in_recovery {
            return;
        }
        if self.latest().is_some_and(|last| sample.lsn < last) {
            self.samples.clear();
        }
        self.samples.push_back((sample.sent, sample.lsn));
        let retain = retain.max(Duration::from_secs(1));
        while self.samples.len() > MAX_MARKS.max(2)
            && (self.samples.len() > MAX_HISTORY || self.samples[1].0 + retain < sample.sent)
        {
            self.samples.pop_front();
        }
    }

    pub fn latest(&self) -> Option<u64> {
        self.samples.back().map(|&(_, lsn)| lsn)
    }

    /// How long the primary has had WAL beyond `replayed`: since the first probe that
    /// saw a position past it. Positions never decrease, so this is a binary search.
    pub fn lag(&self, now: std::time::Instant, replayed: u64) -> Duration {
        let first_past = self.samples.partition_point(|&(_, lsn)| lsn <= replayed);
        match self.samples.get(first_past) {
            Some(&(since, _)) => now.saturating_duration_since(since),
            None => Duration::ZERO,
        }
    }

    /// The most recent `n` probes, oldest first, for the snapshot.
    pub fn recent(&self, n: usize) -> Vec<(std::time::Instant, u64)> {
        let skip = self.samples.len().saturating_sub(n);
        self.samples.iter().skip(skip).copied().collect()
    }
}

/// Builds the next snapshot from this round's samples and the previous snapshot (for
/// hysteresis and the last known positions of nodes that failed).
pub fn assess(
    prev: &Freshness,
    samples: &[Result<Sample, String>],
    history: &PrimaryHistory,
    settings: &MonitorSettings,
    now: std::time::Instant,
) -> Freshness {
    let nodes = samples
        .iter()
        .enumerate()
        .map(|(i, sample)| {
            let before = prev.nodes.get(i);
            let addr = before.map(|n| n.addr.clone()).unwrap_or_default();
            match sample {
                Err(error) => NodeFreshness {
                    addr,
                    healthy: false,
                    in_recovery: before.is_some_and(|n| n.in_recovery),
                    lsn: before.map_or(0, |n| n.lsn),
                    lag_bytes: 0,
                    lag_millis: 0,
                    excluded: (i != 0).then(|| Exclusion::Down(error.clone())),
                },
                Ok(s) if i == 0 => NodeFreshness {
                    addr,
                    healthy: true,
                    in_recovery: s.in_recovery,
                    lsn: s.lsn,
                    lag_bytes: 0,
                    lag_millis: 0,
                    excluded: None,
                },
                Ok(s) => assess_replica(addr, before, s, history, settings, now),
            }
        })
        .collect();
    Freshness {
        nodes,
        generation: prev.generation + 1,
        primary_marks: history.recent(MAX_MARKS),
    }
}

fn assess_replica(
    addr: String,
    before: Option<&NodeFreshness>,
    s: &Sample,
    history: &PrimaryHistory,
    settings: &MonitorSettings,
    now: std::time::Instant,
) -> NodeFreshness {
    let primary = history.latest().unwrap_or(s.lsn);
    let lag_bytes = primary.saturating_sub(s.lsn);
    let caught_up_with_received = s.received.is_none_or(|r| s.lsn >= r);
    let lag_millis = if caught_up_with_received {
        0
    } else {
        history.lag(now, s.lsn).as_millis() as u64
    };
    let was_lagging = matches!(
        before.and_then(|n| n.excluded.as_ref()),
        Some(Exclusion::Lagging { .. })
    );
    let (max_ms, max_bytes) = if was_lagging {
        // Re-admission needs a comfortable margin (hysteresis).
        (
            settings.max_lag.as_millis() as u64 / 2,
            settings.max_lag_bytes / 2,
        )
    } else {
        (settings.max_lag.as_millis() as u64, settings.max_lag_bytes)
    };
    let excluded = if !s.in_recovery {
        Some(Exclusion::NotReplica)
    } else if lag_millis > max_ms || lag_bytes > max_bytes {
        Some(Exclusion::Lagging {
            bytes: lag_bytes,
            millis: lag_millis,
        })
    } else {
        None
    };
    NodeFreshness {
        addr,
        healthy: true,
        in_recovery: s.in_recovery,
        lsn: s.lsn,
        lag_bytes,
        lag_millis,
        excluded,
    }
}

fn log_changes(prev: &Freshness, next: &Freshness) {
    for (i, node) in next.nodes.iter().enumerate() {
        let before = prev.nodes.get(i).and_then(|n| n.excluded.as_ref());
        let same = match (before, node.excluded.as_ref()) {
            (None, None) => true,
            (Some(a), Some(b)) => std::mem::discriminant(a) == std::mem::discriminant(b),
            _ => false,
        };
        if same {
            continue;
        }
        match &node.excluded {
            Some(Exclusion::Fenced(why)) => {
                tracing::error!(node = %node.addr, why, "node fenced: no reads, no writes")
            }
            None if i == 0 => tracing::info!(node = %node.addr, "primary no longer fenced"),
            None => tracing::info!(node = %node.addr, "replica serves reads"),
            Some(why) => {
                tracing::warn!(node = %node.addr, reason = ?why, "replica excluded from reads")
            }
        }
    }
}

pub mod fence;
#[cfg(test)]
mod tests;
