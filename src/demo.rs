//! `shardgate demo`: two real local shards (each a primary and a streaming replica,
//! started from the machine's PostgreSQL binaries in temp dirs), a config and shard map
//! written for them, the proxy in front, and a sample schema with seed data created
//! through the proxy. Ctrl-C stops the proxy and the clusters and removes the temp dirs.

use std::net::TcpListener as StdListener;
use std::path::Path;

use crate::config::Config;
use crate::local_cluster::{ClusterOptions, LocalCluster};
use crate::shard_map::ShardMap;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("starting the local cluster: {0}")]
    Cluster(#[from] crate::local_cluster::ClusterError),
    #[error("writing the demo config: {0}")]
    Io(#[from] std::io::Error),
    #[error("demo config: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("demo shard map: {0}")]
    Map(#[from] crate::shard_map::ShardMapError),
    #[error("proxy: {0}")]
    App(#[from] crate::app::AppError),
}

const USER: &str = "app";
const PASSWORD: &str = "app-secret";
const DATABASE: &str = "app";

fn shard_options() -> ClusterOptions {
    ClusterOptions {
        replicas: 1,
        database: DATABASE.into(),
        app_user: USER.into(),
        app_password: PASSWORD.into(),
        extra_conf: Vec::new(),
    }
}

/// Once its replica streams, each shard's primary waits for the replica to *apply* a
/// commit before the commit returns, so a read in a new session right after a write
/// sees it on the replica too (plain `synchronous_commit = on` only waits for the
/// replica to flush, not to replay). Set after start: with it set during setup, the
/// primary would wait for a standby that does not exist yet.
async fn make_replication_synchronous(
    clusters: &[LocalCluster],
) -> Result<(), tokio_postgres::Error> {
    for cluster in clusters {
        let primary = cluster.primary();
        let dsn = format!(
            "host={} port={} user={} dbname=postgres",
            primary.host,
            primary.port,
            cluster.superuser()
        );
        let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        for sql in [
            "ALTER SYSTEM SET synchronous_standby_names = '*'",
            "ALTER SYSTEM SET synchronous_commit = 'remote_apply'",
            "SELECT pg_reload_conf()",
        ] {
            client.batch_execute(sql).await?;
        }
    }
    Ok(())
}

pub fn run() -> Result<(), DemoError> {
    eprintln!("shardgate demo: starting 2 shards (each a primary + a streaming replica)...");
    let other = std::thread::spawn(|| LocalCluster::start(&shard_options()));
    let first = LocalCluster::start(&shard_options());
    let second = other.join().unwrap_or_else(|_| {
        Err(crate::local_cluster::ClusterError::Io {
            what: "starting the second shard".into(),
            source: std::io::Error::other("the starting thread panicked"),
        })
    });
    let mut clusters = Vec::new();
    let mut failure = None;
    for started in [first, second] {
        match started {
            Ok(cluster) => clusters.push(cluster),
            Err(error) => failure = Some(error),
        }
    }
    let result = match failure {
        Some(error) => Err(error.into()),
        None => serve(&clusters),
    };
    for cluster in &mut clusters {
        eprintln!(
            "shardgate demo: stopping a shard and removing {}",
            cluster.dir().display()
        );
        cluster.stop();
    }
    result
}

fn serve(clusters: &[LocalCluster]) -> Result<(), DemoError> {
    let port = if StdListener::bind("127.0.0.1:6432").is_ok() {
        6432
    } else {
        crate::local_cluster::free_port()
    };
    let (config, map) = write_config(clusters, clusters[0].dir(), port)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        if let Err(error) = make_replication_synchronous(clusters).await {
            eprintln!(
                "shardgate demo: making replication synchronous failed: {}",
                db_message(&error)
            );
        }
        let handle = crate::app::start(&config, &map).await?;
        if let Err(error) = seed(port).await {
            eprintln!(
                "shardgate demo: creating the sample schema failed: {}",
                db_message(&error)
            );
        }
        println!();
        println!("shardgate is running. Connect with:");
        println!("  psql \"postgres://{USER}:{PASSWORD}@127.0.0.1:{port}/{DATABASE}\"");
        println!(
            "Config: {}   Ctrl-C stops everything.",
            config.source.display()
        );
        wait_for_stop_signal().await;
        handle.shutdown();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), handle.wait()).await;
        Ok(())
    })
}

/// `{ primary: "host:port", replicas: [...] }` for one cluster.
fn shard_entry(cluster: &LocalCluster) -> String {
    let primary = cluster.primary();
    let replicas: Vec<String> = cluster
        .replicas()
        .iter()
        .map(|r| format!("\"{}:{}\"", r.host, r.port))
        .collect();
    format!(
        "{{ primary: \"{}:{}\", replicas: [{}] }}",
        primary.host,
        primary.port,
        replicas.join(", ")
    )
}

/// Writes shardgate.yaml and the shard map into the first shard's dir and loads them
/// through the same code path as a user's files.
fn write_config(
    clusters: &[LocalCluster],
    dir: &Path,
    port: u16,
) -> Result<(Config, ShardMap), DemoError> {
    let map_text = format!(
        "version: 1
database: {DATABASE}
shards:
  s0: {}
  s1: {}
keyspaces:
  users:
    type: hash
    buckets: 1024
    map:
      - {{ buckets: 0-511, shard: s0 }}
      - {{ buckets: 512-1023, shard: s1 }}
  months:
    type: time
    map:
      - {{ until: 2026-01-01T00:00:00Z, shard: s0 }}
      - {{ from: 2026-01-01T00:00:00Z, shard: s1 }}
tables:
  users: {{ column: id, keyspace: users }}
  orders: {{ column: user_id, keyspace: users }}
  events: {{ column: created_at, keyspace: months }}
  countries: {{ reference: true }}
default_shard: s0
",
        shard_entry(&clusters[0]),
        shard_entry(&clusters[1]),
    );
    let config_text = format!(
        "listen: 127.0.0.1:{port}\npool: {{ mode: transaction, size: 20 }}\nusers:\n  - {{ name: {USER}, password: {PASSWORD} }}\nshard_map: shard-map.yaml\n"
    );
    let map_path = dir.join("shard-map.yaml");
    let config_path = dir.join("shardgate.yaml");
    std::fs::write(&map_path, map_text)?;
    std::fs::write(&config_path, config_text)?;
    let config = Config::load(&config_path)?;
    let map = ShardMap::load(&config.shard_map)?;
    Ok((config, map))
}

/// The sample schema and seed data, created through the proxy like a user would.
const SCHEMA: &str = "
CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL);
CREATE TABLE orders (id bigserial, user_id bigint NOT NULL, total numeric(10,2), PRIMARY KEY (user_id, id));
CREATE TABLE events (id bigserial, created_at timestamptz NOT NULL, what text);
CREATE TABLE countries (code text PRIMARY KEY, name text NOT NULL);
";

async fn seed(port: u16) -> Result<(), tokio_postgres::Error> {
    let dsn =
        format!("host=127.0.0.1 port={port} user={USER} password={PASSWORD} dbname={DATABASE}");
    let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client.batch_execute(SCHEMA).await?;
    let users: Vec<String> = (1..=100).map(|id| format!("({id}, 'user {id}')")).collect();
    client
        .batch_execute(&format!(
            "INSERT INTO users (id, name) VALUES {}",
            users.join(", ")
        ))
        .await?;
    let orders: Vec<String> = (1..=100)
        .map(|id| format!("({}, {}.50)", (id % 100) + 1, id * 3))
        .collect();
    client
        .batch_execute(&format!(
            "INSERT INTO orders (user_id, total) VALUES {}",
            orders.join(", ")
        ))
        .await?;
    // One statement per text: statements of one text must share a shard.
    client
        .batch_execute(
            "INSERT INTO events (created_at, what) VALUES ('2025-11-20', 'signup'), ('2025-12-24', 'order'), ('2026-01-15', 'refund'), ('2026-02-02', 'signup')",
        )
        .await?;
    client
        .batch_execute("INSERT INTO countries (code, name) VALUES ('fr', 'France'), ('de', 'Germany'), ('jp', 'Japan')")
        .await?;
    println!();
    println!("Sample schema (created through the proxy): users and orders hashed by user id");
    println!("(buckets 0-511 on s0, 512-1023 on s1), events by month (before 2026 on s0),");
    println!("countries copied to both shards. Try:");
    println!("  SELECT * FROM users WHERE id = 42;              -- one shard (its key)");
    println!("  SELECT count(*) FROM users;                     -- both shards, merged");
    println!("  SELECT * FROM orders ORDER BY total DESC LIMIT 3;  -- merged by sort key");
    println!("  SELECT * FROM events WHERE created_at >= '2026-01-01';  -- shard s1 only");
    println!("  INSERT INTO countries (code, name) VALUES ('it', 'Italy');  -- both shards");
    println!("  UPDATE users SET name = 'x';                    -- refused: no key (0A000)");
    Ok(())
}

/// Ctrl-C (SIGINT) or SIGTERM: either way the cluster must be cleaned up.
async fn wait_for_stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The server's own message when there is one (`Display` of the error says only "db error").
fn db_message(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => error.to_string(),
    }
}
