//! The reshard job's side of the servers: control connections (the `control` role,
//! which needs superuser or replication and subscription rights), small query helpers,
//! and the schema copy through `pg_dump --schema-only`.

use std::time::Duration;

use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use crate::control::monitor::MonitorNode;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{node}: {message}")]
pub struct ServerError {
    pub node: String,
    pub message: String,
}

/// A control connection to one node.
pub struct Node {
    pub spec: MonitorNode,
    pub client: Client,
}

pub fn addr(node: &MonitorNode) -> String {
    format!("{}:{}", node.host, node.port)
}

pub async fn connect(spec: &MonitorNode, timeout: Duration) -> Result<Node, ServerError> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(&spec.host)
        .port(spec.port)
        .user(&spec.user)
        .dbname(&spec.database)
        .application_name("shardgate-reshard")
        .connect_timeout(timeout);
    if let Some(password) = &spec.password {
        config.password(password);
    }
    let error = |message: String| ServerError {
        node: addr(spec),
        message,
    };
    let (client, connection) = tokio::time::timeout(timeout, config.connect(NoTls))
        .await
        .map_err(|_| error(format!("no connection within {timeout:?}")))?
        .map_err(|e| error(describe(&e)))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(Node {
        spec: spec.clone(),
        client,
    })
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

impl Node {
    pub fn addr(&self) -> String {
        addr(&self.spec)
    }

    fn error(&self, e: &tokio_postgres::Error) -> ServerError {
        ServerError {
            node: self.addr(),
            message: describe(e),
        }
    }

    /// Runs statements (simple protocol, several allowed).
    pub async fn exec(&self, sql: &str) -> Result<(), ServerError> {
        tracing::debug!(node = %self.addr(), sql, "reshard");
        self.client
            .batch_execute(sql)
            .await
            .map_err(|e| self.error(&e))
    }

    /// All rows of a query, as text (NULL as None).
    pub async fn rows(&self, sql: &str) -> Result<Vec<Vec<Option<String>>>, ServerError> {
        let messages = self
            .client
            .simple_query(sql)
            .await
            .map_err(|e| self.error(&e))?;
        Ok(messages
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some(
                    (0..row.len())
                        .map(|i| row.get(i).map(str::to_owned))
                        .collect(),
                ),
                _ => None,
            })
            .collect())
    }

    /// The first column of the first row.
    pub async fn scalar(&self, sql: &str) -> Result<Option<String>, ServerError> {
        Ok(self
            .rows(sql)
            .await?
            .into_iter()
            .next()
            .and_then(|mut r| r.drain(..).next().flatten()))
    }

    pub async fn int(&self, sql: &str) -> Result<i64, ServerError> {
        let text = self.scalar(sql).await?;
        text.as_deref()
            .unwrap_or("0")
            .parse()
            .map_err(|_| ServerError {
                node: self.addr(),
                message: format!("expected a number from {sql:?}, got {text:?}"),
            })
    }

    pub async fn lsn(&self) -> Result<u64, ServerError> {
        let text = self
            .scalar("SELECT pg_current_wal_lsn()::text")
            .await?
            .unwrap_or_default();
        crate::topology::parse_lsn(&text).ok_or_else(|| ServerError {
            node: self.addr(),
            message: format!("unreadable WAL position {text:?}"),
        })
    }

    /// A libpq connection string by which another server reaches this node.
    pub fn conninfo(&self) -> String {
        let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
        let mut out = format!(
            "host={} port={} user={} dbname={}",
            quote(&self.spec.host),
            self.spec.port,
            quote(&self.spec.user),
            quote(&self.spec.database)
        );
        if let Some(password) = &self.spec.password {
            out.push_str(&format!(" password={}", quote(password)));
        }
        out
    }
}

/// The schema of `tables` on `from`, as SQL that creates them (tables, their indexes,
/// constraints and owned sequences), from `pg_dump --schema-only`.
pub async fn dump_schema(from: &MonitorNode, tables: &[String]) -> Result<String, ServerError> {
    let error = |message: String| ServerError {
        node: addr(from),
        message,
    };
    let program = find_pg_dump().ok_or_else(|| {
        error("pg_dump not found (PATH or /usr/lib/postgresql/*/bin); install the PostgreSQL client tools to reshard to a shard without the schema".into())
    })?;
    let mut cmd = tokio::process::Command::new(program);
    // Owners and grants come along: clients use the same roles on every shard.
    cmd.args(["--schema-only", "--no-publications", "--no-subscriptions"])
        .args(["-h", &from.host, "-p", &from.port.to_string()])
        .args(["-U", &from.user, "-d", &from.database]);
    for table in tables {
        cmd.args(["-t", table]);
    }
    if let Some(password) = &from.password {
        cmd.env("PGPASSWORD", password);
    }
    cmd.kill_on_drop(true);
    let output = cmd
        .output()
        .await
        .map_err(|e| error(format!("pg_dump: {e}")))?;
    if !output.status.success() {
        return Err(error(format!(
            "pg_dump failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    // psql meta-commands (`\restrict` in newer dumps) mean nothing to a server.
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('\\'))
        .collect::<Vec<_>>()
        .join("\n"))
}

fn find_pg_dump() -> Option<std::path::PathBuf> {
    let in_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("pg_dump"))
            .find(|p| p.is_file())
    });
    in_path.or_else(|| {
        let mut found: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin/pg_dump"))
            .filter(|p| p.is_file())
            .collect();
        // The newest major version dumps every older server.
        found.sort_by_key(|p| {
            p.components()
                .nth(4)
                .and_then(|c| c.as_os_str().to_str()?.parse::<u32>().ok())
        });
        found.pop()
    })
}
