//! The merge shape of a read that runs on several shards: how the proxy combines the
//! shards' rows so that the client sees one server's answer (DESIGN.md 5.4), and the
//! rewrite the shards need for it (hidden sort/group columns, `avg` as sum and count,
//! `LIMIT n OFFSET m` as `LIMIT n + m`).
//!
//! Column indexes count the columns the shards return: the client's columns first,
//! then `hidden_columns` extra ones the merger drops. Sort keys of an aggregate query
//! refer to the aggregated row, which has the same layout.

use sqlparser::ast::{
    CastKind, DataType, DuplicateTreatment, Expr, FunctionArg, FunctionArgExpr, FunctionArguments,
    GroupByExpr, LimitClause, OrderByKind, OrderBySort, Query, SelectItem, SetExpr, Statement,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::extract::{fold, has_aggregate_or_window, has_window, is_aggregate_name, Builder};
use super::ValueRef;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeShape {
    /// The merged stream's order (empty: any order).
    pub sort: Vec<SortKey>,
    /// Rows to return after `offset` (`None`: all).
    pub limit: Option<ValueRef>,
    /// Rows to skip in the merged stream (the shards were told not to skip).
    pub offset: Option<ValueRef>,
    /// Per shard column (hidden ones included), how it is aggregated; `None` when the
    /// query does not aggregate.
    pub aggregate: Option<Vec<OutputColumn>>,
    /// Trailing shard columns the client does not see.
    pub hidden_columns: usize,
    /// The shards must run [`shard_sql`] of the client's text, not the text itself.
    pub rewrite: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortKey {
    pub column: ColumnSource,
    pub descending: bool,
    /// PostgreSQL's default: NULLS LAST for ASC, NULLS FIRST for DESC.
    pub nulls_first: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnSource {
    /// A shard column by index.
    Index(usize),
    /// `ORDER BY 2`: a 1-based position held by this value (resolve per execution with
    /// [`super::value_as_i64`]; it counts columns after `*` expansion).
    Ordinal(ValueRef),
    /// The k-th hidden column (index `columns - hidden_columns + k`), used when a `*`
    /// precedes it so that its index is only known from the RowDescription.
    Hidden(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputColumn {
    GroupKey,
    Count,
    Sum,
    Min,
    Max,
    /// This column shows `avg`; the merged value is `sum / count` of these two (hidden)
    /// columns, which are themselves `Sum` and `Count`.
    Avg {
        sum: usize,
        count: usize,
    },
}

/// The text the shards run for a read with `MergeShape::rewrite`: parses `sql` again
/// (only multi-shard reads get here) and applies the same rewrite as the plan. With
/// parameters in LIMIT/OFFSET the rewrite is `LIMIT CAST($1 AS BIGINT) + CAST($2 AS
/// BIGINT)`, which the extended protocol can Parse with the client's parameter types.
pub fn shard_sql(sql: &str) -> Option<String> {
    let mut statements = Parser::parse_sql(&PostgreSqlDialect {}, sql).ok()?;
    let [Statement::Query(q)] = statements.as_mut_slice() else {
        return None;
    };
    let builder = Builder::scratch(sql);
    shape_of(q, &builder).ok()?;
    Some(q.to_string())
}

/// The merge shape of the top query of a plan, `None` when concatenation is right.
pub(super) fn shape(q: &Query, b: &Builder) -> Option<Result<MergeShape, String>> {
    let mut copy = q.clone();
    let needs_merge = q.order_by.is_some()
        || q.limit_clause.is_some()
        || q.fetch.is_some()
        || match q.body.as_ref() {
            SetExpr::Select(s) => {
                s.distinct.is_some()
                    || s.having.is_some()
                    || !matches!(&s.group_by, GroupByExpr::Expressions(e, _) if e.is_empty())
                    || has_aggregate_or_window(&s.projection)
            }
            _ => false,
        };
    needs_merge.then(|| shape_of(&mut copy, b))
}

fn refuse<T>(what: &str) -> Result<T, String> {
    Err(format!(
        "{what} across shards is not supported; add the shard key to the WHERE clause"
    ))
}

fn shape_of(q: &mut Query, b: &Builder) -> Result<MergeShape, String> {
    if q.fetch.is_some() {
        return refuse("FETCH FIRST");
    }
    let (limit, offset) = match &q.limit_clause {
        None => (None, None),
        Some(LimitClause::LimitOffset {
            limit,
            offset,
            limit_by,
        }) if limit_by.is_empty() => (
            limit.as_ref().map(|e| count_value(e, b)).transpose()?,
            offset
                .as_ref()
                .map(|o| count_value(&o.value, b))
                .transpose()?,
        ),
        Some(_) => return refuse("this LIMIT form"),
    };
    let limit = limit.filter(|v| *v != ValueRef::Null);
    let order_by = q.order_by.take();
    let SetExpr::Select(sel) = q.body.as_mut() else {
        return refuse("ORDER BY or LIMIT over a set operation");
    };
    if sel.distinct.is_some() {
        return refuse("SELECT DISTINCT");
    }
    if sel.having.is_some() {
        return refuse("HAVING");
    }
    let group: Vec<Expr> = match &sel.group_by {
        GroupByExpr::All(_) => return refuse("GROUP BY ALL"),
        GroupByExpr::Expressions(e, m) if m.is_empty() => e.clone(),
        _ => return refuse("GROUP BY ROLLUP/CUBE"),
    };
    if group.iter().any(|e| matches!(e, Expr::Value(_))) {
        return refuse("GROUP BY position");
    }
    if has_window(&sel.projection) || has_window(&order_by) {
        return refuse("window functions");
    }
    let aggregating = !group.is_empty() || has_aggregate_or_window(&sel.projection);
    let mut items: Vec<(Option<Expr>, Option<String>)> = sel
        .projection
        .iter()
        .map(|i| match i {
            SelectItem::UnnamedExpr(e) => (Some(e.clone()), None),
            SelectItem::ExprWithAlias { expr, alias } => (Some(expr.clone()), Some(fold(alias))),
            _ => (None, None),
        })
        .collect();
    let visible = items.len();
    let wildcard_at = items.iter().position(|i| i.0.is_none());
    let mut hidden: Vec<Expr> = Vec::new();
    let mut aggregate = None;
    if aggregating {
        if wildcard_at.is_some() {
            return refuse("SELECT * with aggregates");
        }
        let mut cols = Vec::new();
        for (i, (expr, _)) in items.iter().enumerate() {
            let Some(expr) = expr else {
                return refuse("SELECT * with aggregates");
            };
            let col = match aggregate_kind(expr)? {
                Some(Agg::Avg(arg)) => {
                    hidden.push(call("sum", &arg));
                    hidden.push(call("count", &arg));
                    let sum = visible + hidden.len() - 2;
                    OutputColumn::Avg { sum, count: sum + 1 }
                }
                Some(Agg::Simple(c)) => c,
                None if group.iter().any(|g| same(g, expr)) => OutputColumn::GroupKey,
                None => {
                    return Err(format!(
                        "select item {} is neither grouped nor count/sum/min/max/avg, which shardgate cannot merge across shards",
                        i + 1
                    ))
                }
            };
            cols.push(col);
        }
        for g in &group {
            let named = items.iter().any(|(e, a)| {
                e.as_ref().is_some_and(|e| same(e, g))
                    || matches!((g, a), (Expr::Identifier(id), Some(a)) if fold(id) == *a)
            });
            if !named {
                hidden.push(g.clone());
            }
        }
        // Helper sums and counts, then hidden group keys.
        let mut full = cols;
        for h in &hidden {
            full.push(match aggregate_kind(h)? {
                Some(Agg::Simple(c)) => c,
                _ => OutputColumn::GroupKey,
            });
        }
        aggregate = Some(full);
    }
    let mut sort = Vec::new();
    if let Some(ob) = &order_by {
        let OrderByKind::Expressions(exprs) = &ob.kind else {
            return refuse("ORDER BY ALL");
        };
        for o in exprs {
            let descending = match &o.options.sort {
                None | Some(OrderBySort::Asc) => false,
                Some(OrderBySort::Desc) => true,
                Some(OrderBySort::Using(_)) => return refuse("ORDER BY ... USING"),
            };
            let nulls_first = o.options.nulls_first.unwrap_or(descending);
            let column = sort_column(&o.expr, &items, wildcard_at, b, aggregating)?;
            let column = match column {
                Some(c) => c,
                None => {
                    hidden.push(o.expr.clone());
                    items.push((Some(o.expr.clone()), None));
                    if let Some(a) = &mut aggregate {
                        a.push(OutputColumn::GroupKey);
                    }
                    match wildcard_at {
                        Some(_) => ColumnSource::Hidden(items.len() - visible - 1),
                        None => ColumnSource::Index(items.len() - 1),
                    }
                }
            };
            sort.push(SortKey {
                column,
                descending,
                nulls_first,
            });
        }
    }
    // Apply the rewrite to the copy (`shard_sql` prints it).
    let hidden_columns = hidden.len();
    for h in hidden {
        sel.projection.push(SelectItem::UnnamedExpr(h));
    }
    q.order_by = order_by;
    if let Some(LimitClause::LimitOffset {
        limit: l,
        offset: o,
        ..
    }) = &mut q.limit_clause
    {
        if let Some(off) = o.take() {
            if let Some(lim) = l.take() {
                *l = Some(Expr::BinaryOp {
                    left: Box::new(bigint(lim)),
                    op: sqlparser::ast::BinaryOperator::Plus,
                    right: Box::new(bigint(off.value)),
                });
            }
        }
        if l.is_none() {
            q.limit_clause = None;
        }
    }
    Ok(MergeShape {
        sort,
        rewrite: hidden_columns > 0 || offset.is_some(),
        limit,
        offset,
        aggregate,
        hidden_columns,
    })
}

fn bigint(e: Expr) -> Expr {
    Expr::Cast {
        kind: CastKind::Cast,
        expr: Box::new(Expr::Nested(Box::new(e))),
        data_type: DataType::BigInt(None),
        format: None,
    }
}

fn count_value(e: &Expr, b: &Builder) -> Result<ValueRef, String> {
    match b.value(e) {
        Some(v) if !v.negate && !v.to_date => Ok(v.src),
        _ => refuse("a LIMIT or OFFSET that is not a literal or parameter"),
    }
}

fn same(a: &Expr, b: &Expr) -> bool {
    a.to_string() == b.to_string()
}

/// Where an ORDER BY item is among the select items; `None`: add it as hidden.
fn sort_column(
    e: &Expr,
    items: &[(Option<Expr>, Option<String>)],
    wildcard_at: Option<usize>,
    b: &Builder,
    aggregating: bool,
) -> Result<Option<ColumnSource>, String> {
    if let Expr::Value(v) = e {
        return match b.value_ref(v) {
            Some(r @ (ValueRef::Literal(_) | ValueRef::Const(_))) => {
                Ok(Some(ColumnSource::Ordinal(r)))
            }
            _ => refuse("this ORDER BY item"),
        };
    }
    let found = items.iter().position(|(expr, alias)| {
        matches!((e, alias), (Expr::Identifier(id), Some(a)) if fold(id) == *a)
            || expr.as_ref().is_some_and(|x| same(x, e))
    });
    match found {
        Some(i) if wildcard_at.is_none_or(|w| i < w) => Ok(Some(ColumnSource::Index(i))),
        _ if aggregating => {
            refuse("ORDER BY an expression that is not a select item of an aggregate query")
        }
        _ if has_aggregate_or_window(e) => refuse("window functions"),
        _ => Ok(None),
    }
}

enum Agg {
    Simple(OutputColumn),
    /// avg of this argument.
    Avg(Box<FunctionArg>),
}

fn call(name: &str, arg: &FunctionArg) -> Expr {
    let sql = format!("{name}({arg})");
    Parser::new(&PostgreSqlDialect {})
        .try_with_sql(&sql)
        .and_then(|mut p| p.parse_expr())
        .unwrap_or(Expr::Value(sqlparser::ast::Value::Null.into()))
}

/// `count/sum/min/max/avg(arg)` without DISTINCT, FILTER or ORDER BY; `Ok(None)` when
/// `e` contains no aggregate; an error for aggregates that cannot be merged.
fn aggregate_kind(e: &Expr) -> Result<Option<Agg>, String> {
    if let Expr::Function(f) = e {
        if f.over.is_some() {
            return refuse("window functions");
        }
        let name = f.name.to_string().to_lowercase();
        let simple = match name.as_str() {
            "count" => Some(OutputColumn::Count),
            "sum" => Some(OutputColumn::Sum),
            "min" => Some(OutputColumn::Min),
            "max" => Some(OutputColumn::Max),
            "avg" => None,
            _ if is_aggregate_name(&f.name) => {
                return Err(format!("aggregate {name} across shards is not supported"))
            }
            _ => return nested_aggregate(e),
        };
        let FunctionArguments::List(list) = &f.args else {
            return refuse("this aggregate");
        };
        if matches!(list.duplicate_treatment, Some(DuplicateTreatment::Distinct))
            || !list.clauses.is_empty()
            || !f.within_group.is_empty()
            || list.args.len() != 1
        {
            return Err(format!(
                "{name}(DISTINCT ...) or an ordered aggregate across shards is not supported"
            ));
        }
        return Ok(Some(match simple {
            Some(c) => Agg::Simple(c),
            None => match &list.args[0] {
                arg @ FunctionArg::Unnamed(FunctionArgExpr::Expr(_)) => {
                    Agg::Avg(Box::new(arg.clone()))
                }
                _ => return refuse("this avg"),
            },
        }));
    }
    nested_aggregate(e)
}

fn nested_aggregate(e: &Expr) -> Result<Option<Agg>, String> {
    if has_aggregate_or_window(e) {
        return refuse("an expression over aggregates (e.g. sum(x) + 1)");
    }
    Ok(None)
}
