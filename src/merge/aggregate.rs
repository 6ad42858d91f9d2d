//! GROUP BY and aggregates across shards: every leg's partial result rows are folded
//! into one entry per group (memory: one entry per distinct group, each holding its
//! group-key values and one accumulator per column; rows themselves are not kept).
//! The merged rows are produced once every leg has finished.
//!
//! Each shard runs the aggregate over its own rows, so the merge combines partials:
//! counts and sums add, min/max keep the extreme by the type order of `value`, and
//! avg is recomputed from the hidden sum and count columns the query rewrite added
//! (the legs' own avg values are ignored).

use std::collections::HashMap;

use bytes::Bytes;

use super::numeric::{Decimal, Numeric};
use super::value::{
    self, compare, encode_float, encode_integer, encode_numeric, Kind, OutOfRange, Value,
};
use super::wire::{ColumnType, DataRow};
use super::OutputColumn;

/// The merge-wide state of an aggregate query.
#[derive(Debug)]
pub(crate) struct Aggregator {
    columns: Vec<(OutputColumn, ColumnType)>,
    /// Group key bytes -> index into `groups`; groups keep first-seen order.
    index: HashMap<Vec<u8>, usize>,
    groups: Vec<Vec<Cell>>,
}

/// One column's accumulator within a group.
#[derive(Debug)]
enum Cell {
    Key(Option<Bytes>),
    Count(i128),
    SumInt(Option<i128>),
    SumNumeric(Option<Numeric>),
    SumFloat(Option<f64>),
    /// The current min or max, decoded and as sent.
    Extreme(Option<(Value, Bytes)>),
    /// Computed at the end from other cells.
    Avg,
}

impl Aggregator {
    /// Checks the plan against the result's columns (all of them, hidden included).
    pub fn new(plan: &[OutputColumn], types: &[ColumnType]) -> Result<Aggregator, String> {
        if plan.len() != types.len() {
            return Err(format!(
                "the aggregate plan has {} columns but the result has {}",
                plan.len(),
                types.len()
            ));
        }
        for (i, (what, ty)) in plan.iter().zip(types).enumerate() {
            match what {
                OutputColumn::Sum if sum_kind(ty.oid).is_none() => {
                    return Err(format!(
                        "column {i}: sum of type {} is not supported",
                        ty.oid
                    ));
                }
                OutputColumn::Avg { sum, count } => check_avg(plan, types, i, *sum, *count)?,
                _ => {}
            }
        }
        Ok(Aggregator {
            columns: plan.iter().copied().zip(types.iter().copied()).collect(),
            index: HashMap::new(),
            groups: Vec::new(),
        })
    }

    /// Folds one leg's partial row into its group.
    pub fn add(&mut self, row: &DataRow) -> Result<(), String> {
        let key = self.group_key(row);
        let group = match self.index.get(&key) {
            Some(&g) => g,
            None => {
                let cells = self.new_group(row);
                self.groups.push(cells);
                self.index.insert(key, self.groups.len() - 1);
                self.groups.len() - 1
            }
        };
        for (i, (what, ty)) in self.columns.iter().enumerate() {
            // Copied so that a kept value does not pin the whole row frame.
            let field = row.field(i).map(|v| Bytes::copy_from_slice(&v));
            fold(&mut self.groups[group][i], *what, field, *ty)
                .map_err(|e| format!("column {i} ({what:?}): {e}"))?;
        }
        Ok(())
    }

    /// The merged rows, every column included (hidden ones are dropped on output).
    pub fn finish(&self) -> Result<Vec<Vec<Option<Bytes>>>, OutOfRange> {
        self.groups
            .iter()
            .map(|cells| {
                (0..cells.len())
                    .map(|i| self.output(cells, i))
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect()
    }

    /// NULL and each value are length-prefixed so that no two keys collide.
    fn group_key(&self, row: &DataRow) -> Vec<u8> {
        let mut key = Vec::new();
        for (i, (what, _)) in self.columns.iter().enumerate() {
            if *what != OutputColumn::GroupKey {
                continue;
            }
            match row.field(i) {
                None => key.push(0),
                Some(v) => {
                    key.push(1);
                    key.extend_from_slice(&(v.len() as u64).to_be_bytes());
                    key.extend_from_slice(&v);
                }
            }
        }
        key
    }

    fn new_group(&self, row: &DataRow) -> Vec<Cell> {
        self.columns
            .iter()
            .enumerate()
            .map(|(i, (what, ty))| match what {
                OutputColumn::GroupKey => {
                    Cell::Key(row.field(i).map(|v| Bytes::copy_from_slice(&v)))
                }
                OutputColumn::Count => Cell::Count(0),
                OutputColumn::Sum => match sum_kind(ty.oid) {
                    Some(Kind::Int) => Cell::SumInt(None),
                    Some(Kind::Numeric) => Cell::SumNumeric(None),
                    _ => Cell::SumFloat(None),
                },
                OutputColumn::Min | OutputColumn::Max => Cell::Extreme(None),
                OutputColumn::Avg { .. } => Cell::Avg,
            })
            .collect()
    }

    fn output(&self, cells: &[Cell], i: usize) -> Result<Option<Bytes>, OutOfRange> {
        let (what, ty) = self.columns[i];
        Ok(match &cells[i] {
            Cell::Key(v) => v.clone(),
            Cell::Count(n) => Some(encode_integer(*n, ty)?),
            Cell::SumInt(v) => v.map(|v| encode_integer(v, ty)).transpose()?,
            Cell::SumNumeric(v) => v.as_ref().map(|v| encode_numeric(v, ty)).transpose()?,
            Cell::SumFloat(v) => v.map(|v| encode_float(v, ty)),
            Cell::Extreme(v) => v.as_ref().map(|(_, raw)| raw.clone()),
            Cell::Avg => match what {
                OutputColumn::Avg { sum, count } => average(&cells[sum], &cells[count], ty)?,
                _ => None,
            },
        })
    }
}

/// The accumulator a sum of this type uses: integers exactly in i128, numeric as
/// exact decimals, floats in f64.
fn sum_kind(type_oid: u32) -> Option<Kind> {
    match Kind::of(type_oid) {
        k @ (Kind::Int | Kind::Numeric | Kind::Float) => Some(k),
        _ => None,
    }
}

fn check_avg(
    plan: &[OutputColumn],
    types: &[ColumnType],
    i: usize,
    sum: usize,
    count: usize,
) -> Result<(), String> {
    if plan.get(sum) != Some(&OutputColumn::Sum) || plan.get(count) != Some(&OutputColumn::Count) {
        return Err(format!(
            "column {i}: avg needs a sum column and a count column, got {:?} and {:?}",
            plan.get(sum),
            plan.get(count)
        ));
    }
    match (Kind::of(types[i].oid), sum_kind(types[sum].oid)) {
        (Kind::Numeric, Some(Kind::Int | Kind::Numeric)) | (Kind::Float, Some(_)) => Ok(()),
        _ => Err(format!(
            "column {i}: avg of type {} from a sum of type {} is not supported",
            types[i].oid, types[sum].oid
        )),
    }
}

fn fold(
    cell: &mut Cell,
    what: OutputColumn,
    field: Option<Bytes>,
    ty: ColumnType,
) -> Result<(), String> {
    let Some(raw) = field else {
        // Aggregates skip NULLs; a NULL partial sum/min/max means "no rows there".
        return Ok(());
    };
    match cell {
        Cell::Key(_) | Cell::Avg => {}
        Cell::Count(n) => {
            *n = n
                .checked_add(int_value(ty, raw)?)
                .ok_or("count overflows")?
        }
        Cell::SumInt(acc) => {
            let v = int_value(ty, raw)?;
            *acc = Some(acc.unwrap_or(0).checked_add(v).ok_or("sum overflows")?);
        }
        Cell::SumNumeric(acc) => {
            let Value::Numeric(v) = Value::parse(ty, raw) else {
                return Err("not a numeric value".into());
            };
            *acc = Some(match acc.take() {
                None => v,
                Some(a) => a.add(&v),
            });
        }
        Cell::SumFloat(acc) => {
            let Value::Float(v) = Value::parse(ty, raw) else {
                return Err("not a float value".into());
            };
            *acc = Some(acc.unwrap_or(0.0) + v);
        }
        Cell::Extreme(acc) => {
            let v = Value::parse(ty, raw.clone());
            let better = match acc {
                None => true,
                Some((current, _)) => {
                    let order = compare(&v, current);
                    if what == OutputColumn::Max {
                        order.is_gt()
                    } else {
                        order.is_lt()
                    }
                }
            };
            if better {
                *acc = Some((v, raw));
            }
        }
    }
    Ok(())
}

fn int_value(ty: ColumnType, raw: Bytes) -> Result<i128, String> {
    match Value::parse(ty, raw) {
        Value::Int(v) => Ok(v.into()),
        _ => Err("not an integer value".into()),
    }
}

/// avg = sum / count with the server's result type: numeric division with
/// PostgreSQL's scale rule for numeric avg, f64 division for float avg.
fn average(sum: &Cell, count: &Cell, ty: ColumnType) -> Result<Option<Bytes>, OutOfRange> {
    let Cell::Count(n) = count else {
        return Ok(None);
    };
    let Some(n) = u64::try_from(*n).ok().filter(|&n| n > 0) else {
        return Ok(None);
    };
    let exact = match sum {
        Cell::SumInt(Some(v)) => Numeric::Finite(Decimal::from_i128(*v)),
        Cell::SumNumeric(Some(v)) => v.clone(),
        Cell::SumFloat(Some(v)) => return Ok(Some(encode_float(v / n as f64, ty))),
        _ => return Ok(None),
    };
    if Kind::of(ty.oid) == Kind::Float {
        let f = value::parse_float_text(&exact.to_text()).unwrap_or(f64::NAN);
        return Ok(Some(encode_float(f / n as f64, ty)));
    }
    encode_numeric(&exact.div_count(n), ty).map(Some)
}
