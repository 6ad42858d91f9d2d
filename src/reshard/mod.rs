//! Online resharding (DESIGN.md section 8): when a reload brings a map that moves keys
//! between shards, a job moves the rows while clients keep reading and writing.
//!
//! - `plan`: the diff of two maps and the SQL membership of moved keys (pure);
//! - `gate`: how the cutover holds new transactions on the source shards;
//! - `job`: the phases (schema, copy and stream, cutover, verify, clean up), run as one
//!   control-plane task against the servers with `tokio-postgres`;
//! - this file: the job's persisted state and the status `SHOW RESHARD` reads.
//!
//! Routing follows the old map (with the new map's shards added, see
//! `plan::interim_map`) until the cutover publishes the new map. The job state file
//! keeps both maps, so a restarted proxy routes by the right one and resumes the job.

pub mod gate;
mod job;
pub mod plan;
mod server;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub use job::{spawn, JobContext, Publish};

/// Where a job is. Phases only move forward; `Failed` and `Cancelled` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Phase {
    /// Creating the moved tables on the targets.
    Schema,
    /// Copying, then streaming, the moved rows.
    Copy,
    /// Holding transactions on the sources while the targets catch up; then switching.
    Cutover,
    /// Comparing row counts and checksums of the moved rows.
    Verify,
    /// Dropping subscriptions, publications and slots; deleting moved rows on sources.
    Cleanup,
    Done,
    Failed,
    Cancelled,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Schema => "schema",
            Phase::Copy => "copy",
            Phase::Cutover => "cutover",
            Phase::Verify => "verify",
            Phase::Cleanup => "cleanup",
            Phase::Done => "done",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Phase::Done | Phase::Failed | Phase::Cancelled)
    }
}

/// What survives a restart: enough to route by the right map and to resume or undo.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct JobState {
    pub id: u64,
    /// Unix seconds.
    pub started_at: u64,
    /// Both maps as YAML (the old one is no longer in any file).
    pub old_map: String,
    pub new_map: String,
    pub plan: plan::Plan,
    pub phase: Phase,
    /// The new map is what routing follows (set just before it is published).
    pub switched: bool,
    /// Tables the job created, per target shard (a cancel drops them again).
    pub created: BTreeMap<String, Vec<String>>,
    /// Replica identities the job changed to FULL, per source shard: (table, the
    /// clause that restores it).
    pub identities: BTreeMap<String, Vec<(String, String)>>,
    /// Per target shard, its WAL position at the cutover: its replicas serve moved
    /// keys once they have replayed past it.
    pub cutover_lsn: BTreeMap<String, u64>,
    pub verify: Option<String>,
    pub error: Option<String>,
}

impl JobState {
    /// Pair `i` of the plan's (source, target) pairs names its publication,
    /// subscription, slot and fence table.
    pub fn object_name(&self, pair: usize) -> String {
        format!("shardgate_reshard_{}_{pair}", self.id)
    }
}

/// What `SHOW RESHARD` shows about the current or last job.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub job: u64,
    pub phase: String,
    pub sources: String,
    pub targets: String,
    pub rows_copied: u64,
    pub rows_estimate: u64,
    pub bytes_copied: u64,
    pub bytes_estimate: u64,
    /// Rows per second over the copy so far.
    pub rate: f64,
    pub lag_bytes: Option<u64>,
    pub eta_seconds: Option<u64>,
    pub cutover_attempts: u32,
    /// Longest hold of new transactions at the cutover, in milliseconds.
    pub pause_ms: Option<u64>,
    pub verify: Option<String>,
    pub started_at: u64,
    pub error: Option<String>,
}

/// Shared between the job, the sessions (the gate) and the admin console.
#[derive(Default)]
pub struct Shared {
    pub gate: gate::CutoverGate,
    /// std Mutex: short updates and reads, never held across an await.
    status: Mutex<Option<Status>>,
    cancel: Mutex<Option<tokio::sync::watch::Sender<bool>>>,
    /// The job's task, stopped when the proxy shuts down (its state file resumes it).
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CancelError {
    #[error("no reshard job is running")]
    NoJob,
    #[error("the job has switched routing to the new map already; it can only finish")]
    Switched,
}

impl Shared {
    pub fn status(&self) -> Option<Status> {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut Status)) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        f(status.get_or_insert_with(Status::default));
    }

    pub(crate) fn set_status(&self, status: Status) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
    }

    /// A job is under way (not in a final phase).
    pub fn running(&self) -> bool {
        self.cancel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    pub(crate) fn set_cancel(&self, tx: Option<tokio::sync::watch::Sender<bool>>) {
        *self.cancel.lock().unwrap_or_else(|e| e.into_inner()) = tx;
    }

    pub(crate) fn set_task(&self, task: tokio::task::AbortHandle) {
        *self.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
    }

    /// Proxy shutdown: the job stops where it is; a restart resumes it from its state.
    pub fn stop_job(&self) {
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
        self.gate.disarm();
        self.set_cancel(None);
    }

    /// `RESHARD CANCEL`: asks the running job to undo itself (before its cutover).
    pub fn cancel(&self) -> Result<(), CancelError> {
        let guard = self.cancel.lock().unwrap_or_else(|e| e.into_inner());
        let tx = guard.as_ref().ok_or(CancelError::NoJob)?;
        let switched = self
            .status()
            .is_some_and(|s| matches!(s.phase.as_str(), "verify" | "cleanup" | "done"));
        if switched {
            return Err(CancelError::Switched);
        }
        tx.send_replace(true);
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a reshard job state: {source}")]
    Format {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The job state file for a config: `reshard.state_file`, else beside the shard map.
pub fn state_path(config: &crate::config::Config) -> PathBuf {
    config.reshard.state_file.clone().unwrap_or_else(|| {
        let mut name = config.shard_map.as_os_str().to_owned();
        name.push(".reshard.json");
        PathBuf::from(name)
    })
}

/// The persisted job, if any (a finished job's file is removed).
pub fn load_state(path: &Path) -> Result<Option<JobState>, StateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| StateError::Format {
            path: path.to_path_buf(),
            source,
        })
}

/// Writes the state atomically (temp file, fsync, rename).
pub fn save_state(path: &Path, state: &JobState) -> Result<(), StateError> {
    use std::io::Write;
    let io = |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    };
    let text = serde_json::to_string_pretty(state).map_err(|source| StateError::Format {
        path: path.to_path_buf(),
        source,
    })?;
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    let temp = PathBuf::from(temp);
    let mut file = std::fs::File::create(&temp).map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&temp, path).map_err(io)
}

pub fn remove_state(path: &Path) {
    if let Err(error) = std::fs::remove_file(path) {
        if error.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(%error, path = %path.display(), "cannot remove the reshard state file");
        }
    }
}

/// The map routing follows for a persisted job: the new one after its cutover, the
/// interim one before.
pub fn routing_map(
    state: &JobState,
    source: &Path,
) -> Result<crate::shard_map::ShardMap, crate::shard_map::ShardMapError> {
    let new = crate::shard_map::ShardMap::from_yaml_str(&state.new_map, source)?;
    if state.switched {
        return Ok(new);
    }
    let old = crate::shard_map::ShardMap::from_yaml_str(&state.old_map, source)?;
    Ok(plan::interim_map(&old, &new))
}

/// Rows (and bytes) a plan moves per (source, target, table), from the source
/// primaries' planner statistics. Errors are per entry: a shard that cannot be reached
/// leaves its estimates out, with the reason.
pub async fn estimates(
    config: &crate::config::Config,
    old: &crate::shard_map::ShardMap,
    plan: &plan::Plan,
) -> Vec<(String, String, String, Result<(u64, u64), String>)> {
    let mut out = Vec::new();
    for (source, target) in plan.pairs() {
        let filters = plan.filters(&source, &target);
        let node = old.shards.get(&source).and_then(|spec| {
            crate::app::monitor_nodes(config, old, spec)
                .into_iter()
                .next()
        });
        let conn = match node {
            Some(node) => server::connect(&node, config.pool.connect_timeout)
                .await
                .map_err(|e| e.to_string()),
            None => Err(format!("shard {source} is not in the old map")),
        };
        for (table, filter) in filters {
            let estimate = match &conn {
                Ok(conn) => job::estimate_rows(
                    conn,
                    &table,
                    &filter,
                    plan.hash_share(&source, &target, &table),
                )
                .await
                .map_err(|e| e.to_string()),
                Err(e) => Err(e.clone()),
            };
            out.push((source.clone(), target.clone(), table, estimate));
        }
    }
    out
}
