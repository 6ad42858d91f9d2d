//! The operator's door: the admin console (the virtual database `shardgate` on the
//! proxy's own port, DESIGN 6) and the HTTP endpoint (`/metrics`, `/healthz`,
//! `/readyz`). Both only read the snapshots the data and control paths publish
//! (`Topology`, `Freshness`, pool counters, the registries here); the console's
//! `RELOAD`, `PAUSE`/`RESUME` and `PROMOTE` are the only ways in which it acts.
//!
//! - `commands`: console text -> `Command` (pure);
//! - `show`: one table per `SHOW` command, built from the shared state;
//! - `table`: a table as RowDescription/DataRow/CommandComplete (pgwire's codec);
//! - `console`: the console's query loop after login;
//! - `clients`, `pause`: registries the session loop updates;
//! - `metrics`, `http`: the Prometheus recorder and its HTTP server.

pub mod clients;
pub mod commands;
pub mod console;
pub mod http;
pub mod metrics;
pub mod pause;
pub mod show;
pub mod table;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use crate::app::reload::{ReloadError, ReloadOutcome, Reloader};
use crate::protocol::scram::ScramSecret;

/// The database name that selects the console instead of the backends.
pub const CONSOLE_DATABASE: &str = "shardgate";

/// What `PROMOTE <shard> [<node address>]` calls; set by the failover code with
/// `AdminState::set_promoter`. Answers a one-line summary, or the reason it refused.
pub trait Promoter: Send + Sync {
    fn promote<'a>(
        &'a self,
        shard: &'a str,
        node: Option<&'a str>,
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>>;
}

/// The last shard map (re)load, for `SHOW MAP` and the reload counters.
#[derive(Debug, Clone)]
pub struct ReloadRecord {
    /// When the map in use was loaded (start-up or the last applied reload).
    pub loaded_at: SystemTime,
    /// When the last reload was attempted, and what came of it.
    pub last_attempt: Option<SystemTime>,
    pub last_result: Option<&'static str>,
    /// The error of the last refused reload; cleared by the next successful one.
    pub last_error: Option<String>,
    pub applied: u64,
    pub unchanged: u64,
    pub refused: u64,
}

/// Console credentials, the control-plane hooks it calls, and what it reports that
/// nothing else keeps. Lives in `Frontend::admin`.
pub struct AdminState {
    pub user: String,
    /// None when `admin.password` is not set: nobody can log into the console.
    secret: Option<ScramSecret>,
    /// The shard map file as configured (reloads read it again).
    pub map_file: PathBuf,
    /// `routing.max_replica_lag` / `_bytes`, shown beside each replica's lag.
    pub max_lag: Duration,
    pub max_lag_bytes: u64,
    /// Set once after start-up (the reloader is built after the frontend). Weak: the
    /// reloader owns the frontend, not the other way round.
    reloader: OnceLock<Weak<Reloader>>,
    promoter: OnceLock<Arc<dyn Promoter>>,
    /// A std Mutex: held only to copy or update the record, never across .await.
    reloads: Mutex<ReloadRecord>,
    pub started_at: SystemTime,
}

impl AdminState {
    pub fn new(config: &crate::config::Config) -> AdminState {
        let now = SystemTime::now();
        AdminState {
            user: config.admin.user.clone(),
            secret: config.admin.password.as_deref().map(ScramSecret::new),
            map_file: config.shard_map.clone(),
            max_lag: config.routing.max_replica_lag,
            max_lag_bytes: config.routing.max_replica_lag_bytes,
            reloader: OnceLock::new(),
            promoter: OnceLock::new(),
            reloads: Mutex::new(ReloadRecord {
                loaded_at: now,
                last_attempt: None,
                last_result: None,
                last_error: None,
                applied: 0,
                unchanged: 0,
                refused: 0,
            }),
            started_at: now,
        }
    }

    /// The console secret for `user`, when `user` is the admin and a password is set.
    pub fn secret_for(&self, user: &str) -> Option<&ScramSecret> {
        (user == self.user)
            .then_some(self.secret.as_ref())
            .flatten()
    }

    pub fn set_reloader(&self, reloader: &Arc<Reloader>) {
        let _ = self.reloader.set(Arc::downgrade(reloader));
    }

    /// Installs what `PROMOTE` calls; only the first call counts.
    pub fn set_promoter(&self, promoter: Arc<dyn Promoter>) {
        let _ = self.promoter.set(promoter);
    }

    pub fn promoter(&self) -> Option<&Arc<dyn Promoter>> {
        self.promoter.get()
    }

    /// Runs a reload through the reloader and records its outcome. None when the
    /// proxy has no reloader (a frontend built without `app::start`).
    pub async fn reload(&self) -> Option<Result<ReloadOutcome, ReloadError>> {
        let reloader = self.reloader.get()?.upgrade()?;
        // The reloader records the outcome itself (for every trigger).
        Some(reloader.reload().await)
    }

    /// Notes a reload's outcome (`SHOW MAP`, `shardgate_reloads_total`).
    pub fn record_reload(&self, result: &Result<ReloadOutcome, ReloadError>) {
        let now = SystemTime::now();
        let mut r = self.reloads.lock().unwrap_or_else(|e| e.into_inner());
        r.last_attempt = Some(now);
        match result {
            Ok(ReloadOutcome::ReshardStarted { .. }) => {
                r.last_result = Some("reshard started");
                r.last_error = None;
                r.applied += 1;
            }
            Ok(ReloadOutcome::Applied { .. }) => {
                r.loaded_at = now;
                r.last_result = Some("applied");
                r.last_error = None;
                r.applied += 1;
            }
            Ok(ReloadOutcome::Unchanged) => {
                r.last_result = Some("unchanged");
                r.last_error = None;
                r.unchanged += 1;
            }
            Err(error) => {
                r.last_result = Some("refused");
                r.last_error = Some(error.to_string());
                r.refused += 1;
            }
        }
    }

    pub fn reloads(&self) -> ReloadRecord {
        self.reloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// RFC 3339 in UTC (`2026-01-01T09:30:00.250000Z`), for timestamps in console rows.
pub fn format_time(t: SystemTime) -> String {
    let micros = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    crate::shard_map::time::format_timestamp(micros)
}
