//! Harness shared by the integration tests: the PostgreSQL cluster they run against and
//! small async helpers.
//!
//! By default each test binary starts one real local cluster (a primary and two streaming
//! replicas, see `shardgate::local_cluster`) the first time a test asks for it. With
//! `SHARDGATE_TEST_PRIMARY=host:port` set, tests use that server instead (e.g. the docker
//! compose cluster), together with:
//! - `SHARDGATE_TEST_REPLICAS=host:port,host:port` (default: none)
//! - `SHARDGATE_TEST_SUPERUSER_DSN` (default `host=<primary> port=<port> user=postgres dbname=postgres`)
//! - `SHARDGATE_TEST_APP_USER` / `_APP_PASSWORD` / `_DATABASE` (default `app` / `app-secret` / `app`)
#![allow(dead_code)] // not every test binary uses every helper

pub mod proxy;
pub mod raw;
pub mod sharded;
pub mod tls;

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use shardgate::local_cluster::{ClusterOptions, LocalCluster};

pub const DATABASE: &str = "app";
pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "app-secret";

/// The cluster a test talks to. Addresses are `(host, port)`.
pub struct TestCluster {
    pub primary: (String, u16),
    pub replicas: Vec<(String, u16)>,
    pub database: String,
    pub app_user: String,
    pub app_password: String,
    /// A tokio-postgres DSN for the superuser on the primary, for inspecting state.
    pub superuser_dsn_primary: String,
    /// The processes behind it when this harness started them; `None` for env endpoints.
    pub local: Option<LocalCluster>,
}

impl TestCluster {
    fn from_local(local: LocalCluster) -> TestCluster {
        let address = |n: &shardgate::local_cluster::NodeInfo| (n.host.clone(), n.port);
        let primary = address(local.primary());
        TestCluster {
            superuser_dsn_primary: format!(
                "host={} port={} user={} dbname=postgres",
                primary.0,
                primary.1,
                local.superuser()
            ),
            primary,
            replicas: local.replicas().iter().map(address).collect(),
            database: DATABASE.into(),
            app_user: APP_USER.into(),
            app_password: APP_PASSWORD.into(),
            local: Some(local),
        }
    }

    fn from_env() -> Option<TestCluster> {
        let primary = parse_address(&std::env::var("SHARDGATE_TEST_PRIMARY").ok()?);
        let replicas = std::env::var("SHARDGATE_TEST_REPLICAS")
            .map(|list| {
                list.split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(parse_address)
                    .collect()
            })
            .unwrap_or_default();
        let var =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
        let default_dsn = format!(
            "host={} port={} user=postgres dbname=postgres",
            primary.0, primary.1
        );
        Some(TestCluster {
            superuser_dsn_primary: var("SHARDGATE_TEST_SUPERUSER_DSN", &default_dsn),
            primary,
            replicas,
            database: var("SHARDGATE_TEST_DATABASE", DATABASE),
            app_user: var("SHARDGATE_TEST_APP_USER", APP_USER),
            app_password: var("SHARDGATE_TEST_APP_PASSWORD", APP_PASSWORD),
            local: None,
        })
    }

    /// The host serving `port`: ports identify nodes, hosts may differ per node.
    pub fn host_for(&self, port: u16) -> &str {
        std::iter::once(&self.primary)
            .chain(&self.replicas)
            .find(|(_, p)| *p == port)
            .map_or(self.primary.0.as_str(), |(host, _)| host.as_str())
    }

    /// A tokio-postgres config for the application role on the node at `port`.
    pub fn app_config(&self, port: u16) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(self.host_for(port))
            .port(port)
            .user(&self.app_user)
            .password(&self.app_password)
            .dbname(&self.database);
        config
    }
}

fn parse_address(text: &str) -> (String, u16) {
    let text = text.trim();
    let parsed = text
        .rsplit_once(':')
        .and_then(|(host, port)| Some((host.to_owned(), port.parse().ok()?)));
    parsed.unwrap_or_else(|| panic!("expected host:port in SHARDGATE_TEST_* env, got {text:?}"))
}

fn start_local(replicas: usize) -> TestCluster {
    let opts = ClusterOptions {
        replicas,
        database: DATABASE.into(),
        app_user: APP_USER.into(),
        app_password: APP_PASSWORD.into(),
        extra_conf: Vec::new(),
    };
    match LocalCluster::start(&opts) {
        Ok(local) => TestCluster::from_local(local),
        Err(error) => panic!("starting a local PostgreSQL cluster for the tests: {error}"),
    }
}

/// The cluster every test of this binary shares: started on first use, never stopped by
/// Drop (statics are not dropped); the cluster's watchdog removes it when the process ends.
/// Tests sharing it must use `unique_name` for what they create.
pub fn shared_cluster() -> &'static TestCluster {
    static CLUSTER: OnceLock<TestCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| TestCluster::from_env().unwrap_or_else(|| start_local(2)))
}

/// A fresh local cluster of its own, for tests that kill, restart or promote nodes.
/// Always local, even when SHARDGATE_TEST_* points at another cluster.
pub fn own_cluster(replicas: usize) -> TestCluster {
    start_local(replicas)
}

/// A superuser connection to the node at `port` (the superuser DSN with host, port and
/// database replaced); its connection task runs on the current runtime.
pub async fn superuser_client(c: &TestCluster, port: u16, db: &str) -> tokio_postgres::Client {
    let base: tokio_postgres::Config = c
        .superuser_dsn_primary
        .parse()
        .unwrap_or_else(|e| panic!("bad superuser DSN {:?}: {e}", c.superuser_dsn_primary));
    let mut config = tokio_postgres::Config::new();
    if let Some(user) = base.get_user() {
        config.user(user);
    }
    if let Some(password) = base.get_password() {
        config.password(password);
    }
    config.host(c.host_for(port)).port(port).dbname(db);
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("superuser connect to {}:{port}/{db}: {e}", c.host_for(port)));
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            eprintln!("superuser connection to port {port} ended: {error}");
        }
    });
    client
}

/// Polls `f` every 50ms until it returns true; panics naming `what` after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A lowercase identifier unique across tests, test binaries and runs against the same
/// long-lived cluster: `<prefix>_<pid>_<counter>_<random>`.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{}_{:x}_{n}_{:08x}",
        prefix.to_lowercase(),
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Two shards for sharding tests, each a local primary with one streaming replica,
/// shared by the tests of one binary (each test works in a database of its own).
pub fn shard_clusters() -> &'static [TestCluster] {
    static CLUSTERS: OnceLock<Vec<TestCluster>> = OnceLock::new();
    CLUSTERS.get_or_init(|| {
        let first = std::thread::spawn(|| start_local(1));
        let second = start_local(1);
        vec![first.join().expect("first shard cluster"), second]
    })
}

/// Creates database `name`, owned by the app role, on every cluster's primary (the
/// replicas follow).
pub async fn create_database(clusters: &[TestCluster], name: &str) {
    for c in clusters {
        let su = superuser_client(c, c.primary.1, "postgres").await;
        su.batch_execute(&format!("CREATE DATABASE {name} OWNER {}", c.app_user))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name} on port {}: {e}", c.primary.1));
    }
}
