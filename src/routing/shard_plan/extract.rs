//! `plan`: from sqlparser's AST to the routing template (table references, the
//! conditions restricting them, values by position). Runs once per statement shape.

use std::ops::{ControlFlow, Range};

use sqlparser::ast::{
    AssignmentTarget, BinaryOperator, CopySource, DataType, Expr, FromTable, GroupByExpr, Ident,
    JoinConstraint, JoinOperator, ObjectName, ObjectNamePart, OnConflictAction, OnInsert, Query,
    SetExpr, SetOperator, SetQuantifier, Statement, TableFactor, TableObject, TableWithJoins,
    UnaryOperator, UpdateTableFromKind, Value, ValueWithSpan, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::values::{literal_spans, literal_text};
use super::{
    merge, Binding, ColRef, Cond, Filter, InsertPlan, Kind, Op, Scope, ShardPlan, StatementPlan,
    Val, ValueRef,
};

/// Parses `sql` and builds its routing template. Unparsable texts give a plan that
/// routes as `Target::Unknown`.
pub fn plan(sql: &str) -> ShardPlan {
    let Ok(statements) = Parser::parse_sql(&PostgreSqlDialect {}, sql) else {
        return ShardPlan {
            statements: Vec::new(),
            parsed: false,
        };
    };
    let spans = literal_spans(sql).map(|s| locate(sql, s));
    let statements = statements
        .iter()
        .map(|st| {
            let mut b = Builder {
                sql,
                spans: spans.as_deref(),
                p: StatementPlan {
                    kind: Kind::Utility,
                    bindings: Vec::new(),
                    scopes: Vec::new(),
                    filters: Vec::new(),
                    merge: None,
                },
                frames: Vec::new(),
                ctes: Vec::new(),
            };
            b.p.kind = b.statement(st);
            b.p
        })
        .collect();
    ShardPlan {
        statements,
        parsed: true,
    }
}

/// sqlparser's (line, column) of a literal's first character and of the character
/// after it, with the literal's byte range.
pub(super) type Located = ((u64, u64), (u64, u64), Range<usize>);

fn locate(sql: &str, spans: Vec<Range<usize>>) -> Vec<Located> {
    let mut out = Vec::with_capacity(spans.len());
    let (mut line, mut col) = (1u64, 1u64);
    let mut wanted = spans.iter().flat_map(|s| [s.start, s.end]).peekable();
    let mut found = Vec::with_capacity(spans.len() * 2);
    for (i, c) in sql.char_indices().chain(std::iter::once((sql.len(), ' '))) {
        while wanted.peek() == Some(&i) {
            found.push((line, col));
            wanted.next();
        }
        if c == '\n' {
            line += 1;
            col = 1;
        } else {
            col += 1;
        }
    }
    for (k, s) in spans.into_iter().enumerate() {
        if let (Some(a), Some(b)) = (found.get(2 * k), found.get(2 * k + 1)) {
            out.push((*a, *b, s));
        }
    }
    out
}

impl<'a> Builder<'a> {
    /// A builder with no literal positions, for reading values as constants.
    pub(super) fn scratch(sql: &'a str) -> Builder<'a> {
        Builder {
            sql,
            spans: None,
            p: StatementPlan {
                kind: Kind::Utility,
                bindings: Vec::new(),
                scopes: Vec::new(),
                filters: Vec::new(),
                merge: None,
            },
            frames: Vec::new(),
            ctes: Vec::new(),
        }
    }
}

pub(super) struct Builder<'a> {
    sql: &'a str,
    spans: Option<&'a [Located]>,
    p: StatementPlan,
    /// Names visible in each enclosing SELECT, innermost last.
    frames: Vec<Frame>,
    /// CTE names in scope (they shadow tables).
    ctes: Vec<String>,
}

struct Frame {
    scope: u16,
    /// Alias (or table name) -> table reference; `None` for derived tables, CTEs and
    /// functions.
    names: Vec<(String, Option<u16>)>,
}

/// Folds an identifier like PostgreSQL: unquoted to lower case.
pub(super) fn fold(ident: &Ident) -> String {
    match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_lowercase(),
    }
}

fn last_part(name: &ObjectName) -> Option<&Ident> {
    match name.0.last()? {
        ObjectNamePart::Identifier(i) => Some(i),
        _ => None,
    }
}

fn table_name(name: &ObjectName) -> String {
    last_part(name).map(fold).unwrap_or_default()
}

const AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "min",
    "max",
    "avg",
    "array_agg",
    "string_agg",
    "bool_and",
    "bool_or",
    "every",
    "bit_and",
    "bit_or",
    "bit_xor",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "xmlagg",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "corr",
    "covar_pop",
    "covar_samp",
    "regr_avgx",
    "regr_avgy",
    "regr_count",
    "regr_intercept",
    "regr_r2",
    "regr_slope",
    "regr_sxx",
    "regr_sxy",
    "regr_syy",
    "percentile_cont",
    "percentile_disc",
    "mode",
    "range_agg",
    "range_intersect_agg",
    "any_value",
    "json_agg_strict",
    "jsonb_agg_strict",
];

pub(super) fn is_aggregate_name(name: &ObjectName) -> bool {
    last_part(name).is_some_and(|i| AGGREGATES.contains(&fold(i).as_str()))
}

/// Aggregates or window functions in `node`, outside its subqueries (which have
/// scopes of their own).
pub(super) fn has_aggregate_or_window<V: Visit>(node: &V) -> bool {
    find_function(node, |f| {
        f.over.is_some()
            || f.filter.is_some()
            || !f.within_group.is_empty()
            || is_aggregate_name(&f.name)
    })
}

/// Window functions in `node`, outside its subqueries.
pub(super) fn has_window<V: Visit>(node: &V) -> bool {
    find_function(node, |f| f.over.is_some())
}

fn find_function<V: Visit>(node: &V, pred: impl Fn(&sqlparser::ast::Function) -> bool) -> bool {
    struct Finder<F> {
        depth: usize,
        pred: F,
    }
    impl<F: Fn(&sqlparser::ast::Function) -> bool> Visitor for Finder<F> {
        type Break = ();
        fn pre_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.depth += 1;
            ControlFlow::Continue(())
        }
        fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.depth -= 1;
            ControlFlow::Continue(())
        }
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            match expr {
                Expr::Function(f) if self.depth == 0 && (self.pred)(f) => ControlFlow::Break(()),
                _ => ControlFlow::Continue(()),
            }
        }
    }
    node.visit(&mut Finder { depth: 0, pred }).is_break()
}

/// The outermost subqueries inside `node`, cloned.
fn nested_queries<V: Visit>(node: &V) -> Vec<Query> {
    struct Collector {
        depth: usize,
        found: Vec<Query>,
    }
    impl Visitor for Collector {
        type Break = ();
        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
            if self.depth == 0 {
                self.found.push(q.clone());
            }
            self.depth += 1;
            ControlFlow::Continue(())
        }
        fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.depth -= 1;
            ControlFlow::Continue(())
        }
    }
    let mut c = Collector {
        depth: 0,
        found: Vec::new(),
    };
    let _ = node.visit(&mut c);
    c.found
}

impl Builder<'_> {
    fn statement(&mut self, st: &Statement) -> Kind {
        match st {
            Statement::Query(q) => {
                let scope = self.query(q, true);
                self.p.merge = scope.and_then(|_| merge::shape(q, self));
                if has_data_modifying_cte(q) {
                    Kind::UnplannedWrite("a data-modifying WITH")
                } else if select_into(q) {
                    Kind::UnplannedWrite("SELECT INTO")
                } else {
                    Kind::Read
                }
            }
            Statement::Insert(ins) => self.insert(ins),
            Statement::Update(u) => {
                let scope = self.new_scope(false);
                let target = self.add_from_item(&u.table, scope);
                if let Some(from) = &u.from {
                    let (UpdateTableFromKind::BeforeSet(items)
                    | UpdateTableFromKind::AfterSet(items)) = from;
                    for item in items {
                        self.add_from_item(item, scope);
                    }
                }
                let sets = u
                    .assignments
                    .iter()
                    .filter_map(|a| match &a.target {
                        AssignmentTarget::ColumnName(name) => {
                            Some((table_name(name).into(), self.value(&a.value)))
                        }
                        AssignmentTarget::Tuple(_) => None,
                    })
                    .collect();
                for a in &u.assignments {
                    self.subqueries(&a.value);
                }
                self.where_clause(u.selection.as_ref(), scope);
                self.frames.pop();
                match target.first() {
                    Some(&t) => Kind::Update { target: t, sets },
                    None => Kind::UnplannedWrite("UPDATE of this form"),
                }
            }
            Statement::Delete(d) => {
                let scope = self.new_scope(false);
                let (FromTable::WithFromKeyword(items) | FromTable::WithoutKeyword(items)) =
                    &d.from;
                let mut target = Vec::new();
                for item in items {
                    target.extend(self.add_from_item(item, scope));
                }
                for item in d.using.iter().flatten() {
                    self.add_from_item(item, scope);
                }
                self.where_clause(d.selection.as_ref(), scope);
                self.frames.pop();
                match target.first() {
                    Some(&t) if items.len() == 1 => Kind::Delete { target: t },
                    _ => Kind::UnplannedWrite("DELETE of this form"),
                }
            }
            Statement::Explain { statement, .. } => self.statement(statement),
            Statement::Copy { source, to, .. } => match source {
                CopySource::Table { table_name: t, .. } => {
                    if *to {
                        Kind::CopyTo(table_name(t).into())
                    } else {
                        Kind::CopyFrom(table_name(t).into())
                    }
                }
                CopySource::Query(q) => {
                    self.query(q, false);
                    Kind::Read
                }
            },
            other => ddl(other).unwrap_or(Kind::Utility),
        }
    }

    fn insert(&mut self, ins: &sqlparser::ast::Insert) -> Kind {
        let TableObject::TableName(name) = &ins.table else {
            return Kind::UnplannedWrite("INSERT into a table function");
        };
        let scope = self.new_scope(false);
        let target = self.bind(table_name(name), scope);
        let columns = (!ins.columns.is_empty()).then(|| {
            ins.columns
                .iter()
                .map(|c| table_name(c).into_boxed_str())
                .collect()
        });
        let rows = match ins.source.as_deref() {
            Some(Query {
                body,
                with: None,
                order_by: None,
                limit_clause: None,
                ..
            }) => match body.as_ref() {
                SetExpr::Values(v) => {
                    for row in &v.rows {
                        for e in &row.content {
                            self.subqueries(e);
                        }
                    }
                    Some(
                        v.rows
                            .iter()
                            .map(|row| row.content.iter().map(|e| self.value(e)).collect())
                            .collect(),
                    )
                }
                _ => None,
            },
            _ => None,
        };
        if rows.is_none() {
            if let Some(q) = &ins.source {
                self.query(q, false);
            }
        }
        let conflict_sets = match &ins.on {
            Some(OnInsert::OnConflict(c)) => match &c.action {
                OnConflictAction::DoUpdate(u) => u
                    .assignments
                    .iter()
                    .filter_map(|a| match &a.target {
                        AssignmentTarget::ColumnName(n) => Some(table_name(n).into()),
                        AssignmentTarget::Tuple(_) => None,
                    })
                    .collect(),
                OnConflictAction::DoNothing => Vec::new(),
            },
            _ => Vec::new(),
        };
        self.frames.pop();
        Kind::Insert(InsertPlan {
            target,
            columns,
            rows,
            conflict_sets,
        })
    }

    fn new_scope(&mut self, top: bool) -> u16 {
        let id = self.p.scopes.len() as u16;
        self.p.scopes.push(Scope {
            grouped: false,
            top,
        });
        self.frames.push(Frame {
            scope: id,
            names: Vec::new(),
        });
        id
    }

    fn bind(&mut self, table: String, scope: u16) -> u16 {
        let id = self.p.bindings.len() as u16;
        self.p.bindings.push(Binding {
            table: table.clone().into(),
            scope,
        });
        if let Some(f) = self.frames.last_mut() {
            f.names.push((table, Some(id)));
        }
        id
    }

    /// Walks a query; returns the scope of its body when it is one plain SELECT.
    fn query(&mut self, q: &Query, top: bool) -> Option<u16> {
        let pushed = self.ctes.len();
        if let Some(with) = &q.with {
            for cte in &with.cte_tables {
                if with.recursive {
                    self.ctes.push(fold(&cte.alias.name));
                }
                self.query(&cte.query, false);
                if !with.recursive {
                    self.ctes.push(fold(&cte.alias.name));
                }
            }
        }
        let limited = q.limit_clause.is_some() || q.fetch.is_some();
        let scope = self.set_expr(&q.body, top, limited);
        if let Some(ob) = &q.order_by {
            self.subqueries(ob);
        }
        self.ctes.truncate(pushed);
        scope
    }

    fn set_expr(&mut self, body: &SetExpr, top: bool, limited: bool) -> Option<u16> {
        match body {
            SetExpr::Select(sel) => Some(self.select(sel, top, limited)),
            SetExpr::Query(q) => {
                self.query(q, false);
                None
            }
            SetExpr::SetOperation {
                left,
                op,
                set_quantifier,
                right,
            } => {
                // UNION ALL branches are independent; anything else de-duplicates or
                // compares rows across branches.
                let all = *op == SetOperator::Union && *set_quantifier == SetQuantifier::All;
                let first = self.p.scopes.len();
                self.set_expr(left, false, false);
                self.set_expr(right, false, false);
                if !all || limited || top {
                    for s in &mut self.p.scopes[first..] {
                        s.grouped |= !all || limited;
                    }
                }
                None
            }
            SetExpr::Values(v) => {
                for row in &v.rows {
                    for e in &row.content {
                        self.subqueries(e);
                    }
                }
                None
            }
            SetExpr::Table(t) => {
                let scope = self.new_scope(top);
                if let Some(name) = &t.table_name {
                    let folded = name.to_lowercase();
                    if !self.ctes.contains(&folded) {
                        self.bind(folded, scope);
                    }
                }
                self.frames.pop();
                Some(scope)
            }
            SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_) => {
                None
            }
        }
    }

    fn select(&mut self, sel: &sqlparser::ast::Select, top: bool, limited: bool) -> u16 {
        let scope = self.new_scope(top);
        for item in &sel.from {
            self.add_from_item(item, scope);
        }
        let grouped_by = match &sel.group_by {
            GroupByExpr::All(_) => true,
            GroupByExpr::Expressions(e, _) => !e.is_empty(),
        };
        self.p.scopes[usize::from(scope)].grouped = limited
            || sel.distinct.is_some()
            || grouped_by
            || sel.having.is_some()
            || has_aggregate_or_window(&sel.projection);
        self.where_clause(sel.selection.as_ref(), scope);
        self.subqueries(&sel.projection);
        if let Some(h) = &sel.having {
            self.subqueries(h);
        }
        self.frames.pop();
        scope
    }

    fn where_clause(&mut self, selection: Option<&Expr>, scope: u16) {
        let Some(expr) = selection else {
            return;
        };
        let restricts = self
            .p
            .bindings
            .iter()
            .enumerate()
            .filter(|(_, b)| b.scope == scope)
            .map(|(i, _)| i as u16)
            .collect();
        let cond = self.cond(expr);
        self.p.filters.push(Filter { cond, restricts });
        self.subqueries(expr);
    }

    fn subqueries<V: Visit>(&mut self, node: &V) {
        for q in nested_queries(node) {
            self.query(&q, false);
        }
    }

    /// Adds a FROM item's references; returns them (the first is the leftmost table).
    fn add_from_item(&mut self, item: &TableWithJoins, scope: u16) -> Vec<u16> {
        let mut left = self.factor(&item.relation, scope);
        for join in &item.joins {
            let right = self.factor(&join.relation, scope);
            let (constraint, restricts): (Option<&JoinConstraint>, Vec<u16>) =
                match &join.join_operator {
                    JoinOperator::Join(c) | JoinOperator::Inner(c) => {
                        (Some(c), left.iter().chain(&right).copied().collect())
                    }
                    JoinOperator::Left(c) | JoinOperator::LeftOuter(c) => (Some(c), right.clone()),
                    JoinOperator::Right(c) | JoinOperator::RightOuter(c) => (Some(c), left.clone()),
                    JoinOperator::FullOuter(c) => (Some(c), Vec::new()),
                    _ => (None, Vec::new()),
                };
            match constraint {
                Some(JoinConstraint::On(expr)) => {
                    let cond = self.cond(expr);
                    self.p.filters.push(Filter { cond, restricts });
                    self.subqueries(expr);
                }
                Some(JoinConstraint::Using(cols)) => {
                    // Only when each side is one table: `a JOIN b USING (k)` is a.k = b.k.
                    if let ([l], [r]) = (left.as_slice(), right.as_slice()) {
                        let conds = cols
                            .iter()
                            .map(|c| {
                                let col: Box<str> = table_name(c).into();
                                Cond::ColEq(ColRef::Bound(*l, col.clone()), ColRef::Bound(*r, col))
                            })
                            .collect();
                        self.p.filters.push(Filter {
                            cond: Cond::And(conds),
                            restricts,
                        });
                    }
                }
                _ => {}
            }
            left.extend(right);
        }
        left
    }

    fn factor(&mut self, factor: &TableFactor, scope: u16) -> Vec<u16> {
        match factor {
            TableFactor::Table {
                name, alias, args, ..
            } => {
                let table = table_name(name);
                let is_cte = name.0.len() == 1 && self.ctes.contains(&table);
                let alias_name = alias.as_ref().map(|a| fold(&a.name));
                if args.is_some() || is_cte {
                    if let Some(a) = &args {
                        self.subqueries(a);
                    }
                    self.name_only(alias_name.unwrap_or(table));
                    return Vec::new();
                }
                let id = self.bind(table.clone(), scope);
                if let (Some(a), Some(f)) = (alias_name, self.frames.last_mut()) {
                    // The alias hides the table name.
                    f.names.pop();
                    f.names.push((a, Some(id)));
                }
                vec![id]
            }
            TableFactor::Derived {
                subquery, alias, ..
            } => {
                self.query(subquery, false);
                if let Some(a) = alias {
                    self.name_only(fold(&a.name));
                }
                Vec::new()
            }
            TableFactor::NestedJoin {
                table_with_joins,
                alias,
            } => {
                let ids = self.add_from_item(table_with_joins, scope);
                if let Some(a) = alias {
                    self.name_only(fold(&a.name));
                }
                ids
            }
            other => {
                self.subqueries(other);
                Vec::new()
            }
        }
    }

    fn name_only(&mut self, name: String) {
        if let Some(f) = self.frames.last_mut() {
            f.names.push((name, None));
        }
    }

    /// A condition's routing tree.
    fn cond(&self, expr: &Expr) -> Cond {
        match expr {
            Expr::Nested(e) => self.cond(e),
            Expr::BinaryOp { left, op, right } => match op {
                BinaryOperator::And => {
                    let mut parts = Vec::new();
                    for side in [left, right] {
                        match self.cond(side) {
                            Cond::And(inner) => parts.extend(inner),
                            c => parts.push(c),
                        }
                    }
                    Cond::And(parts)
                }
                BinaryOperator::Or => Cond::Or(vec![self.cond(left), self.cond(right)]),
                _ => {
                    let Some(op) = compare_op(op) else {
                        return Cond::Unknown;
                    };
                    match (self.col(left), self.col(right)) {
                        (Some(a), Some(b)) if op == Op::Eq => Cond::ColEq(a, b),
                        (Some(c), None) => self
                            .value(right)
                            .map_or(Cond::Unknown, |v| Cond::Cmp(c, op, v)),
                        (None, Some(c)) => self
                            .value(left)
                            .map_or(Cond::Unknown, |v| Cond::Cmp(c, op.flip(), v)),
                        _ => Cond::Unknown,
                    }
                }
            },
            Expr::InList {
                expr,
                list,
                negated: false,
            } => match (self.col(expr), self.values(list)) {
                (Some(c), Some(v)) => Cond::In(c, v),
                _ => Cond::Unknown,
            },
            Expr::Between {
                expr,
                negated: false,
                low,
                high,
            } => match (self.col(expr), self.value(low), self.value(high)) {
                (Some(c), Some(lo), Some(hi)) => Cond::And(vec![
                    Cond::Cmp(c.clone(), Op::Ge, lo),
                    Cond::Cmp(c, Op::Le, hi),
                ]),
                _ => Cond::Unknown,
            },
            Expr::AnyOp {
                left,
                compare_op: BinaryOperator::Eq,
                right,
                ..
            } => {
                let Some(c) = self.col(left) else {
                    return Cond::Unknown;
                };
                match strip(right) {
                    Expr::Array(arr) => self
                        .values(&arr.elem)
                        .map_or(Cond::Unknown, |v| Cond::In(c, v)),
                    other => self.value(other).map_or(Cond::Unknown, |v| Cond::Any(c, v)),
                }
            }
            _ => Cond::Unknown,
        }
    }

    fn values(&self, list: &[Expr]) -> Option<Vec<Val>> {
        list.iter().map(|e| self.value(e)).collect()
    }

    /// A column reference, resolved to a table reference where qualified.
    fn col(&self, expr: &Expr) -> Option<ColRef> {
        match expr {
            Expr::Nested(e) => self.col(e),
            Expr::Identifier(i) => Some(ColRef::Unqualified(
                self.frames.last()?.scope,
                fold(i).into(),
            )),
            Expr::CompoundIdentifier(parts) if parts.len() >= 2 => {
                let qualifier = fold(&parts[parts.len() - 2]);
                let column: Box<str> = fold(&parts[parts.len() - 1]).into();
                for f in self.frames.iter().rev() {
                    if let Some((_, b)) = f.names.iter().rev().find(|(n, _)| *n == qualifier) {
                        return b.map(|b| ColRef::Bound(b, column));
                    }
                }
                None
            }
            _ => None,
        }
    }

    /// A value: a literal or parameter, possibly negated or cast.
    pub(super) fn value(&self, expr: &Expr) -> Option<Val> {
        match expr {
            Expr::Nested(e) => self.value(e),
            Expr::Value(v) => self.value_ref(v).map(|src| Val {
                src,
                negate: false,
                to_date: false,
                cast: false,
            }),
            Expr::UnaryOp { op, expr } => {
                let mut v = self.value(expr)?;
                match op {
                    UnaryOperator::Minus => v.negate = !v.negate,
                    UnaryOperator::Plus => {}
                    _ => return None,
                }
                Some(v)
            }
            Expr::Cast {
                expr, data_type, ..
            } => cast(self.value(expr)?, data_type),
            Expr::TypedString(t) => {
                let v = Val {
                    src: self.value_ref(&t.value)?,
                    negate: false,
                    to_date: false,
                    cast: false,
                };
                cast(v, &t.data_type)
            }
            _ => None,
        }
    }

    pub(super) fn value_ref(&self, v: &ValueWithSpan) -> Option<ValueRef> {
        let text = match &v.value {
            Value::Placeholder(p) => {
                let n: u16 = p.strip_prefix('$')?.parse().ok()?;
                return n.checked_sub(1).map(ValueRef::Param);
            }
            Value::Null => return Some(ValueRef::Null),
            Value::Number(n, _) => n.as_str(),
            Value::SingleQuotedString(s) => s.as_str(),
            _ => return None,
        };
        let Some(spans) = self.spans else {
            return Some(ValueRef::Const(text.into()));
        };
        let start = (v.span.start.line, v.span.start.column);
        let end = (v.span.end.line, v.span.end.column);
        let k = spans
            .iter()
            .position(|(a, b, _)| *a == start && *b == end)?;
        // The literal must be exactly this value (not part of `1e5`, not an E'' string).
        let raw = self.sql.get(spans[k].2.clone())?;
        let quoted = raw.starts_with('\'');
        let matches = match &v.value {
            Value::Number(..) => !quoted && raw == text,
            _ => quoted && literal_text(raw) == text,
        };
        matches.then_some(ValueRef::Literal(k as u16))
    }
}

/// Strips parentheses.
fn strip(e: &Expr) -> &Expr {
    match e {
        Expr::Nested(inner) => strip(inner),
        other => other,
    }
}

fn compare_op(op: &BinaryOperator) -> Option<Op> {
    Some(match op {
        BinaryOperator::Eq => Op::Eq,
        BinaryOperator::Lt => Op::Lt,
        BinaryOperator::LtEq => Op::Le,
        BinaryOperator::Gt => Op::Gt,
        BinaryOperator::GtEq => Op::Ge,
        _ => return None,
    })
}

/// Casts that keep a key value's meaning: to integer, text, uuid and timestamp types
/// as is, to date with truncation. Others (numeric -> int rounds, ...) lose it.
fn cast(mut v: Val, ty: &DataType) -> Option<Val> {
    v.cast = true;
    match ty {
        DataType::Int(_)
        | DataType::Integer(_)
        | DataType::BigInt(_)
        | DataType::SmallInt(_)
        | DataType::Int2(_)
        | DataType::Int4(_)
        | DataType::Int8(_)
        | DataType::Text
        | DataType::Varchar(_)
        | DataType::Uuid
        | DataType::Timestamp(..) => {}
        DataType::Date => v.to_date = true,
        DataType::Custom(name, _) => {
            let n = table_name(name);
            if !matches!(
                n.as_str(),
                "timestamptz" | "int8" | "int4" | "int2" | "uuid" | "text"
            ) {
                return None;
            }
        }
        _ => return None,
    }
    Some(v)
}

fn has_data_modifying_cte(q: &Query) -> bool {
    q.with.as_ref().is_some_and(|w| {
        w.cte_tables.iter().any(|c| {
            matches!(
                c.query.body.as_ref(),
                SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_)
            ) || has_data_modifying_cte(&c.query)
        })
    })
}

fn select_into(q: &Query) -> bool {
    matches!(q.body.as_ref(), SetExpr::Select(s) if s.into.is_some())
}

/// DDL and other statements naming tables or schema-wide objects.
fn ddl(st: &Statement) -> Option<Kind> {
    let tables = |names: Vec<&ObjectName>| Kind::Ddl {
        tables: names.into_iter().map(|n| table_name(n).into()).collect(),
        schema_wide: false,
    };
    let schema_wide = Kind::Ddl {
        tables: Vec::new(),
        schema_wide: true,
    };
    Some(match st {
        Statement::CreateTable(ct) => tables(vec![&ct.name]),
        Statement::CreateIndex(ci) => tables(vec![&ci.table_name]),
        Statement::AlterTable(at) => tables(vec![&at.name]),
        Statement::Truncate(t) => tables(t.table_names.iter().map(|t| &t.name).collect()),
        Statement::Drop {
            object_type, names, ..
        } => match object_type {
            sqlparser::ast::ObjectType::Table => tables(names.iter().collect()),
            // An index name does not say its table: indexes of sharded tables exist on
            // every shard, so the DROP goes everywhere (use IF EXISTS for others').
            sqlparser::ast::ObjectType::Index
            | sqlparser::ast::ObjectType::Schema
            | sqlparser::ast::ObjectType::Type
            | sqlparser::ast::ObjectType::Sequence => schema_wide,
            _ => return None,
        },
        // Sequences are created on every shard: each shard then has its own, so values
        // are unique per shard only (use uuids or a key from the application for
        // globally unique ids).
        Statement::CreateSequence { .. }
        | Statement::CreateFunction(_)
        | Statement::CreateExtension(_)
        | Statement::DropExtension(_)
        | Statement::DropFunction(_)
        | Statement::CreateType { .. }
        | Statement::AlterType(_)
        | Statement::CreateDomain(_)
        | Statement::DropDomain(_)
        | Statement::CreateSchema { .. }
        | Statement::AlterSchema(_)
        | Statement::AlterIndex { .. } => schema_wide,
        _ => return None,
    })
}
