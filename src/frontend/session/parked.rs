//! Sharded maps, extended protocol: one implicit transaction (the statements between
//! two Syncs, outside BEGIN/COMMIT) whose statements belong to several shards. Drivers
//! send bulk writes that way: asyncpg's `executemany`, psycopg 3's `executemany`,
//! pgjdbc's `executeBatch` bind and execute row after row and sync once at the end.
//!
//! When a statement of such a batch belongs to another shard than the connection
//! holding the batch so far, that connection's answers are read (Flush) and passed on,
//! and it is parked: still in its implicit transaction, nothing committed. The batch
//! goes on on the other shard's connection (or a parked one of that shard). At the
//! client's Sync (or a simple Query, which ends the batch too) the held connection's
//! answers are read first:
//! - the batch failed somewhere: the parked connections are closed, so their servers
//!   roll back, and the client's Sync ends the failed one as usual: nothing of the
//!   batch stays, as on one server;
//! - it did not: each parked connection gets its Sync (commit) and goes back to its
//!   pool. Should one of these commits fail (a deferred constraint, a serialization
//!   failure), the ones not yet committed are closed and the held connection is made to
//!   fail with that error, so the client sees it and that shard's part rolls back too;
//!   parts committed before it stay (no two-phase commit: docs/sharding.md).

use tokio::io::{AsyncRead, AsyncWrite};

use super::side::Side;
use super::{Session, SessionError};
use crate::backend::BackendError;
use crate::protocol::messages;
use crate::routing::route::PRIMARY;

impl<R, W> Session<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// The held connection carries an implicit transaction of the client's batch (it
    /// ran statements since the last Sync, outside an explicit transaction), so a
    /// statement of the batch for another shard may continue it there.
    pub(super) fn batch_may_move(&self) -> bool {
        self.txn_begin.is_none()
            && self.pending_begin.is_none()
            && !self.describe_only
            && self.batch.is_none()
            && self.gate.is_none()
            && self
                .server
                .as_ref()
                .is_some_and(|c| c.txn_status == b'I' && c.unsynced && c.ran_since_sync)
    }

    /// Reads the held connection's answers, then parks it; `next_shard` is borrowed
    /// next. False when those answers failed the batch: the server now skips to Sync,
    /// and so does the rest of the client's batch (the statement is dropped).
    pub(super) async fn park_and_move(&mut self) -> Result<bool, SessionError> {
        self.drain_server().await?;
        if self.skipping {
            return Ok(false);
        }
        if let Some(conn) = self.server.take() {
            self.parked.push(Side {
                shard: self.server_shard,
                node: self.server_node,
                conn,
            });
            self.cancel.set(None);
            self.replay = None;
        }
        Ok(true)
    }

    /// The batch comes back to a shard it already ran on: that connection again.
    pub(super) fn unpark(&mut self, shard: usize) -> bool {
        let Some(i) = self.parked.iter().position(|s| s.shard == shard) else {
            return false;
        };
        let side = self.parked.swap_remove(i);
        self.hold(side);
        true
    }

    /// The client's batch ends (Sync, or a simple Query): the parked connections
    /// commit when the whole batch succeeded, and roll back (closed) otherwise.
    pub(super) async fn end_parked(&mut self) -> Result<(), SessionError> {
        if self.server.is_some() {
            self.drain_server().await?;
        }
        let parked = std::mem::take(&mut self.parked);
        if self.skipping || self.server.is_none() {
            // Failed (or the held connection is gone): closing rolls each part back.
            drop(parked);
            return Ok(());
        }
        let mut parked = parked.into_iter();
        let mut wrote = false;
        while let Some(mut side) = parked.next() {
            match side.conn.sync().await {
                Ok(()) => {
                    wrote |= side.node == PRIMARY;
                    if side.conn.is_poolable() {
                        side.conn.release();
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, shard = %self.topo.shards[side.shard].name,
                        "a batch's part failed at commit; the rest of the batch is rolled back");
                    drop(parked);
                    self.fail_batch(&error);
                    break;
                }
            }
        }
        if wrote && self.fe.settings.read_your_writes {
            self.route.wrote_at = Some(std::time::Instant::now());
        }
        Ok(())
    }

    /// Makes the held connection fail the batch, the client seeing `error`.
    fn fail_batch(&mut self, error: &BackendError) {
        let (code, message) = match error {
            BackendError::Server { code, message } => (code.as_str(), message.clone()),
            other => ("08006", other.to_string()),
        };
        let mut answer = bytes::BytesMut::new();
        messages::error_fields(&mut answer, b'E', "ERROR", code, &message);
        self.raise_with = Some(answer.freeze());
        self.raise_stale();
    }
}
