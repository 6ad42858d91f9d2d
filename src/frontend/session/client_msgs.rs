//! Client -> server direction: what each frontend message needs before it is forwarded
//! (a server connection, statement renaming, an injected Parse), and the order of
//! answers we then owe the client.

use std::sync::Arc;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Expect, Flow, Op, PortalAnswer, Session, SessionError};
use crate::frontend::prepared::PreparedStatement;
use crate::frontend::session_sql;
use crate::protocol::messages::{self, btag, tag};
use crate::protocol::{next_client_frame, Frame, Next, ProtocolError};
use crate::routing::analyze::{StatementClass, NOT_UTF8};

pub(super) const PARSE_COMPLETE: &[u8] = &[btag::PARSE_COMPLETE, 0, 0, 0, 4];
pub(super) const CLOSE_COMPLETE: &[u8] = &[btag::CLOSE_COMPLETE, 0, 0, 0, 4];
pub(super) const BIND_COMPLETE: &[u8] = &[btag::BIND_COMPLETE, 0, 0, 0, 4];
const NO_DATA: &[u8] = &[btag::NO_DATA, 0, 0, 0, 4];
const NO_PARAMETERS: &[u8] = &[btag::PARAMETER_DESCRIPTION, 0, 0, 0, 6, 0, 0];

/// Why a sharded map refuses a statement whose text is not UTF-8: its keys cannot be
/// read, as for SQL the parser rejects.
const NOT_UTF8_SHARDED: &str = "the statement text is not valid UTF-8 (client_encoding is not UTF8), so the shard it belongs to is unknown";

/// Makes the server fail with the SQLSTATE of a stale prepared statement, so the
/// transaction fails on the server exactly as it would on a direct connection.
const RAISE_STALE: &str = "DO $shardgate$ BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', \
    MESSAGE = 'cached plan must not change result type'; END $shardgate$";

impl<R, W> Session<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    pub(super) async fn process_client_frames(&mut self) -> Result<Flow, SessionError> {
        while self.sout.len() < self.fe.settings.buffer_size && self.gate.is_none() {
            if self.client_relay > 0 {
                if !self.relay_client_data() {
                    break;
                }
                continue;
            }
            let frame = match self.held.take() {
                Some(frame) => frame,
                None => {
                    let max = self.fe.settings.max_message_size;
                    // A cross-shard batch decides per frame: it gets whole ones.
                    match next_client_frame(&self.cbuf, max, self.batch.is_none())? {
                        Next::More => break,
                        Next::Stream(header) => {
                            self.start_client_relay(header.len);
                            continue;
                        }
                        Next::Whole(header) => Frame {
                            tag: header.tag,
                            raw: self.cbuf.split_to(header.len).freeze(),
                        },
                    }
                }
            };
            if self.skipping && frame.tag != tag::SYNC {
                // The server discards everything up to Sync after an error: forward
                // without bookkeeping, nothing of it takes effect.
                self.sout.extend_from_slice(&frame.raw);
                continue;
            }
            if !self.on_client_frame(&frame).await? {
                // Waits for a shape check; processed again when it is done.
                self.held = Some(frame);
                break;
            }
            if frame.tag == tag::TERMINATE {
                return Ok(Flow::Stop);
            }
            if let Some(frames) = self.replay.as_mut() {
                frames.push(frame.raw.clone());
            }
        }
        Ok(Flow::Continue)
    }

    /// The head of a long CopyData whose body is still arriving: it goes to the held
    /// server in pieces as the client sends it (`relay_client_data`), or is dropped
    /// when no server is held, as a whole CopyData would be.
    fn start_client_relay(&mut self, len: usize) {
        // Part of the transaction is gone as it came: it cannot be run again elsewhere.
        self.replay = None;
        self.client_relay = len;
        if let Some(conn) = self.server.as_mut() {
            conn.to_server_rest = len;
        }
        self.relay_client_data();
    }

    /// Passes on what has arrived of the client message being relayed; false when
    /// nothing has.
    fn relay_client_data(&mut self) -> bool {
        let n = self.client_relay.min(self.cbuf.len());
        if n == 0 {
            return false;
        }
        if let Some(conn) = self.server.as_mut() {
            if conn.to_server_rest > 0 {
                self.sout.extend_from_slice(&self.cbuf[..n]);
                conn.to_server_rest -= n;
            }
        }
        self.cbuf.advance(n);
        self.client_relay -= n;
        true
    }

    /// Handles one client frame; `false` means it must wait for a shape check.
    async fn on_client_frame(&mut self, frame: &Frame) -> Result<bool, SessionError> {
        if matches!(frame.tag, tag::QUERY | tag::EXECUTE | tag::FUNCTION_CALL) {
            self.statement_started
                .get_or_insert_with(std::time::Instant::now);
        }
        if self.batch.is_some() && self.on_batch_frame(frame).await? {
            return Ok(true);
        }
        self.refresh_topology();
        if self.deferred_parse.is_some() && !matches!(frame.tag, tag::BIND | tag::PARSE) {
            // Anything but the Bind it waits for: the deferred Parse goes first, to the
            // default shard (or the held server). A Describe of the statement does not
            // fix the shard of a transaction whose BEGIN is deferred.
            self.describing = frame.tag == tag::DESCRIBE
                && frame.body().first() == Some(&b'S')
                && (self.server.is_none() || self.describe_only);
            let borrowed = self.ensure_server(None).await;
            self.describing = false;
            borrowed?;
        }
        if !self.parked.is_empty() && matches!(frame.tag, tag::SYNC | tag::QUERY) && !self.copy_in {
            // The end of a batch that ran on several shards (parked.rs).
            self.end_parked().await?;
        }
        {
            match frame.tag {
                tag::QUERY => self.on_query(frame).await?,
                tag::PARSE => self.on_parse(frame).await?,
                tag::BIND => return self.on_bind(frame).await,
                tag::DESCRIBE => return self.on_describe(frame).await,
                tag::CLOSE => self.on_close(frame).await?,
                tag::SYNC if self.copy_in => self.sout.extend_from_slice(&frame.raw),
                tag::SYNC => self.on_sync(frame),
                tag::EXECUTE => self.on_execute(frame).await?,
                tag::FUNCTION_CALL => {
                    self.forward_needing_server(frame, Expect::FunctionCall)
                        .await?
                }
                tag::COPY_DONE | tag::COPY_FAIL => {
                    if self.copy_in {
                        self.copy_in = false;
                    } else if self.server.is_some() {
                        self.copy_ended_early += 1;
                    }
                    if self.server.is_some() {
                        self.sout.extend_from_slice(&frame.raw);
                    }
                }
                tag::FLUSH | tag::COPY_DATA => {
                    // Meaningful only to a server we already hold (COPY IN runs inside
                    // a Query/Execute whose op is still open).
                    if self.server.is_some() {
                        self.sout.extend_from_slice(&frame.raw);
                    }
                }
                tag::TERMINATE => {}
                _ => {
                    return Err(
                        ProtocolError::Malformed("unsupported frontend message type").into(),
                    )
                }
            }
        }
        Ok(true)
    }

    pub(super) fn push_hidden(&mut self, expect: Expect) {
        self.push(Op::Hidden(expect));
    }

    pub(super) fn push(&mut self, op: Op) {
        if let (Op::Forward(expect) | Op::Hidden(expect), Some(conn)) = (&op, self.server.as_mut())
        {
            // Sync, a simple Query and FunctionCall end an extended-protocol batch;
            // anything else opens one that only the client's Sync may close.
            conn.unsynced = !matches!(expect, Expect::Sync | Expect::Query | Expect::FunctionCall);
            conn.ran_since_sync = match expect {
                Expect::Sync => false,
                Expect::Parse { .. } | Expect::Describe { .. } | Expect::Shape { .. } => {
                    conn.ran_since_sync
                }
                _ => true,
            };
        }
        self.ops.push_back(op);
    }

    /// Queues an answer the proxy gives itself, after everything already owed.
    pub(super) fn push_synthetic(&mut self, bytes: &'static [u8]) {
        self.push_synthetic_bytes(Bytes::from_static(bytes));
    }

    pub(super) fn push_synthetic_bytes(&mut self, bytes: Bytes) {
        // Answered by us: running the transaction again elsewhere would answer twice.
        self.replay = None;
        if self.ops.is_empty() {
            self.cout.extend_from_slice(&bytes);
        } else {
            self.push(Op::Synthetic(bytes));
        }
    }

    async fn forward_needing_server(
        &mut self,
        frame: &Frame,
        expect: Expect,
    ) -> Result<(), SessionError> {
        self.ensure_server(None).await?;
        self.sout.extend_from_slice(&frame.raw);
        self.push(Op::Forward(expect));
        Ok(())
    }

    async fn on_query(&mut self, frame: &Frame) -> Result<(), SessionError> {
        let Ok(sql) = std::str::from_utf8(messages::decode_query_bytes(frame)?) else {
            return self.on_query_not_utf8(frame).await;
        };
        let analyzed = self.fe.analysis.get_or_analyze(sql);
        if let Some(mode) = analyzed.set_target {
            // `SET shardgate.target` is ours: answered here, never sent to a server.
            self.route.mode = mode;
            let status = self.client_status();
            let mut answer = bytes::BytesMut::new();
            messages::command_complete(&mut answer, "SET");
            messages::ready_for_query(&mut answer, status);
            self.push_synthetic_bytes(answer.freeze());
            return Ok(());
        }
        // A read has no session effects (SET, temp objects, advisory locks and
        // set_config() all classify otherwise): skip the scan on the hot path.
        let effects = if analyzed.class == StatementClass::Read {
            session_sql::SessionEffects::default()
        } else {
            session_sql::analyze(sql)
        };
        if self.topo.sharded() && self.route_sharded_query(sql, &analyzed).await? {
            return Ok(());
        }
        self.ensure_server(Some(&analyzed)).await?;
        self.note_statement(&analyzed);
        self.note_shape_changes(effects.changes_shapes);
        if let Some(conn) = self.server.as_mut() {
            conn.tainted |= effects.taints;
        }
        self.add_effects(effects.effects);
        self.sout.extend_from_slice(&frame.raw);
        self.push(Op::Forward(Expect::Query));
        Ok(())
    }

    /// A Query whose text is not UTF-8 (a LATIN1 or SQL_ASCII client's literal): sent
    /// as it is, to the primary, as SQL the parser rejects would be. Its session effects
    /// cannot be carried as text, so any makes the connection tainted (DISCARD ALL
    /// before reuse) instead of following the client.
    async fn on_query_not_utf8(&mut self, frame: &Frame) -> Result<(), SessionError> {
        if self.topo.sharded() {
            return self.refuse_query(NOT_UTF8_SHARDED).await;
        }
        let seen = {
            let text = messages::decode_query_bytes(frame)?;
            session_sql::analyze(&String::from_utf8_lossy(text))
        };
        self.ensure_server(Some(&NOT_UTF8)).await?;
        self.note_statement(&NOT_UTF8);
        self.note_shape_changes(seen.changes_shapes);
        if let Some(conn) = self.server.as_mut() {
            conn.tainted |= !seen.is_empty();
        }
        self.sout.extend_from_slice(&frame.raw);
        self.push(Op::Forward(Expect::Query));
        Ok(())
    }

    async fn on_execute(&mut self, frame: &Frame) -> Result<(), SessionError> {
        let portal = frame.body().split(|&b| b == 0).next().unwrap_or_default();
        match self.target_portal.take() {
            Some((name, answer)) if name.as_bytes() == portal => {
                let tag = match answer {
                    PortalAnswer::SetTarget(mode) => {
                        self.route.mode = mode;
                        "SET"
                    }
                    PortalAnswer::Begin => "BEGIN",
                };
                let mut out = bytes::BytesMut::new();
                messages::command_complete(&mut out, tag);
                self.push_synthetic_bytes(out.freeze());
                Ok(())
            }
            other => {
                self.target_portal = other;
                self.forward_needing_server(frame, Expect::Execute).await
            }
        }
    }

    async fn on_parse(&mut self, frame: &Frame) -> Result<(), SessionError> {
        let parse = messages::decode_parse_bytes(frame)?;
        let stmt = match std::str::from_utf8(parse.query) {
            Ok(text) => self.fe.statements.register(text, &parse.param_types),
            Err(_) => self
                .fe
                .statements
                .register_raw(parse.query, &parse.param_types),
        };
        if stmt.analyzed.set_target.is_some() {
            // `SET shardgate.target` through the extended protocol: ours, like its
            // simple-query form; no server sees it.
            if parse.name.is_empty() {
                self.unnamed = Some(stmt);
            } else {
                self.statements.insert(parse.name.to_owned(), stmt);
            }
            self.push_synthetic(PARSE_COMPLETE);
            return Ok(());
        }
        if !parse.name.is_empty() && self.server.is_none() && stmt.is_validated() {
            // Between transactions, a statement some server already accepted needs no
            // server now. This also keeps clients that prepare synchronously (pgbench
            // -M prepared) from waiting for a connection their own other sessions hold.
            self.statements.insert(parse.name.to_owned(), stmt);
            self.push_synthetic(PARSE_COMPLETE);
            return Ok(());
        }
        if self.topo.sharded()
            && self.server.is_none()
            && self.deferred_parse.is_none()
            && stmt.raw_query.is_none()
        {
            // The shard is known only at Bind: the Parse goes to that shard's server
            // then, in front of the Bind (or to the default shard before anything else).
            if parse.name.is_empty() {
                self.unnamed = Some(stmt.clone());
            } else {
                self.statements.insert(parse.name.to_owned(), stmt.clone());
            }
            self.deferred_parse = Some((frame.clone(), stmt));
            return Ok(());
        }
        self.ensure_server(Some(&stmt.analyzed)).await?;
        self.forward_parse(frame, parse.name, stmt);
        Ok(())
    }

    /// Sends a client's Parse to the held server (named statements renamed, and
    /// skipped when the server already has them).
    pub(super) fn forward_parse(
        &mut self,
        frame: &Frame,
        name: &str,
        stmt: Arc<PreparedStatement>,
    ) {
        let Some(conn) = self.server.as_mut() else {
            return;
        };
        if name.is_empty() {
            // The unnamed statement is forwarded as is; remember it so a later Bind on
            // another server connection can re-create it.
            conn.unnamed = Some(stmt.id);
            self.unnamed = Some(stmt.clone());
            self.sout.extend_from_slice(&frame.raw);
            self.push(Op::Forward(Expect::Parse {
                named: None,
                unnamed: Some(stmt.id),
            }));
        } else {
            let known = !conn.prepared.insert(stmt.id);
            self.statements.insert(name.to_owned(), stmt.clone());
            if known {
                self.push_synthetic(PARSE_COMPLETE);
            } else {
                messages::parse_bytes(
                    &mut self.sout,
                    &stmt.server_name,
                    stmt.wire_query(),
                    &stmt.param_types,
                );
                self.push(Op::Forward(Expect::Parse {
                    named: Some(stmt.id),
                    unnamed: None,
                }));
                self.describe_for_shape(&stmt, &stmt.server_name, Some(name.to_owned()));
            }
        }
    }

    /// The client's statement by its own name ("" = unnamed), if it parsed one.
    fn client_statement(&self, name: &str) -> Option<Arc<PreparedStatement>> {
        if name.is_empty() {
            self.unnamed.clone()
        } else {
            self.statements.get(name).cloned()
        }
    }

    /// Makes sure the held server connection has `stmt`, injecting a Parse if not.
    /// Returns false when the client's frame must wait for the statement's shape check.
    fn prepare_on_server(&mut self, stmt: &Arc<PreparedStatement>, unnamed: bool) -> bool {
        let Some(conn) = self.server.as_mut() else {
            return true;
        };
        let missing = if unnamed {
            conn.unnamed != Some(stmt.id)
        } else {
            !conn.prepared.contains(&stmt.id)
        };
        if !missing {
            return true;
        }
        let expect = if unnamed {
            conn.unnamed = Some(stmt.id);
            Expect::Parse {
                named: None,
                unnamed: Some(stmt.id),
            }
        } else {
            conn.prepared.insert(stmt.id);
            Expect::Parse {
                named: Some(stmt.id),
                unnamed: None,
            }
        };
        let name = if unnamed {
            ""
        } else {
            stmt.server_name.as_str()
        };
        messages::parse_bytes(&mut self.sout, name, stmt.wire_query(), &stmt.param_types);
        self.push(Op::Hidden(expect));
        self.describe_for_shape(stmt, name, None)
    }

    /// Right after a Parse of `stmt` went to the server: describe it, to record its
    /// result shape (first time) or to check it against the recorded one. A check
    /// holds the client's next frames until the answer is in (one round trip, once per
    /// statement and server connection), so no row of a changed shape can reach a
    /// client that was given the old RowDescription. Returns false when gated.
    fn describe_for_shape(
        &mut self,
        stmt: &Arc<PreparedStatement>,
        server_name: &str,
        client_name: Option<String>,
    ) -> bool {
        messages::target_renamed(&mut self.sout, tag::DESCRIBE, b'S', server_name);
        let gate = stmt.shape().is_some();
        self.push(Op::Hidden(Expect::Shape { id: stmt.id, gate }));
        if gate {
            messages::empty_msg(&mut self.sout, tag::FLUSH);
            self.gate = Some(super::Gate {
                stmt: stmt.clone(),
                client_name,
            });
        }
        !gate
    }

    /// A DDL statement that may change result shapes is about to run.
    fn note_shape_changes(&mut self, changes_shapes: bool) {
        if changes_shapes {
            self.fe.statements.new_epoch();
            self.ddl_pending = true;
        }
    }

    /// The client binds (or describes) a statement whose shape changed: make the
    /// server fail the current transaction as PostgreSQL fails a stale prepared
    /// statement; the error the client sees is PostgreSQL's own (server_msgs.rs).
    pub(super) fn raise_stale(&mut self) {
        let Some(conn) = self.server.as_mut() else {
            return;
        };
        conn.unnamed = None;
        messages::parse(&mut self.sout, "", RAISE_STALE, &[]);
        self.push(Op::Hidden(Expect::Parse {
            named: None,
            unnamed: None,
        }));
        messages::put_msg(&mut self.sout, tag::BIND, |b| {
            b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]); // portal "", statement "", no formats/values
        });
        self.push(Op::Hidden(Expect::Bind { stmt: None }));
        messages::put_msg(&mut self.sout, tag::EXECUTE, |b| {
            b.extend_from_slice(&[0, 0, 0, 0, 0]); // portal "", no row limit
        });
        self.push(Op::Hidden(Expect::Raise));
    }

    async fn on_bind(&mut self, frame: &Frame) -> Result<bool, SessionError> {
        let bind = messages::decode_bind(frame)?;
        let stmt = self.client_statement(bind.statement);
        if let Some(mode) = stmt.as_ref().and_then(|s| s.analyzed.set_target) {
            self.target_portal = Some((bind.portal.to_owned(), PortalAnswer::SetTarget(mode)));
            self.push_synthetic(BIND_COMPLETE);
            return Ok(true);
        }
        if let Some(stmt) = stmt.as_ref().filter(|s| self.defers_extended_begin(s)) {
            // As a simple-query BEGIN: answered here, sent with the transaction's
            // first statement to the shard that statement belongs to.
            if self.deferred_parse.take().is_some() {
                self.push_synthetic(PARSE_COMPLETE);
            }
            let begin = (stmt.query.clone(), *stmt.analyzed);
            self.txn_begin = Some(begin.clone());
            self.pending_begin = Some(begin);
            self.target_portal = Some((bind.portal.to_owned(), PortalAnswer::Begin));
            self.push_synthetic(BIND_COMPLETE);
            return Ok(true);
        }
        if self
            .target_portal
            .as_ref()
            .is_some_and(|(portal, _)| portal == bind.portal)
        {
            // The portal name now means another statement, which the server runs.
            self.target_portal = None;
        }
        if let (true, Some(stmt)) = (self.topo.sharded(), &stmt) {
            if stmt.raw_query.is_some() {
                self.refuse_extended(NOT_UTF8_SHARDED).await?;
                return Ok(true);
            }
            if !self.route_sharded_bind(stmt, &bind).await? {
                return Ok(true);
            }
        }
        self.ensure_server(stmt.as_ref().map(|s| &*s.analyzed))
            .await?;
        let Some(stmt) = stmt else {
            // Unknown to us: let the server report "does not exist".
            self.sout.extend_from_slice(&frame.raw);
            self.push(Op::Forward(Expect::Bind { stmt: None }));
            return Ok(true);
        };
        if stmt.is_stale() {
            self.raise_stale();
            return Ok(true);
        }
        let unnamed = bind.statement.is_empty();
        if !self.prepare_on_server(&stmt, unnamed) {
            return Ok(false);
        }
        self.note_statement(&stmt.analyzed);
        self.note_shape_changes(stmt.effects.changes_shapes);
        if unnamed {
            self.sout.extend_from_slice(&frame.raw);
        } else {
            messages::bind_renamed(&mut self.sout, &bind, &stmt.server_name);
        }
        if let Some(conn) = self.server.as_mut() {
            conn.tainted |= stmt.effects.taints;
        }
        if !stmt.effects.effects.is_empty() {
            self.add_effects(stmt.effects.effects.clone());
        }
        self.push(Op::Forward(Expect::Bind {
            stmt: Some(stmt.id),
        }));
        Ok(true)
    }

    async fn on_describe(&mut self, frame: &Frame) -> Result<bool, SessionError> {
        let (kind, name) = messages::decode_target(frame)?;
        let stmt = if kind == b'S' {
            self.client_statement(name)
        } else {
            None
        };
        let ours = match (kind, &stmt, &self.target_portal) {
            (b'S', Some(stmt), _) if self.defers_extended_begin(stmt) => {
                // A driver preparing BEGIN (tokio-postgres, pgjdbc): its shape is
                // known, and no server is needed until its transaction's first
                // statement says which shard runs it.
                if self.deferred_parse.take().is_some() {
                    self.push_synthetic(PARSE_COMPLETE);
                }
                true
            }
            (b'S', Some(stmt), _) => stmt.analyzed.set_target.is_some(),
            (b'P', _, Some((portal, _))) => portal == name,
            _ => false,
        };
        if ours {
            if kind == b'S' {
                self.push_synthetic(NO_PARAMETERS);
            }
            self.push_synthetic(NO_DATA);
            return Ok(true);
        }
        // A statement described before its Bind (a driver preparing inside a
        // transaction) must not fix the transaction's shard.
        self.describing = kind == b'S' && (self.server.is_none() || self.describe_only);
        let borrowed = self
            .ensure_server(stmt.as_ref().map(|s| &*s.analyzed))
            .await;
        self.describing = false;
        borrowed?;
        let Some(stmt) = stmt else {
            self.sout.extend_from_slice(&frame.raw);
            self.push(Op::Forward(Expect::Describe { stmt: None }));
            return Ok(true);
        };
        if stmt.is_stale() {
            self.raise_stale();
            return Ok(true);
        }
        if !self.prepare_on_server(&stmt, name.is_empty()) {
            return Ok(false);
        }
        if name.is_empty() {
            self.sout.extend_from_slice(&frame.raw);
        } else {
            messages::target_renamed(&mut self.sout, tag::DESCRIBE, b'S', &stmt.server_name);
        }
        self.push(Op::Forward(Expect::Describe {
            stmt: Some(stmt.id),
        }));
        Ok(true)
    }

    async fn on_close(&mut self, frame: &Frame) -> Result<(), SessionError> {
        let (kind, name) = messages::decode_target(frame)?;
        if kind == b'S' {
            // Server-side statements are shared by the pool and stay; the client's
            // name simply stops existing.
            if name.is_empty() {
                self.unnamed = None;
            } else {
                self.statements.remove(name);
            }
            self.push_synthetic(CLOSE_COMPLETE);
        } else if self.server.is_some() {
            self.sout.extend_from_slice(&frame.raw);
            self.push(Op::Forward(Expect::Close));
        } else {
            // Portals do not outlive a transaction, and without a server we are
            // between transactions.
            self.push_synthetic(CLOSE_COMPLETE);
        }
        Ok(())
    }

    fn on_sync(&mut self, frame: &Frame) {
        self.skipping = false;
        if self.server.is_some() {
            self.sout.extend_from_slice(&frame.raw);
            self.push(Op::Forward(Expect::Sync));
        } else {
            // Nothing ran on a server since the last transaction ended (a deferred
            // BEGIN, or reads on other shards, may have started one).
            let mut out = bytes::BytesMut::new();
            messages::ready_for_query(&mut out, self.client_status());
            self.push_synthetic_bytes(out.freeze());
        }
    }
}
