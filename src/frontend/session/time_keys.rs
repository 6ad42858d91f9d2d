//! Sharded maps with time keyspaces: what the session tells the planner so a time key
//! is placed exactly instead of to within 16 hours (`routing::shard_plan::TimeKeys`).
//! PostgreSQL reads `'2025-12-31 23:00'` as a wall-clock time for a `timestamp` or
//! `date` column and as an instant in the session's TimeZone for a `timestamptz` one,
//! and the map says neither. So:
//!
//! - the key columns' types come from the catalog of the default shard, learned once
//!   for every time-keyed table of the map and kept proxy-wide (`TimeColumns`); looked
//!   up again when the map changes, after DDL through the proxy, and (at most once a
//!   second) while a table does not exist yet;
//! - the session's TimeZone is its own setting (startup parameter or `SET`), else the
//!   server's default (`reset_val` of `TimeZone`, learned with the types). Only fixed
//!   UTC zones count as known: a zone with daylight saving time has no single offset.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};

use super::{Session, SessionError};
use crate::routing::shard_plan::{ShardPlan, TimeColumn, TimeKeys};
use crate::shard_map::{Keyspace, ShardMap, TableRule};

/// How often tables of the map that the catalog did not know are looked up again.
const MISSING_RETRY: Duration = Duration::from_secs(1);

/// The time key columns' types, as learned from the default shard's catalog.
#[derive(Debug, Default)]
pub struct TimeColumns {
    /// The topology (by generation) and the DDL epoch they were learned under.
    generation: u64,
    ddl_epoch: u64,
    pub columns: Vec<(String, TimeColumn)>,
    /// Time-keyed tables the catalog did not have, and when that was seen.
    missing: Vec<String>,
    checked: Option<Instant>,
    /// The servers' default TimeZone (`reset_val`).
    server_timezone: Option<String>,
}

impl TimeColumns {
    fn current(&self, generation: u64, ddl_epoch: u64) -> bool {
        self.checked.is_some()
            && self.generation == generation
            && self.ddl_epoch == ddl_epoch
            && (self.missing.is_empty()
                || self.checked.is_some_and(|at| at.elapsed() < MISSING_RETRY))
    }
}

/// The map's tables keyed by a time keyspace, with their key columns.
fn time_tables(map: &ShardMap) -> Vec<(&str, &str)> {
    map.tables
        .iter()
        .filter_map(|(table, rule)| match rule {
            TableRule::Sharded { column, keyspace } => {
                matches!(map.keyspaces.get(keyspace), Some(Keyspace::Time { .. }))
                    .then_some((table.as_str(), column.as_str()))
            }
            TableRule::Reference => None,
        })
        .collect()
}

/// Seconds east of UTC of a TimeZone setting that is a fixed UTC zone; None for any
/// other (named zones move with daylight saving time).
pub fn fixed_utc_offset(setting: &str) -> Option<i32> {
    let name = setting.trim().trim_matches('\'').trim();
    let name = match name.get(..4) {
        Some(prefix) if prefix.eq_ignore_ascii_case("etc/") => &name[4..],
        _ => name,
    };
    [
        "UTC",
        "UCT",
        "GMT",
        "GMT0",
        "GMT+0",
        "GMT-0",
        "Universal",
        "Zulu",
        "Greenwich",
        "Z",
    ]
    .iter()
    .any(|utc| utc.eq_ignore_ascii_case(name))
    .then_some(0)
}

impl<R, W> Session<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// The time-key knowledge for a statement of `plan`; empty when the map has no
    /// time keyspace or the statement touches none of its tables. May look the
    /// columns up first (one round trip on the default shard, rarely).
    pub(super) async fn time_keys_for(
        &mut self,
        plan: &ShardPlan,
    ) -> Result<Option<Arc<TimeColumns>>, SessionError> {
        let map = &self.topo.map;
        if !map
            .keyspaces
            .values()
            .any(|k| matches!(k, Keyspace::Time { .. }))
        {
            return Ok(None);
        }
        let touches_time = plan.tables().any(|t| {
            matches!(
                map.tables.get(t),
                Some(TableRule::Sharded { keyspace, .. })
                    if matches!(map.keyspaces.get(keyspace), Some(Keyspace::Time { .. }))
            )
        });
        if !touches_time {
            return Ok(None);
        }
        if plan.is_ddl() {
            // The table may be created or changed now: learned again by the next
            // statement (DDL itself runs on every shard, whatever its values).
            self.fe.time_columns.store(Arc::default());
            return Ok(None);
        }
        let epoch = self.fe.statements.epoch();
        let known = self.fe.time_columns.load_full();
        if known.current(self.topo.generation, epoch) {
            return Ok(Some(known));
        }
        let learned = Arc::new(self.learn_time_columns(epoch).await?);
        self.fe.time_columns.store(learned.clone());
        Ok(Some(learned))
    }

    /// The session's TimeZone as a fixed offset, when it is one.
    pub(super) fn session_utc_offset(&self, known: &TimeColumns) -> Option<i32> {
        let own = self
            .params
            .get("timezone")
            .filter(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "default" | "local"));
        fixed_utc_offset(own.or(known.server_timezone.as_deref())?)
    }

    async fn learn_time_columns(&mut self, ddl_epoch: u64) -> Result<TimeColumns, SessionError> {
        let map = self.topo.map.clone();
        let tables = time_tables(&map);
        let quote = crate::backend::params::quote_literal;
        let pairs: Vec<String> = tables
            .iter()
            .map(|(t, c)| format!("({}, {})", quote(t), quote(c)))
            .collect();
        // One text: `table<US>type` per table, then `<RS>` and the default TimeZone.
        let sql = format!(
            "SELECT coalesce(string_agg(t.tbl || chr(31) || coalesce(format_type(a.atttypid, NULL), ''), chr(30)), '') \
             || chr(29) || (SELECT reset_val FROM pg_settings WHERE name = 'TimeZone') \
             FROM (VALUES {}) AS t(tbl, col) \
             LEFT JOIN pg_attribute a ON a.attrelid = to_regclass(t.tbl) AND a.attname = t.col AND NOT a.attisdropped",
            pairs.join(", ")
        );
        let default = self.topo.default_shard;
        let mut conn = self.borrow_for_leg(default, &super::fanout::WRITE).await?;
        let answer = conn.query_scalar(&sql).await;
        if conn.is_poolable() {
            conn.release();
        }
        let answer = match answer {
            Ok(answer) => answer.unwrap_or_default(),
            Err(error) if !error.is_connection_failure() => {
                // Time values are then placed to within 16 hours, as without a catalog.
                tracing::warn!(%error, "looking up the time key columns failed");
                String::new()
            }
            Err(error) => return Err(error.into()),
        };
        let (rows, timezone) = answer.split_once('\u{1d}').unwrap_or((&answer, ""));
        let mut learned = TimeColumns {
            generation: self.topo.generation,
            ddl_epoch,
            checked: Some(Instant::now()),
            server_timezone: (!timezone.is_empty()).then(|| timezone.to_owned()),
            ..TimeColumns::default()
        };
        for row in rows.split('\u{1e}').filter(|r| !r.is_empty()) {
            let (table, ty) = row.split_once('\u{1f}').unwrap_or((row, ""));
            match TimeColumn::from_type_name(ty) {
                Some(column) => learned.columns.push((table.to_owned(), column)),
                None => learned.missing.push(table.to_owned()),
            }
        }
        tracing::debug!(columns = ?learned.columns, missing = ?learned.missing, timezone, "time key columns learned");
        Ok(learned)
    }
}

/// The planner's view of `known` for this session.
pub(super) fn time_keys(known: &TimeColumns, utc_offset: Option<i32>) -> TimeKeys<'_> {
    TimeKeys {
        columns: &known.columns,
        utc_offset,
    }
}

#[cfg(test)]
mod tests {
    use super::fixed_utc_offset;

    #[test]
    fn only_fixed_utc_zones_have_a_known_offset() {
        for utc in [
            "UTC",
            "'UTC'",
            "Etc/UTC",
            "etc/utc",
            "GMT",
            "Zulu",
            "'Etc/GMT0'",
        ] {
            assert_eq!(fixed_utc_offset(utc), Some(0), "{utc}");
        }
        for other in ["Europe/Berlin", "America/New_York", "EST5EDT", "+05", ""] {
            assert_eq!(fixed_utc_offset(other), None, "{other}");
        }
    }
}
