//! Cross-shard read results merged into the answer one server would give.
//!
//! A read without a shard key runs on every shard ("legs"); the session feeds each
//! leg's backend messages (RowDescription or NoData, DataRows, CommandComplete, or an
//! ErrorResponse) to a [`Merger`] and writes what [`Merger::drain`] returns to the
//! client. This layer is pure and synchronous: frames in, frames out, no sockets,
//! no knowledge of shards beyond a leg number. It sits between the protocol layer
//! (whose frame helpers and message builders it uses) and the frontend session.
//!
//! What the client sees: one RowDescription (the first one any leg sends, minus the
//! hidden helper columns), the rows (unsorted: as they arrive; sorted: a streaming
//! k-way merge; aggregates: at the end), then one CommandComplete counting the rows
//! actually sent — or, if any leg fails, exactly one ErrorResponse (the first) and
//! nothing more.
//!
//! Memory: a sorted merge can only emit once every unfinished leg has a row buffered,
//! so [`Merger::wants`] names the legs it is waiting for and the caller reads other
//! legs only while their [`Merger::buffered`] count is below its per-leg bound
//! ([`DEFAULT_LEG_BUFFER_ROWS`] is the suggested default): at most one bound of rows
//! per leg is held. An unsorted merge holds only what arrived since the last drain.
//! An aggregate holds one entry per group and no rows.
//!
//! Where the answer can differ from one server's (the caller should route such
//! queries elsewhere or refuse them):
//! - text columns sort by bytes: the server's order only under the `C`/`C.UTF-8`
//!   collation; dates and times must be printed in `DateStyle = ISO`; other types
//!   without a decoder here (interval, inet, arrays, ...) sort by their bytes;
//! - GROUP BY keys group by their bytes, so `1.0` and `1.00` from two shards are two
//!   groups; sum/avg support integer, numeric and float columns only;
//! - float sums add in another order than one server would (last-bit differences),
//!   and float text keeps Rust's choice on exact ties of the shortest digits
//!   (PostgreSQL's Ryu picks the even digit or one more digit there);
//! - HAVING, DISTINCT and `count(DISTINCT ...)` cannot be merged from partials, and a
//!   LIMIT must not be pushed down to the shards of an aggregate query.
//!
//! Crates: frames are decoded with the protocol layer's helpers and written with its
//! `messages::put_msg` (the builders every other part of the proxy uses); binary
//! int/float/date/timestamp values are read and written with `postgres-protocol`'s
//! `types` codecs (already a dependency: postgres-types only wraps them and pgwire
//! would be a second message model). No crate decodes PostgreSQL `numeric` exactly
//! (postgres-types has no numeric; rust_decimal stops at 28 digits), so `numeric`
//! holds a small exact decimal with PostgreSQL's division-scale rule. No dependency
//! was added.

mod aggregate;
mod datetime;
mod numeric;
mod stream;
mod value;
mod wire;

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};

use crate::protocol::messages::{self, btag};
use aggregate::Aggregator;
use value::Value;
use wire::{ColumnType, CommandTag, DataRow};

/// A sort column at or past this value means hidden column `column - HIDDEN_SORT_COLUMN`
/// (index `columns - hidden_columns + k`), for sort keys appended after a `*` whose
/// width is known only from the RowDescription.
pub const HIDDEN_SORT_COLUMN: usize = 1 << 30;

/// Suggested per-leg bound on buffered rows for callers (see the module header).
pub const DEFAULT_LEG_BUFFER_ROWS: usize = 1024;

/// How the legs' results combine into the client's result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergePlan {
    /// ORDER BY: result column index, descending?, nulls first? (PostgreSQL default:
    /// NULLS LAST for ASC, NULLS FIRST for DESC — the caller fills the resolved value).
    pub sort: Vec<SortKey>,
    pub limit: Option<u64>,
    pub offset: u64,
    /// Set when the query aggregates: GROUP BY columns and what each output column is.
    pub aggregate: Option<AggregatePlan>,
    /// Columns appended by the query rewrite that the client must not see (e.g. the
    /// count added to compute avg from sum/count): the last `hidden_columns` columns
    /// are removed from the RowDescription and from every DataRow.
    pub hidden_columns: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SortKey {
    pub column: usize,
    pub descending: bool,
    pub nulls_first: bool,
}

/// One entry per result column, hidden helper columns included.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AggregatePlan {
    pub columns: Vec<OutputColumn>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputColumn {
    GroupKey,
    Count,
    Sum,
    Min,
    Max,
    /// avg = sum column / count column (indexes of the hidden helper columns).
    Avg {
        sum: usize,
        count: usize,
    },
}

/// Why a merge cannot go on. After one, the merge is over: the caller answers the
/// client with its own ErrorResponse and cancels the legs; later calls repeat it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    #[error("leg {leg} does not exist: the merge has {legs} legs")]
    NoSuchLeg { leg: usize, legs: usize },
    #[error("malformed message from leg {leg}: {reason}")]
    Malformed { leg: usize, reason: String },
    #[error("unexpected message '{}' from leg {leg}: {reason}", *tag as char)]
    Unexpected {
        leg: usize,
        tag: u8,
        reason: &'static str,
    },
    #[error("leg {leg} describes its result differently from the first leg: {reason}")]
    DescriptionMismatch { leg: usize, reason: String },
    #[error("the merge plan does not fit the result: {0}")]
    Plan(String),
    #[error("rows arrived without a RowDescription but the merge needs the column types")]
    NoDescription,
    #[error("bad value from leg {leg}: {reason}")]
    BadValue { leg: usize, reason: String },
}

/// What the legs announce before their rows; all legs must announce the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// No leg has said anything yet.
    Unknown,
    /// RowDescriptions (simple query, or Describe in the batch).
    Described,
    NoData,
    /// Rows without a description (extended protocol, Execute only).
    Undescribed,
}

#[derive(Debug, Default)]
struct Leg {
    announced: bool,
    complete: bool,
    rows: VecDeque<Row>,
}

/// A buffered row and its decoded sort keys (`None` is NULL).
#[derive(Debug)]
struct Row {
    data: DataRow,
    keys: Vec<Option<Value>>,
}

/// The merge of one statement's results from `legs` shards. See the module header.
#[derive(Debug)]
pub struct Merger {
    plan: MergePlan,
    legs: Vec<Leg>,
    shape: Shape,
    /// Types of all columns, hidden included, once known.
    columns: Option<Vec<ColumnType>>,
    /// The RowDescription (trimmed) or NoData to send, until sent: the first one any
    /// leg sends.
    description: Option<Bytes>,
    description_chosen: bool,
    tag: Option<CommandTag>,
    aggregator: Option<Aggregator>,
    /// The first ErrorResponse any leg sent, until drained.
    error: Option<Bytes>,
    failure: Option<MergeError>,
    skipped: u64,
    sent: u64,
    finished: bool,
}

impl Merger {
    pub fn new(plan: MergePlan, legs: usize) -> Merger {
        Merger {
            plan,
            legs: (0..legs).map(|_| Leg::default()).collect(),
            shape: Shape::Unknown,
            columns: None,
            description: None,
            description_chosen: false,
            tag: None,
            aggregator: None,
            error: None,
            failure: None,
            skipped: 0,
            sent: 0,
            finished: false,
        }
    }

    /// Supplies the column types from a RowDescription the client already has (its
    /// earlier Describe), for batches whose legs send rows without one. Nothing is
    /// sent for it; a description a leg sends later must agree with it.
    pub fn describe(&mut self, row_description: &[u8]) -> Result<(), MergeError> {
        let malformed = |reason| MergeError::Malformed { leg: 0, reason };
        if wire::check_frame(row_description).map_err(malformed)? != btag::ROW_DESCRIPTION {
            return Err(malformed("not a RowDescription".into()));
        }
        let desc = wire::decode_row_description(row_description, self.plan.hidden_columns)
            .map_err(MergeError::Plan)?;
        self.set_columns(desc.columns)
    }

    /// One backend message from leg `leg`: RowDescription or NoData, DataRow,
    /// CommandComplete, or ErrorResponse. Once the answer is decided (finished, an
    /// error pending, LIMIT reached) later frames are dropped, so a leg's reply to a
    /// cancellation does not reach the client.
    pub fn push(&mut self, leg: usize, frame: &[u8]) -> Result<(), MergeError> {
        if let Some(failure) = &self.failure {
            return Err(failure.clone());
        }
        if self.finished || self.error.is_some() || self.satisfied() {
            return Ok(());
        }
        let result = self.accept(leg, frame);
        if let Err(e) = &result {
            self.failure = Some(e.clone());
            self.legs.iter_mut().for_each(|l| l.rows.clear());
        }
        result
    }

    /// Whether the merge is waiting for more from `leg`: unsorted merges and
    /// aggregates use every row, so every unfinished leg is wanted; a sorted merge
    /// wants the unfinished legs with no buffered row (it cannot emit before it has
    /// one from each).
    pub fn wants(&self, leg: usize) -> bool {
        let Some(l) = self.legs.get(leg) else {
            return false;
        };
        if l.complete
            || self.finished
            || self.failure.is_some()
            || self.error.is_some()
            || self.satisfied()
        {
            return false;
        }
        self.plan.aggregate.is_some() || self.plan.sort.is_empty() || l.rows.is_empty()
    }

    /// Rows from `leg` held and not yet sent (always 0 for aggregates).
    pub fn buffered(&self, leg: usize) -> usize {
        self.legs.get(leg).map_or(0, |l| l.rows.len())
    }

    /// Appends every client message that can be sent now, in order.
    pub fn drain(&mut self, out: &mut BytesMut) {
        if self.finished || self.failure.is_some() {
            return;
        }
        if let Some(error) = self.error.take() {
            out.put_slice(&error);
            self.finish();
            return;
        }
        if self.shape == Shape::Unknown && !self.legs.iter().all(|l| l.complete) {
            return;
        }
        if let Some(description) = self.description.take() {
            out.put_slice(&description);
        }
        if self.plan.aggregate.is_some() {
            self.drain_aggregate(out);
        } else if self.plan.sort.is_empty() {
            self.drain_unsorted(out);
        } else {
            self.drain_sorted(out);
        }
        let all_sent = self.legs.iter().all(|l| l.complete && l.rows.is_empty());
        if !self.finished && (self.limit_reached() || all_sent) {
            let tag = self.tag.as_ref().map_or_else(
                || format!("SELECT {}", self.sent),
                |t| t.with_count(self.sent),
            );
            messages::command_complete(out, &tag);
            self.finish();
        }
    }

    /// True once the final CommandComplete (or the error) has been drained.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// True once LIMIT is satisfied: the next drain completes the result and the
    /// caller may cancel the remaining legs.
    pub fn satisfied(&self) -> bool {
        self.limit_reached() && self.shape != Shape::Unknown
    }

    fn limit_reached(&self) -> bool {
        self.plan.limit.is_some_and(|limit| self.sent >= limit)
    }

    fn finish(&mut self) {
        self.finished = true;
        self.legs.iter_mut().for_each(|l| l.rows.clear());
        self.aggregator = None;
    }

    fn accept(&mut self, leg: usize, frame: &[u8]) -> Result<(), MergeError> {
        let legs = self.legs.len();
        let l = self
            .legs
            .get(leg)
            .ok_or(MergeError::NoSuchLeg { leg, legs })?;
        let tag =
            wire::check_frame(frame).map_err(|reason| MergeError::Malformed { leg, reason })?;
        // An error after a leg's CommandComplete (its connection failed before
        // ReadyForQuery) still fails the statement; anything else is a protocol breach.
        if l.complete && tag != btag::ERROR_RESPONSE {
            let reason = "the leg already sent CommandComplete";
            return Err(MergeError::Unexpected { leg, tag, reason });
        }
        match tag {
            btag::ERROR_RESPONSE => {
                self.error = Some(Bytes::copy_from_slice(frame));
                self.legs.iter_mut().for_each(|l| l.rows.clear());
                Ok(())
            }
            btag::ROW_DESCRIPTION | btag::NO_DATA => self.accept_description(leg, tag, frame),
            btag::DATA_ROW => self.accept_row(leg, frame),
            btag::COMMAND_COMPLETE => self.accept_complete(leg, frame),
            _ => {
                let reason = "a merge takes only RowDescription, NoData, DataRow, CommandComplete, ErrorResponse";
                Err(MergeError::Unexpected { leg, tag, reason })
            }
        }
    }

    fn accept_description(&mut self, leg: usize, tag: u8, frame: &[u8]) -> Result<(), MergeError> {
        if self.legs[leg].announced {
            let reason = "a second description from one leg";
            return Err(MergeError::Unexpected { leg, tag, reason });
        }
        self.legs[leg].announced = true;
        let shape = if tag == btag::NO_DATA {
            Shape::NoData
        } else {
            Shape::Described
        };
        match self.shape {
            Shape::Unknown => self.shape = shape,
            s if s == shape => {}
            s => {
                let reason = format!("{shape:?} where another leg sent {s:?}");
                return Err(MergeError::DescriptionMismatch { leg, reason });
            }
        }
        let visible_frame = if shape == Shape::NoData {
            Bytes::copy_from_slice(frame)
        } else {
            let desc = wire::decode_row_description(frame, self.plan.hidden_columns)
                .map_err(|reason| MergeError::Malformed { leg, reason })?;
            match &self.columns {
                Some(known) if *known != desc.columns => {
                    let reason = describe_difference(known, &desc.columns);
                    return Err(MergeError::DescriptionMismatch { leg, reason });
                }
                Some(_) => {}
                None => self.set_columns(desc.columns)?,
            }
            desc.visible_frame
        };
        if !self.description_chosen {
            self.description = Some(visible_frame);
            self.description_chosen = true;
        }
        Ok(())
    }

    /// Fixes the column types and checks the plan against them.
    fn set_columns(&mut self, columns: Vec<ColumnType>) -> Result<(), MergeError> {
        if let Some(known) = &self.columns {
            if *known != columns {
                let reason = describe_difference(known, &columns);
                return Err(MergeError::DescriptionMismatch { leg: 0, reason });
            }
            return Ok(());
        }
        let n = columns.len();
        if self.plan.hidden_columns > n {
            return Err(MergeError::Plan(format!(
                "{} hidden columns but the result has {n}",
                self.plan.hidden_columns
            )));
        }
        let first_hidden = n - self.plan.hidden_columns;
        for key in &mut self.plan.sort {
            if key.column >= HIDDEN_SORT_COLUMN {
                key.column = first_hidden + (key.column - HIDDEN_SORT_COLUMN);
            }
        }
        if let Some(key) = self.plan.sort.iter().find(|k| k.column >= n) {
            return Err(MergeError::Plan(format!(
                "ORDER BY column {} but the result has {n} columns",
                key.column
            )));
        }
        if let Some(plan) = &self.plan.aggregate {
            self.aggregator =
                Some(Aggregator::new(&plan.columns, &columns).map_err(MergeError::Plan)?);
        }
        self.columns = Some(columns);
        Ok(())
    }

    fn accept_row(&mut self, leg: usize, frame: &[u8]) -> Result<(), MergeError> {
        match (self.shape, self.legs[leg].announced) {
            (Shape::Unknown, _) => self.shape = Shape::Undescribed,
            (Shape::Undescribed, _) | (Shape::Described, true) => {}
            (Shape::NoData, _) => {
                let reason = "a DataRow after NoData";
                return Err(MergeError::Unexpected {
                    leg,
                    tag: btag::DATA_ROW,
                    reason,
                });
            }
            (Shape::Described, false) => {
                let reason = "rows without a RowDescription where other legs sent one".into();
                return Err(MergeError::DescriptionMismatch { leg, reason });
            }
        }
        if self.columns.is_none() {
            if !self.plan.sort.is_empty()
                || self.plan.aggregate.is_some()
                || self.plan.hidden_columns > 0
            {
                return Err(MergeError::NoDescription);
            }
            let count = frame
                .get(5..7)
                .map_or(0, |c| i16::from_be_bytes([c[0], c[1]]));
            let count = usize::try_from(count).unwrap_or(0);
            self.set_columns(vec![ColumnType::UNKNOWN; count])?;
        }
        let columns = self.columns.as_deref().unwrap_or_default();
        let data = wire::decode_data_row(
            Bytes::copy_from_slice(frame),
            columns.len(),
            self.plan.hidden_columns,
        )
        .map_err(|reason| MergeError::Malformed { leg, reason })?;
        if let Some(aggregator) = &mut self.aggregator {
            return aggregator
                .add(&data)
                .map_err(|reason| MergeError::BadValue { leg, reason });
        }
        let keys = stream::sort_keys(&self.plan.sort, columns, &data);
        self.legs[leg].rows.push_back(Row { data, keys });
        Ok(())
    }

    fn accept_complete(&mut self, leg: usize, frame: &[u8]) -> Result<(), MergeError> {
        let tag = wire::decode_command_complete(frame)
            .map_err(|reason| MergeError::Malformed { leg, reason })?;
        match (self.shape, self.legs[leg].announced) {
            (Shape::Unknown, _) => self.shape = Shape::Undescribed,
            (Shape::Described | Shape::NoData, false) => {
                let reason = "no description where other legs sent one".into();
                return Err(MergeError::DescriptionMismatch { leg, reason });
            }
            _ => {}
        }
        self.tag.get_or_insert(tag);
        self.legs[leg].complete = true;
        Ok(())
    }
}

fn describe_difference(known: &[ColumnType], got: &[ColumnType]) -> String {
    if known.len() != got.len() {
        return format!("{} columns instead of {}", got.len(), known.len());
    }
    match known.iter().zip(got).position(|(a, b)| a != b) {
        Some(i) => format!(
            "column {i} has type {} format {} instead of type {} format {}",
            got[i].oid, got[i].format, known[i].oid, known[i].format
        ),
        None => "identical".into(),
    }
}

#[cfg(test)]
mod tests;
