//! A session's part in a reshard cutover (src/reshard/gate.rs): while a job runs, a
//! transaction that starts on a source shard carries a ticket until it ends, so the
//! cutover knows when the source's last change is final. The ticket is taken before the
//! statement is routed: a session that routed by the old map is always counted, and one
//! that waited at a closed gate routes again by the map the cutover published.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use super::{Session, SessionError};
use crate::backend::BackendError;
use crate::routing::shard_plan::{ShardPlan, Target};

/// Longest wait at a closed gate; the job reopens it within `reshard.max_pause` (plus
/// a round trip), so this only bounds a job that died mid-cutover.
const GATE_WAIT: Duration = Duration::from_secs(10);

impl<R, W> Session<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// Before routing a statement that starts a transaction: waits while a cutover
    /// holds new transactions, takes the newest topology, and takes a ticket. A no-op
    /// (one relaxed load) while no job runs.
    pub(super) async fn enter_cutover_gate(&mut self) -> Result<(), SessionError> {
        if self.server.is_some() && !self.describe_only {
            return self.enter_holding_a_server().await;
        }
        let gate = &self.fe.reshard.gate;
        if !gate.is_armed() || self.reshard_ticket.is_some() {
            return Ok(());
        }
        loop {
            // Any shard counts here; `keep_ticket_for` drops it once the statement is
            // known to run elsewhere.
            match self.fe.reshard.gate.enter_any() {
                Ok(ticket) => {
                    self.reshard_ticket = ticket;
                    return Ok(());
                }
                Err(_closed) => {
                    if !self.fe.reshard.gate.wait_open(GATE_WAIT).await {
                        return Err(BackendError::Server {
                            code: "57P03".into(),
                            message:
                                "a reshard cutover has held new transactions for too long; retry"
                                    .into(),
                        }
                        .into());
                    }
                    self.take_newest_topology();
                }
            }
        }
    }

    /// A statement from a session that keeps its server connection between
    /// transactions (LISTEN or a WITH HOLD cursor pins it, session pooling, or a
    /// pipeline): between transactions it follows a newer map (so a key that moved is
    /// refused there rather than written to its old shard), and while a job runs a
    /// transaction on a source shard is counted like any other.
    async fn enter_holding_a_server(&mut self) -> Result<(), SessionError> {
        let between = self.server.as_ref().is_some_and(|c| c.txn_status == b'I')
            && self.ops.is_empty()
            && self.sout.is_empty()
            && self.pending_begin.is_none()
            && self.batch.is_none();
        if !between {
            // Inside a transaction: the ticket it started with (if any) covers it.
            return Ok(());
        }
        self.follow_topology_holding_a_server();
        loop {
            let gate = &self.fe.reshard.gate;
            if !gate.is_armed() || self.reshard_ticket.is_some() {
                return Ok(());
            }
            let shard = &self.topo.shards[self.server_shard].name;
            if !gate.is_source(shard) {
                return Ok(());
            }
            match gate.enter_any() {
                Ok(ticket) => {
                    self.reshard_ticket = ticket;
                    return Ok(());
                }
                Err(_closed) => {
                    if !self.fe.reshard.gate.wait_open(GATE_WAIT).await {
                        return Err(BackendError::Server {
                            code: "57P03".into(),
                            message:
                                "a reshard cutover has held new transactions for too long; retry"
                                    .into(),
                        }
                        .into());
                    }
                    self.follow_topology_holding_a_server();
                }
            }
        }
    }

    /// A newer topology for a session that holds a server between transactions: the
    /// held connection's shard is found by name in it (indexes may shift). A shard
    /// that is gone keeps the old topology; its statements run where they did.
    fn follow_topology_holding_a_server(&mut self) {
        let current = self.fe.topology.load();
        if current.generation == self.topo.generation {
            return;
        }
        let name = &self.topo.shards[self.server_shard].name;
        let Some(index) = current.shards.iter().position(|s| &s.name == name) else {
            return;
        };
        self.topo = arc_swap::Guard::into_inner(current);
        self.pools = self.fe.pools_for(&self.user, &self.topo);
        self.server_shard = index;
        self.next_shard = index;
    }

    /// After routing: the ticket stays only when the statement runs on a source shard.
    pub(super) fn keep_ticket_for(&mut self, target: &Target) {
        if self.reshard_ticket.is_none() {
            return;
        }
        let gate = &self.fe.reshard.gate;
        let names = |shards: &mut dyn Iterator<Item = usize>| {
            shards
                .filter_map(|i| self.topo.shards.get(i))
                .any(|s| gate.is_source(&s.name))
        };
        let touches = match target {
            Target::Shards(shards) => names(&mut shards.iter().copied()),
            Target::SplitInsert(parts) => names(&mut parts.iter().map(|(s, _)| *s)),
            Target::Default => names(&mut std::iter::once(self.topo.default_shard)),
            Target::Refuse(_) => false,
            _ => true,
        };
        // Reads the transaction holds open on other shards count too.
        let holds = names(&mut self.side.iter().map(|s| s.shard));
        if !touches && !holds {
            self.reshard_ticket = None;
        }
    }

    /// A write over several shards that reaches a shard receiving keys in a running
    /// job: it would change the copies there and then again through replication.
    pub(super) fn writes_reshard_copies(&self, plan: &ShardPlan, target: &Target) -> bool {
        let gate = &self.fe.reshard.gate;
        if !gate.is_armed() || plan.is_read() || plan.is_ddl() {
            return false;
        }
        let sharded = plan.tables().any(|t| {
            matches!(
                self.topo.map.tables.get(t),
                Some(crate::shard_map::TableRule::Sharded { .. })
            )
        });
        if !sharded {
            return false;
        }
        let shards: Vec<usize> = match target {
            Target::Shards(shards) if shards.len() > 1 => shards.clone(),
            Target::All { write: true } => (0..self.topo.shards.len()).collect(),
            _ => return false,
        };
        shards
            .iter()
            .filter_map(|&i| self.topo.shards.get(i))
            .any(|s| gate.is_target(&s.name))
    }

    /// The statement ended without keeping a server connection (answered here, or run
    /// across shards): its ticket goes.
    pub(super) fn end_ticket_if_idle(&mut self) {
        if self.server.is_none() && self.batch.is_none() && self.side.is_empty() {
            self.reshard_ticket = None;
        }
    }
}
