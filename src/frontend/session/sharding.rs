//! Sharded maps: which shard a statement's transaction runs on, decided before a
//! server connection is borrowed. The planner (`routing::shard_plan`) says where a
//! statement's keys live; this module applies that to the session: one shard per
//! transaction, cross-shard statements to the fan-out executor (`fanout.rs`), and
//! refusals as real errors. Unsharded maps never come here.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

use super::fanout::{Combine, Leg};
use super::time_keys::time_keys;
use super::{Expect, Op, Session, SessionError};
use crate::merge::{AggregatePlan, MergePlan};
use crate::protocol::messages::{self, btag};
use crate::routing::analyze::{Analyzed, StatementClass};
use crate::routing::shard_plan::{
    self, ColumnSource, MergeShape, OutputColumn, ShardPlan, Target, Values,
};

/// Where a statement runs, as the session applies it.
pub(super) enum Placement {
    /// On one shard's connection, through the byte-for-byte forwarder.
    One(usize),
    /// Answered here already (refused, or run across shards).
    Answered,
}

impl<R, W> Session<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// The transaction status the client believes in.
    pub(super) fn client_status(&self) -> u8 {
        match (&self.server, &self.pending_begin) {
            (Some(_), Some(_)) if self.describe_only => b'T',
            (Some(conn), _) => conn.txn_status,
            (None, Some(_)) => b'T',
            (None, None) => b'I',
        }
    }

    /// Routes one simple-protocol statement of a sharded map. Returns true when the
    /// statement was answered here (deferred BEGIN, refusal, cross-shard execution);
    /// otherwise `next_shard` names the shard the caller borrows from.
    pub(super) async fn route_sharded_query(
        &mut self,
        sql: &str,
        analyzed: &Analyzed,
    ) -> Result<bool, SessionError> {
        if matches!(analyzed.class, StatementClass::Begin { .. }) {
            self.txn_begin = Some((sql.to_owned(), *analyzed));
        }
        if self.server.is_none() && self.defer_transaction_control(sql, analyzed) {
            self.settle_side_end().await;
            return Ok(true);
        }
        if matches!(
            analyzed.class,
            StatementClass::Begin { .. } | StatementClass::TxnControl | StatementClass::SessionSet
        ) || self.in_failed_transaction()
        {
            // Transaction control and session settings go with the session; so does
            // everything in a failed transaction (its server answers 25P02).
            self.next_shard = self.current_shard();
            return Ok(false);
        }
        self.enter_cutover_gate().await?;
        // One scan gives the shape key and this text's literal positions.
        let mut spans = Vec::new();
        let plan = self
            .fe
            .shard_plans
            .get_or_compute_spans(sql, &mut spans, |text| Arc::new(shard_plan::plan(text)));
        let known = self.time_keys_for(&plan).await?;
        let time = known
            .as_deref()
            .map(|k| time_keys(k, self.session_utc_offset(k)))
            .unwrap_or_default();
        let values = Values::simple(sql, &spans).with_time(time);
        let target = shard_plan::route(&plan, &self.topo.map, &values);
        let placement = match &target {
            Target::Refuse(why) if why.contains("column list") => {
                match self.with_column_list(sql).await? {
                    // `INSERT INTO t VALUES (...)`: placed as if the columns were named.
                    Some(named) => {
                        let plan = Arc::new(shard_plan::plan(&named));
                        let spans = shard_plan::literal_spans(&named).unwrap_or_default();
                        let values = Values::simple(&named, &spans).with_time(time);
                        let target = shard_plan::route(&plan, &self.topo.map, &values);
                        self.place(&plan, target, &named, &values).await?
                    }
                    None => self.place(&plan, target, sql, &values).await?,
                }
            }
            _ => self.place(&plan, target, sql, &values).await?,
        };
        match placement {
            Placement::One(shard) => {
                self.next_shard = shard;
                Ok(false)
            }
            Placement::Answered => {
                self.end_ticket_if_idle();
                Ok(true)
            }
        }
    }

    /// `INSERT INTO t VALUES (...)` without a column list: the same INSERT with the
    /// table's leading columns named, read from the default shard's catalog (the key
    /// column's position is what routing needs). None when that cannot be done.
    async fn with_column_list(&mut self, sql: &str) -> Result<Option<String>, SessionError> {
        use sqlparser::ast::{SetExpr, Statement};
        let Ok(mut statements) =
            sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::PostgreSqlDialect {}, sql)
        else {
            return Ok(None);
        };
        let [Statement::Insert(insert)] = statements.as_mut_slice() else {
            return Ok(None);
        };
        let width = match insert.source.as_deref().map(|q| q.body.as_ref()) {
            Some(SetExpr::Values(values)) => values.rows.first().map_or(0, |r| r.len()),
            _ => return Ok(None),
        };
        if !insert.columns.is_empty() || width == 0 {
            return Ok(None);
        }
        let table = insert.table.to_string();
        let lookup = format!(
            "SELECT string_agg(quote_ident(attname), ',' ORDER BY attnum) FROM pg_attribute \
             WHERE attrelid = to_regclass({}) AND attnum > 0 AND NOT attisdropped",
            crate::backend::params::quote_literal(&table)
        );
        let default = self.topo.default_shard;
        let mut conn = self.borrow_for_leg(default, &super::fanout::WRITE).await?;
        let columns = conn.query_scalar(&lookup).await;
        conn.release();
        let Some(columns) = columns? else {
            return Ok(None);
        };
        let names: Vec<&str> = columns.split(',').collect();
        if names.len() < width {
            return Ok(None);
        }
        insert.columns = names[..width]
            .iter()
            .map(|n| sqlparser::ast::Ident::new(n.trim_matches('"').replace("\"\"", "\"")))
            .map(|mut ident| {
                ident.quote_style = Some('"');
                sqlparser::ast::ObjectName::from(vec![ident])
            })
            .collect();
        Ok(Some(statements[0].to_string()))
    }

    /// Routes a Bind of a sharded map: sets `next_shard`, or refuses (through the
    /// server, so the batch fails there as for a server error) and returns false.
    pub(super) async fn route_sharded_bind(
        &mut self,
        stmt: &crate::frontend::prepared::PreparedStatement,
        bind: &messages::BindHead<'_>,
    ) -> Result<bool, SessionError> {
        if matches!(stmt.analyzed.class, StatementClass::Begin { .. }) {
            self.txn_begin = Some((stmt.query.clone(), *stmt.analyzed));
        }
        if matches!(
            stmt.analyzed.class,
            StatementClass::Begin { .. } | StatementClass::TxnControl | StatementClass::SessionSet
        ) || self.in_failed_transaction()
        {
            self.next_shard = self.current_shard();
            return Ok(true);
        }
        self.enter_cutover_gate().await?;
        let params = messages::decode_bind_params(bind.rest)?;
        let (plan, spans) = stmt.shard_plan();
        let plan = plan.clone();
        let known = self.time_keys_for(&plan).await?;
        let time = known
            .as_deref()
            .map(|k| time_keys(k, self.session_utc_offset(k)))
            .unwrap_or_default();
        let values = Values {
            text: &stmt.query,
            literals: spans,
            params: &params.values,
            param_formats: &params.formats,
            param_types: &stmt.param_types,
            time,
        };
        let target = shard_plan::route(&plan, &self.topo.map, &values);
        self.keep_ticket_for(&target);
        if self.writes_reshard_copies(&plan, &target) {
            return self.refuse_extended(WRITES_COPIES).await;
        }
        self.let_go_of_prepare_only(&target).await?;
        if self.reads_beyond_own_shard(&plan, &target) {
            // A driver sends the statement's Parse in the same batch (pgjdbc): its
            // answer comes first, then the read runs on the other shards.
            self.catch_up_with_server().await?;
        }
        let one = match target {
            Target::Default if plan.tables().next().is_none() => self.current_shard(),
            Target::Default => self.topo.default_shard,
            Target::AnyOne => self.current_shard(),
            Target::Shards(shards) if shards.len() == 1 => shards[0],
            Target::Refuse(message) => return self.refuse_extended(&message).await,
            Target::Unknown => {
                return self
                    .refuse_extended("the statement could not be parsed, so the shard it belongs to is unknown")
                    .await
            }
            target @ (Target::Shards(_) | Target::All { write: false })
                if self.in_explicit_transaction()
                    && plan.is_read()
                    && self.ops.is_empty()
                    && self.sout.is_empty() =>
            {
                // A read inside a transaction: the transaction's shard answers on its
                // own connection (see `fan_out_read`).
                return self
                    .start_extended_fan_out(stmt, bind, &plan, &values, target)
                    .await;
            }
            _ if self.server.is_some() && !self.held_elsewhere(None) => {
                return self
                    .refuse_extended("a statement over several shards cannot run inside a transaction (a transaction stays on one shard)")
                    .await
            }
            _ if self.pending_begin.is_some() => {
                return self
                    .refuse_extended("a statement over several shards cannot run inside a transaction (a transaction stays on one shard)")
                    .await
            }
            target => {
                return self
                    .start_extended_fan_out(stmt, bind, &plan, &values, target)
                    .await
            }
        };
        self.next_shard = one;
        if self.server.is_some() && one != self.server_shard && !self.held_elsewhere(None) {
            if self.reads_elsewhere(&plan) {
                // Read on the transaction's connection on that shard (side.rs).
                let target = Target::Shards(vec![one]);
                return self
                    .start_extended_fan_out(stmt, bind, &plan, &values, target)
                    .await;
            }
            if self.batch_may_move() {
                // A batch writing on several shards outside a transaction (parked.rs).
                return self.park_and_move().await;
            }
            let message = format!(
                "this transaction runs on shard {}; the statement belongs to shard {} (a transaction stays on one shard for writes)",
                self.topo.shards[self.server_shard].name, self.topo.shards[one].name
            );
            return self.refuse_extended(&message).await;
        }
        Ok(true)
    }

    /// A statement for several shards while the session holds a connection that only
    /// parsed and described since the last Sync, outside a transaction (asyncpg and
    /// sqlx prepare with Parse/Describe/Flush, then Bind/Execute/Sync): that
    /// connection carries no transaction, so it is let go and the statement is not
    /// "inside a transaction".
    async fn let_go_of_prepare_only(&mut self, target: &Target) -> Result<(), SessionError> {
        let several = match target {
            Target::Shards(shards) => shards.len() > 1,
            Target::All { .. } | Target::SplitInsert(_) => true,
            _ => false,
        };
        if several && self.only_prepared() && !self.in_explicit_transaction() {
            self.sync_and_release().await?;
        }
        Ok(())
    }

    /// A read for another shard than the transaction's, inside the transaction and
    /// with nothing else under way: it runs on the transaction's connection there.
    fn reads_elsewhere(&self, plan: &ShardPlan) -> bool {
        plan.is_read()
            && !self.describe_only
            && self.in_explicit_transaction()
            && self.ops.is_empty()
            && self.sout.is_empty()
    }

    /// An extended-protocol BEGIN the proxy answers and defers, as it does a
    /// simple-query one: no server held, no transaction open, nothing owed before it
    /// (a held-back Parse may only be the BEGIN's own).
    pub(super) fn defers_extended_begin(
        &self,
        stmt: &Arc<crate::frontend::prepared::PreparedStatement>,
    ) -> bool {
        self.topo.sharded()
            && matches!(stmt.analyzed.class, StatementClass::Begin { .. })
            && stmt.raw_query.is_none()
            && self.server.is_none()
            && self.pending_begin.is_none()
            && self.batch.is_none()
            && self.ops.is_empty()
            && self
                .deferred_parse
                .as_ref()
                .is_none_or(|(_, parsed)| Arc::ptr_eq(parsed, stmt))
    }

    /// A read inside a transaction that needs shards other than the transaction's own.
    fn reads_beyond_own_shard(&self, plan: &ShardPlan, target: &Target) -> bool {
        if !plan.is_read() || self.server.is_none() || !self.in_explicit_transaction() {
            return false;
        }
        match target {
            Target::Shards(shards) => shards.iter().any(|&s| s != self.server_shard),
            Target::All { write: false } => true,
            Target::Default => self.topo.default_shard != self.server_shard,
            _ => false,
        }
    }

    /// Sends what is queued for the held server (Parse and Describe messages of the
    /// client's open batch, which owe answers without a Sync) with a Flush, and
    /// processes the answers, so the next statement can run elsewhere after them. Does
    /// nothing when an Execute or Sync is still owed (the statement is then refused as
    /// not waiting for the ones before it).
    async fn catch_up_with_server(&mut self) -> Result<(), SessionError> {
        let answered_without_sync = self.ops.iter().all(|op| {
            matches!(
                op,
                Op::Forward(Expect::Parse { .. } | Expect::Describe { .. })
                    | Op::Hidden(Expect::Parse { .. } | Expect::Shape { .. })
                    | Op::Synthetic(_)
            )
        });
        if self.ops.is_empty() || !answered_without_sync || self.gate.is_some() {
            return Ok(());
        }
        self.drain_server().await
    }

    /// The client's transaction failed on its server (ReadyForQuery 'E').
    fn in_failed_transaction(&self) -> bool {
        !self.describe_only && self.server.as_ref().is_some_and(|c| c.txn_status == b'E')
    }

    /// Refuses an extended-protocol statement: the server of the session's current
    /// shard raises the error, so the batch (and a transaction) fails as for any server
    /// error and the rest of the batch is skipped up to Sync.
    pub(super) async fn refuse_extended(&mut self, message: &str) -> Result<bool, SessionError> {
        tracing::debug!(message, "statement refused");
        self.next_shard = self.current_shard();
        self.ensure_server(None).await?;
        if let Some(conn) = self.server.as_mut() {
            conn.unnamed = None;
        }
        messages::parse(&mut self.sout, "", &raise_sql(message), &[]);
        self.push(Op::Hidden(Expect::Parse {
            named: None,
            unnamed: None,
        }));
        messages::put_msg(&mut self.sout, crate::protocol::messages::tag::BIND, |b| {
            b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        });
        self.push(Op::Hidden(Expect::Bind { stmt: None }));
        messages::put_msg(
            &mut self.sout,
            crate::protocol::messages::tag::EXECUTE,
            |b| {
                b.extend_from_slice(&[0, 0, 0, 0, 0]);
            },
        );
        self.push(Op::Hidden(Expect::Execute));
        Ok(false)
    }

    /// The client is inside BEGIN ... COMMIT (deferred or on a server).
    pub(super) fn in_explicit_transaction(&self) -> bool {
        self.pending_begin.is_some() || self.server.as_ref().is_some_and(|c| c.txn_status != b'I')
    }

    /// The shard the session's transaction is on (the default one between them).
    fn current_shard(&self) -> usize {
        if self.server.is_some() {
            self.server_shard
        } else {
            self.topo.default_shard
        }
    }

    /// Applies a routing target to a simple-protocol statement.
    async fn place(
        &mut self,
        plan: &ShardPlan,
        target: Target,
        sql: &str,
        values: &Values<'_>,
    ) -> Result<Placement, SessionError> {
        self.keep_ticket_for(&target);
        if self.writes_reshard_copies(plan, &target) {
            return self.refused(WRITES_COPIES).await;
        }
        self.let_go_of_prepare_only(&target).await?;
        let in_transaction = self.server.is_some() || self.pending_begin.is_some();
        let one = match target {
            Target::Default if plan.tables().next().is_none() => self.current_shard(),
            Target::Default => self.topo.default_shard,
            Target::AnyOne => self.current_shard(),
            Target::Shards(shards) if shards.len() == 1 => shards[0],
            Target::Refuse(message) => return self.refused(&message).await,
            Target::Unknown => {
                let message =
                    "the statement could not be parsed, so the shard it belongs to is unknown";
                return self.refused(message).await;
            }
            Target::Shards(_) | Target::All { write: false }
                if in_transaction
                    && plan.is_read()
                    && (!self.ops.is_empty() || !self.sout.is_empty()) =>
            {
                let message = "a read over several shards inside a transaction must wait for the statements before it (send it after their answers)";
                return self.refused(message).await;
            }
            _ if in_transaction && !plan.is_read() => {
                let message = "a statement over several shards cannot run inside a transaction (a transaction stays on one shard)";
                return self.refused(message).await;
            }
            Target::Shards(shards) if !plan.is_read() => {
                // A keyed write whose keys are on several shards (`id IN (1, 2)`): all
                // or nothing, as a write on every shard is.
                let legs = shards
                    .into_iter()
                    .map(|shard| Leg::simple(shard, sql))
                    .collect();
                self.fan_out_write(legs, Combine::Sum).await?;
                self.ready_idle();
                return Ok(Placement::Answered);
            }
            Target::Shards(shards) => return self.read_across(plan, shards, sql, values).await,
            Target::All { write: false } => {
                let all = (0..self.topo.shards.len()).collect();
                return self.read_across(plan, all, sql, values).await;
            }
            Target::All { write: true } => {
                let legs = (0..self.topo.shards.len())
                    .map(|shard| Leg::simple(shard, sql))
                    .collect();
                let combine = combine_for(plan, &self.topo.map);
                self.fan_out_write(legs, combine).await?;
                self.ready_idle();
                return Ok(Placement::Answered);
            }
            Target::SplitInsert(parts) => {
                let Some(legs) = split_insert(sql, &parts) else {
                    return self
                        .refused("this multi-row INSERT cannot be split by shard")
                        .await;
                };
                self.fan_out_write(legs, Combine::Sum).await?;
                self.ready_idle();
                return Ok(Placement::Answered);
            }
        };
        self.next_shard = one;
        if self.server.is_some() && one != self.server_shard && !self.held_elsewhere(None) {
            if self.reads_elsewhere(plan) {
                // Read on the transaction's connection on that shard (side.rs).
                return self.read_across(plan, vec![one], sql, values).await;
            }
            if plan.is_read() && self.in_explicit_transaction() {
                let message = "a read on another shard inside a transaction must wait for the statements before it (send it after their answers)";
                return self.refused(message).await;
            }
            let message = format!(
                "this transaction runs on shard {}; the statement belongs to shard {} (a transaction stays on one shard for writes)",
                self.topo.shards[self.server_shard].name, self.topo.shards[one].name
            );
            return self.refused(&message).await;
        }
        Ok(Placement::One(one))
    }

    async fn refused(&mut self, message: &str) -> Result<Placement, SessionError> {
        self.refuse_query(message).await?;
        Ok(Placement::Answered)
    }

    /// A read over several shards, merged.
    async fn read_across(
        &mut self,
        plan: &ShardPlan,
        shards: Vec<usize>,
        sql: &str,
        values: &Values<'_>,
    ) -> Result<Placement, SessionError> {
        let (merge, text) = match plan.merge() {
            None => (MergePlan::default(), sql.to_owned()),
            Some(Err(message)) => return self.refused(message).await,
            Some(Ok(shape)) => {
                let Some(merge) = merge_plan(shape, values) else {
                    return self.refused("LIMIT, OFFSET or ORDER BY position must be a non-negative integer here").await;
                };
                let text = if shape.rewrite {
                    match shard_plan::shard_sql(sql) {
                        Some(text) => text,
                        None => {
                            return self
                                .refused("this read cannot be rewritten for several shards")
                                .await
                        }
                    }
                } else {
                    sql.to_owned()
                };
                (merge, text)
            }
        };
        let legs = shards
            .into_iter()
            .map(|shard| Leg::simple(shard, &text))
            .collect();
        // Inside a transaction the leg of the transaction's shard runs on its own
        // connection (it sees the transaction's writes); the other shards answer from
        // connections of their own (not one snapshot: docs/sharding.md).
        let status = (self.server.is_some() || self.pending_begin.is_some()).then_some(());
        self.fan_out_read(legs, merge, true).await?;
        match status {
            Some(()) => {
                let status = self.client_status();
                if let Some(started) = self.statement_started.take() {
                    self.fe
                        .metrics
                        .latency(crate::admin::metrics::QueryRoute::FanOut, started.elapsed());
                }
                messages::ready_for_query(&mut self.cout, status);
            }
            None => self.ready_idle(),
        }
        Ok(Placement::Answered)
    }

    pub(super) fn ready_idle(&mut self) {
        if let Some(started) = self.statement_started.take() {
            self.fe
                .metrics
                .latency(crate::admin::metrics::QueryRoute::FanOut, started.elapsed());
        }
        messages::ready_for_query(&mut self.cout, b'I');
    }

    /// `BEGIN` without a server: answered here, sent later on the shard of the
    /// transaction's first statement. `COMMIT`/`ROLLBACK` of a transaction that never
    /// ran a statement: answered here too.
    fn defer_transaction_control(&mut self, sql: &str, analyzed: &Analyzed) -> bool {
        match analyzed.class {
            StatementClass::Begin { .. } if self.pending_begin.is_none() => {
                self.pending_begin = Some((sql.to_owned(), *analyzed));
                self.answer(&["BEGIN"], b'T');
                true
            }
            StatementClass::TxnControl if self.pending_begin.is_some() => {
                let first = crate::frontend::session_sql::strip_leading_comments(sql)
                    .split(|c: char| c.is_whitespace() || c == ';')
                    .next()
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                let tag = match first.as_str() {
                    "commit" | "end" => "COMMIT",
                    "rollback" | "abort" => "ROLLBACK",
                    // SAVEPOINT and friends need the transaction on a server.
                    _ => return false,
                };
                self.pending_begin = None;
                self.txn_begin = None;
                if !self.side.is_empty() {
                    self.side_end = Some(tag == "COMMIT");
                }
                self.answer(&[tag], b'I');
                true
            }
            _ => false,
        }
    }

    /// Answers a simple Query ourselves: CommandCompletes, then ReadyForQuery.
    fn answer(&mut self, tags: &[&str], status: u8) {
        let mut out = BytesMut::new();
        for tag in tags {
            messages::command_complete(&mut out, tag);
        }
        messages::ready_for_query(&mut out, status);
        self.push_synthetic_bytes(out.freeze());
    }

    /// Refuses a statement with SQLSTATE 0A000. Outside a transaction the proxy
    /// answers; inside one the server raises the error, so the transaction fails there
    /// exactly as it would for a server error (later statements get 25P02).
    pub(super) async fn refuse_query(&mut self, message: &str) -> Result<(), SessionError> {
        tracing::debug!(message, "statement refused");
        self.fe.metrics.error("0A000");
        if self.server.is_none() && self.pending_begin.is_none() {
            let mut out = BytesMut::new();
            messages::error_fields(&mut out, btag::ERROR_RESPONSE, "ERROR", "0A000", message);
            messages::ready_for_query(&mut out, b'I');
            self.push_synthetic_bytes(out.freeze());
            return Ok(());
        }
        if self.server.is_none() {
            self.next_shard = self.topo.default_shard;
            self.ensure_server(None).await?;
        }
        messages::query(&mut self.sout, &raise_sql(message));
        self.push(Op::Forward(Expect::Query));
        Ok(())
    }
}

/// A statement that makes the server raise `message` with SQLSTATE 0A000.
const WRITES_COPIES: &str = "a write over several shards that include a reshard's target shard is refused until the job's cutover (the target holds copies of rows it does not own yet); give the shard key, or retry after the cutover";

fn raise_sql(message: &str) -> String {
    format!(
        "DO $shardgate$ BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = {}; END $shardgate$",
        crate::backend::params::quote_literal(&message.replace("$shardgate$", ""))
    )
}

/// How a write on every shard answers: rows of sharded tables differ per shard (their
/// counts add up); reference tables and schema objects are the same everywhere (one
/// shard's answer is the answer).
pub(super) fn combine_for(plan: &ShardPlan, map: &crate::shard_map::ShardMap) -> Combine {
    let sharded = plan.tables().any(|t| {
        matches!(
            map.tables.get(t),
            Some(crate::shard_map::TableRule::Sharded { .. })
        )
    });
    if sharded {
        Combine::Sum
    } else {
        Combine::First
    }
}

/// The merger's plan for one execution of a read with merge shape `shape`.
pub(super) fn merge_plan(shape: &MergeShape, values: &Values) -> Option<MergePlan> {
    let count = |v: &Option<shard_plan::ValueRef>| -> Option<Option<u64>> {
        match v {
            None => Some(None),
            Some(v) => u64::try_from(shard_plan::value_as_i64(v, values)?)
                .ok()
                .map(Some),
        }
    };
    let sort = shape
        .sort
        .iter()
        .map(|key| {
            let column = match &key.column {
                ColumnSource::Index(i) => *i,
                ColumnSource::Ordinal(v) => {
                    usize::try_from(shard_plan::value_as_i64(v, values)?.checked_sub(1)?).ok()?
                }
                ColumnSource::Hidden(k) => crate::merge::HIDDEN_SORT_COLUMN + k,
            };
            Some(crate::merge::SortKey {
                column,
                descending: key.descending,
                nulls_first: key.nulls_first,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    let aggregate = shape.aggregate.as_ref().map(|columns| AggregatePlan {
        columns: columns
            .iter()
            .map(|c| match c {
                OutputColumn::GroupKey => crate::merge::OutputColumn::GroupKey,
                OutputColumn::Count => crate::merge::OutputColumn::Count,
                OutputColumn::Sum => crate::merge::OutputColumn::Sum,
                OutputColumn::Min => crate::merge::OutputColumn::Min,
                OutputColumn::Max => crate::merge::OutputColumn::Max,
                OutputColumn::Avg { sum, count } => crate::merge::OutputColumn::Avg {
                    sum: *sum,
                    count: *count,
                },
            })
            .collect(),
    });
    Some(MergePlan {
        sort,
        limit: count(&shape.limit)?,
        offset: count(&shape.offset)?.unwrap_or(0),
        aggregate,
        hidden_columns: shape.hidden_columns,
    })
}

/// Per shard, the INSERT with only that shard's rows of the VALUES list.
fn split_insert(sql: &str, parts: &[(usize, Vec<usize>)]) -> Option<Vec<Leg>> {
    use sqlparser::ast::{SetExpr, Statement};
    let statements =
        sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::PostgreSqlDialect {}, sql)
            .ok()?;
    let [Statement::Insert(insert)] = statements.as_slice() else {
        return None;
    };
    let source = insert.source.as_ref()?;
    let SetExpr::Values(values) = source.body.as_ref() else {
        return None;
    };
    let mut legs = Vec::with_capacity(parts.len());
    for (shard, rows) in parts {
        let mut part = insert.clone();
        let mut query = source.clone();
        let mut subset = values.clone();
        subset.rows = rows
            .iter()
            .map(|&i| values.rows.get(i).cloned())
            .collect::<Option<Vec<_>>>()?;
        query.body = Box::new(SetExpr::Values(subset));
        part.source = Some(query);
        legs.push(Leg::simple(*shard, &Statement::Insert(part).to_string()));
    }
    Some(legs)
}
