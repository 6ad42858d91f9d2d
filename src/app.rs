//! Wires the proxy together: builds the shared frontend state from the config and
//! shard map, binds the listener, runs housekeeping, and owns the one shutdown path
//! (SIGTERM: drain within the grace period; SIGINT: exit now).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use arc_swap::ArcSwap;

pub mod failover;
pub mod reload;

use crate::backend::{PoolSettings, Pools};
use crate::config::{Config, PoolMode as ConfigPoolMode};
use crate::control::monitor::{self, MonitorNode, MonitorSettings};
use crate::frontend::listener::Listener;
use crate::frontend::{
    BackendNode, ClientUser, Frontend, FrontendSettings, PoolMode, ShardRuntime, Topology,
};
use crate::protocol::scram::ScramSecret;
use crate::routing::cache::{AnalysisCache, ShapeCache};
use crate::shard_map::{NodeAddr, ShardMap, ShardSpec};
use crate::topology::SharedFreshness;

/// Distinct simple-query texts whose analysis is kept.

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// A running proxy. Dropping the handle does not stop it; call `shutdown`.
pub struct ProxyHandle {
    pub local_addr: SocketAddr,
    /// Where `/metrics`, `/healthz` and `/readyz` answer (None: `metrics` not set).
    pub metrics_addr: Option<SocketAddr>,
    pub frontend: Arc<Frontend>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// Owns the shards' monitors; reloads the shard map.
    reloader: Arc<reload::Reloader>,
    failover: Arc<failover::Failover>,
}

impl ProxyHandle {
    /// Promotes a replica of `shard` (`node` as `host:port`, or the most advanced).
    pub async fn promote(
        &self,
        shard: &str,
        node: Option<&str>,
    ) -> Result<failover::Promotion, failover::FailoverError> {
        self.failover.promote(shard, node, true).await
    }

    /// Reads the shard map file again and applies it when it may be applied (what
    /// SIGHUP and a change of the file do).
    pub async fn reload(&self) -> Result<reload::ReloadOutcome, reload::ReloadError> {
        self.reloader.reload().await
    }

    /// Stops accepting and lets sessions finish their transactions.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Waits until the listener and every session (within the grace period) are done.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

fn backend_node(addr: &NodeAddr) -> BackendNode {
    BackendNode {
        host: addr.host.clone(),
        port: addr.port,
        user: addr.user.clone(),
        password: addr.password.clone(),
        database: addr.dbname.clone(),
    }
}

/// A shard's nodes, primary first, in map order.
fn shard_nodes(shard: &ShardSpec) -> Vec<&NodeAddr> {
    std::iter::once(&shard.primary)
        .chain(shard.replicas.iter())
        .collect()
}

pub(crate) fn monitor_nodes(
    config: &Config,
    map: &ShardMap,
    shard: &ShardSpec,
) -> Vec<MonitorNode> {
    let control = config.user(&config.control.user);
    shard_nodes(shard)
        .into_iter()
        .map(|n| MonitorNode {
            host: n.host.clone(),
            port: n.port,
            user: n
                .user
                .clone()
                .unwrap_or_else(|| config.control.user.clone()),
            password: n
                .password
                .clone()
                .or_else(|| control.map(|u| u.password.clone())),
            database: n.dbname.clone().unwrap_or_else(|| map.database.clone()),
        })
        .collect()
}

/// Per shard, in map order: its nodes and the freshness its monitor publishes.
fn shard_runtimes(config: &Config, map: &ShardMap) -> Vec<(ShardRuntime, Vec<MonitorNode>)> {
    map.shards
        .iter()
        .map(|(name, spec)| {
            let monitor = monitor_nodes(config, map, spec);
            let fresh: SharedFreshness =
                Arc::new(ArcSwap::from_pointee(monitor::initial_freshness(&monitor)));
            let shard = ShardRuntime {
                name: name.clone(),
                nodes: shard_nodes(spec).into_iter().map(backend_node).collect(),
                fresh,
                read_floor: 0,
            };
            (shard, monitor)
        })
        .collect()
}

pub fn build_frontend(
    config: &Config,
    map: &ShardMap,
    shards: Vec<ShardRuntime>,
) -> Result<Frontend, AppError> {
    let users = config
        .users
        .iter()
        .map(|u| {
            let user = ClientUser {
                password: u.password.clone(),
                scram: ScramSecret::new(&u.password),
            };
            (u.name.clone(), user)
        })
        .collect::<HashMap<_, _>>();
    let settings = FrontendSettings {
        pool_mode: match config.pool.mode {
            ConfigPoolMode::Transaction => PoolMode::Transaction,
            ConfigPoolMode::Session => PoolMode::Session,
        },
        pool: PoolSettings {
            size: config.pool.size,
            acquire_timeout: config.pool.acquire_timeout,
            connect_timeout: config.pool.connect_timeout,
            idle_timeout: config.pool.idle_timeout,
            lifetime: config.pool.server_lifetime,
            tcp_keepalive: config.pool.tcp_keepalive,
            tcp_user_timeout: config.pool.tcp_user_timeout,
        },
        max_message_size: config.limits.max_message_size,
        login_timeout: config.limits.login_timeout,
        startup_wait: config.limits.startup_wait,
        database: map.database.clone(),
        read_your_writes: config.routing.read_your_writes,
        failover_buffer: config.failover.auto.then_some(config.failover.buffer),
        idle_in_transaction_timeout: Some(config.limits.idle_in_transaction_timeout)
            .filter(|t| !t.is_zero()),
        client_idle_timeout: Some(config.limits.client_idle_timeout).filter(|t| !t.is_zero()),
        max_auth_message: config.limits.max_auth_message_size,
        buffer_size: config.limits.buffer_size,
    };
    Ok(Frontend {
        settings,
        users,
        decoy: ScramSecret::new("decoy"),
        topology_published: tokio::sync::watch::Sender::new(0),
        fenced: Default::default(),
        failovers_running: Default::default(),
        topology: ArcSwap::from_pointee(Topology {
            default_shard: shards
                .iter()
                .position(|s| s.name == map.default_shard)
                .unwrap_or(0),
            shards,
            map: Arc::new(map.clone()),
            generation: 0,
        }),
        analysis: AnalysisCache::new(config.limits.statement_cache_size),
        shard_plans: ShapeCache::new(config.limits.statement_cache_size),
        time_columns: Default::default(),
        route_counter: Default::default(),
        pinned_sessions: Default::default(),
        route_stats: Default::default(),
        pools: Pools::default(),
        statements: crate::frontend::prepared::StatementRegistry::with_limit(
            config.limits.max_prepared_statements,
        ),
        cancels: Default::default(),
        tls: match &config.tls {
            Some(tls) => Some(
                crate::frontend::tls::load(&tls.cert, &tls.key)
                    .map_err(|e| AppError::Tls(e.to_string()))?,
            ),
            None => None,
        },
        admin: crate::admin::AdminState::new(config),
        clients: Default::default(),
        // A paused shard holds a new transaction as long as a pool would.
        pauses: crate::admin::pause::Pauses::with_limit(
            config.pool.acquire_timeout,
            config.limits.max_paused_transactions,
        ),
        metrics: Default::default(),
        reshard: Default::default(),
    })
}

/// Binds and starts the proxy in the current tokio runtime.
pub async fn start(config: &Config, map: &ShardMap) -> Result<ProxyHandle, AppError> {
    // A reshard job the last run left: route by the map it says, resume it below.
    let job = match crate::reshard::load_state(&crate::reshard::state_path(config)) {
        Ok(job) => job,
        Err(error) => {
            tracing::error!(%error, "ignoring the reshard job state file");
            None
        }
    };
    let job_map = job.as_ref().and_then(|state| {
        match crate::reshard::routing_map(state, &config.shard_map) {
            Ok(map) => Some(map),
            Err(error) => {
                tracing::error!(%error, "the reshard job state has an invalid map; ignoring it");
                None
            }
        }
    });
    let map = job_map.as_ref().unwrap_or(map);
    let (shards, monitored): (Vec<_>, Vec<_>) = shard_runtimes(config, map).into_iter().unzip();
    let published: Vec<SharedFreshness> = shards.iter().map(|s| s.fresh.clone()).collect();
    let frontend = Arc::new(build_frontend(config, map, shards)?);
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| AppError::Bind(config.listen, e))?;
    let local_addr = listener
        .local_addr()
        .map_err(|e| AppError::Bind(config.listen, e))?;
    let (tx, rx) = watch::channel(false);
    let reaper = spawn_reaper(frontend.clone(), config.pool.idle_timeout, rx.clone());
    let settings = MonitorSettings {
        interval: config.routing.lag_check_interval,
        max_lag: config.routing.max_replica_lag,
        max_lag_bytes: config.routing.max_replica_lag_bytes,
        connect_timeout: config.pool.connect_timeout,
    };
    let monitors = map
        .shards
        .iter()
        .zip(monitored.into_iter().zip(published))
        .map(|((name, spec), (nodes, fresh))| {
            let handle = monitor::spawn_monitor(nodes, settings, fresh);
            (name.clone(), (spec.clone(), handle))
        })
        .collect();
    let reloader = Arc::new(reload::Reloader::new(
        frontend.clone(),
        config.clone(),
        settings,
        monitors,
    ));
    frontend.admin.set_reloader(&reloader);
    if let (Some(state), Some(_)) = (job, &job_map) {
        resume_reshard(&frontend, config, &reloader, state);
    }
    let metrics_addr = match config.metrics {
        Some(addr) => {
            let (bound, _task) = crate::admin::http::spawn(addr, frontend.clone(), rx.clone())
                .await
                .map_err(|e| AppError::Bind(addr, e))?;
            Some(bound)
        }
        None => None,
    };
    let triggers = reload::spawn_triggers(reloader.clone(), rx.clone());
    let failover = Arc::new(failover::Failover::new(
        frontend.clone(),
        config.clone(),
        reloader.clone(),
    ));
    frontend
        .admin
        .set_promoter(Arc::new(failover::ConsolePromoter(failover.clone())));
    // Fencing runs always; promotions only with failover.auto.
    let supervisor = failover::spawn_supervisor(failover.clone(), rx.clone());
    let listener = Listener {
        listener,
        fe: frontend.clone(),
        max_clients: config.limits.max_client_connections,
        max_unauthenticated: config.limits.max_unauthenticated,
    };
    let grace = config.limits.shutdown_grace;
    let fe_for_task = frontend.clone();
    let task = tokio::spawn(async move {
        listener.run(rx, grace).await;
        fe_for_task.reshard.stop_job();
        reaper.abort();
        triggers.abort();
        supervisor.abort();
    });
    tracing::info!(%local_addr, database = %map.database, "shardgate listening");
    Ok(ProxyHandle {
        local_addr,
        metrics_addr,
        frontend,
        shutdown: tx,
        task,
        reloader,
        failover,
    })
}

/// Closes idle server connections past their idle timeout, a few times per timeout.
/// Resumes a persisted reshard job, or shows how the last one ended.
fn resume_reshard(
    fe: &Arc<Frontend>,
    config: &Config,
    reloader: &Arc<reload::Reloader>,
    state: crate::reshard::JobState,
) {
    if state.phase.is_final() {
        fe.reshard.set_status(crate::reshard::Status {
            job: state.id,
            phase: state.phase.as_str().into(),
            started_at: state.started_at,
            verify: state.verify.clone(),
            error: state.error.clone(),
            ..Default::default()
        });
        return;
    }
    tracing::info!(
        job = state.id,
        phase = state.phase.as_str(),
        "resuming the reshard job"
    );
    crate::reshard::spawn(
        crate::reshard::JobContext {
            fe: fe.clone(),
            config: config.clone(),
            publisher: reloader.clone(),
        },
        state,
    );
}

fn spawn_reaper(
    fe: Arc<Frontend>,
    idle_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let every = (idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => fe.pools.reap(),
                _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
            }
        }
    })
}
