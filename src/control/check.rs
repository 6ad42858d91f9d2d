//! `shardgate check` against the servers: for each shard's primary, whether the
//! control role can do what promotion and resharding need. Read-only: it only asks.

use std::time::Duration;

use tokio_postgres::{NoTls, SimpleQueryMessage};

use crate::config::Config;
use crate::shard_map::ShardMap;

/// One finding about one node, for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub shard: String,
    pub node: String,
    /// None when all is well.
    pub warning: Option<String>,
}

/// Asks every shard's primary for `wal_level` and whether the control role is a
/// superuser (publications, subscriptions, slots, `pg_dump` and `pg_promote` need it).
pub async fn check_nodes(config: &Config, map: &ShardMap, timeout: Duration) -> Vec<Finding> {
    let mut out = Vec::new();
    for (name, spec) in &map.shards {
        let Some(node) = crate::app::monitor_nodes(config, map, spec)
            .into_iter()
            .next()
        else {
            continue;
        };
        let addr = format!("{}:{}", node.host, node.port);
        let warning = match probe(&node, timeout).await {
            Err(error) => Some(format!("not reachable as {}: {error}", node.user)),
            Ok((wal_level, superuser)) => {
                let mut problems = Vec::new();
                if wal_level != "logical" {
                    problems.push(format!(
                        "wal_level is {wal_level}: online resharding needs wal_level = logical (restart required)"
                    ));
                }
                if superuser != "on" {
                    problems.push(format!(
                        "control role {} is not a superuser: promotion and resharding need it (or equivalent grants)",
                        node.user
                    ));
                }
                (!problems.is_empty()).then(|| problems.join("; "))
            }
        };
        out.push(Finding {
            shard: name.clone(),
            node: addr,
            warning,
        });
    }
    out
}

async fn probe(
    node: &crate::control::monitor::MonitorNode,
    timeout: Duration,
) -> Result<(String, String), String> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(&node.host)
        .port(node.port)
        .user(&node.user)
        .dbname(&node.database)
        .application_name("shardgate-check")
        .connect_timeout(timeout);
    if let Some(password) = &node.password {
        config.password(password);
    }
    let (client, connection) = tokio::time::timeout(timeout, config.connect(NoTls))
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let rows = client
        .simple_query("SELECT current_setting('wal_level'), current_setting('is_superuser')")
        .await
        .map_err(|e| e.to_string())?;
    rows.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some((
                row.get(0).unwrap_or_default().to_owned(),
                row.get(1).unwrap_or_default().to_owned(),
            )),
            _ => None,
        })
        .ok_or_else(|| "no answer".to_owned())
}
