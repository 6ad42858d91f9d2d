//! Reloading the shard map while serving: on SIGHUP, on a change of the map file
//! (watched with `notify`, debounced), or when called. Load, validate, compare, swap:
//!
//! - an invalid map is rejected with its file, line and reason; the old one stays;
//! - a map that moves keys between shards starts a reshard job (src/reshard): routing
//!   keeps following the old ownership (with the new map's shards added) until the
//!   job's cutover publishes the new map. Edits a reshard cannot carry out (tables
//!   changing rules, the database or default shard changing) are refused, as is any
//!   ownership change while a job runs; the old map stays;
//! - otherwise the new topology (nodes added, removed or changed, shards without keys
//!   added) is published at once. Sessions pick it up at their next transaction;
//!   transactions in flight finish on the snapshot they started with. Shards whose
//!   nodes did not change keep their monitor and freshness.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{backend_node, monitor_nodes, shard_nodes};
use crate::config::Config;
use crate::control::monitor::{self, MonitorHandle, MonitorSettings};
use crate::frontend::{Frontend, ShardRuntime, Topology};
use crate::shard_map::{ShardMap, ShardMapError, ShardSpec};
use crate::topology::SharedFreshness;

/// Changes of the map file closer together than this make one reload.
const DEBOUNCE: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}; keeping version {1}")]
    Invalid(ShardMapError, u64),
    #[error("{path}: version {to} cannot be resharded to: {error}; keeping version {from}")]
    Ownership {
        path: PathBuf,
        error: crate::reshard::plan::PlanError,
        from: u64,
        to: u64,
    },
    #[error("{path}: version {to} moves keys, but reshard job {job} is still running (wait for it or RESHARD CANCEL); keeping version {from}")]
    JobRunning {
        path: PathBuf,
        job: u64,
        from: u64,
        to: u64,
    },
    #[error("cannot record the reshard job: {0}; keeping version {1}")]
    State(crate::reshard::StateError, u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The file says what is already in use.
    Unchanged,
    /// The new topology is published.
    Applied { from: u64, to: u64 },
    /// Keys move: a reshard job started; routing follows `from` until its cutover.
    ReshardStarted { from: u64, to: u64, job: u64 },
}

/// The running shards' monitors, by shard name, with the spec each was built from.
type Monitors = HashMap<String, (ShardSpec, MonitorHandle)>;

pub struct Reloader {
    fe: Arc<Frontend>,
    config: Config,
    settings: MonitorSettings,
    monitors: Mutex<Monitors>,
    /// Serialises reloads (SIGHUP and a file change may race).
    busy: tokio::sync::Mutex<()>,
}

impl Reloader {
    pub(super) fn new(
        fe: Arc<Frontend>,
        config: Config,
        settings: MonitorSettings,
        monitors: Monitors,
    ) -> Reloader {
        Reloader {
            fe,
            config,
            settings,
            monitors: Mutex::new(monitors),
            busy: tokio::sync::Mutex::new(()),
        }
    }

    /// Reads the map file again and applies it if it may be applied; the outcome is
    /// recorded for `SHOW MAP` and the metrics.
    pub async fn reload(self: &Arc<Self>) -> Result<ReloadOutcome, ReloadError> {
        let result = self.reload_inner().await;
        self.fe.admin.record_reload(&result);
        result
    }

    async fn reload_inner(self: &Arc<Self>) -> Result<ReloadOutcome, ReloadError> {
        let _one_at_a_time = self.busy.lock().await;
        let current = self.fe.topology.load_full();
        let from = current.map.version;
        let map =
            ShardMap::load(&self.config.shard_map).map_err(|e| ReloadError::Invalid(e, from))?;
        if *current.map == map {
            return Ok(ReloadOutcome::Unchanged);
        }
        let old = &current.map;
        let moves = old.database != map.database
            || old.keyspaces != map.keyspaces
            || old.tables != map.tables
            || old.default_shard != map.default_shard;
        if moves {
            let path = self.config.shard_map.clone();
            let to = map.version;
            if let Some(status) = self
                .fe
                .reshard
                .status()
                .filter(|_| self.fe.reshard.running())
            {
                let job = status.job;
                return Err(ReloadError::JobRunning {
                    path,
                    job,
                    from,
                    to,
                });
            }
            let plan =
                crate::reshard::plan::diff(old, &map).map_err(|error| ReloadError::Ownership {
                    path,
                    error,
                    from,
                    to,
                })?;
            if !plan.is_empty() {
                return self.start_reshard(&current, &map, plan);
            }
        }
        let topology = self.build(&current, &map, &BTreeMap::new());
        let generation = topology.generation;
        self.fe.topology.store(Arc::new(topology));
        self.fe.topology_published.send_replace(generation);
        tracing::info!(from, to = map.version, file = %self.config.shard_map.display(), "shard map reloaded");
        Ok(ReloadOutcome::Applied {
            from,
            to: map.version,
        })
    }

    /// The new topology; shards whose nodes did not change keep their freshness and
    /// monitor, the others get new ones (their replicas serve reads again after the
    /// first probe).
    fn build(
        &self,
        current: &Topology,
        map: &ShardMap,
        floors: &BTreeMap<String, u64>,
    ) -> Topology {
        let mut monitors = self.monitors.lock().unwrap_or_else(|e| e.into_inner());
        let mut kept: Monitors = HashMap::new();
        let shards = map
            .shards
            .iter()
            .map(|(name, spec)| {
                let unchanged = monitors.get(name).is_some_and(|(old, _)| old == spec);
                let old_fresh = current
                    .shards
                    .iter()
                    .find(|s| &s.name == name)
                    .map(|s| s.fresh.clone());
                let fresh = match (unchanged, old_fresh, monitors.remove(name)) {
                    (true, Some(fresh), Some(entry)) => {
                        kept.insert(name.clone(), entry);
                        fresh
                    }
                    _ => {
                        let nodes = monitor_nodes(&self.config, map, spec);
                        let fresh: SharedFreshness =
                            Arc::new(ArcSwap::from_pointee(monitor::initial_freshness(&nodes)));
                        let handle = monitor::spawn_monitor(nodes, self.settings, fresh.clone());
                        kept.insert(name.clone(), (spec.clone(), handle));
                        fresh
                    }
                };
                ShardRuntime {
                    name: name.clone(),
                    nodes: shard_nodes(spec).into_iter().map(backend_node).collect(),
                    fresh,
                    read_floor: floors.get(name).copied().unwrap_or(0),
                }
            })
            .collect::<Vec<_>>();
        // Monitors of shards that are gone or changed stop here (dropped handles).
        *monitors = kept;
        Topology {
            default_shard: shards
                .iter()
                .position(|s| s.name == map.default_shard)
                .unwrap_or(0),
            shards,
            map: Arc::new(map.clone()),
            generation: current.generation + 1,
        }
    }
}

impl Reloader {
    /// Records a job for `map` (which moves keys), routes by the interim map (old
    /// ownership, both maps' shards) and starts the job.
    fn start_reshard(
        self: &Arc<Self>,
        current: &Topology,
        map: &ShardMap,
        plan: crate::reshard::plan::Plan,
    ) -> Result<ReloadOutcome, ReloadError> {
        use crate::reshard::{JobContext, JobState, Phase};
        let from = current.map.version;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let state = JobState {
            id: now.as_millis() as u64,
            started_at: now.as_secs(),
            old_map: current.map.to_yaml(),
            new_map: map.to_yaml(),
            plan,
            phase: Phase::Schema,
            switched: false,
            created: BTreeMap::new(),
            identities: BTreeMap::new(),
            cutover_lsn: BTreeMap::new(),
            verify: None,
            error: None,
        };
        let path = crate::reshard::state_path(&self.config);
        crate::reshard::save_state(&path, &state).map_err(|e| ReloadError::State(e, from))?;
        let interim = crate::reshard::plan::interim_map(&current.map, map);
        if interim.shards != current.map.shards {
            self.publish_now(&interim, &BTreeMap::new());
        }
        let job = state.id;
        tracing::info!(from, to = map.version, job, moves = ?state.plan.pairs(), "shard map moves keys: reshard job started");
        crate::reshard::spawn(
            JobContext {
                fe: self.fe.clone(),
                config: self.config.clone(),
                publisher: self.clone(),
            },
            state,
        );
        Ok(ReloadOutcome::ReshardStarted {
            from,
            to: map.version,
            job,
        })
    }

    fn publish_now(&self, map: &ShardMap, floors: &BTreeMap<String, u64>) {
        let current = self.fe.topology.load_full();
        let topology = self.build(&current, map, floors);
        let generation = topology.generation;
        self.fe.topology.store(Arc::new(topology));
        self.fe.topology_published.send_replace(generation);
    }
}

impl crate::reshard::Publish for Reloader {
    fn publish(&self, map: &ShardMap, floors: &BTreeMap<String, u64>) {
        self.publish_now(map, floors);
        tracing::info!(
            version = map.version,
            "shard map published by the reshard job"
        );
    }
}

/// Reloads on SIGHUP and when the map file changes, until `stop`.
pub(super) fn spawn_triggers(
    reloader: Arc<Reloader>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let (tx, mut changed) = mpsc::channel::<()>(16);
        let _watcher = watch_file(&reloader.config.shard_map, tx);
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            let hup = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = hup => {}
                Some(()) = changed.recv() => {
                    // Editors write in several steps: wait for the last one.
                    tokio::time::sleep(DEBOUNCE).await;
                    while changed.try_recv().is_ok() {}
                }
                _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
            }
            match reloader.reload().await {
                Ok(ReloadOutcome::Unchanged) => {
                    tracing::debug!("shard map file unchanged")
                }
                Ok(ReloadOutcome::Applied { .. } | ReloadOutcome::ReshardStarted { .. }) => {}
                Err(error) => tracing::error!(%error, "shard map reload refused"),
            }
        }
    })
}

/// Watches the map file's directory (editors often replace the file by renaming a new
/// one over it) and signals changes of that file. None when watching is not possible
/// (then SIGHUP still works).
fn watch_file(path: &std::path::Path, tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let file = path.file_name()?.to_owned();
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if event
                .paths
                .iter()
                .any(|p| p.file_name() == Some(file.as_os_str()))
            {
                let _ = tx.try_send(());
            }
        }
    })
    .map_err(|error| tracing::warn!(%error, "cannot watch the shard map file; reload with SIGHUP"))
    .ok()?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .map_err(|error| tracing::warn!(%error, dir = %dir.display(), "cannot watch the shard map's directory; reload with SIGHUP"))
        .ok()?;
    Some(watcher)
}
