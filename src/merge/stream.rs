//! The three ways merged rows leave a [`Merger`]: as they arrive (no ORDER BY), by a
//! streaming k-way merge (ORDER BY), or all at once after the last leg (aggregates);
//! each passes through OFFSET and LIMIT on the way out.

use std::cmp::Ordering;

use bytes::BytesMut;

use super::value::{self, Value};
use super::wire::{self, ColumnType, DataRow};
use super::{Merger, Row, SortKey};
use crate::protocol::messages::{self, btag};

impl Merger {
    /// Applies OFFSET and LIMIT to the merged stream and writes what passes.
    fn emit(&mut self, row: &DataRow, out: &mut BytesMut) {
        if self.skipped < self.plan.offset {
            self.skipped += 1;
        } else if !self.limit_reached() {
            row.put_visible(out);
            self.sent += 1;
        }
    }

    pub(super) fn drain_unsorted(&mut self, out: &mut BytesMut) {
        for leg in 0..self.legs.len() {
            while !self.limit_reached() {
                let Some(row) = self.legs[leg].rows.pop_front() else {
                    break;
                };
                self.emit(&row.data, out);
            }
        }
    }

    /// Streaming k-way merge: emits the smallest head row while every unfinished leg
    /// has one (ties go to the lower leg, so equal keys keep leg order). A linear scan
    /// over the legs per row: shard counts are small.
    pub(super) fn drain_sorted(&mut self, out: &mut BytesMut) {
        while !self.limit_reached() {
            let mut best: Option<usize> = None;
            for (i, leg) in self.legs.iter().enumerate() {
                match leg.rows.front() {
                    None if !leg.complete => return,
                    None => {}
                    Some(row) => {
                        let better = best.is_none_or(|b| {
                            let head = self.legs[b].rows.front();
                            head.is_none_or(|h| compare_rows(&self.plan.sort, row, h).is_lt())
                        });
                        if better {
                            best = Some(i);
                        }
                    }
                }
            }
            let Some(row) = best.and_then(|b| self.legs[b].rows.pop_front()) else {
                return;
            };
            self.emit(&row.data, out);
        }
    }

    /// Once every leg finished: the groups become rows, sorted if asked, then pass
    /// through OFFSET/LIMIT. A result out of its type's range fails the statement
    /// with SQLSTATE 22003, as the server would.
    pub(super) fn drain_aggregate(&mut self, out: &mut BytesMut) {
        if !self.legs.iter().all(|l| l.complete) {
            return;
        }
        let Some(aggregator) = self.aggregator.take() else {
            return;
        };
        let columns = self.columns.clone().unwrap_or_default();
        let fields = match aggregator.finish() {
            Ok(fields) => fields,
            Err(value::OutOfRange(message)) => {
                messages::error_fields(out, btag::ERROR_RESPONSE, "ERROR", "22003", message);
                self.finish();
                return;
            }
        };
        let mut rows: Vec<Row> = Vec::with_capacity(fields.len());
        for row in fields {
            let mut frame = BytesMut::new();
            wire::put_data_row(&mut frame, &row);
            // Our own encoding of the right shape: decoding cannot fail.
            let Ok(data) =
                wire::decode_data_row(frame.freeze(), columns.len(), self.plan.hidden_columns)
            else {
                continue;
            };
            let keys = sort_keys(&self.plan.sort, &columns, &data);
            rows.push(Row { data, keys });
        }
        // Stable: equal keys keep first-seen group order.
        rows.sort_by(|a, b| compare_rows(&self.plan.sort, a, b));
        for row in rows {
            if self.limit_reached() {
                break;
            }
            self.emit(&row.data, out);
        }
    }
}

pub(super) fn sort_keys(
    sort: &[SortKey],
    columns: &[ColumnType],
    row: &DataRow,
) -> Vec<Option<Value>> {
    sort.iter()
        .map(|key| {
            let ty = columns
                .get(key.column)
                .copied()
                .unwrap_or(ColumnType::UNKNOWN);
            row.field(key.column).map(|raw| Value::parse(ty, raw))
        })
        .collect()
}

/// ORDER BY semantics: NULL placement is absolute (NULLS FIRST puts them first for
/// DESC too); only the comparison of two values is reversed by DESC.
fn compare_rows(sort: &[SortKey], a: &Row, b: &Row) -> Ordering {
    for (i, key) in sort.iter().enumerate() {
        let order = match (
            a.keys.get(i).and_then(Option::as_ref),
            b.keys.get(i).and_then(Option::as_ref),
        ) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) if key.nulls_first => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) if key.nulls_first => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(x), Some(y)) if key.descending => value::compare(y, x),
            (Some(x), Some(y)) => value::compare(x, y),
        };
        if order.is_ne() {
            return order;
        }
    }
    Ordering::Equal
}
