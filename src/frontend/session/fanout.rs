//! Cross-shard execution of one simple-protocol statement, beside the single-shard
//! forwarder (which stays a byte-for-byte pipe). Each shard's part is a "leg": its own
//! server connection, driven by a task that passes the server's messages through a
//! bounded channel, so a leg whose rows are not needed yet waits instead of filling
//! memory.
//!
//! - Reads: the legs' answers go through the merger (`crate::merge`), which turns them
//!   into what one server would have sent (one RowDescription, rows in order, LIMIT,
//!   aggregates, one CommandComplete), streamed to the client as it goes.
//! - Writes to several shards (DDL, reference tables, a multi-row INSERT split by
//!   shard): every leg runs `BEGIN` and the statement; only when all succeeded do all
//!   commit, otherwise all roll back and the client gets the first error. Without
//!   two-phase commit a crash between the commits can still leave one shard committed
//!   and another not (docs/sharding.md).

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{align_settings, Session, SessionError, CHECKOUT_RETRIES};
use crate::backend::{BackendError, PooledConn};
use crate::merge::{MergePlan, Merger};
use crate::protocol::messages::{self, btag};
use crate::routing::analyze::{Analyzed, StatementClass};

/// One shard's part of a cross-shard statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leg {
    /// Index into `Frontend::shards`.
    pub shard: usize,
    /// The messages this shard gets: a simple Query, or an extended-protocol batch
    /// ending with Sync.
    pub messages: Bytes,
    /// ReadyForQuery messages that answer `messages`.
    pub ready: usize,
}

impl Leg {
    /// A leg running `sql` as a simple Query.
    pub fn simple(shard: usize, sql: &str) -> Leg {
        let mut messages = BytesMut::new();
        messages::query(&mut messages, sql);
        Leg {
            shard,
            messages: messages.freeze(),
            ready: 1,
        }
    }
}

/// Server messages buffered per leg before its task waits for the merge to catch up.
const LEG_QUEUE: usize = 64;

/// How long an unfinished leg may take to end by itself once its rows are not needed,
/// before it is cancelled (its connection is then closed, not pooled).
const FINISH_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

/// How long a cancelled leg gets to stop before it is cancelled again (and then its
/// connection closed).
const CANCEL_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Bytes merged for the client before they are written out.
const CLIENT_CHUNK: usize = 64 * 1024;

const READ: Analyzed = Analyzed {
    class: StatementClass::Read,
    hint: None,
    set_target: None,
    parsed: true,
};

pub(super) const WRITE: Analyzed = Analyzed {
    class: StatementClass::Write,
    hint: None,
    set_target: None,
    parsed: true,
};

/// A leg's task: runs `sql` on `conn` and passes every server message before
/// ReadyForQuery to `tx`. When the receiver is gone (the merge is done early) it keeps
/// reading, without passing, until the server is ready again, so the connection comes
/// back usable. The merge reads rows whole, so a message over `max_len`
/// (`limits.max_message_size`) fails the leg (and the statement) with an error naming
/// the node and the limit.
async fn run_leg(
    mut conn: PooledConn,
    leg: Leg,
    tx: mpsc::Sender<Bytes>,
    max_len: usize,
) -> Result<PooledConn, BackendError> {
    let result = async {
        conn.wr.write_all(&leg.messages).await?;
        let mut ready = 0;
        let mut passing = true;
        loop {
            let frame = conn.read_frame(max_len).await?;
            if frame.tag == btag::READY_FOR_QUERY {
                conn.txn_status = frame.body().first().copied().unwrap_or(b'I');
                // Every leg ends with a simple Query or a Sync.
                conn.unsynced = false;
                ready += 1;
                if ready == leg.ready {
                    return Ok(());
                }
                continue;
            }
            if passing && tx.send(frame.raw).await.is_err() {
                passing = false;
            }
        }
    }
    .await;
    conn.note_failure(result)?;
    Ok(conn)
}

/// What the client is told when the legs' answers cannot be merged.
fn merge_error(error: &crate::merge::MergeError) -> (&'static str, String) {
    (
        "0A000",
        format!("the results of the shards cannot be merged: {error}"),
    )
}

/// An ErrorResponse for a leg whose connection failed mid-statement.
fn leg_failure(shard: &str, error: &BackendError) -> Bytes {
    let mut out = BytesMut::new();
    messages::error_fields(
        &mut out,
        btag::ERROR_RESPONSE,
        "ERROR",
        error.sqlstate(),
        &format!("shard {shard}: {error}"),
    );
    out.freeze()
}

struct Running {
    shard: usize,
    rx: mpsc::Receiver<Bytes>,
    /// Taken when the leg is joined.
    task: Option<tokio::task::JoinHandle<Result<PooledConn, BackendError>>>,
    cancel: (String, u16, (u32, u32)),
    /// The leg's channel closed: its task has ended or is about to.
    done: bool,
    /// The leg's final answer (CommandComplete or ErrorResponse) has been received:
    /// nothing runs on its server any more, and it must not be cancelled.
    answered: bool,
    /// Whose connection the leg runs on.
    keep: Keep,
    kept: Option<PooledConn>,
}

/// Where a leg's connection goes when the leg is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// Borrowed for the statement: back to its pool.
    No,
    /// The transaction's own connection: back to the session.
    Own,
    /// The transaction's connection on another shard (`side.rs`), from node `node`:
    /// back to the transaction.
    Side { node: usize },
}

impl Keep {
    /// A leg inside the client's transaction: never cancelled (its connection stays
    /// with the transaction, so it is always run to its end).
    fn in_transaction(self) -> bool {
        self != Keep::No
    }
}

impl Running {
    /// Waits for the leg's task; its connection goes back to the pool when idle,
    /// unless `pool` is false (a cancel may still be on its way to that server and
    /// would hit the next statement run there: the connection is closed instead).
    async fn join(&mut self, pool: bool) -> Result<(), BackendError> {
        let Some(task) = self.task.take() else {
            return Ok(());
        };
        match task.await {
            Ok(Ok(conn)) => {
                if self.keep.in_transaction() {
                    self.kept = Some(conn);
                } else if pool {
                    conn.release();
                }
                Ok(())
            }
            Ok(Err(error)) => Err(error),
            Err(_) => Err(BackendError::Closed),
        }
    }
}

impl<R, W> Session<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// Borrows a connection on `shard` for one leg, settings aligned, retrying a
    /// connection that fails before use like `ensure_server` does.
    pub(super) async fn borrow_for_leg(
        &mut self,
        shard: usize,
        analyzed: &Analyzed,
    ) -> Result<PooledConn, SessionError> {
        let mut attempt = 0;
        loop {
            let (_, mut conn) = self.acquire_routed(Some(analyzed), shard).await?;
            match align_settings(&mut conn, &self.params).await {
                Ok(()) => return Ok(conn),
                Err(error) if error.is_connection_failure() && attempt < CHECKOUT_RETRIES => {
                    attempt += 1;
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Borrows a connection per leg and starts the legs. When a shard cannot be
    /// reached the legs already started are ended, the client gets the error as an
    /// ErrorResponse (its session goes on) and None is returned.
    async fn start_legs(
        &mut self,
        legs: Vec<Leg>,
        analyzed: &Analyzed,
    ) -> Result<Option<Vec<Running>>, SessionError> {
        // A read inside the client's transaction runs within it on every shard.
        let transactional =
            analyzed.class == StatementClass::Read && self.in_explicit_transaction();
        if self.server.is_some() {
            // The client sees answers from now on: no silent retry elsewhere.
            self.replay = None;
        }
        let mut running = Vec::with_capacity(legs.len());
        for leg in legs {
            let shard = leg.shard;
            // PAUSE holds new transactions; a read inside one goes on (the pause waits
            // for that transaction to end).
            let paused = match transactional {
                true => Ok(()),
                false => {
                    self.fe
                        .pauses
                        .wait_if_paused(&self.topo.shards[shard].name)
                        .await
                }
            };
            if let Err(error) = paused {
                self.finish_legs(running).await;
                self.fanout_failed = true;
                let text = error.to_string();
                messages::error_fields(
                    &mut self.cout,
                    btag::ERROR_RESPONSE,
                    "ERROR",
                    error.sqlstate(),
                    &text,
                );
                return Ok(None);
            }
            let own = if self.server_shard == shard && self.server.is_some() && !self.describe_only
            {
                self.server.take()
            } else {
                None
            };
            let (keep, borrowed) = match own {
                Some(conn) => (Keep::Own, Ok(conn)),
                None if transactional => match self.side_for_leg(shard).await {
                    Ok((node, conn)) => (Keep::Side { node }, Ok(conn)),
                    Err(error) => (Keep::No, Err(error)),
                },
                None => (Keep::No, self.borrow_for_leg(shard, analyzed).await),
            };
            let conn = match borrowed {
                Ok(conn) => conn,
                Err(SessionError::Backend(error)) => {
                    self.finish_legs(running).await;
                    self.fanout_failed = true;
                    let name = &self.topo.shards[shard].name;
                    self.cout.extend_from_slice(&leg_failure(name, &error));
                    return Ok(None);
                }
                Err(error) => return Err(error),
            };
            self.fe.metrics.query(
                crate::admin::metrics::QueryRoute::FanOut,
                &self.topo.shards[shard].name,
            );
            let cancel = (conn.host.clone(), conn.port, conn.backend_key);
            let (tx, rx) = mpsc::channel(LEG_QUEUE);
            let max_len = self.fe.settings.max_message_size;
            let task = tokio::spawn(run_leg(conn, leg, tx, max_len));
            running.push(Running {
                shard,
                rx,
                task: Some(task),
                cancel,
                done: false,
                answered: false,
                keep,
                kept: None,
            });
        }
        Ok(Some(running))
    }

    /// Ends every leg: legs still running are cancelled, each connection goes back to
    /// its pool if the server is idle (it is closed otherwise).
    async fn finish_legs(&mut self, legs: Vec<Running>) {
        for mut leg in legs {
            let mut cancel =
                !leg.keep.in_transaction() && !leg.done && !leg.answered && leg.task.is_some();
            leg.rx.close();
            if cancel {
                // Most unfinished legs are about to finish by themselves (their LIMIT
                // went to the shard too): let them, and keep the connection pooled.
                if let Some(task) = leg.task.as_mut() {
                    if let Ok(joined) = tokio::time::timeout(FINISH_GRACE, &mut *task).await {
                        leg.task = None;
                        cancel = false;
                        if let Ok(Ok(conn)) = joined {
                            conn.release();
                        }
                    }
                }
            }
            if cancel {
                let (host, port, key) = leg.cancel.clone();
                tokio::spawn(async move {
                    let _ = crate::backend::conn::send_cancel(&host, port, key).await;
                });
            }
            leg.rx.close();
            if cancel {
                // A cancel that reaches the server before the statement started is
                // lost: give it a moment, cancel once more, then close the connection.
                for _ in 0..2 {
                    let Some(task) = leg.task.as_mut() else { break };
                    if tokio::time::timeout(CANCEL_GRACE, &mut *task).await.is_ok() {
                        break;
                    }
                    let (host, port, key) = leg.cancel.clone();
                    let _ = crate::backend::conn::send_cancel(&host, port, key).await;
                }
                if let Some(task) = leg.task.take() {
                    if !task.is_finished() {
                        task.abort();
                    }
                    // The connection (if any) is dropped: closed, never pooled.
                }
                continue;
            }
            if let Err(error) = leg.join(!cancel).await {
                tracing::warn!(%error, shard = %self.topo.shards[leg.shard].name, "leg failed");
            }
            if let Some(conn) = leg.kept.take() {
                // Back to the transaction: it goes on there.
                match leg.keep {
                    Keep::Side { node } => self.keep_side(leg.shard, node, conn),
                    _ => self.server = Some(conn),
                }
            }
        }
    }

    /// A keyless read over several shards, merged. `describe`: the client wants the
    /// RowDescription (always for a simple Query). The caller sends ReadyForQuery.
    pub(super) async fn fan_out_read(
        &mut self,
        legs: Vec<Leg>,
        plan: MergePlan,
        describe: bool,
    ) -> Result<(), SessionError> {
        let count = legs.len();
        self.fanout_failed = false;
        let transactional = self.in_explicit_transaction();
        let Some(mut running) = self.start_legs(legs, &READ).await? else {
            if transactional {
                self.abort_after_failed_read().await?;
            }
            return Ok(());
        };
        let mut merger = Merger::new(plan, count);
        let mut merge_failed = false;
        while !merger.finished() {
            let next = (0..count).find(|&i| !running[i].done && merger.wants(i));
            let Some(i) = next.or_else(|| (0..count).find(|&i| !running[i].done)) else {
                break;
            };
            match running[i].rx.recv().await {
                // Notices once (every shard would say the same), no status chatter.
                Some(frame) if frame.first() == Some(&btag::NOTICE_RESPONSE) => {
                    if i == 0 {
                        self.cout.extend_from_slice(&frame);
                    }
                }
                // Status chatter, and the extended protocol's acknowledgements (the
                // client gets its own).
                Some(frame)
                    if matches!(
                        frame.first(),
                        Some(
                            &(btag::PARAMETER_STATUS
                                | btag::NOTIFICATION
                                | btag::PARSE_COMPLETE
                                | btag::BIND_COMPLETE
                                | btag::CLOSE_COMPLETE)
                        )
                    ) => {}
                Some(frame) => {
                    if matches!(
                        frame.first(),
                        Some(&(btag::COMMAND_COMPLETE | btag::ERROR_RESPONSE))
                    ) {
                        running[i].answered = true;
                    }
                    if let Err(error) = merger.push(i, &frame) {
                        tracing::warn!(%error, "cross-shard merge failed");
                        self.fanout_failed = true;
                        merge_failed = true;
                        let (code, text) = merge_error(&error);
                        messages::error_fields(
                            &mut self.cout,
                            btag::ERROR_RESPONSE,
                            "ERROR",
                            code,
                            &text,
                        );
                        break;
                    }
                }
                None => {
                    running[i].done = true;
                    // The task ended: normally after its CommandComplete or error,
                    // which the merger has; a failed connection says so here.
                    if let Err(error) = running[i].join(true).await {
                        let name = &self.topo.shards[running[i].shard].name;
                        let _ = merger.push(i, &leg_failure(name, &error));
                    }
                }
            }
            self.drain_merged(&mut merger, describe);
            if self.cout.len() >= CLIENT_CHUNK {
                self.wr.write_all(&self.cout).await?;
                self.cout.clear();
            }
            if merger.satisfied() {
                break;
            }
        }
        if !merge_failed {
            self.drain_merged(&mut merger, describe);
        }
        self.finish_legs(running).await;
        if transactional {
            self.abort_after_failed_read().await?;
        }
        Ok(())
    }

    /// Moves merged messages to the client; without `describe` the RowDescription
    /// (which the merge needs from the legs) is left out.
    fn drain_merged(&mut self, merger: &mut Merger, describe: bool) {
        let mut merged = BytesMut::new();
        merger.drain(&mut merged);
        while let Ok(Some(frame)) = crate::protocol::decode_frame(&mut merged, usize::MAX) {
            if frame.tag == btag::ERROR_RESPONSE {
                self.fanout_failed = true;
            }
            if describe || frame.tag != btag::ROW_DESCRIPTION {
                self.cout.extend_from_slice(&frame.raw);
            }
        }
    }

    /// A write on several shards, all or nothing before the commits: each leg runs
    /// `BEGIN` and its statement; then all commit, or all roll back on any error.
    /// The caller sends ReadyForQuery.
    pub(super) async fn fan_out_write(
        &mut self,
        legs: Vec<Leg>,
        combine: Combine,
    ) -> Result<(), SessionError> {
        self.fan_out_write_described(legs, true, combine).await
    }

    /// `fan_out_write` for an extended-protocol batch: `describe` says whether the
    /// client asked for the portal's description (RowDescription or NoData).
    pub(super) async fn fan_out_write_described(
        &mut self,
        legs: Vec<Leg>,
        describe: bool,
        combine: Combine,
    ) -> Result<(), SessionError> {
        let legs = legs
            .into_iter()
            .map(|leg| {
                let mut messages = BytesMut::new();
                messages::query(&mut messages, "BEGIN");
                messages.extend_from_slice(&leg.messages);
                Leg {
                    shard: leg.shard,
                    messages: messages.freeze(),
                    ready: leg.ready + 1,
                }
            })
            .collect();
        self.fanout_failed = false;
        let Some(mut running) = self.start_legs(legs, &WRITE).await? else {
            return Ok(());
        };
        let mut answers: Vec<Vec<Bytes>> = Vec::with_capacity(running.len());
        for leg in running.iter_mut() {
            let mut frames = Vec::new();
            while let Some(frame) = leg.rx.recv().await {
                frames.push(frame);
            }
            leg.done = true;
            answers.push(frames);
        }
        let mut conns = Vec::with_capacity(running.len());
        let mut failure: Option<Bytes> = None;
        for (mut leg, frames) in running.into_iter().zip(&answers) {
            let name = &self.topo.shards[leg.shard].name;
            if let Some(task) = leg.task.take() {
                match task.await {
                    Ok(Ok(conn)) => conns.push(conn),
                    Ok(Err(error)) => {
                        failure.get_or_insert_with(|| leg_failure(name, &error));
                    }
                    Err(_) => {
                        failure.get_or_insert_with(|| leg_failure(name, &BackendError::Closed));
                    }
                }
            }
            if let Some(error) = frames
                .iter()
                .find(|f| f.first() == Some(&btag::ERROR_RESPONSE))
            {
                failure.get_or_insert_with(|| error.clone());
            }
        }
        let end = if failure.is_some() {
            "ROLLBACK"
        } else {
            "COMMIT"
        };
        let mut commit_failure = None;
        for mut conn in conns {
            match conn.run_internal(end).await {
                Ok(()) => conn.release(),
                Err(error) => {
                    tracing::warn!(%error, end, "ending a cross-shard write leg failed");
                    commit_failure.get_or_insert(error);
                }
            }
        }
        if failure.is_none() {
            self.route.wrote_at = Some(std::time::Instant::now());
        }
        self.fanout_failed = failure.is_some() || commit_failure.is_some();
        match failure {
            Some(error) => self.cout.extend_from_slice(&error),
            None => match commit_failure {
                Some(error) => messages::error_fields(
                    &mut self.cout,
                    btag::ERROR_RESPONSE,
                    "ERROR",
                    error.sqlstate(),
                    &format!("committing on one shard failed after others committed: {error}"),
                ),
                None => {
                    let shown = match combine {
                        Combine::Sum => &answers[..],
                        Combine::First => &answers[..answers.len().min(1)],
                    };
                    write_combined(&mut self.cout, shown, describe)
                }
            },
        }
        Ok(())
    }
}

/// How the legs of a write make up the client's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    /// Each shard wrote different rows (a split INSERT, a keyed write over several
    /// shards): rows and counts add up.
    Sum,
    /// Every shard did the same (DDL, reference tables): one shard's answer is the
    /// answer.
    First,
}

/// The client's view of a successful write on several shards: the first leg's
/// RowDescription (RETURNING), every leg's rows, one CommandComplete whose row count
/// is the sum (`INSERT 0 n`, `UPDATE n`, `DELETE n`; other tags as the first leg's).
fn write_combined(out: &mut BytesMut, answers: &[Vec<Bytes>], describe: bool) {
    // Each leg's frames: BEGIN's CommandComplete, then the statement's answer.
    let statement =
        |frames: &Vec<Bytes>| -> Vec<Bytes> { frames.iter().skip(1).cloned().collect() };
    let mut described = false;
    let mut total: u64 = 0;
    let mut first_tag: Option<String> = None;
    for frames in answers {
        for frame in statement(frames) {
            match frame.first().copied() {
                Some(btag::ROW_DESCRIPTION | btag::NO_DATA) if !described => {
                    described = true;
                    if describe {
                        out.extend_from_slice(&frame);
                    }
                }
                Some(btag::DATA_ROW) => out.extend_from_slice(&frame),
                Some(btag::COMMAND_COMPLETE) => {
                    let tag = String::from_utf8_lossy(
                        frame
                            .get(5..frame.len().saturating_sub(1))
                            .unwrap_or_default(),
                    )
                    .into_owned();
                    total += tag
                        .rsplit(' ')
                        .next()
                        .and_then(|n| n.parse::<u64>().ok())
                        .unwrap_or(0);
                    first_tag.get_or_insert(tag);
                }
                _ => {}
            }
        }
    }
    let tag = first_tag.unwrap_or_default();
    let words: Vec<&str> = tag.split(' ').collect();
    let combined = match words.as_slice() {
        ["INSERT", oid, _] => format!("INSERT {oid} {total}"),
        [verb @ ("UPDATE" | "DELETE" | "MERGE" | "SELECT" | "COPY"), _] => {
            format!("{verb} {total}")
        }
        _ => tag,
    };
    messages::command_complete(out, &combined);
}
