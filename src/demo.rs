//! `shardgate demo`: a real local cluster (a primary and a streaming replica, started
//! from the machine's PostgreSQL binaries in a temp dir), a config written for it, and
//! the proxy in front. Ctrl-C stops the proxy and the cluster and removes the temp dir.

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

pub fn run() -> Result<(), DemoError> {
    eprintln!("shardgate demo: starting PostgreSQL (primary + streaming replica)...");
    let mut cluster = LocalCluster::start(&ClusterOptions {
        replicas: 1,
        database: DATABASE.into(),
        app_user: USER.into(),
        app_password: PASSWORD.into(),
        extra_conf: Vec::new(),
    })?;
    let result = serve(&cluster);
    eprintln!(
        "shardgate demo: stopping the cluster and removing {}",
        cluster.dir().display()
    );
    cluster.stop();
    result
}

fn serve(cluster: &LocalCluster) -> Result<(), DemoError> {
    let port = if StdListener::bind("127.0.0.1:6432").is_ok() {
        6432
    } else {
        crate::local_cluster::free_port()
    };
    let (config, map) = write_config(cluster, cluster.dir(), port)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let handle = crate::app::start(&config, &map).await?;
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

/// Writes shardgate.yaml and the shard map into the cluster's dir and loads them
/// through the same code path as a user's files.
fn write_config(
    cluster: &LocalCluster,
    dir: &Path,
    port: u16,
) -> Result<(Config, ShardMap), DemoError> {
    let primary = cluster.primary();
    let replicas: Vec<String> = cluster
        .replicas()
        .iter()
        .map(|r| format!("{}:{}", r.host, r.port))
        .collect();
    let map_text = format!(
        "version: 1\ndatabase: {DATABASE}\nshards:\n  s0: {{ primary: \"{}:{}\", replicas: [{}] }}\ndefault_shard: s0\n",
        primary.host,
        primary.port,
        replicas.iter().map(|r| format!("\"{r}\"")).collect::<Vec<_>>().join(", ")
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
