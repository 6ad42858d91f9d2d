//! Server settings from `shardgate.yaml` (DESIGN.md section 3): typed values with their
//! documented defaults, loaded and validated once at start-up or `RELOAD`.
//!
//! The data path never reads YAML: it gets a `Config` whose invariants (at least one user,
//! a control user that exists, non-zero timeouts and pool sizes) already hold. The reference
//! for every field lives in `docs/configuration.md`; the `Default` impls below are the
//! single source of those defaults.

mod build;
mod error;
mod raw;
#[cfg(test)]
mod tests;
pub mod units;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::ConfigError;

/// Everything in `shardgate.yaml`, with defaults applied and relative paths resolved
/// against the directory of the file.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was loaded from, as given (used in messages and `SHOW` output).
    pub source: PathBuf,
    pub listen: SocketAddr,
    /// Address of the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`); off when `None`.
    pub metrics: Option<SocketAddr>,
    pub admin: AdminConfig,
    /// Without it an SSLRequest is answered with 'N'.
    pub tls: Option<TlsConfig>,
    pub pool: PoolConfig,
    pub limits: LimitsConfig,
    /// Never empty; names are unique.
    pub users: Vec<UserConfig>,
    pub control: ControlConfig,
    pub routing: RoutingConfig,
    pub failover: FailoverConfig,
    pub reshard: ReshardConfig,
    pub shard_map: PathBuf,
}

/// Credentials for the admin console, the virtual database `shardgate`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub user: String,
    /// `None` means nobody can log into the console.
    pub password: Option<String>,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// When a client gives its server connection back to the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PoolMode {
    /// At the end of each transaction (or each statement outside one).
    #[default]
    Transaction,
    /// When the client disconnects.
    Session,
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub mode: PoolMode,
    /// Server connections per (node, user, database); at least 1.
    pub size: usize,
    /// How long a client waits for a free server connection before getting an error.
    pub acquire_timeout: Duration,
    /// TCP connect plus backend authentication.
    pub connect_timeout: Duration,
    /// An unused server connection is closed after this long.
    pub idle_timeout: Duration,
    /// A server connection is closed when returned to the pool after this long in use.
    pub server_lifetime: Duration,
    /// TCP keepalive on server connections: probes start after this long without
    /// traffic (then every third of it); zero turns keepalive off.
    pub tcp_keepalive: Duration,
    /// TCP_USER_TIMEOUT on server connections (Linux): a connection whose sent data
    /// stays unacknowledged (or unsent behind a zero window) this long is closed; zero
    /// (the default) keeps the system's. Off by default: a server that stops reading a
    /// long COPY while it waits for a lock would be cut off too.
    pub tcp_user_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub max_client_connections: usize,
    /// Largest protocol message accepted from a client or server, in bytes.
    pub max_message_size: usize,
    /// Time from TCP accept to completed authentication.
    pub login_timeout: Duration,
    /// How long SIGTERM waits for open transactions before closing connections.
    pub shutdown_grace: Duration,
    /// Connections that have not finished authentication, counted apart from
    /// `max_client_connections`; beyond this new sockets get 53300 at once.
    pub max_unauthenticated: usize,
    /// How long a new connection may stay silent before its first message.
    pub startup_wait: Duration,
    /// A client idle inside a transaction this long is rolled back on the server and
    /// gets 25P03; zero is off.
    pub idle_in_transaction_timeout: Duration,
    /// A client idle outside a transaction this long is closed; zero is off.
    pub client_idle_timeout: Duration,
    /// Statement shapes whose analysis (and, sharded, shard plan) is cached.
    pub statement_cache_size: usize,
    /// Distinct prepared statement texts remembered across clients; past it the
    /// registry starts over (statements in use stay valid).
    pub max_prepared_statements: usize,
    /// Largest message accepted during authentication (SCRAM messages are small).
    pub max_auth_message_size: usize,
    /// Bytes queued towards a client or a server per session before the proxy stops
    /// reading from the other side (backpressure).
    pub buffer_size: usize,
    /// Transactions that may wait on paused shards at once; more are refused.
    pub max_paused_transactions: usize,
}

/// A role clients log in as; the same name and password are used towards the backends.
#[derive(Debug, Clone)]
pub struct UserConfig {
    pub name: String,
    pub password: String,
}

/// The role used for monitoring, promotion and resharding SQL.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Always one of `Config::users`.
    pub user: String,
}

#[derive(Debug, Clone)]
pub struct RoutingConfig {
    /// A replica further behind than this (in time) gets no reads.
    pub max_replica_lag: Duration,
    /// A replica further behind than this (in WAL bytes) gets no reads.
    pub max_replica_lag_bytes: u64,
    pub read_your_writes: bool,
    pub lag_check_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct FailoverConfig {
    pub auto: bool,
    /// How long a primary must be unreachable before automatic promotion.
    pub after: Duration,
    /// How long a write waits for its shard's new primary while a failover runs,
    /// before it fails with 57P03.
    pub buffer: Duration,
}

/// Online resharding (DESIGN.md section 8).
#[derive(Debug, Clone)]
pub struct ReshardConfig {
    /// Longest time new transactions touching the moving keys are held at cutover.
    pub max_pause: Duration,
    /// The copy counts as caught up (and the cutover may start) when a fence row
    /// written on the source reaches the target within this.
    pub catch_up: Duration,
    /// Rows deleted from the source per statement during clean-up.
    pub delete_batch: usize,
    /// Where job state is kept (so a restart resumes or cleans up); default: next to
    /// the shard map, `<map file>.reshard.json`.
    pub state_file: Option<PathBuf>,
}

impl Default for ReshardConfig {
    fn default() -> Self {
        ReshardConfig {
            max_pause: Duration::from_secs(2),
            catch_up: Duration::from_secs(1),
            delete_batch: 5000,
            state_file: None,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            user: "admin".into(),
            password: None,
        }
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Transaction,
            size: 20,
            acquire_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(10 * 60),
            server_lifetime: Duration::from_secs(60 * 60),
            tcp_keepalive: Duration::from_secs(30),
            tcp_user_timeout: Duration::ZERO,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_client_connections: 1000,
            max_message_size: 64 << 20,
            login_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(30),
            max_unauthenticated: 100,
            startup_wait: Duration::from_secs(5),
            idle_in_transaction_timeout: Duration::from_secs(10 * 60),
            client_idle_timeout: Duration::ZERO,
            statement_cache_size: 4096,
            max_prepared_statements: 10_000,
            max_auth_message_size: 64 << 10,
            buffer_size: 256 << 10,
            max_paused_transactions: 10_000,
        }
    }
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            max_replica_lag: Duration::from_secs(1),
            max_replica_lag_bytes: 16 << 20,
            read_your_writes: true,
            lag_check_interval: Duration::from_millis(250),
        }
    }
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            auto: false,
            after: Duration::from_secs(3),
            buffer: Duration::from_secs(10),
        }
    }
}

/// Used when `listen` is not given: local-only, on PgBouncer's customary port.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 6432));

impl Config {
    /// Reads and validates the file; relative paths inside it are resolved against its
    /// directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_yaml_str(&text, path)
    }

    /// Parses and validates `text` as if it had been read from `source`.
    pub fn from_yaml_str(text: &str, source: &Path) -> Result<Config, ConfigError> {
        build::build(text, source)
            .map_err(|issue| ConfigError::invalid(source.to_path_buf(), issue))
    }

    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }
}
