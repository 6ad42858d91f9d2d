//! Client (downstream) side of the data path: the listener (connection limit,
//! shutdown), startup and authentication, and the per-client session loop that
//! forwards frames to pooled server connections.

pub mod cancel;
pub mod listener;
pub mod prepared;
pub mod session;
pub mod session_sql;
pub mod startup;
pub mod stream;
pub mod tls;

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use crate::backend::{PoolSettings, Pools, ServerTarget};
use crate::protocol::scram::ScramSecret;
use crate::routing::cache::AnalysisCache;
use crate::topology::SharedFreshness;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// A server connection is lent for one transaction (the default).
    Transaction,
    /// A server connection is lent for the whole client session.
    Session,
}

#[derive(Debug, Clone)]
pub struct FrontendSettings {
    pub pool_mode: PoolMode,
    pub pool: PoolSettings,
    pub max_message_size: usize,
    pub login_timeout: Duration,
    /// `limits.startup_wait`: a new connection must send its first message within this.
    pub startup_wait: Duration,
    /// The backend database name clients must ask for.
    pub database: String,
    /// DESIGN 5.3: after a write commits, reads wait for replicas that replayed it.
    pub read_your_writes: bool,
    /// With automatic failover: how long a write waits for its shard's new primary
    /// (`failover.buffer`) before 57P03. None: writes fail at once.
    pub failover_buffer: Option<Duration>,
    /// `limits.idle_in_transaction_timeout`: a client idle this long inside a
    /// transaction is rolled back and closed with 25P03. None: off.
    pub idle_in_transaction_timeout: Option<Duration>,
    /// `limits.client_idle_timeout`: a client idle this long outside a transaction is
    /// closed with 57P05. None: off (the default).
    pub client_idle_timeout: Option<Duration>,
    /// `limits.max_auth_message_size`.
    pub max_auth_message: usize,
    /// `limits.buffer_size`: per-session bytes queued towards one side before the
    /// proxy stops reading from the other.
    pub buffer_size: usize,
}

/// A user clients may log in as. The password is kept to authenticate to servers
/// when the node address carries none.
pub struct ClientUser {
    pub password: String,
    pub scram: ScramSecret,
}

pub use crate::topology::{BackendNode, ShardRuntime, Topology};

/// Everything sessions share. Immutable after start-up except the pools and
/// registries, which synchronise internally.
pub struct Frontend {
    pub settings: FrontendSettings,
    pub users: HashMap<String, ClientUser>,
    /// Used for unknown users, so they go through the same exchange and fail the same
    /// way as a wrong password (no user enumeration).
    pub decoy: ScramSecret,
    /// The shard map and its shards; swapped whole by a reload.
    pub topology: arc_swap::ArcSwap<Topology>,
    /// The generation of the last published topology: sessions waiting for a shard's
    /// new primary wait on it.
    pub topology_published: tokio::sync::watch::Sender<u64>,
    /// Old primaries taken out of the map by a promotion: (shard, host:port). The proxy
    /// never routes to them again.
    pub fenced: std::sync::Mutex<Vec<(String, String)>>,
    /// Promotions running now.
    pub failovers_running: AtomicUsize,
    /// Simple-query analysis by statement text.
    pub analysis: AnalysisCache,
    /// Sharded maps: where each statement shape's keys are (`routing::shard_plan`).
    pub shard_plans:
        crate::routing::cache::ShapeCache<std::sync::Arc<crate::routing::shard_plan::ShardPlan>>,
    /// Sharded maps with time keyspaces: the key columns' types and the servers'
    /// TimeZone (`session/time_keys.rs`).
    pub time_columns: arc_swap::ArcSwap<session::time_keys::TimeColumns>,
    /// Rotates ties between equally loaded replicas.
    pub route_counter: AtomicUsize,
    /// Clients holding their server connection between transactions because they
    /// LISTEN or keep a WITH HOLD cursor open (transaction pooling).
    pub pinned_sessions: AtomicUsize,
    /// Routing decisions by reason (why reads went to the primary, among others).
    pub route_stats: crate::routing::route::RouteStats,
    pub pools: Pools,
    pub statements: prepared::StatementRegistry,
    pub cancels: cancel::CancelRegistry,
    pub tls: Option<tls::ClientTls>,
    // ---- admin console and metrics (src/admin) ----
    /// Console credentials, control-plane hooks (reload, promote), reload record.
    pub admin: crate::admin::AdminState,
    /// Logged-in clients (`SHOW CLIENTS`, client gauges).
    pub clients: crate::admin::clients::ClientRegistry,
    /// `PAUSE`/`RESUME`: sessions wait here before a new transaction.
    pub pauses: crate::admin::pause::Pauses,
    /// Counters and histograms for `/metrics`.
    pub metrics: crate::admin::metrics::Metrics,
    /// The reshard job's cutover gate and status (src/reshard).
    pub reshard: crate::reshard::Shared,
}

impl Frontend {
    /// A user's pools for every node of every shard of `topology`, per shard. Pools are
    /// cheap until used: connections open on first acquire.
    pub fn pools_for(
        &self,
        user: &str,
        topology: &Topology,
    ) -> Vec<Vec<std::sync::Arc<crate::backend::Pool>>> {
        topology
            .shards
            .iter()
            .map(|shard| {
                shard
                    .nodes
                    .iter()
                    .map(|node| {
                        self.pools
                            .get(&self.server_target(user, node), &self.settings.pool)
                    })
                    .collect()
            })
            .collect()
    }

    /// The default shard's freshness (the only shard's, for an unsharded map).
    pub fn default_fresh(&self) -> SharedFreshness {
        let topology = self.topology.load();
        topology.shards[topology.default_shard].fresh.clone()
    }

    /// The server identity a client's pool connects with: credentials and database
    /// from the node address when it has them, otherwise the client's own and the
    /// map's (as the monitor and the reshard job connect).
    pub fn server_target(&self, user: &str, node: &BackendNode) -> ServerTarget {
        let password = node
            .password
            .clone()
            .or_else(|| self.users.get(user).map(|u| u.password.clone()));
        ServerTarget {
            host: node.host.clone(),
            port: node.port,
            user: node.user.clone().unwrap_or_else(|| user.to_owned()),
            password,
            database: node
                .database
                .clone()
                .unwrap_or_else(|| self.settings.database.clone()),
        }
    }
}
