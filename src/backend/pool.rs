//! Bounded pools of server connections, one per (node, user, database). The bound is a
//! semaphore: a permit travels with every connection handed out, so `size` limits
//! connections in use plus connections idle. Idle connections are reused LIFO (warm
//! caches, and the oldest ones age out under low load).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::conn::{ServerConn, ServerTarget};
use super::BackendError;

/// ParameterStatus name/value pairs as a server reported them.
pub type ServerParams = Arc<Vec<(String, String)>>;

#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub size: usize,
    pub acquire_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub lifetime: Duration,
    /// Keepalive idle time and TCP_USER_TIMEOUT of new connections (zero: off).
    pub tcp_keepalive: Duration,
    pub tcp_user_timeout: Duration,
}

pub struct Pool {
    pub target: ServerTarget,
    settings: PoolSettings,
    /// A std Mutex, not a tokio one: it is held only to push or pop, never across .await.
    idle: Mutex<Vec<ServerConn>>,
    permits: Arc<Semaphore>,
    /// Connections on loan right now: the "outstanding work" reads are balanced by.
    outstanding: AtomicUsize,
    /// ParameterStatus values from the first successful connection, shown to clients
    /// at login (server_version, encodings, DateStyle...).
    server_params: Mutex<Option<ServerParams>>,
}

/// A connection on loan. Dropping it closes the connection; only `release` returns it
/// to the pool, so an error path can never leak a dirty connection back.
pub struct PooledConn {
    conn: Option<ServerConn>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl Pool {
    pub fn new(target: ServerTarget, settings: PoolSettings) -> Arc<Pool> {
        Arc::new(Pool {
            permits: Arc::new(Semaphore::new(settings.size)),
            target,
            settings,
            idle: Mutex::new(Vec::new()),
            outstanding: AtomicUsize::new(0),
            server_params: Mutex::new(None),
        })
    }

    pub async fn acquire(self: &Arc<Self>) -> Result<PooledConn, BackendError> {
        let wait = self.settings.acquire_timeout;
        // Fast path without a timer: most acquires find a free slot.
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                match tokio::time::timeout(wait, self.permits.clone().acquire_owned()).await {
                    Ok(Ok(permit)) => permit,
                    _ => return Err(BackendError::AcquireTimeout(wait)),
                }
            }
        };
        let conn = match self.pop_idle() {
            Some(conn) => conn,
            None => {
                let conn = ServerConn::connect(&self.target, self.settings.connect_timeout).await?;
                conn.set_liveness(self.settings.tcp_keepalive, self.settings.tcp_user_timeout);
                self.remember_params(&conn);
                conn
            }
        };
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        Ok(PooledConn {
            conn: Some(conn),
            pool: self.clone(),
            _permit: permit,
        })
    }

    fn pop_idle(&self) -> Option<ServerConn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(conn) = idle.pop() {
            if !conn.looks_alive() {
                // Closed by the server while idle (restart, pg_terminate_backend,
                // idle_session_timeout): drop it quietly and try the next one.
                tracing::debug!(server = %self.target.addr(), "idle server connection was closed by the server; discarded");
                continue;
            }
            if !self.expired(&conn, Instant::now()) {
                return Some(conn);
            }
            tokio::spawn(conn.terminate());
        }
        None
    }

    fn expired(&self, conn: &ServerConn, now: Instant) -> bool {
        now.duration_since(conn.last_used) >= self.settings.idle_timeout
            || now.duration_since(conn.created) >= self.settings.lifetime
    }

    fn remember_params(&self, conn: &ServerConn) {
        let mut cached = self.server_params.lock().unwrap_or_else(|e| e.into_inner());
        if cached.is_none() {
            *cached = Some(Arc::new(conn.startup_params.clone()));
        }
    }

    /// Server ParameterStatus values, connecting once if none is known yet.
    pub async fn server_params(self: &Arc<Self>) -> Result<ServerParams, BackendError> {
        if let Some(p) = self
            .server_params
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Ok(p);
        }
        let conn = self.acquire().await?;
        let params = Arc::new(conn.startup_params.clone());
        conn.release();
        Ok(params)
    }

    /// Closes idle connections past their idle timeout or lifetime.
    pub fn reap(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let (expired, keep): (Vec<_>, Vec<_>) = idle.drain(..).partition(|c| self.expired(c, now));
        *idle = keep;
        drop(idle);
        for conn in expired {
            tokio::spawn(conn.terminate());
        }
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn in_use(&self) -> usize {
        // Saturating: a released connection is pushed to `idle` just before its
        // permit is returned, so for a moment it counts both ways.
        self.settings
            .size
            .saturating_sub(self.permits.available_permits())
            .saturating_sub(self.idle_count())
    }
}

impl PooledConn {
    /// Returns the connection to the pool if it is idle and clean; closes it otherwise.
    pub fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            if conn.is_poolable() {
                conn.last_used = Instant::now();
                // The unnamed statement is the last client's: the next borrower that
                // binds it without its own Parse gets it re-created (and verified).
                conn.unnamed = None;
                let mut idle = self.pool.idle.lock().unwrap_or_else(|e| e.into_inner());
                idle.push(conn);
            } else {
                tokio::spawn(conn.terminate());
            }
        }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        self.pool.outstanding.fetch_sub(1, Ordering::Relaxed);
        if let Some(conn) = self.conn.take() {
            // Not released: closed, never pooled.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(conn.terminate());
            }
        }
    }
}

impl std::ops::Deref for PooledConn {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        self.conn
            .as_ref()
            .unwrap_or_else(|| unreachable!("taken only by release/drop"))
    }
}

impl std::ops::DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut ServerConn {
        self.conn
            .as_mut()
            .unwrap_or_else(|| unreachable!("taken only by release/drop"))
    }
}

/// All pools of the process, created on first use.
#[derive(Default)]
pub struct Pools {
    pools: Mutex<HashMap<ServerTarget, Arc<Pool>>>,
}

impl Pools {
    pub fn get(&self, target: &ServerTarget, settings: &PoolSettings) -> Arc<Pool> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .entry(target.clone())
            .or_insert_with(|| Pool::new(target.clone(), settings.clone()))
            .clone()
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        self.pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn reap(&self) {
        for pool in self.all() {
            pool.reap();
        }
    }
}
