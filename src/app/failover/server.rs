//! The SQL steps of a promotion, against the servers themselves: connecting as the
//! control user, the split-brain check, quiescing an old primary for a switchover,
//! choosing the most advanced replica, and re-pointing the others (failover.rs runs
//! them in order).

use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use super::{addr, FOLLOW_TIMEOUT};
use crate::control::monitor::MonitorNode;
use crate::topology::parse_lsn;

pub(super) async fn connect(node: &MonitorNode, timeout: Duration) -> Option<Client> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(&node.host)
        .port(node.port)
        .user(&node.user)
        .dbname(&node.database)
        .application_name("shardgate-failover")
        .connect_timeout(timeout);
    if let Some(password) = &node.password {
        config.password(password);
    }
    let (client, connection) = tokio::time::timeout(timeout, config.connect(NoTls))
        .await
        .ok()?
        .ok()?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Some(client)
}

/// A connection to `node` if it is up and not in recovery.
pub(super) async fn writable(node: &MonitorNode, timeout: Duration) -> Option<Client> {
    let client = connect(node, timeout).await?;
    let in_recovery =
        tokio::time::timeout(timeout, scalar(&client, "SELECT pg_is_in_recovery()::text"))
            .await
            .ok()
            .flatten();
    (in_recovery.as_deref() == Some("false")).then_some(client)
}

pub(super) async fn run(client: &Client, sql: &str) -> Result<(), String> {
    client
        .batch_execute(sql)
        .await
        .map_err(|e| match e.as_db_error() {
            Some(db) => db.message().to_owned(),
            None => e.to_string(),
        })
}

pub(super) async fn scalar(client: &Client, sql: &str) -> Option<String> {
    let messages = client.simple_query(sql).await.ok()?;
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
        _ => None,
    })
}

/// Makes the old primary refuse new writes and ends its client sessions; returns its
/// WAL position after that, which the candidate must reach.
pub(super) async fn quiesce(primary: &Client) -> Result<u64, String> {
    run(
        primary,
        "ALTER SYSTEM SET default_transaction_read_only = on",
    )
    .await?;
    run(primary, "SELECT pg_reload_conf()").await?;
    run(
        primary,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() \
         AND application_name NOT LIKE 'shardgate-%'",
    )
    .await?;
    let lsn = scalar(primary, "SELECT pg_current_wal_lsn()::text").await;
    lsn.as_deref()
        .and_then(parse_lsn)
        .ok_or_else(|| "cannot read the WAL position".into())
}

/// Waits until some candidate has replayed `target`.
pub(super) async fn wait_replayed(
    candidates: &[MonitorNode],
    target: u64,
    timeout: Duration,
) -> bool {
    let deadline = Instant::now() + FOLLOW_TIMEOUT;
    while Instant::now() < deadline {
        for node in candidates {
            if let Some(client) = connect(node, timeout).await {
                let replayed = scalar(&client, "SELECT pg_last_wal_replay_lsn()::text").await;
                if replayed
                    .as_deref()
                    .and_then(parse_lsn)
                    .is_some_and(|l| l >= target)
                {
                    return true;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// The replica to promote: `wanted` (host:port) or the one that received the most WAL.
pub(super) async fn choose(
    replicas: &[MonitorNode],
    wanted: Option<&str>,
    timeout: Duration,
) -> Result<(usize, Client), String> {
    let mut best: Option<(u64, u64, usize, Client)> = None;
    let mut seen = Vec::new();
    for (i, node) in replicas.iter().enumerate() {
        if wanted.is_some_and(|w| w != addr(node)) {
            continue;
        }
        let Some(client) = connect(node, timeout).await else {
            seen.push(format!("{} unreachable", addr(node)));
            continue;
        };
        let sql = "SELECT pg_is_in_recovery()::text, coalesce(pg_last_wal_receive_lsn(), '0/0')::text, coalesce(pg_last_wal_replay_lsn(), '0/0')::text";
        let row = client.simple_query(sql).await.ok().and_then(|messages| {
            messages.into_iter().find_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some((
                    row.get(0).map(str::to_owned),
                    row.get(1).and_then(parse_lsn),
                    row.get(2).and_then(parse_lsn),
                )),
                _ => None,
            })
        });
        let Some((Some(in_recovery), Some(received), Some(replayed))) = row else {
            seen.push(format!("{} did not answer", addr(node)));
            continue;
        };
        if in_recovery != "true" {
            seen.push(format!("{} is not a replica", addr(node)));
            continue;
        }
        let key = (received.max(replayed), replayed);
        if best.as_ref().is_none_or(|(r, p, _, _)| key > (*r, *p)) {
            best = Some((key.0, key.1, i, client));
        }
    }
    match best {
        Some((_, _, i, client)) => Ok((i, client)),
        None if seen.is_empty() => Err(match wanted {
            Some(w) => format!("{w} is not a replica of this shard"),
            None => "the shard has no replicas".into(),
        }),
        None => Err(seen.join(", ")),
    }
}

/// Points the other replicas at the new primary; returns (following, not following).
pub(super) async fn repoint(
    replicas: &[&MonitorNode],
    primary: &MonitorNode,
    timeout: Duration,
) -> (Vec<String>, Vec<String>) {
    let mut following = Vec::new();
    let mut not_following = Vec::new();
    for node in replicas {
        let done = async {
            let client = connect(node, timeout).await.ok_or("unreachable")?;
            let current = scalar(&client, "SHOW primary_conninfo").await.unwrap_or_default();
            let conninfo = with_host_port(&current, &primary.host, primary.port);
            let quoted = crate::backend::params::quote_literal(&conninfo);
            run(&client, &format!("ALTER SYSTEM SET primary_conninfo = {quoted}"))
                .await
                .map_err(|_| "ALTER SYSTEM failed")?;
            run(&client, "SELECT pg_reload_conf()").await.map_err(|_| "reload failed")?;
            let deadline = Instant::now() + FOLLOW_TIMEOUT;
            let check = format!(
                "SELECT count(*)::text FROM pg_stat_wal_receiver WHERE status = 'streaming' AND sender_port = {}",
                primary.port
            );
            while Instant::now() < deadline {
                if scalar(&client, &check).await.as_deref() == Some("1") {
                    return Ok::<(), &str>(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err("not streaming from the new primary")
        }
        .await;
        match done {
            Ok(()) => following.push(addr(node)),
            Err(why) => {
                tracing::warn!(replica = %addr(node), why, "replica does not follow the new primary");
                not_following.push(addr(node));
            }
        }
    }
    (following, not_following)
}

/// `conninfo` (libpq key=value form) with host and port replaced.
pub(super) fn with_host_port(conninfo: &str, host: &str, port: u16) -> String {
    let mut parts: Vec<String> = conninfo
        .split_whitespace()
        .filter(|kv| {
            !kv.starts_with("host=") && !kv.starts_with("port=") && !kv.starts_with("hostaddr=")
        })
        .map(str::to_owned)
        .collect();
    parts.push(format!("host={host}"));
    parts.push(format!("port={port}"));
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_gets_the_new_host_and_port() {
        let old = "user=replicator passfile='/x' channel_binding=prefer host=127.0.0.1 port=5432 sslmode=prefer";
        assert_eq!(
            with_host_port(old, "10.0.0.2", 5433),
            "user=replicator passfile='/x' channel_binding=prefer sslmode=prefer host=10.0.0.2 port=5433"
        );
    }
}
