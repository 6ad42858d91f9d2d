//! The shape of `shardgate.yaml` exactly as written, before defaults and validation.
//!
//! Values that need checking after parsing (durations, sizes, addresses, names) are kept
//! as `Spanned` strings so a validation error can still point at their line and column.
//! Every struct denies unknown fields: a misspelt key must fail loudly, never be ignored.

use serde::Deserialize;
use serde_saphyr::Spanned;

pub(crate) type Text = Spanned<String>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub listen: Option<Text>,
    pub metrics: Option<Text>,
    pub admin: Option<RawAdmin>,
    pub tls: Option<RawTls>,
    pub pool: Option<RawPool>,
    pub limits: Option<RawLimits>,
    pub users: Spanned<Vec<Spanned<RawUser>>>,
    pub control: Option<RawControl>,
    pub routing: Option<RawRouting>,
    pub failover: Option<RawFailover>,
    pub reshard: Option<RawReshard>,
    pub shard_map: Text,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    pub user: Option<Text>,
    pub password: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    pub cert: Text,
    pub key: Text,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPool {
    pub mode: Option<Text>,
    pub size: Option<Spanned<usize>>,
    pub acquire_timeout: Option<Text>,
    pub connect_timeout: Option<Text>,
    pub idle_timeout: Option<Text>,
    pub server_lifetime: Option<Text>,
    pub tcp_keepalive: Option<Text>,
    pub tcp_user_timeout: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub max_client_connections: Option<Spanned<usize>>,
    pub max_message_size: Option<Text>,
    pub login_timeout: Option<Text>,
    pub shutdown_grace: Option<Text>,
    pub max_unauthenticated: Option<Spanned<usize>>,
    pub startup_wait: Option<Text>,
    pub idle_in_transaction_timeout: Option<Text>,
    pub client_idle_timeout: Option<Text>,
    pub statement_cache_size: Option<Spanned<usize>>,
    pub max_prepared_statements: Option<Spanned<usize>>,
    pub max_auth_message_size: Option<Text>,
    pub buffer_size: Option<Text>,
    pub max_paused_transactions: Option<Spanned<usize>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUser {
    pub name: Text,
    pub password: Text,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawControl {
    pub user: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRouting {
    pub max_replica_lag: Option<Text>,
    pub max_replica_lag_bytes: Option<Text>,
    pub read_your_writes: Option<bool>,
    pub lag_check_interval: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFailover {
    pub auto: Option<bool>,
    pub after: Option<Text>,
    pub buffer: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawReshard {
    pub max_pause: Option<Text>,
    pub catch_up: Option<Text>,
    pub delete_batch: Option<Spanned<usize>>,
    pub state_file: Option<Text>,
}
