//! Server -> client direction: frames pass through byte for byte; we only look at tags
//! to know which forwarded message each answer completes, to drop answers to messages
//! the proxy injected, to slot in answers the proxy gives itself, and to learn the
//! transaction status at ReadyForQuery.

use bytes::Buf;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use std::sync::Arc;

use bytes::BytesMut;

use super::{Expect, Op, Session, SessionError};
use crate::backend::params::SessionParams;
use crate::backend::BackendError;
use crate::frontend::prepared::{shape_of, PreparedStatement};
use crate::frontend::session_sql::SessionEffect;
use crate::protocol::messages::{self, btag};
use crate::protocol::{next_server_frame, FrameHeader, Next};

/// What a server message carries that bookkeeping needs, decoded only when it does.
enum Detail {
    None,
    /// The result shape of a RowDescription/NoData answering a statement Describe.
    Shape(u64),
    /// The SQLSTATE of an ErrorResponse answering a Bind or our Raise.
    Code(String),
}

/// PostgreSQL's SQLSTATE for "cached plan must not change result type".
const STALE_PLAN_CODE: &str = "0A000";

/// The error PostgreSQL gives when a prepared statement's result shape changed,
/// with the routine name drivers check (pgjdbc re-prepares on it).
fn stale_statement_error(out: &mut BytesMut) {
    use crate::protocol::messages::{put_cstr, put_msg};
    put_msg(out, btag::ERROR_RESPONSE, |b| {
        for (field, value) in [
            (b'S', "ERROR"),
            (b'V', "ERROR"),
            (b'C', STALE_PLAN_CODE),
            (b'M', "cached plan must not change result type"),
            (b'F', "plancache.c"),
            (b'R', "RevalidateCachedQuery"),
        ] {
            b.extend_from_slice(&[field]);
            put_cstr(b, value);
        }
        b.extend_from_slice(&[0]);
    });
}

impl<R, W> Session<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    pub(super) fn process_server_frames(&mut self) -> Result<(), SessionError> {
        while self.cout.len() < self.fe.settings.buffer_size {
            let Some(conn) = self.server.as_mut() else {
                return Ok(());
            };
            if conn.to_client_rest > 0 {
                if !self.relay_server_data() {
                    return Ok(());
                }
                continue;
            }
            let next = next_server_frame(&conn.rbuf, self.fe.settings.max_message_size)
                .map_err(|e| conn.framing_error(e))?;
            match next {
                Next::More => return Ok(()),
                Next::Stream(header) => self.start_server_relay(header),
                Next::Whole(header) => self.on_server_frame(header)?,
            }
        }
        Ok(())
    }

    /// The head of a long DataRow, CopyData or FunctionCallResponse whose body is still
    /// arriving: the bookkeeping is done now, the bytes go to the client as they come
    /// (`relay_server_data`), so memory stays bounded whatever the value's size.
    fn start_server_relay(&mut self, header: FrameHeader) {
        let forward = self.on_server_message(header.tag, 0, Detail::None);
        if forward {
            self.replay = None;
        }
        if let Some(conn) = self.server.as_mut() {
            conn.to_client_rest = header.len;
            // Never the case for data messages today; dropped like a whole one would be.
            conn.to_client_hidden = !forward;
        }
        self.relay_server_data();
    }

    /// Passes on what has arrived of the message being relayed; false when nothing has.
    fn relay_server_data(&mut self) -> bool {
        let Some(conn) = self.server.as_mut() else {
            return false;
        };
        let n = conn.to_client_rest.min(conn.rbuf.len());
        if n == 0 {
            return false;
        }
        if !conn.to_client_hidden {
            self.cout.extend_from_slice(&conn.rbuf[..n]);
        }
        conn.rbuf.advance(n);
        conn.to_client_rest -= n;
        true
    }

    /// Sends what is queued for the held connection with a Flush and reads until every
    /// answer owed before the client's next Sync has come (passed on to the client as
    /// usual). After an error the server skips to Sync: nothing more is owed then.
    pub(super) async fn drain_server(&mut self) -> Result<(), SessionError> {
        let owed = |ops: &std::collections::VecDeque<Op>| {
            ops.iter().any(|op| !matches!(op, Op::Synthetic(_)))
        };
        if !owed(&self.ops) {
            return Ok(());
        }
        let Some(conn) = self.server.as_mut() else {
            return Ok(());
        };
        messages::empty_msg(&mut self.sout, crate::protocol::messages::tag::FLUSH);
        let written = conn.wr.write_all(&self.sout).await;
        conn.note_failure(written.map_err(BackendError::Io))?;
        self.sout.clear();
        while owed(&self.ops) {
            let Some(conn) = self.server.as_mut() else {
                break;
            };
            let conn = &mut **conn;
            let read = conn.rd.read_buf(&mut conn.rbuf).await;
            match conn.note_failure(read.map_err(BackendError::Io))? {
                0 => return Err(BackendError::Closed.into()),
                _ => self.process_server_frames()?,
            }
        }
        Ok(())
    }

    /// One whole server message at the front of the server buffer: bookkeeping, then
    /// one copy to the client (or none when the proxy hides it).
    fn on_server_frame(&mut self, header: FrameHeader) -> Result<(), SessionError> {
        let Some(conn) = self.server.as_mut() else {
            return Ok(());
        };
        let status = conn.rbuf.get(5).copied().unwrap_or(b'I');
        if header.tag == btag::ERROR_RESPONSE && self.replay.is_some() {
            // A replica shutting down or crashing says so before closing; while
            // nothing reached the client yet, that is a retry, not the answer.
            let frame = crate::protocol::Frame {
                tag: header.tag,
                raw: bytes::Bytes::copy_from_slice(&conn.rbuf[..header.len]),
            };
            let (code, message) = crate::protocol::messages::decode_error_fields(&frame);
            if code.starts_with("57P") || code.starts_with("08") {
                return Err(BackendError::Server { code, message }.into());
            }
        }
        let detail = match (header.tag, self.ops.front()) {
            (
                btag::ROW_DESCRIPTION | btag::NO_DATA,
                Some(
                    Op::Forward(Expect::Describe { stmt: Some(_) })
                    | Op::Hidden(Expect::Shape { .. }),
                ),
            ) => Detail::Shape(shape_of(&conn.rbuf[..header.len])),
            (
                btag::ERROR_RESPONSE,
                Some(Op::Forward(Expect::Bind { stmt: Some(_) }) | Op::Hidden(Expect::Raise)),
            ) => {
                let frame = crate::protocol::Frame {
                    tag: header.tag,
                    raw: bytes::Bytes::copy_from_slice(&conn.rbuf[..header.len]),
                };
                Detail::Code(crate::protocol::messages::decode_error_fields(&frame).0)
            }
            _ => Detail::None,
        };
        if header.tag == btag::ERROR_RESPONSE {
            let frame = crate::protocol::Frame {
                tag: header.tag,
                raw: bytes::Bytes::copy_from_slice(&conn.rbuf[..header.len]),
            };
            let (code, _) = crate::protocol::messages::decode_error_fields(&frame);
            self.fe.metrics.error(&code);
        }
        let forward = self.on_server_message(header.tag, status, detail);
        let Some(conn) = self.server.as_mut() else {
            return Ok(());
        };
        if forward {
            self.cout.extend_from_slice(&conn.rbuf[..header.len]);
            if header.tag == btag::READY_FOR_QUERY && self.describe_only && status == b'I' {
                // The client's BEGIN is still deferred (this connection only
                // described): to the client the transaction is open.
                if let Some(last) = self.cout.last_mut() {
                    *last = b'T';
                }
            }
            // The client has seen part of the answer: no silent retry from now on.
            self.replay = None;
        }
        if header.tag == btag::COMMAND_COMPLETE && conn.rbuf[5..header.len].starts_with(b"ROLLBACK")
        {
            self.txn_failed = true;
        }
        conn.rbuf.advance(header.len);
        if header.tag == btag::READY_FOR_QUERY {
            if forward {
                if let Some(started) = self.statement_started.take() {
                    let route = if self.server_node == crate::routing::route::PRIMARY {
                        crate::admin::metrics::QueryRoute::Primary
                    } else {
                        crate::admin::metrics::QueryRoute::Replica
                    };
                    self.fe.metrics.latency(route, started.elapsed());
                }
            }
            self.on_ready(status);
        }
        self.emit_synthetic();
        Ok(())
    }

    /// Updates the op queue for one server message; returns whether the client sees it.
    /// `first_byte` is the body's first byte (the status for ReadyForQuery).
    fn on_server_message(&mut self, tag: u8, first_byte: u8, detail: Detail) -> bool {
        let head = match self.ops.front() {
            Some(Op::Forward(e)) => Some((*e, false)),
            Some(Op::Hidden(e)) => Some((*e, true)),
            _ => None,
        };
        let hidden = head.is_some_and(|(_, h)| h);
        let expect = head.map(|(e, _)| e);
        match tag {
            btag::READY_FOR_QUERY => {
                self.ops.pop_front();
                if let Some(conn) = self.server.as_mut() {
                    conn.txn_status = first_byte;
                    if self.ops.is_empty() {
                        // Nothing was sent after this sync point (a simple Query ends
                        // like a Sync): what comes next starts a new batch.
                        conn.ran_since_sync = false;
                    }
                }
                // A hidden simple query (a deferred BEGIN) ends with a hidden
                // ReadyForQuery; every other one is the client's.
                !hidden
            }
            btag::COPY_IN if self.copy_ended_early > 0 => {
                // The client already sent all its data and CopyDone/CopyFail: the
                // server is in copy-in only until it reads them.
                self.copy_ended_early -= 1;
                true
            }
            btag::COPY_IN => {
                // Syncs the client sent after the Execute that started COPY are ignored
                // by the server: they owe no ReadyForQuery.
                self.copy_in = true;
                let head = self.ops.pop_front();
                self.ops
                    .retain(|op| !matches!(op, Op::Forward(Expect::Sync)));
                if let Some(head) = head {
                    self.ops.push_front(head);
                }
                true
            }
            btag::ERROR_RESPONSE => {
                self.txn_failed = true;
                if !self.copy_in && self.copy_ended_early > 0 {
                    // A COPY the client streamed eagerly failed before it started.
                    self.copy_ended_early -= 1;
                }
                self.copy_in = false;
                let mut forward = true;
                match (expect, &detail) {
                    (Some(Expect::Raise), _) => {
                        // Our stand-in for a stale statement failed as intended: the
                        // client gets the error PostgreSQL itself gives (drivers such
                        // as pgjdbc recognise it by its routine and re-prepare).
                        match self.raise_with.take() {
                            Some(error) => self.cout.extend_from_slice(&error),
                            None => stale_statement_error(&mut self.cout),
                        }
                        forward = false;
                    }
                    (Some(Expect::Bind { stmt: Some(id) }), Detail::Code(code))
                        if code == STALE_PLAN_CODE =>
                    {
                        self.stale_on_server(id);
                    }
                    _ => {}
                }
                if !matches!(expect, Some(Expect::Query | Expect::FunctionCall)) {
                    self.drop_until_sync();
                }
                forward
            }
            btag::PARAMETER_DESCRIPTION => !hidden,
            btag::PARSE_COMPLETE => {
                if let Some(Expect::Parse { named, unnamed }) = expect {
                    self.mark_validated(named.or(unnamed));
                }
                self.ops.pop_front();
                !hidden
            }
            btag::BIND_COMPLETE | btag::CLOSE_COMPLETE => {
                self.ops.pop_front();
                !hidden
            }
            btag::ROW_DESCRIPTION | btag::NO_DATA => match expect {
                Some(Expect::Describe { stmt }) => {
                    self.ops.pop_front();
                    if let (Some(id), Detail::Shape(shape)) = (stmt, detail) {
                        if let Some(stmt) = self.statement_by_id(id) {
                            if !stmt.check_shape(shape) {
                                self.retire(&stmt);
                            }
                        }
                    }
                    true
                }
                Some(Expect::Shape { id, gate }) => {
                    self.ops.pop_front();
                    if let Detail::Shape(shape) = detail {
                        self.on_shape(id, gate, shape);
                    }
                    false
                }
                _ => true,
            },
            btag::COMMAND_COMPLETE | btag::EMPTY_QUERY | btag::PORTAL_SUSPENDED => {
                if matches!(expect, Some(Expect::Execute | Expect::Raise)) {
                    self.ops.pop_front();
                }
                !hidden
            }
            btag::NOTICE_RESPONSE | btag::PARAMETER_STATUS => true,
            _ => true,
        }
    }

    /// After an extended-protocol error the server skips to the next Sync: so do the
    /// answers we owe. Statements whose Parse never ran are not on the server.
    fn drop_until_sync(&mut self) {
        while let Some(op) = self.ops.front() {
            if matches!(op, Op::Forward(Expect::Sync)) {
                return;
            }
            if matches!(op, Op::Hidden(Expect::Shape { gate: true, .. })) {
                // The check will never be answered: the client's held frame goes on
                // (to be skipped up to Sync like the rest).
                self.gate = None;
            }
            if let Some(
                Op::Forward(Expect::Parse { named, unnamed })
                | Op::Hidden(Expect::Parse { named, unnamed }),
            ) = self.ops.pop_front()
            {
                if let Some(conn) = self.server.as_mut() {
                    if let Some(id) = named {
                        conn.prepared.remove(&id);
                    }
                    if unnamed.is_some() {
                        conn.unnamed = None;
                    }
                }
            }
        }
        self.skipping = true;
    }

    /// Rare (once per statement and server connection), so a scan of this client's
    /// statements is cheaper than keeping another index.
    fn mark_validated(&self, id: Option<u64>) {
        let Some(id) = id else {
            return;
        };
        let found = self
            .statements
            .values()
            .chain(self.unnamed.iter())
            .find(|s| s.id == id);
        if let Some(stmt) = found {
            stmt.mark_validated();
        }
    }

    /// A statement of this session by pool-wide id (rare: shape and stale events).
    fn statement_by_id(&self, id: u64) -> Option<Arc<PreparedStatement>> {
        self.statements
            .values()
            .chain(self.unnamed.iter())
            .chain(self.gate.iter().map(|g| &g.stmt))
            .find(|s| s.id == id)
            .cloned()
    }

    /// The statement's shape changed (DDL): no server connection of this session
    /// keeps it under its old name, and nobody is handed it again.
    fn retire(&mut self, stmt: &PreparedStatement) {
        tracing::info!(statement = %stmt.server_name, "prepared statement changed result shape; retired");
        self.fe.statements.retire(stmt);
        if let Some(conn) = self.server.as_mut() {
            conn.prepared.remove(&stmt.id);
            if conn.unnamed == Some(stmt.id) {
                conn.unnamed = None;
            }
        }
    }

    /// The answer to a Describe the proxy sent after parsing a statement.
    fn on_shape(&mut self, id: u64, gate: bool, shape: u64) {
        let gate = if gate { self.gate.take() } else { None };
        let stmt = match &gate {
            Some(gate) => Some(gate.stmt.clone()),
            None => self.statement_by_id(id),
        };
        let Some(stmt) = stmt else {
            return;
        };
        if stmt.check_shape(shape) {
            return;
        }
        self.retire(&stmt);
        if let Some(super::Gate {
            client_name: Some(name),
            ..
        }) = gate
        {
            // The client's own Parse just made it, with the new shape: its name now
            // means a new statement (re-created on the server when first bound).
            let fresh = self.fe.statements.register_again(&stmt);
            self.statements.insert(name, fresh);
        }
    }

    /// The server said a bound statement's cached plan changed result type: DDL ran
    /// somewhere. Retire the statement (the client re-prepares, as directly) and
    /// start a new epoch so statements prepared from now on are fresh.
    fn stale_on_server(&mut self, id: u64) {
        if let Some(stmt) = self.statement_by_id(id) {
            self.retire(&stmt);
        } else if let Some(conn) = self.server.as_mut() {
            conn.prepared.remove(&id);
        }
        self.fe.statements.new_epoch();
    }

    fn emit_synthetic(&mut self) {
        while let Some(Op::Synthetic(bytes)) = self.ops.front() {
            self.cout.extend_from_slice(bytes);
            self.ops.pop_front();
        }
    }

    /// Records the session effects of a statement being sent. With ReadyForQuerys of
    /// earlier statements still owed, they wait for those (`later`): the transaction
    /// ending at the next one is not theirs.
    pub(super) fn add_effects(&mut self, effects: Vec<SessionEffect>) {
        if effects.is_empty() {
            return;
        }
        match self.readies_owed() {
            0 => self.pending.extend(effects),
            owed => self.later.push_back((owed, effects)),
        }
    }

    /// ReadyForQuerys the server still owes for what was sent to it.
    fn readies_owed(&self) -> usize {
        self.ops
            .iter()
            .filter(|op| {
                matches!(
                    op,
                    Op::Forward(Expect::Sync | Expect::Query | Expect::FunctionCall)
                        | Op::Hidden(Expect::Sync | Expect::Query | Expect::FunctionCall)
                )
            })
            .count()
    }

    /// At a ReadyForQuery: the `later` effects whose statements come right after it.
    fn effects_now_due(&mut self) -> Vec<SessionEffect> {
        if self.later.is_empty() {
            return Vec::new();
        }
        let none_owed = self.readies_owed() == 0;
        let mut due = Vec::new();
        for entry in self.later.iter_mut() {
            entry.0 = entry.0.saturating_sub(1);
        }
        while let Some((owed, _)) = self.later.front() {
            if *owed > 0 && !none_owed {
                break;
            }
            if let Some((_, effects)) = self.later.pop_front() {
                due.extend(effects);
            }
        }
        due
    }

    /// At ReadyForQuery 'I' the transaction is over: its session effects become the
    /// client's settings (and are known to be on this server), or vanish with a
    /// rollback. When a rollback may have undone only part of them, the server is
    /// marked for DISCARD ALL rather than guessed about.
    fn on_ready(&mut self, status: u8) {
        // Effects of statements sent behind this ReadyForQuery belong to what follows.
        let behind = self.effects_now_due();
        if status != b'I' {
            self.pending.extend(behind);
            return;
        }
        if self.ops.is_empty() && self.sout.is_empty() {
            // The transaction is over, nothing else runs on the connection: a reshard
            // cutover need not wait for this session (a kept connection takes a new
            // ticket with its next statement).
            self.reshard_ticket = None;
        }
        // A DDL statement pipelined behind this one has not run yet: its epoch starts
        // at a later ReadyForQuery (late is safe, early is not).
        if self.ddl_pending && self.readies_owed() == 0 {
            self.ddl_pending = false;
            // Committed (or rolled back) now: statements prepared from here on see it.
            self.fe.statements.new_epoch();
        }
        let effects = std::mem::replace(&mut self.pending, behind);
        let failed = std::mem::replace(&mut self.txn_failed, false);
        if !self.describe_only && self.pending_begin.is_none() {
            // The client's transaction is over: so are its reads on other shards.
            self.txn_begin = None;
            if !self.side.is_empty() {
                self.side_end = Some(!failed);
            }
        }
        let Some(conn) = self.server.as_mut() else {
            return;
        };
        if failed {
            conn.tainted |= !effects.is_empty();
            return;
        }
        for effect in effects {
            match effect {
                SessionEffect::Set { name, value } => {
                    self.params.set(&name, &value);
                    conn.applied.set(&name, &value);
                }
                SessionEffect::Reset { name } => {
                    // RESET returns to the session default: the startup value if any.
                    match self.startup_params.get(&name) {
                        Some(v) => self.params.set(&name, v),
                        None => self.params.remove(&name),
                    }
                    conn.applied.remove(&name);
                }
                SessionEffect::ResetAll => {
                    self.params = self.startup_params.clone();
                    conn.applied = SessionParams::default();
                }
                SessionEffect::Listen { channel } => {
                    self.listening.insert(channel);
                }
                SessionEffect::Unlisten { channel: Some(c) } => {
                    self.listening.remove(&c);
                }
                SessionEffect::Unlisten { channel: None } => self.listening.clear(),
                SessionEffect::HoldCursor { name } => {
                    self.held_cursors.insert(name);
                }
                SessionEffect::CloseCursor { name: Some(name) } => {
                    self.held_cursors.remove(&name);
                }
                SessionEffect::CloseCursor { name: None } => self.held_cursors.clear(),
                SessionEffect::DiscardAll | SessionEffect::DeallocateAll => {
                    if effect == SessionEffect::DiscardAll {
                        self.params = self.startup_params.clone();
                        conn.applied = SessionParams::default();
                        self.listening.clear();
                        self.held_cursors.clear();
                    }
                    conn.prepared.clear();
                    conn.unnamed = None;
                    self.statements.clear();
                    self.unnamed = None;
                }
            }
        }
        let pin = !self.listening.is_empty() || !self.held_cursors.is_empty();
        self.set_pinned(pin);
    }
}
