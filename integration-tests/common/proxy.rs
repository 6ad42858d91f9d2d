//! Starts a shardgate proxy in-process, in front of a test cluster, configured from
//! real YAML files (the same loading path as the binary). Each test gets its own proxy
//! on a free port, so pools and settings never leak between tests.

use std::net::SocketAddr;
use std::path::PathBuf;

use shardgate::app::{self, ProxyHandle};
use shardgate::config::Config;
use shardgate::shard_map::ShardMap;

use super::TestCluster;

pub struct ProxyOptions {
    pub pool_mode: &'static str,
    pub pool_size: usize,
    pub max_client_connections: usize,
    pub max_message_size: &'static str,
    pub acquire_timeout: &'static str,
    /// (cert, key) PEM paths.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub shutdown_grace: &'static str,
    pub max_replica_lag: &'static str,
    pub max_replica_lag_bytes: &'static str,
    pub lag_check_interval: &'static str,
    pub read_your_writes: bool,
    /// More users after the app user, as (name, password).
    pub extra_users: Vec<(String, String)>,
    /// YAML appended to shardgate.yaml as is (top-level keys not written above, such
    /// as `failover:` or `control:`).
    pub extra: String,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            pool_mode: "transaction",
            pool_size: 4,
            max_client_connections: 100,
            max_message_size: "1MB",
            acquire_timeout: "5s",
            tls: None,
            shutdown_grace: "10s",
            max_replica_lag: "1s",
            max_replica_lag_bytes: "16MB",
            lag_check_interval: "100ms",
            read_your_writes: true,
            extra_users: Vec::new(),
            extra: String::new(),
        }
    }
}

pub struct TestProxy {
    pub addr: SocketAddr,
    pub handle: ProxyHandle,
    pub user: String,
    pub password: String,
    pub database: String,
    _dir: TempDir,
}

impl TestProxy {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The shard map file the proxy was started with (edit it to test reloads).
    pub fn map_file(&self) -> PathBuf {
        self._dir.0.join("map.yaml")
    }

    /// A libpq/tokio-postgres connection string for the app user through the proxy.
    pub fn dsn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={} password={} dbname={}",
            self.addr.port(),
            self.user,
            self.password,
            self.database
        )
    }

    pub fn url(&self) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{}",
            self.user,
            self.password,
            self.addr.port(),
            self.database
        )
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.dsn()).await
    }

    /// Stops this proxy and starts another from the same files, as a restart of the
    /// process would (on a new port).
    #[allow(dead_code)]
    pub async fn restart(self) -> TestProxy {
        let TestProxy {
            handle,
            user,
            password,
            database,
            _dir,
            ..
        } = self;
        handle.shutdown();
        handle.wait().await;
        let path = _dir.0.join("shardgate.yaml");
        let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let map = ShardMap::load(&config.shard_map).unwrap_or_else(|e| panic!("{e}"));
        let handle = app::start(&config, &map).await.expect("proxy restarts");
        TestProxy {
            addr: handle.local_addr,
            handle,
            user,
            password,
            database,
            _dir,
        }
    }
}

pub async fn connect(dsn: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {dsn}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A temp dir removed on drop.
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn temp_dir(prefix: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!(
        "{prefix}-{}-{}",
        std::process::id(),
        super::unique_name("d")
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    TempDir(dir)
}

/// Writes shardgate.yaml and its shard map for `cluster` into a fresh temp dir;
/// returns the dir and the config path.
pub fn write_config(
    cluster: &TestCluster,
    opts: &ProxyOptions,
    listen: &str,
) -> (TempDir, PathBuf) {
    write_config_with_map(cluster, &single_shard_map(cluster), opts, listen)
}

/// `{ primary: "host:port", replicas: [...] }` for a shard map.
pub fn shard_entry(cluster: &TestCluster) -> String {
    let (host, port) = &cluster.primary;
    let replicas: Vec<String> = cluster
        .replicas
        .iter()
        .map(|(h, p)| format!("\"{h}:{p}\""))
        .collect();
    format!(
        "{{ primary: \"{host}:{port}\", replicas: [{}] }}",
        replicas.join(", ")
    )
}

/// Like `write_config`, with the shard map text given (users come from `cluster`).
pub fn write_config_with_map(
    cluster: &TestCluster,
    map: &str,
    opts: &ProxyOptions,
    listen: &str,
) -> (TempDir, PathBuf) {
    let dir = temp_dir("shardgate-proxy");
    let tls = match &opts.tls {
        Some((cert, key)) => format!(
            "tls: {{ cert: {}, key: {} }}\n",
            cert.display(),
            key.display()
        ),
        None => String::new(),
    };
    let config = format!(
        "listen: {listen}\n{tls}pool: {{ mode: {}, size: {}, acquire_timeout: {} }}\nlimits: {{ max_client_connections: {}, max_message_size: {}, shutdown_grace: {} }}\nrouting: {{ max_replica_lag: {}, max_replica_lag_bytes: {}, lag_check_interval: {}, read_your_writes: {} }}\nusers:\n  - {{ name: {}, password: {} }}\nshard_map: map.yaml\n",
        opts.pool_mode,
        opts.pool_size,
        opts.acquire_timeout,
        opts.max_client_connections,
        opts.max_message_size,
        opts.shutdown_grace,
        opts.max_replica_lag,
        opts.max_replica_lag_bytes,
        opts.lag_check_interval,
        opts.read_your_writes,
        cluster.app_user,
        cluster.app_password,
    );
    let mut config = config;
    for (name, password) in &opts.extra_users {
        let line = format!("  - {{ name: {name}, password: {password} }}\n");
        let at = config.find("shard_map:").unwrap_or(config.len());
        config.insert_str(at, &line);
    }
    config.push_str(&opts.extra);
    std::fs::write(dir.0.join("map.yaml"), map).expect("write map");
    std::fs::write(dir.0.join("shardgate.yaml"), config).expect("write config");
    let path = dir.0.join("shardgate.yaml");
    (dir, path)
}

pub async fn start_proxy(cluster: &TestCluster, opts: ProxyOptions) -> TestProxy {
    let (dir, path) = write_config(cluster, &opts, "127.0.0.1:0");
    start_from(cluster, dir, path).await
}

/// A proxy in front of several clusters (one shard each), with `map` as its shard map.
pub async fn start_proxy_with_map(
    cluster: &TestCluster,
    map: &str,
    opts: ProxyOptions,
) -> TestProxy {
    let (dir, path) = write_config_with_map(cluster, map, &opts, "127.0.0.1:0");
    start_from(cluster, dir, path).await
}

async fn start_from(cluster: &TestCluster, dir: TempDir, path: PathBuf) -> TestProxy {
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let map = ShardMap::load(&config.shard_map).unwrap_or_else(|e| panic!("{e}"));
    let handle = app::start(&config, &map).await.expect("proxy starts");
    TestProxy {
        addr: handle.local_addr,
        handle,
        user: cluster.app_user.clone(),
        password: cluster.app_password.clone(),
        database: cluster.database.clone(),
        _dir: dir,
    }
}

/// Runs a command to completion, returning (success, stdout, stderr).
pub fn run_cmd(cmd: &mut std::process::Command) -> (bool, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Path of a PostgreSQL client binary (psql, pgbench) from the local installation.
pub fn pg_bin(name: &str) -> PathBuf {
    match shardgate::local_cluster::find_bin_dir() {
        Ok(dir) => dir.join(name),
        Err(_) => PathBuf::from(name),
    }
}

/// The real binary on a free port, with `map` as its shard map, for tests that read the
/// proxy's own memory from /proc. Killed on drop.
#[allow(dead_code)]
pub struct ProxyProcess {
    pub child: std::process::Child,
    pub port: u16,
    _dir: TempDir,
}

#[allow(dead_code)]
impl ProxyProcess {
    /// Starts the binary and waits until it accepts connections.
    pub async fn spawn(cluster: &TestCluster, map: &str, opts: &ProxyOptions) -> ProxyProcess {
        let port = shardgate::local_cluster::free_port();
        let listen = format!("127.0.0.1:{port}");
        let (dir, config) = write_config_with_map(cluster, map, opts, &listen);
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_shardgate"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start shardgate");
        super::wait_for(
            "the proxy binary to accept connections",
            std::time::Duration::from_secs(20),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
        ProxyProcess {
            child,
            port,
            _dir: dir,
        }
    }

    /// A field of /proc/<pid>/status in kB (VmRSS: now, VmHWM: peak so far).
    pub fn status_kb(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the proxy process is alive");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/<pid>/status"))
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The one-shard map `write_config` uses for `cluster`.
pub fn single_shard_map(cluster: &TestCluster) -> String {
    format!(
        "version: 1\ndatabase: {}\nshards:\n  s0: {}\ndefault_shard: s0\n",
        cluster.database,
        shard_entry(cluster),
    )
}
