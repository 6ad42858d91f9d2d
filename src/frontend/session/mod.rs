//! The per-client query loop: frames from the client are forwarded to a pooled server
//! connection, the server's frames are passed back untouched, and the connection goes
//! back to the pool at the end of each transaction (transaction pooling) or of the
//! session (session pooling).
//!
//! Flow control: four buffers (client in/out, server in/out) and one `select!` over
//! the four directions. Reading from a side stops while the buffer towards the other
//! side is above `limits.buffer_size`, so a slow reader backs pressure up to the producer and
//! memory stays bounded per session.

mod batch;
mod client_msgs;
mod cutover;
mod fanout;
mod parked;
mod server_msgs;
mod sharding;
mod side;
pub(crate) mod time_keys;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;

use super::cancel::{CancelSlot, CancelTarget};
use super::prepared::PreparedStatement;
use super::session_sql::SessionEffect;
use super::{Frontend, PoolMode};
use crate::backend::params::SessionParams;
use crate::backend::{BackendError, Pool, PooledConn};
use crate::protocol::messages;
use crate::protocol::ProtocolError;
use crate::routing::analyze::{Analyzed, StatementClass, TargetMode};
use crate::routing::route::{self, SessionRoute, PRIMARY};

/// What routing assumes for messages it cannot attribute to a statement (Execute or
/// FunctionCall with no server held, a Bind of an unknown statement): the primary.
const UNANALYZED: Analyzed = Analyzed {
    class: StatementClass::Write,
    hint: None,
    set_target: None,
    parsed: true,
};

/// How many borrowed connections may fail before first use (dead sockets the pool's
/// liveness check could not see yet) before the client gets the error.
const CHECKOUT_RETRIES: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client I/O: {0}")]
    ClientIo(#[from] io::Error),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("{0}")]
    Backend(#[from] BackendError),
}

/// What the server owes us for a message we forwarded, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// `named`/`unnamed`: the statement id the server holds once this succeeds.
    Parse {
        named: Option<u64>,
        unnamed: Option<u64>,
    },
    /// `stmt`: the pool-wide statement bound, when known (0A000 on Bind retires it).
    Bind {
        stmt: Option<u64>,
    },
    /// `stmt`: set for Describe of a statement, whose answer is its result shape.
    Describe {
        stmt: Option<u64>,
    },
    /// A Describe of statement `id` the proxy sent to learn its result shape, or with
    /// `gate`, to check it before the client's next frames go on (prepared.rs).
    Shape {
        id: u64,
        gate: bool,
    },
    /// The proxy's Execute that makes the server fail the transaction the way a stale
    /// prepared statement would; the server's error is replaced with PostgreSQL's own.
    Raise,
    Execute,
    Close,
    Sync,
    Query,
    FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    /// The server's answer goes to the client.
    Forward(Expect),
    /// The proxy injected this message; its success is swallowed (errors still show).
    Hidden(Expect),
    /// The proxy answers itself, at this point in the stream.
    Synthetic(Bytes),
}

/// A shape check the client's frames wait for: the statement re-created on the held
/// connection must describe the shape clients were given.
struct Gate {
    stmt: Arc<PreparedStatement>,
    /// The client's own Parse created it under this name (else a hidden Parse did).
    client_name: Option<String>,
}

/// What the proxy answers for a portal it keeps from the servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortalAnswer {
    /// `SET shardgate.target = ...`: the session's routing mode.
    SetTarget(TargetMode),
    /// A BEGIN of a sharded map, deferred until the transaction's first statement
    /// says which shard it runs on (as for a simple-query BEGIN).
    Begin,
}

enum Flow {
    Continue,
    Stop,
}

enum Event {
    ClientRead(usize),
    ServerRead(usize),
    Wrote,
    Shutdown,
    /// The client stayed idle past its limit (`Session::idle`).
    IdleTimeout,
}

/// Which limit an idle client counts towards (docs/decisions.md, "Idle clients").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdleLimit {
    /// `limits.idle_in_transaction_timeout`: 25P03, as PostgreSQL's
    /// `idle_in_transaction_session_timeout`.
    InTransaction,
    /// `limits.client_idle_timeout`: 57P05, as PostgreSQL's `idle_session_timeout`.
    Session,
}

pub struct Session<R, W> {
    fe: Arc<Frontend>,
    user: String,
    /// The topology this session routes by; refreshed between transactions when a
    /// reload published a new one.
    topo: Arc<crate::topology::Topology>,
    rd: R,
    wr: W,
    /// Client bytes not yet decoded, and bytes queued to the client / to the server.
    cbuf: BytesMut,
    cout: BytesMut,
    sout: BytesMut,
    /// Per shard (in `Frontend::shards` order), one pool per node (index 0 the primary).
    pools: Vec<Vec<Arc<Pool>>>,
    server: Option<PooledConn>,
    /// The shard and node the held server connection belongs to.
    server_shard: usize,
    server_node: usize,
    /// When the statement the client waits for started (for the latency histogram).
    statement_started: Option<std::time::Instant>,
    /// The last cross-shard statement ended in an error (the rest of its
    /// extended-protocol batch is skipped up to Sync, as a server would).
    fanout_failed: bool,
    /// Sharded maps: a client's Parse held back until its Bind says which shard runs
    /// it (sent in front of that Bind by `ensure_server`).
    deferred_parse: Option<(crate::protocol::Frame, Arc<PreparedStatement>)>,
    /// Sharded maps: an extended-protocol statement for several shards, collected
    /// until the client's Sync.
    batch: Option<batch::ExtendedFanOut>,
    /// Sharded maps: a `BEGIN` the proxy answered without a server, because the shard
    /// of the transaction is known only at its first statement; it is sent (its answer
    /// hidden) on the connection that statement borrows.
    pending_begin: Option<(String, Analyzed)>,
    /// Sharded maps: the BEGIN of the client's transaction (text and analysis), run on
    /// the connections it holds on other shards (`side.rs`).
    txn_begin: Option<(String, Analyzed)>,
    /// Sharded maps: connections on other shards the client's transaction reads from.
    side: Vec<side::Side>,
    /// The transaction ended on its own connection: its connections on other shards
    /// end next (COMMIT when true).
    side_end: Option<bool>,
    /// Sharded maps: connections holding earlier parts of the client's implicit
    /// transaction (its extended-protocol batch) on other shards (`parked.rs`).
    parked: Vec<side::Side>,
    /// The error the client sees when the proxy's Raise fails the batch, instead of
    /// the stale-statement one (`parked.rs`).
    raise_with: Option<Bytes>,
    /// The shard the next borrowed connection comes from (routing sets it before a
    /// transaction starts; the default shard otherwise).
    next_shard: usize,
    route: SessionRoute,
    /// Nodes that failed during the current transaction (bit per node index).
    failed_nodes: u64,
    /// While a replica serves a read and nothing of its answer has reached the client,
    /// the client frames of the transaction so far: if the replica fails now, they are
    /// run again elsewhere and the client never notices.
    replay: Option<Vec<Bytes>>,
    /// The current loan ran a statement that writes: learn the WAL position at release.
    hold_wrote: bool,
    ops: VecDeque<Op>,
    /// Set while a shape check is under way: no client frame is processed meanwhile.
    gate: Option<Gate>,
    /// The client frame that asked for the check, processed again once it is done.
    held: Option<crate::protocol::Frame>,
    /// Channels the client listens on and WITH HOLD cursors it keeps open: while
    /// either is non-empty its server connection stays with it between transactions
    /// (transaction pooling), so notifications arrive and cursors survive.
    listening: HashSet<String>,
    held_cursors: HashSet<String>,
    pinned: bool,
    /// A statement that may change result shapes (ALTER, DROP...) ran in this
    /// transaction: prepared statements start a new epoch when it ends.
    ddl_pending: bool,
    /// After an error in an extended-protocol batch the server ignores everything up
    /// to Sync; so do we.
    skipping: bool,
    statements: HashMap<String, Arc<PreparedStatement>>,
    unnamed: Option<Arc<PreparedStatement>>,
    /// A portal whose Execute the proxy answers (extended protocol): one bound to
    /// `SET shardgate.target`, or a deferred BEGIN.
    target_portal: Option<(String, PortalAnswer)>,
    params: SessionParams,
    startup_params: SessionParams,
    /// Session effects of statements whose transaction has not ended yet.
    pending: Vec<SessionEffect>,
    /// Session effects of statements sent while ReadyForQuerys of earlier ones were
    /// still owed (a pipelining client; tokio-postgres sends its next query as soon as
    /// an ErrorResponse arrives): each joins `pending` once that many have come, so it
    /// counts in its own transaction, not in the one still ending.
    later: VecDeque<(usize, Vec<SessionEffect>)>,
    txn_failed: bool,
    /// The server is in COPY FROM STDIN: it ignores Sync and Flush until CopyDone or
    /// CopyFail, so those owe no answer.
    copy_in: bool,
    /// CopyDone/CopyFail the client sent before the server's CopyInResponse arrived
    /// (clients may stream a whole COPY without waiting for it): that many coming
    /// CopyInResponses start no copy-in state.
    copy_ended_early: u32,
    /// Bytes still to come of a long client CopyData whose head already went on: it
    /// is relayed in pieces as it arrives (client_msgs.rs), never buffered whole.
    client_relay: usize,
    cancel: Arc<CancelSlot>,
    shutdown: watch::Receiver<bool>,
    /// While a reshard job runs: this transaction is on a shard that gives keys away
    /// (the cutover waits for it to end).
    reshard_ticket: Option<crate::reshard::gate::Ticket>,
    /// Sharded maps: set by the caller while it borrows only to describe a statement.
    describing: bool,
    /// Sharded maps: the held connection was borrowed to describe a statement while
    /// the client's BEGIN is deferred (its shard is known only at Bind): the BEGIN was
    /// not sent on it, and a statement that executes borrows afresh.
    describe_only: bool,
    /// The idle timer; None when both idle limits are off. Allocated once per session
    /// and only reset when an idle period starts, never per message.
    idle_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Set while the timer runs for the current idle period: the client owes the next
    /// message and nothing is owed to or by the server.
    idle: Option<IdleLimit>,
}

pub struct SessionInit {
    pub fe: Arc<Frontend>,
    pub user: String,
    /// The topology the pools were made for.
    pub topology: Arc<crate::topology::Topology>,
    pub pools: Vec<Vec<Arc<Pool>>>,
    pub params: SessionParams,
    pub cancel: Arc<CancelSlot>,
    pub shutdown: watch::Receiver<bool>,
}

impl<R, W> Session<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    pub fn new(init: SessionInit, rd: R, wr: W, leftover: BytesMut) -> Self {
        let mode = match init.fe.settings.pool_mode {
            PoolMode::Transaction => TargetMode::Auto,
            PoolMode::Session => TargetMode::Primary,
        };
        let default_shard = init.topology.default_shard;
        let settings = &init.fe.settings;
        let idle_timer = (settings.idle_in_transaction_timeout.is_some()
            || settings.client_idle_timeout.is_some())
        .then(|| Box::pin(tokio::time::sleep(std::time::Duration::MAX)));
        Session {
            fe: init.fe,
            user: init.user,
            topo: init.topology,
            rd,
            wr,
            cbuf: leftover,
            cout: BytesMut::with_capacity(16 * 1024),
            sout: BytesMut::with_capacity(4 * 1024),
            server_shard: default_shard,
            next_shard: default_shard,
            pending_begin: None,
            txn_begin: None,
            side: Vec::new(),
            side_end: None,
            parked: Vec::new(),
            raise_with: None,
            batch: None,
            deferred_parse: None,
            fanout_failed: false,
            statement_started: None,
            pools: init.pools,
            server: None,
            server_node: PRIMARY,
            route: SessionRoute {
                // Session pooling lends one connection for the whole session, which
                // must be able to write: the session targets the primary unless the
                // client says otherwise (docs/decisions.md).
                mode,
                wrote_at: None,
            },
            failed_nodes: 0,
            replay: None,
            hold_wrote: false,
            ops: VecDeque::new(),
            gate: None,
            held: None,
            ddl_pending: false,
            listening: HashSet::new(),
            held_cursors: HashSet::new(),
            pinned: false,
            skipping: false,
            statements: HashMap::new(),
            unnamed: None,
            target_portal: None,
            startup_params: init.params.clone(),
            params: init.params,
            pending: Vec::new(),
            later: VecDeque::new(),
            txn_failed: false,
            copy_in: false,
            copy_ended_early: 0,
            client_relay: 0,
            cancel: init.cancel,
            shutdown: init.shutdown,
            reshard_ticket: None,
            describing: false,
            describe_only: false,
            idle_timer,
            idle: None,
        }
    }

    pub async fn run(mut self) {
        if let Err(error) = self.query_loop().await {
            match &error {
                SessionError::ClientIo(_) => {}
                SessionError::Protocol(e) => self.fatal("08P01", &e.to_string()),
                SessionError::Backend(e) => {
                    if e.is_connection_failure() {
                        if let Some(conn) = self.server.as_mut() {
                            conn.broken = true;
                        }
                    }
                    tracing::warn!(%error, "server connection failed");
                    self.fatal(e.sqlstate(), &e.to_string())
                }
            }
        }
        self.flush_client().await;
        self.finish().await;
        self.set_pinned(false);
    }

    /// Keeps the server connection between transactions while the client listens or
    /// holds a cursor (and counts such clients).
    fn set_pinned(&mut self, pinned: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        if pinned == self.pinned {
            return;
        }
        self.pinned = pinned;
        if pinned {
            self.fe.pinned_sessions.fetch_add(1, Relaxed);
            tracing::debug!(
                listening = self.listening.len(),
                cursors = self.held_cursors.len(),
                "server connection pinned to its client (LISTEN or WITH HOLD cursor)"
            );
        } else {
            self.fe.pinned_sessions.fetch_sub(1, Relaxed);
        }
    }

    async fn query_loop(&mut self) -> Result<(), SessionError> {
        loop {
            match self.step().await {
                Ok(Flow::Continue) => {}
                Ok(Flow::Stop) => return Ok(()),
                Err(SessionError::Backend(error)) if self.replay.is_some() => {
                    tracing::warn!(%error, node = self.server_node, "replica failed before answering; retrying the read elsewhere");
                    self.retry_elsewhere();
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn step(&mut self) -> Result<Flow, SessionError> {
        if let Flow::Stop = self.process_client_frames().await? {
            return Ok(Flow::Stop);
        }
        let gated = self.gate.is_some();
        self.process_server_frames()?;
        self.settle_side_end().await;
        if gated && self.gate.is_none() {
            // The shape check is done: the client's waiting frames go on at once.
            return Ok(Flow::Continue);
        }
        self.maybe_release().await;
        if self.server.is_none() && *self.shutdown.borrow() {
            return Err(self.shutting_down());
        }
        self.arm_idle_timer();
        match self.wait_io().await? {
            Event::ClientRead(0) => Ok(Flow::Stop),
            Event::ServerRead(0) => Err(BackendError::Closed.into()),
            Event::Shutdown => Err(self.shutting_down()),
            Event::IdleTimeout => Err(self.idle_timeout().await),
            Event::ClientRead(_) => {
                // The idle period is over; the next one starts with a fresh deadline.
                self.idle = None;
                Ok(Flow::Continue)
            }
            Event::ServerRead(_) | Event::Wrote => Ok(Flow::Continue),
        }
    }

    /// The replica died before any of its answer reached the client: forget that
    /// connection and feed the transaction's client frames through again, so routing
    /// picks another node (never this one) and the client sees one clean answer.
    fn retry_elsewhere(&mut self) {
        let Some(frames) = self.replay.take() else {
            return;
        };
        self.failed_nodes |= 1 << self.server_node.min(63);
        self.server = None;
        self.cancel.set(None);
        self.ops.clear();
        self.gate = None;
        self.sout.clear();
        self.pending.clear();
        self.later.clear();
        self.skipping = false;
        self.copy_in = false;
        self.copy_ended_early = 0;
        self.txn_failed = false;
        let mut again = BytesMut::with_capacity(
            frames.iter().map(|f| f.len()).sum::<usize>() + self.cbuf.len(),
        );
        for frame in &frames {
            again.extend_from_slice(frame);
        }
        if let Some(held) = self.held.take() {
            again.extend_from_slice(&held.raw);
        }
        again.extend_from_slice(&self.cbuf);
        self.cbuf = again;
    }

    fn shutting_down(&mut self) -> SessionError {
        self.fatal(
            "57P01",
            "terminating connection due to administrator command",
        );
        SessionError::ClientIo(io::Error::other("shutdown"))
    }

    /// Starts the idle timer when the session begins to wait for the client with
    /// nothing owed to or by the server; stops it when something is owed again. Costs a
    /// clock read and a timer reset per idle period, nothing per message otherwise.
    fn arm_idle_timer(&mut self) {
        if self.idle_timer.is_none() {
            return;
        }
        let waiting = self.ops.is_empty() && self.sout.is_empty() && self.gate.is_none();
        if !waiting {
            self.idle = None;
            return;
        }
        if self.idle.is_some() {
            return;
        }
        // In a transaction as the client sees it (a deferred BEGIN counts: the client
        // cannot tell it holds nothing yet), or in the middle of an extended-protocol
        // batch (an implicit transaction: the server keeps its locks until Sync).
        let in_transaction = self.client_status() != b'I'
            || self.batch.is_some()
            || self.server.as_ref().is_some_and(|c| c.unsynced);
        let settings = &self.fe.settings;
        let (kind, limit) = if in_transaction {
            (
                IdleLimit::InTransaction,
                settings.idle_in_transaction_timeout,
            )
        } else {
            (IdleLimit::Session, settings.client_idle_timeout)
        };
        if let (Some(limit), Some(timer)) = (limit, self.idle_timer.as_mut()) {
            timer.as_mut().reset(tokio::time::Instant::now() + limit);
            self.idle = Some(kind);
        }
    }

    /// The client stayed idle past its limit: its transaction is rolled back and its
    /// server connection goes back to the pool (closed if it was mid-batch) before the
    /// client is told, then the client is closed, as PostgreSQL does.
    async fn idle_timeout(&mut self) -> SessionError {
        let kind = self.idle.take();
        self.release_server().await;
        self.end_sides(false).await;
        self.pending_begin = None;
        let (code, message) = match kind {
            Some(IdleLimit::InTransaction) => (
                "25P03",
                "terminating connection due to idle-in-transaction timeout",
            ),
            _ => (
                "57P05",
                "terminating connection due to idle-session timeout",
            ),
        };
        tracing::info!(code, "client idle past its limit; closing it");
        self.fatal(code, message);
        SessionError::ClientIo(io::Error::other("idle timeout"))
    }

    async fn wait_io(&mut self) -> Result<Event, SessionError> {
        let out_limit = self.fe.settings.buffer_size;
        let Session {
            rd,
            wr,
            cbuf,
            cout,
            sout,
            server,
            shutdown,
            gate,
            idle_timer,
            idle: idle_limit,
            ..
        } = self;
        let idle = server.is_none();
        // While a shape check is under way the client's frames wait: don't buffer more.
        let gated = gate.is_some();
        let (srd, swr, rbuf) = match server.as_mut() {
            Some(conn) => {
                let conn = &mut **conn;
                conn.rbuf.reserve(16 * 1024);
                (Some(&mut conn.rd), Some(&mut conn.wr), Some(&mut conn.rbuf))
            }
            None => (None, None, None),
        };
        cbuf.reserve(8 * 1024);
        tokio::select! {
            biased;
            r = wr.write_buf(cout), if !cout.is_empty() => { r?; Ok(Event::Wrote) }
            r = write_server(swr, sout), if !sout.is_empty() => { r.map_err(BackendError::Io)?; Ok(Event::Wrote) }
            r = read_server(srd, rbuf), if !idle && cout.len() < out_limit => {
                Ok(Event::ServerRead(r.map_err(BackendError::Io)?))
            }
            r = rd.read_buf(cbuf), if sout.len() < out_limit && !gated => Ok(Event::ClientRead(r?)),
            _ = shutdown.changed(), if idle => Ok(Event::Shutdown),
            _ = idle_sleep(idle_timer.as_mut()), if idle_limit.is_some() => Ok(Event::IdleTimeout),
        }
    }

    /// Borrows a server connection for this client if it has none, and brings the
    /// connection's session settings in line with the client's. A borrowed connection
    /// that fails before any of the client's bytes went to it is replaced, so a server
    /// restart or a terminated backend costs the client nothing.
    async fn ensure_server(&mut self, analyzed: Option<&Analyzed>) -> Result<(), SessionError> {
        self.borrow_server(analyzed).await?;
        if let Some((frame, stmt)) = self.deferred_parse.take() {
            let name = messages::decode_parse(&frame)?.name.to_owned();
            if let Some(replay) = self.replay.as_mut() {
                replay.push(frame.raw.clone());
            }
            self.forward_parse(&frame, &name, stmt);
        }
        Ok(())
    }

    async fn borrow_server(&mut self, analyzed: Option<&Analyzed>) -> Result<(), SessionError> {
        if self.server.is_some() && self.describe_only && !self.describing {
            // A statement executes: its transaction's BEGIN goes where it runs.
            if self.only_prepared() {
                self.sync_and_release().await?;
            } else if let Some((sql, _)) = self.pending_begin.take() {
                // Answers still due on this connection: the transaction stays here.
                messages::query(&mut self.sout, &sql);
                self.push_hidden(Expect::Query);
                self.describe_only = false;
            }
        }
        if self.server.is_some() && self.held_elsewhere(analyzed) {
            self.sync_and_release().await?;
        }
        if let Some(conn) = self.server.as_mut() {
            if self.ops.is_empty()
                && self.sout.is_empty()
                && !conn.unsynced
                && conn.applied.fingerprint() != self.params.fingerprint()
            {
                align_settings(conn, &self.params).await?;
            }
            return Ok(());
        }
        let mut attempt = 0;
        let shard = self.next_shard;
        self.settle_side_end().await;
        if !self.describing && (self.adopt_side(shard) || self.unpark(shard)) {
            return Ok(());
        }
        if let Err(error) = self
            .fe
            .pauses
            .wait_if_paused(&self.topo.shards[shard].name)
            .await
        {
            return Err(BackendError::Server {
                code: error.sqlstate().into(),
                message: error.to_string(),
            }
            .into());
        }
        // An explicit transaction is routed by its BEGIN (primary unless READ ONLY).
        let begin = self.pending_begin.as_ref().map(|(_, a)| *a);
        let analyzed = begin.as_ref().or(analyzed);
        let mut waiting_since = None;
        let (node, conn) = loop {
            let (node, mut conn) = match self.acquire_routed(analyzed, shard).await {
                Ok(borrowed) => borrowed,
                Err(SessionError::Backend(error)) if self.may_wait_for_primary(&error) => {
                    let since = *waiting_since.get_or_insert_with(std::time::Instant::now);
                    self.wait_for_new_primary(shard, since, &error).await?;
                    continue;
                }
                Err(error) => return Err(error),
            };
            match align_settings(&mut conn, &self.params).await {
                Ok(()) => break (node, conn),
                Err(error) if error.is_connection_failure() && attempt < CHECKOUT_RETRIES => {
                    attempt += 1;
                    tracing::warn!(%error, node, attempt, "server connection failed before use; trying another");
                }
                Err(error) => return Err(error.into()),
            }
        };
        self.cancel.set(Some(CancelTarget {
            host: conn.host.clone(),
            port: conn.port,
            key: conn.backend_key,
        }));
        self.server = Some(conn);
        self.server_shard = shard;
        self.server_node = node;
        self.hold_wrote = false;
        self.replay = (node != PRIMARY).then(Vec::new);
        if self.describing && self.pending_begin.is_some() {
            self.describe_only = true;
        } else if let Some((sql, _)) = self.pending_begin.take() {
            messages::query(&mut self.sout, &sql);
            self.push_hidden(Expect::Query);
        }
        Ok(())
    }

    /// With automatic failover a shard whose primary cannot be reached is about to get
    /// a new one: the statement waits for it (bounded) instead of failing at once.
    fn may_wait_for_primary(&self, error: &BackendError) -> bool {
        self.fe.settings.failover_buffer.is_some()
            && matches!(
                error,
                BackendError::Connect(..)
                    | BackendError::ConnectTimeout(_)
                    | BackendError::Io(_)
                    | BackendError::Closed
            )
    }

    /// Waits for a topology with a new primary for `shard`, until `failover.buffer`
    /// after `since`; then the write fails with 57P03.
    async fn wait_for_new_primary(
        &mut self,
        shard: usize,
        since: std::time::Instant,
        error: &BackendError,
    ) -> Result<(), SessionError> {
        let window = self.fe.settings.failover_buffer.unwrap_or_default();
        let mut published = self.fe.topology_published.subscribe();
        let seen = self.topo.generation;
        let changed = tokio::time::timeout_at(
            (since + window).into(),
            published.wait_for(|generation| *generation > seen),
        )
        .await;
        let fresh = self.fe.topology.load_full();
        if changed.is_err() || fresh.generation == seen || fresh.shards.len() <= shard {
            let name = &self.topo.shards[shard].name;
            return Err(BackendError::Server {
                code: "57P03".into(),
                message: format!(
                    "shard {name} has no reachable primary and a failover is in progress or pending (waited {window:?}): {error}"
                ),
            }
            .into());
        }
        tracing::info!(shard = %fresh.shards[shard].name, "write resumes on the shard's new primary");
        self.pools = self.fe.pools_for(&self.user, &fresh);
        self.topo = fresh;
        Ok(())
    }

    /// The held connection only parsed and described statements since the client's
    /// last Sync (a driver that prepares with Flush, then runs), and the statement now
    /// needs another node (a write after a read's Describe on a replica) or another
    /// shard: that connection can be let go instead of refusing or misrouting.
    fn held_elsewhere(&self, analyzed: Option<&Analyzed>) -> bool {
        if self.server.is_none() {
            return false;
        }
        let only_prepared = self.only_prepared();
        let needs_primary = self.server_node != PRIMARY
            && !analyzed.is_some_and(|a| route::is_read(a.class) && a.hint.is_none());
        only_prepared && (needs_primary || self.next_shard != self.server_shard)
    }

    /// The held connection has only parsed and described since the client's last
    /// Sync, and nothing of its answers is still due: it can be let go unnoticed.
    fn only_prepared(&self) -> bool {
        self.server.as_ref().is_some_and(|conn| {
            self.ops.is_empty()
                && self.sout.is_empty()
                && conn.rbuf.is_empty()
                && !conn.ran_since_sync
                && conn.txn_status == b'I'
                && self.pending.is_empty()
                && self.later.is_empty()
                && !self.pinned
        })
    }

    /// Ends the held connection's batch with a Sync of our own (nothing of it ran, so
    /// nothing commits) and gives it back; the statement then borrows afresh.
    /// The shard the statement being routed goes to (`next_shard`) stays as it is.
    async fn sync_and_release(&mut self) -> Result<(), SessionError> {
        let Some(conn) = self.server.as_mut() else {
            return Ok(());
        };
        conn.sync().await?;
        // The unnamed statement stays the client's: re-created where it runs next.
        let shard = self.next_shard;
        self.release_server().await;
        self.next_shard = shard;
        Ok(())
    }

    /// Routes (DESIGN 5.1-5.3) and borrows a connection; a replica that cannot be
    /// reached is skipped for this transaction and routing runs again.
    async fn acquire_routed(
        &mut self,
        analyzed: Option<&Analyzed>,
        shard: usize,
    ) -> Result<(usize, PooledConn), SessionError> {
        let analyzed = analyzed.unwrap_or(&UNANALYZED);
        let pools = &self.pools[shard];
        loop {
            let fresh = self.topo.shards[shard].fresh.load();
            // On the stack: no allocation per transaction. Nodes past 16 count as idle.
            let mut load = [0usize; 16];
            for (slot, pool) in load.iter_mut().zip(pools) {
                *slot = pool.outstanding();
            }
            let load = &load[..pools.len().min(16)];
            let tiebreak = self
                .fe
                .route_counter
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut decision = route::route(
                analyzed,
                &self.route,
                &fresh,
                load,
                self.failed_nodes,
                tiebreak,
            );
            let floor = self.topo.shards[shard].read_floor;
            if decision.node != PRIMARY
                && fresh
                    .nodes
                    .get(decision.node)
                    .is_some_and(|n| n.lsn < floor)
            {
                // Keys a reshard moved here: replicas serve them once past the cutover.
                decision = route::Route {
                    node: PRIMARY,
                    reason: route::RouteReason::NotCaughtUp,
                };
            }
            self.fe.route_stats.record(decision.reason);
            if decision.node == PRIMARY && decision.reason != route::RouteReason::Write {
                tracing::debug!(
                    reason = decision.reason.as_str(),
                    "read routed to the primary"
                );
            }
            let node = decision.node.min(pools.len() - 1);
            match pools[node].acquire().await {
                Ok(conn) => {
                    let route = if node == PRIMARY {
                        crate::admin::metrics::QueryRoute::Primary
                    } else {
                        crate::admin::metrics::QueryRoute::Replica
                    };
                    self.fe.metrics.query(route, &self.topo.shards[shard].name);
                    return Ok((node, conn));
                }
                Err(error) if node != PRIMARY => {
                    tracing::warn!(%error, node, "replica unavailable; routing again");
                    self.failed_nodes |= 1 << node.min(63);
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Notes what a statement about to run on the held connection means for routing.
    fn note_statement(&mut self, analyzed: &Analyzed) {
        if matches!(
            analyzed.class,
            StatementClass::Write | StatementClass::Utility
        ) {
            self.hold_wrote = true;
        }
        if self.replay.is_some()
            && !route::is_read(analyzed.class)
            && analyzed.class != StatementClass::TxnControl
        {
            // Not a plain read: never run it twice.
            self.replay = None;
        }
    }

    /// Between transactions: take the newest topology (a reload re-points sessions at
    /// their next transaction; shard indexes stay fixed within one).
    fn refresh_topology(&mut self) {
        if self.server.is_some()
            || self.pending_begin.is_some()
            || self.batch.is_some()
            || !self.ops.is_empty()
        {
            return;
        }
        self.take_newest_topology();
    }

    /// Takes the newest topology, if it changed, while no server is held (its pools,
    /// and the default shard as the next one).
    fn take_newest_topology(&mut self) {
        let current = self.fe.topology.load();
        if current.generation == self.topo.generation {
            return;
        }
        let old = std::mem::replace(&mut self.topo, arc_swap::Guard::into_inner(current));
        self.pools = self.fe.pools_for(&self.user, &self.topo);
        self.next_shard = self.topo.default_shard;
        self.server_shard = self.topo.default_shard;
        self.remap_sides(&old);
    }

    /// Transaction pooling: give the server back as soon as it is idle and we owe
    /// nothing to either side.
    async fn maybe_release(&mut self) {
        if self.fe.settings.pool_mode != PoolMode::Transaction || self.pinned {
            return;
        }
        let idle = match &self.server {
            Some(conn) => {
                self.ops.is_empty()
                    && !self.skipping
                    && self.sout.is_empty()
                    && conn.rbuf.is_empty()
                    && !conn.unsynced
                    && conn.txn_status == b'I'
            }
            None => false,
        };
        if idle {
            self.release_server().await;
        } else if let Some(conn) = &self.server {
            tracing::trace!(ops = ?self.ops, skipping = self.skipping, sout = self.sout.len(),
                rbuf = conn.rbuf.len(), status = conn.txn_status, "server kept");
        }
    }

    async fn release_server(&mut self) {
        let Some(mut conn) = self.server.take() else {
            return;
        };
        self.reshard_ticket = None;
        self.describe_only = false;
        self.cancel.set(None);
        self.replay = None;
        self.failed_nodes = 0;
        self.next_shard = self.topo.default_shard;
        if self.hold_wrote && self.server_node == PRIMARY && self.fe.settings.read_your_writes {
            // The transaction's commit is behind us (the server said idle): any primary
            // position the monitor observes from now on includes it. No round trip.
            self.route.wrote_at = Some(std::time::Instant::now());
        }
        self.hold_wrote = false;
        if conn.unsynced || conn.broken {
            // The client left in the middle of a batch, or the connection failed:
            // closing it is what a direct connection would do (the server rolls back).
            tracing::debug!(
                unsynced = conn.unsynced,
                broken = conn.broken,
                "server connection closed instead of pooled"
            );
            return;
        }
        if !conn.needs_reset() {
            // The common case: idle and clean, no round trip and no timer.
            conn.release();
            return;
        }
        let reset = tokio::time::timeout(self.fe.settings.pool.acquire_timeout, conn.reset()).await;
        match reset {
            Ok(Ok(())) => conn.release(),
            Ok(Err(error)) => tracing::warn!(%error, "server reset failed; closing it"),
            Err(_) => tracing::warn!("server reset timed out; closing it"),
        }
    }

    /// The client is gone: keep the server connection only if it is between messages
    /// (then a ROLLBACK ends any open transaction); otherwise cancel and close it.
    async fn finish(&mut self) {
        self.end_sides(false).await;
        let between = self.ops.is_empty()
            && self.sout.is_empty()
            && self
                .server
                .as_ref()
                .is_some_and(|c| c.rbuf.is_empty() && !c.unsynced && !c.broken);
        if between {
            self.release_server().await;
        } else if let Some(conn) = self.server.take() {
            self.cancel.set(None);
            let (host, port, key) = (conn.host.clone(), conn.port, conn.backend_key);
            drop(conn);
            tokio::spawn(async move {
                let _ = crate::backend::conn::send_cancel(&host, port, key).await;
            });
        }
    }

    fn fatal(&mut self, code: &str, message: &str) {
        self.fe.metrics.error(code);
        if self.server.as_ref().is_some_and(|c| c.to_client_rest > 0) {
            // The client is in the middle of a relayed message: an error now would be
            // read as its rest. Closing is all that can be said.
            return;
        }
        messages::error_fields(&mut self.cout, b'E', "FATAL", code, message);
    }

    async fn flush_client(&mut self) {
        let timeout = std::time::Duration::from_secs(1);
        let _ = tokio::time::timeout(timeout, async {
            let _ = self.wr.write_all(&self.cout).await;
            let _ = self.wr.flush().await;
        })
        .await;
        self.cout.clear();
    }
}

/// Brings a server connection's session settings in line with the client's.
async fn align_settings(conn: &mut PooledConn, params: &SessionParams) -> Result<(), BackendError> {
    if conn.applied.fingerprint() != params.fingerprint() {
        let sql = params.diff_sql(&conn.applied);
        conn.run_internal(&sql).await?;
        conn.applied = params.clone();
    }
    Ok(())
}

async fn read_server(
    rd: Option<&mut OwnedReadHalf>,
    buf: Option<&mut BytesMut>,
) -> io::Result<usize> {
    match (rd, buf) {
        (Some(rd), Some(buf)) => rd.read_buf(buf).await,
        _ => std::future::pending().await,
    }
}

async fn idle_sleep(timer: Option<&mut Pin<Box<tokio::time::Sleep>>>) {
    match timer {
        Some(timer) => timer.as_mut().await,
        None => std::future::pending().await,
    }
}

async fn write_server(wr: Option<&mut OwnedWriteHalf>, buf: &mut BytesMut) -> io::Result<usize> {
    match wr {
        Some(wr) => wr.write_buf(buf).await,
        None => std::future::pending().await,
    }
}
