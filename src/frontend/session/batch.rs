//! Sharded maps, extended protocol: a statement bound for several shards. Its Bind is
//! answered here and the rest of the client's batch (Describe and Execute of the
//! portal, its Close) is collected until Sync or Flush; then the statement runs on
//! every shard at once (`fanout.rs`) and the client gets one answer, as from one
//! server.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

use super::fanout::{Combine, Leg};
use super::sharding::{combine_for, merge_plan};
use super::{Session, SessionError};
use crate::merge::MergePlan;
use crate::protocol::messages;
use crate::routing::shard_plan::{self, ShardPlan, Target, Values};

/// An extended-protocol batch collected to run on several shards at its Sync.
#[derive(Clone)]
pub(super) struct ExtendedFanOut {
    shards: Vec<usize>,
    /// Reads: how results merge. Writes: None.
    merge: Option<crate::merge::MergePlan>,
    /// The text the shards run (rewritten for merging when needed).
    text: String,
    param_types: Vec<u32>,
    /// The client's Bind after its portal and statement names.
    bind_rest: Bytes,
    portal: String,
    describe: bool,
    execute: bool,
    close: bool,
    done: bool,
    combine: Combine,
}

impl<R, W> Session<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// A Bind whose statement runs on several shards: answered here, and the rest of the
    /// client's batch (Describe, Execute, Close of the portal) is collected until Sync
    /// or Flush, then run on every shard at once (`fanout.rs`).
    pub(super) async fn start_extended_fan_out(
        &mut self,
        stmt: &crate::frontend::prepared::PreparedStatement,
        bind: &messages::BindHead<'_>,
        plan: &ShardPlan,
        values: &Values<'_>,
        target: Target,
    ) -> Result<bool, SessionError> {
        let all = || (0..self.topo.shards.len()).collect::<Vec<_>>();
        let (shards, write, rows) = match &target {
            Target::Shards(shards) => (shards.clone(), !plan.is_read(), None),
            Target::All { write } => (all(), *write, None),
            Target::SplitInsert(parts) => {
                (parts.iter().map(|(s, _)| *s).collect(), true, Some(parts))
            }
            _ => (all(), true, None),
        };
        if rows.is_some() {
            return self
                .refuse_extended("a multi-row INSERT over several shards needs the simple query protocol (or one statement per row)")
                .await;
        }
        let (merge, text) = if write {
            (None, stmt.query.clone())
        } else {
            match plan.merge() {
                None => (Some(MergePlan::default()), stmt.query.clone()),
                Some(Err(message)) => return self.refuse_extended(message).await,
                Some(Ok(shape)) => {
                    let Some(merge) = merge_plan(shape, values) else {
                        return self.refuse_extended("LIMIT, OFFSET or ORDER BY position must be a non-negative integer here").await;
                    };
                    let text = if shape.rewrite {
                        match shard_plan::shard_sql(&stmt.query) {
                            Some(text) => text,
                            None => {
                                return self
                                    .refuse_extended(
                                        "this read cannot be rewritten for several shards",
                                    )
                                    .await
                            }
                        }
                    } else {
                        stmt.query.clone()
                    };
                    (Some(merge), text)
                }
            }
        };
        if self.server.is_some() {
            self.sync_and_release().await?;
        }
        if self.deferred_parse.take().is_some() {
            // Every shard parses it as part of the batch.
            self.push_synthetic(super::client_msgs::PARSE_COMPLETE);
        }
        self.push_synthetic(super::client_msgs::BIND_COMPLETE);
        self.batch = Some(ExtendedFanOut {
            shards,
            merge,
            text,
            param_types: stmt.param_types.clone(),
            bind_rest: bytes::Bytes::copy_from_slice(bind.rest),
            portal: bind.portal.to_owned(),
            describe: false,
            execute: false,
            close: false,
            done: false,
            combine: match target {
                Target::All { .. } => combine_for(plan, &self.topo.map),
                _ => Combine::Sum,
            },
        });
        Ok(false)
    }

    /// A client frame while an extended-protocol batch is collected for several
    /// shards. Returns false when the frame is not part of it (the batch has been run
    /// and the frame is processed as usual).
    pub(super) async fn on_batch_frame(
        &mut self,
        frame: &crate::protocol::Frame,
    ) -> Result<bool, SessionError> {
        use crate::protocol::messages::tag;
        let Some(batch) = self.batch.as_mut() else {
            return Ok(false);
        };
        match frame.tag {
            tag::DESCRIBE => {
                let (kind, name) = messages::decode_target(frame)?;
                if kind == b'P' && name == batch.portal {
                    batch.describe = true;
                    return Ok(true);
                }
            }
            tag::EXECUTE => {
                let portal = frame.body().split(|&b| b == 0).next().unwrap_or_default();
                if portal == batch.portal.as_bytes() {
                    batch.execute = true;
                    return Ok(true);
                }
            }
            tag::CLOSE => {
                let (kind, name) = messages::decode_target(frame)?;
                if kind == b'P' && name == batch.portal {
                    batch.close = true;
                    return Ok(true);
                }
            }
            tag::FLUSH => {
                self.run_batch().await?;
                return Ok(true);
            }
            tag::SYNC => {
                self.run_batch().await?;
                self.batch = None;
                self.ready_idle();
                return Ok(true);
            }
            _ if batch.done && self.fanout_failed => {
                // After an error the rest of the batch is skipped up to Sync.
                return Ok(true);
            }
            _ => {}
        }
        // Anything else: the batch runs now, the frame afterwards (or, after an
        // error, the frame is skipped like the rest of the batch up to Sync).
        self.run_batch().await?;
        if self.batch.as_ref().is_some_and(|b| b.done) && self.fanout_failed {
            return Ok(true);
        }
        self.batch = None;
        Ok(false)
    }

    /// Runs the collected batch on its shards (once), answering what the client asked.
    async fn run_batch(&mut self) -> Result<(), SessionError> {
        let Some(batch) = self.batch.as_mut() else {
            return Ok(());
        };
        if batch.done || !batch.execute {
            return Ok(());
        }
        batch.done = true;
        let batch = batch.clone();
        let mut messages_out = BytesMut::new();
        messages::parse(&mut messages_out, "", &batch.text, &batch.param_types);
        messages::put_msg(
            &mut messages_out,
            crate::protocol::messages::tag::BIND,
            |b| {
                b.extend_from_slice(&[0, 0]); // portal "", statement ""
                b.extend_from_slice(&batch.bind_rest);
            },
        );
        messages::put_msg(
            &mut messages_out,
            crate::protocol::messages::tag::DESCRIBE,
            |b| {
                b.extend_from_slice(&[b'P', 0]);
            },
        );
        messages::put_msg(
            &mut messages_out,
            crate::protocol::messages::tag::EXECUTE,
            |b| {
                b.extend_from_slice(&[0, 0, 0, 0, 0]);
            },
        );
        messages::empty_msg(&mut messages_out, crate::protocol::messages::tag::SYNC);
        let payload = messages_out.freeze();
        let legs = batch
            .shards
            .iter()
            .map(|&shard| Leg {
                shard,
                messages: payload.clone(),
                ready: 1,
            })
            .collect();
        match batch.merge {
            Some(merge) => self.fan_out_read(legs, merge, batch.describe).await?,
            None => {
                self.fan_out_write_described(legs, batch.describe, batch.combine)
                    .await?
            }
        }
        if batch.close {
            self.cout
                .extend_from_slice(super::client_msgs::CLOSE_COMPLETE);
        }
        Ok(())
    }
}
