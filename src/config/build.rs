//! Turns the raw YAML shape into a `Config`: applies defaults, parses units and addresses,
//! resolves paths against the file's directory and checks cross-field rules. The first
//! problem found is reported with the position of the value that caused it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_saphyr::{Options, Spanned};

use super::raw::{
    RawConfig, RawFailover, RawLimits, RawPool, RawReshard, RawRouting, RawTls, RawUser, Text,
};
use super::units::{parse_duration, parse_size};
use super::{
    AdminConfig, Config, ControlConfig, FailoverConfig, LimitsConfig, PoolConfig, PoolMode,
    ReshardConfig, RoutingConfig, TlsConfig, UserConfig, DEFAULT_LISTEN,
};
use crate::shard_map::yaml::{Issue, Position};

/// Smallest accepted `limits.max_message_size`: a startup packet may be up to 10000
/// bytes, so anything below this would refuse ordinary clients.
const MIN_MESSAGE_SIZE: u64 = 16 << 10;

const EMPTY_FILE: &str = "the file is empty; at least `users` and `shard_map` are required";

pub(super) fn build(text: &str, source: &Path) -> Result<Config, Issue> {
    let options = Options {
        with_snippet: false,
        ..Options::default()
    };
    let raw: RawConfig = serde_saphyr::from_str_with_options(text, options)
        .map_err(|err| Issue::from_yaml(&err, text, EMPTY_FILE))?;
    let base = source.parent().unwrap_or(Path::new(""));
    let users = users(&raw.users)?;
    let control = control(raw.control.and_then(|c| c.user).as_ref(), &users)?;
    Ok(Config {
        source: source.to_path_buf(),
        listen: listen(raw.listen.as_ref())?,
        metrics: raw
            .metrics
            .as_ref()
            .map(|m| socket_addr(m, "metrics"))
            .transpose()?,
        admin: admin(raw.admin.unwrap_or_default())?,
        tls: raw.tls.map(|t| tls(&t, base)).transpose()?,
        pool: pool(raw.pool.unwrap_or_default())?,
        limits: limits(raw.limits.unwrap_or_default())?,
        users,
        control,
        routing: routing(raw.routing.unwrap_or_default())?,
        failover: failover(raw.failover.unwrap_or_default())?,
        reshard: reshard(raw.reshard.unwrap_or_default(), base)?,
        shard_map: path(&raw.shard_map, "shard_map", base)?,
    })
}

fn listen(raw: Option<&Text>) -> Result<SocketAddr, Issue> {
    raw.map_or(Ok(DEFAULT_LISTEN), |text| socket_addr(text, "listen"))
}

fn socket_addr(text: &Text, field: &str) -> Result<SocketAddr, Issue> {
    text.value.trim().parse().map_err(|_| {
        let value = &text.value;
        let msg = format!(
            "{field}: invalid address \"{value}\": \
             expected IP:port such as 127.0.0.1:6432 or [::]:6432"
        );
        Issue::at(text, msg)
    })
}

fn non_empty(text: &Text, field: &str) -> Result<String, Issue> {
    if text.value.trim().is_empty() {
        return Err(Issue::at(text, format!("{field}: must not be empty")));
    }
    Ok(text.value.clone())
}

fn path(text: &Text, field: &str, base: &Path) -> Result<PathBuf, Issue> {
    Ok(base.join(non_empty(text, field)?))
}

fn duration(raw: Option<&Text>, field: &str, default: Duration) -> Result<Duration, Issue> {
    let Some(text) = raw else {
        return Ok(default);
    };
    parse_duration(&text.value).map_err(|reason| {
        Issue::at(
            text,
            format!("{field}: invalid duration \"{}\": {reason}", text.value),
        )
    })
}

/// For timeouts and intervals where zero would mean "fail at once" or "spin".
fn positive_duration(
    raw: Option<&Text>,
    field: &str,
    default: Duration,
) -> Result<Duration, Issue> {
    let value = duration(raw, field, default)?;
    match raw {
        Some(text) if value.is_zero() => Err(Issue::at(
            text,
            format!("{field}: must be greater than zero"),
        )),
        _ => Ok(value),
    }
}

fn size(raw: Option<&Text>, field: &str, default: u64) -> Result<u64, Issue> {
    let Some(text) = raw else {
        return Ok(default);
    };
    parse_size(&text.value).map_err(|reason| {
        Issue::at(
            text,
            format!("{field}: invalid size \"{}\": {reason}", text.value),
        )
    })
}

fn at_least_one(raw: Option<Spanned<usize>>, field: &str, default: usize) -> Result<usize, Issue> {
    match raw {
        None => Ok(default),
        Some(n) if n.value == 0 => Err(Issue::at(&n, format!("{field}: must be at least 1"))),
        Some(n) => Ok(n.value),
    }
}

fn admin(raw: super::raw::RawAdmin) -> Result<AdminConfig, Issue> {
    let defaults = AdminConfig::default();
    Ok(AdminConfig {
        user: match &raw.user {
            Some(user) => non_empty(user, "admin.user")?,
            None => defaults.user,
        },
        password: raw.password,
    })
}

fn tls(raw: &RawTls, base: &Path) -> Result<TlsConfig, Issue> {
    Ok(TlsConfig {
        cert: path(&raw.cert, "tls.cert", base)?,
        key: path(&raw.key, "tls.key", base)?,
    })
}

fn pool(raw: RawPool) -> Result<PoolConfig, Issue> {
    let d = PoolConfig::default();
    let mode = match &raw.mode {
        None => d.mode,
        Some(text) => match text.value.as_str() {
            "transaction" => PoolMode::Transaction,
            "session" => PoolMode::Session,
            other => {
                return Err(Issue::at(
                    text,
                    format!("pool.mode: unknown mode \"{other}\", expected transaction or session"),
                ))
            }
        },
    };
    Ok(PoolConfig {
        mode,
        size: at_least_one(raw.size, "pool.size", d.size)?,
        acquire_timeout: positive_duration(
            raw.acquire_timeout.as_ref(),
            "pool.acquire_timeout",
            d.acquire_timeout,
        )?,
        connect_timeout: positive_duration(
            raw.connect_timeout.as_ref(),
            "pool.connect_timeout",
            d.connect_timeout,
        )?,
        idle_timeout: positive_duration(
            raw.idle_timeout.as_ref(),
            "pool.idle_timeout",
            d.idle_timeout,
        )?,
        server_lifetime: positive_duration(
            raw.server_lifetime.as_ref(),
            "pool.server_lifetime",
            d.server_lifetime,
        )?,
        tcp_keepalive: duration(
            raw.tcp_keepalive.as_ref(),
            "pool.tcp_keepalive",
            d.tcp_keepalive,
        )?,
        tcp_user_timeout: duration(
            raw.tcp_user_timeout.as_ref(),
            "pool.tcp_user_timeout",
            d.tcp_user_timeout,
        )?,
    })
}

fn limits(raw: RawLimits) -> Result<LimitsConfig, Issue> {
    let d = LimitsConfig::default();
    let field = "limits.max_message_size";
    let max_message_size = size(
        raw.max_message_size.as_ref(),
        field,
        d.max_message_size as u64,
    )?;
    let max_message_size = match &raw.max_message_size {
        Some(text) if max_message_size < MIN_MESSAGE_SIZE => {
            return Err(Issue::at(text, format!("{field}: must be at least 16kB")))
        }
        Some(text) => usize::try_from(max_message_size)
            .map_err(|_| Issue::at(text, format!("{field}: too large for this platform")))?,
        None => d.max_message_size,
    };
    Ok(LimitsConfig {
        max_client_connections: at_least_one(
            raw.max_client_connections,
            "limits.max_client_connections",
            d.max_client_connections,
        )?,
        max_message_size,
        login_timeout: positive_duration(
            raw.login_timeout.as_ref(),
            "limits.login_timeout",
            d.login_timeout,
        )?,
        // Zero is meaningful here: close at once without waiting for transactions.
        shutdown_grace: duration(
            raw.shutdown_grace.as_ref(),
            "limits.shutdown_grace",
            d.shutdown_grace,
        )?,
        max_unauthenticated: at_least_one(
            raw.max_unauthenticated,
            "limits.max_unauthenticated",
            d.max_unauthenticated,
        )?,
        startup_wait: positive_duration(
            raw.startup_wait.as_ref(),
            "limits.startup_wait",
            d.startup_wait,
        )?,
        // Zero turns these two off.
        idle_in_transaction_timeout: duration(
            raw.idle_in_transaction_timeout.as_ref(),
            "limits.idle_in_transaction_timeout",
            d.idle_in_transaction_timeout,
        )?,
        client_idle_timeout: duration(
            raw.client_idle_timeout.as_ref(),
            "limits.client_idle_timeout",
            d.client_idle_timeout,
        )?,
        statement_cache_size: at_least_one(
            raw.statement_cache_size,
            "limits.statement_cache_size",
            d.statement_cache_size,
        )?,
        max_prepared_statements: at_least_one(
            raw.max_prepared_statements,
            "limits.max_prepared_statements",
            d.max_prepared_statements,
        )?,
        max_auth_message_size: bounded_size(
            raw.max_auth_message_size.as_ref(),
            "limits.max_auth_message_size",
            d.max_auth_message_size,
            1 << 10,
        )?,
        buffer_size: bounded_size(
            raw.buffer_size.as_ref(),
            "limits.buffer_size",
            d.buffer_size,
            16 << 10,
        )?,
        max_paused_transactions: at_least_one(
            raw.max_paused_transactions,
            "limits.max_paused_transactions",
            d.max_paused_transactions,
        )?,
    })
}

/// A size with a lower bound, as a usize.
fn bounded_size(raw: Option<&Text>, field: &str, default: usize, min: u64) -> Result<usize, Issue> {
    let Some(text) = raw else {
        return Ok(default);
    };
    let value = size(Some(text), field, default as u64)?;
    if value < min {
        return Err(Issue::at(
            text,
            format!("{field}: must be at least {min} bytes"),
        ));
    }
    usize::try_from(value)
        .map_err(|_| Issue::at(text, format!("{field}: too large for this platform")))
}

fn reshard(raw: RawReshard, base: &Path) -> Result<ReshardConfig, Issue> {
    let d = ReshardConfig::default();
    Ok(ReshardConfig {
        max_pause: positive_duration(raw.max_pause.as_ref(), "reshard.max_pause", d.max_pause)?,
        catch_up: positive_duration(raw.catch_up.as_ref(), "reshard.catch_up", d.catch_up)?,
        delete_batch: at_least_one(raw.delete_batch, "reshard.delete_batch", d.delete_batch)?,
        state_file: raw
            .state_file
            .as_ref()
            .map(|t| path(t, "reshard.state_file", base))
            .transpose()?,
    })
}

fn users(raw: &Spanned<Vec<Spanned<RawUser>>>) -> Result<Vec<UserConfig>, Issue> {
    if raw.value.is_empty() {
        return Err(Issue::at(raw, "users: at least one user is required"));
    }
    let mut users = Vec::with_capacity(raw.value.len());
    for (i, entry) in raw.value.iter().enumerate() {
        let name = non_empty(&entry.value.name, "users.name")?;
        let password = non_empty(&entry.value.password, "users.password")?;
        let earlier = raw.value[..i].iter().find(|e| e.value.name.value == name);
        if let Some(first) = earlier {
            let first = Position::of(&first.value.name)
                .map_or(String::new(), |p| format!(" (first at line {})", p.line));
            return Err(Issue::at(
                &entry.value.name,
                format!("users: user \"{name}\" is listed twice{first}"),
            ));
        }
        users.push(UserConfig { name, password });
    }
    Ok(users)
}

fn control(raw: Option<&Text>, users: &[UserConfig]) -> Result<ControlConfig, Issue> {
    let Some(text) = raw else {
        // `users` is never empty here, so the documented default always exists.
        let user = users.first().map(|u| u.name.clone()).unwrap_or_default();
        return Ok(ControlConfig { user });
    };
    if users.iter().any(|u| u.name == text.value) {
        return Ok(ControlConfig {
            user: text.value.clone(),
        });
    }
    let known: Vec<&str> = users.iter().map(|u| u.name.as_str()).collect();
    Err(Issue::at(
        text,
        format!(
            "control.user: \"{}\" is not one of the users ({})",
            text.value,
            known.join(", ")
        ),
    ))
}

fn routing(raw: RawRouting) -> Result<RoutingConfig, Issue> {
    let d = RoutingConfig::default();
    Ok(RoutingConfig {
        // Zero is meaningful: only replicas that have replayed everything get reads.
        max_replica_lag: duration(
            raw.max_replica_lag.as_ref(),
            "routing.max_replica_lag",
            d.max_replica_lag,
        )?,
        max_replica_lag_bytes: size(
            raw.max_replica_lag_bytes.as_ref(),
            "routing.max_replica_lag_bytes",
            d.max_replica_lag_bytes,
        )?,
        read_your_writes: raw.read_your_writes.unwrap_or(d.read_your_writes),
        lag_check_interval: positive_duration(
            raw.lag_check_interval.as_ref(),
            "routing.lag_check_interval",
            d.lag_check_interval,
        )?,
    })
}

fn failover(raw: RawFailover) -> Result<FailoverConfig, Issue> {
    let d = FailoverConfig::default();
    Ok(FailoverConfig {
        auto: raw.auto.unwrap_or(d.auto),
        // Zero would promote on the first missed health check, i.e. on any network blip.
        after: positive_duration(raw.after.as_ref(), "failover.after", d.after)?,
        buffer: positive_duration(raw.buffer.as_ref(), "failover.buffer", d.buffer)?,
    })
}
