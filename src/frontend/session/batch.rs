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
    /// A multi-row INSERT split by shard: per shard its own text, parameter types and
    /// Bind (the rows it owns, parameters renumbered).
    split: Option<Vec<SplitPart>>,
}

#[derive(Clone)]
struct SplitPart {
    shard: usize,
    text: String,
    param_types: Vec<u32>,
    bind_rest: Bytes,
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
        let split = match &rows {
            Some(parts) => match split_insert(&stmt.query, &stmt.param_types, bind.rest, parts) {
                Some(split) => Some(split),
                None => {
                    return self
                        .refuse_extended("this multi-row INSERT cannot be split by shard (parameters outside its VALUES rows?)")
                        .await
                }
            },
            None => None,
        };
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
        if self.server.is_some() && !self.in_explicit_transaction() {
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
            split,
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
                self.end_ticket_if_idle();
                if self.in_explicit_transaction() {
                    let status = self.client_status();
                    messages::ready_for_query(&mut self.cout, status);
                } else {
                    self.ready_idle();
                }
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
        self.end_ticket_if_idle();
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
        let legs = match &batch.split {
            Some(parts) => parts
                .iter()
                .map(|part| Leg {
                    shard: part.shard,
                    messages: leg_messages(&part.text, &part.param_types, &part.bind_rest),
                    ready: 1,
                })
                .collect(),
            None => batch
                .shards
                .iter()
                .map(|&shard| Leg {
                    shard,
                    messages: payload.clone(),
                    ready: 1,
                })
                .collect(),
        };
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

/// Parse, Bind, Describe of the portal, Execute and Sync of one leg.
fn leg_messages(text: &str, param_types: &[u32], bind_rest: &[u8]) -> Bytes {
    use crate::protocol::messages::tag;
    let mut out = BytesMut::new();
    messages::parse(&mut out, "", text, param_types);
    messages::put_msg(&mut out, tag::BIND, |b| {
        b.extend_from_slice(&[0, 0]); // portal "", statement ""
        b.extend_from_slice(bind_rest);
    });
    messages::put_msg(&mut out, tag::DESCRIBE, |b| b.extend_from_slice(&[b'P', 0]));
    messages::put_msg(&mut out, tag::EXECUTE, |b| {
        b.extend_from_slice(&[0, 0, 0, 0, 0])
    });
    messages::empty_msg(&mut out, tag::SYNC);
    out.freeze()
}

/// Per shard, the INSERT with only its rows of the VALUES list, its `$n` parameters
/// renumbered from 1 in order of first use, and the matching parameter types and Bind
/// (formats and values of those parameters; the result formats unchanged). None when
/// a parameter appears outside the VALUES rows (RETURNING, ON CONFLICT) or the text
/// or Bind cannot be read.
fn split_insert(
    query: &str,
    param_types: &[u32],
    bind_rest: &[u8],
    parts: &[(usize, Vec<usize>)],
) -> Option<Vec<SplitPart>> {
    use sqlparser::ast::{SetExpr, Statement, Value};
    let params = messages::decode_bind_params(bind_rest).ok()?;
    let result_formats = bind_result_formats(bind_rest, params.values.len())?;
    let statements =
        sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::PostgreSqlDialect {}, query)
            .ok()?;
    let [Statement::Insert(insert)] = statements.as_slice() else {
        return None;
    };
    let source = insert.source.as_ref()?;
    let SetExpr::Values(values) = source.body.as_ref() else {
        return None;
    };
    // Parameters used outside the rows would have to go to every part: not handled.
    let mut outside = insert.clone();
    outside.source = None;
    if placeholders(&Statement::Insert(outside)) > 0 {
        return None;
    }
    let mut out = Vec::with_capacity(parts.len());
    for (shard, rows) in parts {
        let mut subset = values.clone();
        subset.rows = rows
            .iter()
            .map(|&i| values.rows.get(i).cloned())
            .collect::<Option<Vec<_>>>()?;
        // Renumber `$n` in order of first use.
        let mut order: Vec<usize> = Vec::new();
        let mut bad = false;
        let _ = sqlparser::ast::visit_expressions_mut(&mut subset, |expr| {
            if let sqlparser::ast::Expr::Value(v) = expr {
                if let Value::Placeholder(p) = &mut v.value {
                    match p.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) {
                        Some(n) if n >= 1 && n <= params.values.len() => {
                            let new = match order.iter().position(|&o| o == n) {
                                Some(i) => i + 1,
                                None => {
                                    order.push(n);
                                    order.len()
                                }
                            };
                            *p = format!("${new}");
                        }
                        _ => bad = true,
                    }
                }
            }
            std::ops::ControlFlow::<()>::Continue(())
        });
        if bad {
            return None;
        }
        let mut part = insert.clone();
        let mut query = source.clone();
        query.body = Box::new(SetExpr::Values(subset));
        part.source = Some(query);
        let mut bind = BytesMut::new();
        let count = i16::try_from(order.len()).ok()?;
        bind.extend_from_slice(&count.to_be_bytes());
        for &n in &order {
            bind.extend_from_slice(&params.formats[n - 1].to_be_bytes());
        }
        bind.extend_from_slice(&count.to_be_bytes());
        for &n in &order {
            match params.values[n - 1] {
                Some(v) => {
                    bind.extend_from_slice(&i32::try_from(v.len()).ok()?.to_be_bytes());
                    bind.extend_from_slice(v);
                }
                None => bind.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        bind.extend_from_slice(result_formats);
        out.push(SplitPart {
            shard: *shard,
            text: Statement::Insert(part).to_string(),
            param_types: order
                .iter()
                .map(|&n| param_types.get(n - 1).copied().unwrap_or(0))
                .collect(),
            bind_rest: bind.freeze(),
        });
    }
    Some(out)
}

/// How many `$n` placeholders a statement has.
fn placeholders(statement: &sqlparser::ast::Statement) -> usize {
    let mut n = 0;
    let _ = sqlparser::ast::visit_expressions(statement, |expr| {
        if let sqlparser::ast::Expr::Value(v) = expr {
            if matches!(v.value, sqlparser::ast::Value::Placeholder(_)) {
                n += 1;
            }
        }
        std::ops::ControlFlow::<()>::Continue(())
    });
    n
}

/// The result-format part of a Bind's rest (after the parameter values).
fn bind_result_formats(rest: &[u8], nparams: usize) -> Option<&[u8]> {
    let i16_at = |b: &[u8], at: usize| -> Option<usize> {
        let v = i16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]);
        usize::try_from(v).ok()
    };
    let mut at = 2 + 2 * i16_at(rest, 0)?;
    at += 2; // parameter count
    for _ in 0..nparams {
        let len = i32::from_be_bytes(rest.get(at..at + 4)?.try_into().ok()?);
        at += 4 + usize::try_from(len).unwrap_or(0);
    }
    rest.get(at..)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(formats: &[i16], values: &[Option<&[u8]>], results: &[i16]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(formats.len() as i16).to_be_bytes());
        for f in formats {
            b.extend_from_slice(&f.to_be_bytes());
        }
        b.extend_from_slice(&(values.len() as i16).to_be_bytes());
        for v in values {
            match v {
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        b.extend_from_slice(&(results.len() as i16).to_be_bytes());
        for r in results {
            b.extend_from_slice(&r.to_be_bytes());
        }
        b
    }

    #[test]
    fn rows_split_with_their_parameters_renumbered() {
        let rest = bind(&[0], &[Some(b"1"), Some(b"a"), Some(b"2"), None], &[1]);
        let parts = split_insert(
            "INSERT INTO t (id, v) VALUES ($1, $2), ($3, $4) RETURNING id",
            &[20, 25, 20, 25],
            &rest,
            &[(0, vec![1]), (1, vec![0])],
        )
        .unwrap_or_default();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].shard, 0);
        assert_eq!(
            parts[0].text,
            "INSERT INTO t (id, v) VALUES ($1, $2) RETURNING id"
        );
        assert_eq!(parts[0].param_types, vec![20, 25]);
        assert_eq!(
            &parts[0].bind_rest[..],
            &bind(&[0, 0], &[Some(b"2"), None], &[1])[..]
        );
        assert_eq!(
            &parts[1].bind_rest[..],
            &bind(&[0, 0], &[Some(b"1"), Some(b"a")], &[1])[..]
        );
    }

    #[test]
    fn parameters_outside_the_rows_are_not_split() {
        let rest = bind(&[], &[Some(b"1"), Some(b"2"), Some(b"x")], &[]);
        assert!(split_insert(
            "INSERT INTO t (id) VALUES ($1), ($2) ON CONFLICT (id) DO UPDATE SET v = $3",
            &[],
            &rest,
            &[(0, vec![0]), (1, vec![1])],
        )
        .is_none());
    }
}
