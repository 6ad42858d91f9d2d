//! Sharded maps: the connections an explicit transaction holds on shards other than
//! its own. A transaction stays on the shard of its first keyed statement for writes,
//! but it may read anywhere: a keyless read fans out, a keyed read may belong to
//! another shard. Each other shard it reads from gets a connection of its own, in a
//! transaction begun with the client's BEGIN (same isolation level and access mode),
//! held until the client's transaction ends. So a REPEATABLE READ transaction reads
//! every shard from one snapshot per shard (not one snapshot across shards:
//! docs/sharding.md), and a shard read twice answers from the same transaction.
//!
//! - Reads run there through the fan-out executor (`fanout.rs`), which takes the
//!   connection for the leg and gives it back.
//! - When the transaction's first keyed statement belongs to a shard already held
//!   (a deferred BEGIN whose first statement was a keyless read), that connection
//!   becomes the transaction's own (`adopt_side`).
//! - A read across shards that fails aborts the whole transaction, as one server
//!   would: the transaction's own connection is made to fail too, so the client's
//!   next statements get 25P02 from it until ROLLBACK (`abort_after_failed_read`).
//! - The transaction's end (its connection idle again, or a deferred COMMIT/ROLLBACK
//!   answered here) ends the others: COMMIT when the client committed, ROLLBACK
//!   otherwise, then they go back to their pools.

use tokio::io::{AsyncRead, AsyncWrite};

use super::{Session, SessionError};
use crate::backend::PooledConn;
use crate::routing::analyze::{Analyzed, StatementClass};

/// A connection on another shard, inside the client's transaction.
pub(super) struct Side {
    pub(super) shard: usize,
    /// The node it came from (index 0 the primary).
    pub(super) node: usize,
    pub(super) conn: PooledConn,
}

/// The transaction of the client when its BEGIN text is unknown (a BEGIN inside a
/// multi-statement query): read-write, on the primary.
const PLAIN_BEGIN: Analyzed = Analyzed {
    class: StatementClass::Begin { read_only: false },
    hint: None,
    set_target: None,
    parsed: true,
};

/// What the transaction's own connection runs to fail the transaction after a read on
/// another shard failed (the client already has that read's error; this one is not
/// shown).
const ABORT_SQL: &str = "DO $shardgate$ BEGIN RAISE EXCEPTION USING ERRCODE = '25P02', MESSAGE = 'a read over several shards failed: the transaction is aborted'; END $shardgate$";

impl<R, W> Session<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// The connection a transaction's read uses on `shard` (not the transaction's own
    /// shard): the one it already holds there, or a new one that runs the client's
    /// BEGIN first. Returned with its node; the caller gives it back with `keep_side`.
    pub(super) async fn side_for_leg(
        &mut self,
        shard: usize,
    ) -> Result<(usize, PooledConn), SessionError> {
        self.settle_side_end().await;
        if let Some(i) = self.side.iter().position(|s| s.shard == shard) {
            let side = self.side.swap_remove(i);
            return Ok((side.node, side.conn));
        }
        let (sql, analyzed) = self
            .txn_begin
            .clone()
            .unwrap_or_else(|| ("BEGIN".to_owned(), PLAIN_BEGIN));
        let mut attempt = 0;
        loop {
            let (node, mut conn) = self.acquire_routed(Some(&analyzed), shard).await?;
            let ready = async {
                super::align_settings(&mut conn, &self.params).await?;
                conn.run_internal(&sql).await
            }
            .await;
            match ready {
                Ok(()) => return Ok((node, conn)),
                Err(error)
                    if error.is_connection_failure() && attempt < super::CHECKOUT_RETRIES =>
                {
                    attempt += 1;
                }
                Err(error) => {
                    // A BEGIN the server refused leaves the connection idle and clean.
                    if conn.is_poolable() {
                        conn.release();
                    }
                    return Err(error.into());
                }
            }
        }
    }

    /// Ends the connections of a transaction that ended, if that is still to do (a new
    /// transaction never reads through the last one's).
    pub(super) async fn settle_side_end(&mut self) {
        if let Some(commit) = self.side_end.take() {
            self.end_sides(commit).await;
        }
    }

    /// A leg's connection back to the transaction.
    pub(super) fn keep_side(&mut self, shard: usize, node: usize, conn: PooledConn) {
        self.side.push(Side { shard, node, conn });
    }

    /// The transaction's first statement that runs on its own connection belongs to
    /// `shard`, where the transaction already reads: that connection becomes the
    /// transaction's (the client's BEGIN ran on it).
    pub(super) fn adopt_side(&mut self, shard: usize) -> bool {
        let Some(i) = self.side.iter().position(|s| s.shard == shard) else {
            return false;
        };
        let side = self.side.swap_remove(i);
        self.pending_begin = None;
        self.hold_wrote = false;
        self.hold(side);
        true
    }

    /// A connection held apart (a side, or a parked part of a batch) becomes the
    /// session's own again.
    pub(super) fn hold(&mut self, side: Side) {
        self.cancel.set(Some(super::CancelTarget {
            host: side.conn.host.clone(),
            port: side.conn.port,
            key: side.conn.backend_key,
        }));
        self.server = Some(side.conn);
        self.server_shard = side.shard;
        self.server_node = side.node;
        self.replay = None;
    }

    /// After a read over several shards inside a transaction: connections whose
    /// transaction failed are let go, and when the read failed the transaction as the
    /// client sees it is aborted (its own connection fails too; a transaction that had
    /// none yet takes a failed one, or a new one on the default shard).
    pub(super) async fn abort_after_failed_read(&mut self) -> Result<(), SessionError> {
        let mut failed = Vec::new();
        let mut i = 0;
        while i < self.side.len() {
            if self.side[i].conn.txn_status == b'E' {
                failed.push(self.side.swap_remove(i));
            } else {
                i += 1;
            }
        }
        if !self.fanout_failed && failed.is_empty() {
            return Ok(());
        }
        if self.server.is_some() && self.describe_only && self.only_prepared() {
            // Only described (the BEGIN is still deferred): not in the transaction.
            self.sync_and_release().await?;
        }
        if self.server.is_none() {
            match failed.pop() {
                Some(side) => {
                    self.adopt_failed(side);
                }
                None => {
                    let shard = self.topo.default_shard;
                    let (node, conn) = self.side_for_leg(shard).await?;
                    self.adopt_failed(super::side::Side { shard, node, conn });
                }
            }
        }
        if let Some(conn) = self.server.as_mut() {
            if conn.txn_status == b'T' {
                let result = conn.run_internal(ABORT_SQL).await;
                if let Err(error) = result {
                    if conn.broken {
                        return Err(error.into());
                    }
                }
            }
        }
        for side in failed {
            end_side(side, false).await;
        }
        Ok(())
    }

    /// A failed connection becomes the transaction's own.
    fn adopt_failed(&mut self, side: Side) {
        let shard = side.shard;
        self.side.push(side);
        self.adopt_side(shard);
    }

    /// Ends the connections held on other shards: COMMIT when the client committed,
    /// ROLLBACK otherwise. Each goes back to its pool when that worked, and is closed
    /// otherwise.
    pub(super) async fn end_sides(&mut self, commit: bool) {
        self.txn_begin = None;
        for side in std::mem::take(&mut self.side) {
            end_side(side, commit).await;
        }
        if self.server.is_none() {
            self.reshard_ticket = None;
        }
    }

    /// A newer topology taken mid-transaction (a reshard cutover): the held
    /// connections' shards are found by name in it. One whose shard is gone is closed
    /// (it only read).
    pub(super) fn remap_sides(&mut self, old: &crate::topology::Topology) {
        let new = &self.topo;
        self.side.retain_mut(|side| {
            let name = &old.shards[side.shard].name;
            match new.shards.iter().position(|s| &s.name == name) {
                Some(index) => {
                    side.shard = index;
                    true
                }
                None => false,
            }
        });
    }
}

async fn end_side(mut side: Side, commit: bool) {
    let end = if commit && side.conn.txn_status == b'T' {
        "COMMIT"
    } else {
        "ROLLBACK"
    };
    match side.conn.run_internal(end).await {
        Ok(()) if side.conn.is_poolable() => side.conn.release(),
        Ok(()) => {}
        Err(error) => {
            tracing::warn!(%error, end, "ending a transaction's read on another shard failed; closing it")
        }
    }
}
