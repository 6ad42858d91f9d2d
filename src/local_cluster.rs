//! A real local PostgreSQL cluster — one primary and N streaming replicas, `postgres`
//! processes in a temp dir — started from the machine's PostgreSQL binaries.
//!
//! Used by `shardgate demo` and by the integration tests; it is not part of the proxy's
//! data or control path. Everything here is blocking (`std::process`), so callers on a
//! tokio runtime should expect `start`/`stop` to take a few seconds.
//!
//! Layout of the temp dir `$TMPDIR/shardgate-<pid>-<random>`:
//! `node0/` is the initial primary, `node1/`.. the replicas; each node dir holds `data/`,
//! `postgres.log` and the node's unix socket. Node names, not roles, name the dirs because
//! a failover test may promote a replica.
//!
//! PostgreSQL refuses to run as root, so when started by root every PostgreSQL binary runs
//! as the `postgres` user and the temp dir belongs to that user.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The bootstrap superuser of every local cluster (`initdb -U`).
pub const SUPERUSER: &str = "postgres";

/// `pg_ctl -t`: how long a node may take to start or stop, in seconds.
const PG_CTL_TIMEOUT_SECS: &str = "60";
/// How long a new replica may take to start streaming.
const STREAMING_TIMEOUT: Duration = Duration::from_secs(60);
/// A port picked by [`free_port`] can be taken by someone else before postgres binds it
/// (tests start clusters in parallel); a start that fails that way retries with a new port.
const PORT_ATTEMPTS: usize = 5;
/// Poll interval while waiting for a condition on a node.
const POLL: Duration = Duration::from_millis(50);
/// Lines of a node's log quoted in a start error.
const LOG_TAIL_LINES: usize = 30;
/// The per-node settings file, included last from postgresql.conf.
const NODE_CONF: &str = "shardgate-node.conf";
/// Client environment that would silently redirect our PostgreSQL tools elsewhere.
const PG_CLIENT_ENV: &[&str] = &[
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGOPTIONS",
    "PGSSLMODE",
    "PGDATA",
    "PGAPPNAME",
];

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "no PostgreSQL server binaries (initdb, pg_ctl) found; looked at {searched}. \
         Install PostgreSQL or set PG_BINDIR to the directory that holds them"
    )]
    NoBinDir { searched: String },
    #[error("{tool} is missing from {dir}")]
    MissingTool { tool: String, dir: PathBuf },
    #[error(
        "running as root but there is no `postgres` user to run PostgreSQL as \
         (PostgreSQL refuses to run as root)"
    )]
    NoPostgresUser,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("starting {node} failed: {reason}\n--- end of {log} ---\n{log_tail}")]
    Start {
        node: String,
        reason: String,
        log: String,
        log_tail: String,
    },
    #[error("timed out after {timeout:?} waiting for {what}{detail}")]
    Timeout {
        what: String,
        timeout: Duration,
        /// The last error seen while polling, if any (", last error: ...").
        detail: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// What to start. `Default` is one replica, database/user `app`, password `app-secret`.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub replicas: usize,
    /// Created on the primary, owned by `app_user`.
    pub database: String,
    /// A LOGIN role; over TCP it must authenticate with SCRAM-SHA-256.
    pub app_user: String,
    pub app_password: String,
    /// Lines appended to every node's postgresql.conf (after ours, so they win).
    pub extra_conf: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            replicas: 1,
            database: "app".into(),
            app_user: "app".into(),
            app_password: "app-secret".into(),
            extra_conf: Vec::new(),
        }
    }
}

/// One postgres server of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Always "127.0.0.1": nodes listen on loopback only.
    pub host: String,
    pub port: u16,
    pub data_dir: PathBuf,
}

impl NodeInfo {
    /// The node's own dir: holds `data/`, `postgres.log` and the unix socket.
    fn node_dir(&self) -> &Path {
        self.data_dir.parent().unwrap_or(&self.data_dir)
    }

    /// "node0", "node1", ...: also the node's `cluster_name`, hence the
    /// `application_name` of its walreceiver in the primary's `pg_stat_replication`.
    fn name(&self) -> String {
        self.node_dir()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn log_file(&self) -> PathBuf {
        self.node_dir().join("postgres.log")
    }
}

/// A running cluster. `stop` (or drop) shuts it down and removes its dir; if the process
/// dies first — or never drops it, as with a cluster in a `static` — a watchdog does.
pub struct LocalCluster {
    dir: PathBuf,
    bin_dir: PathBuf,
    /// uid/gid to run PostgreSQL binaries as; `None` = as ourselves (we are not root).
    run_as: Option<(u32, u32)>,
    /// `nodes[0]` is the initial primary, the rest are the replicas.
    nodes: Vec<NodeInfo>,
    watchdog: Option<Watchdog>,
    stopped: bool,
}

/// The cleanup process and the write end of the pipe it waits on.
struct Watchdog {
    child: Child,
    /// Never written. The watchdog reads its stdin until EOF, which comes when every copy
    /// of this end is closed — when we stop or our process is gone, however it died.
    _lifeline: io::PipeWriter,
}

impl LocalCluster {
    /// Starts the primary, creates the application role and database, then starts each
    /// replica from a base backup and waits until it streams. On error everything started
    /// so far is stopped and removed.
    pub fn start(opts: &ClusterOptions) -> Result<LocalCluster, ClusterError> {
        let bin_dir = find_bin_dir()?;
        let mut tools = vec!["postgres", "psql"];
        if opts.replicas > 0 {
            tools.push("pg_basebackup");
        }
        for tool in tools {
            if !bin_dir.join(tool).is_file() {
                return Err(ClusterError::MissingTool {
                    tool: tool.into(),
                    dir: bin_dir,
                });
            }
        }
        let run_as = postgres_ids_if_root()?;
        let dir = make_temp_dir(run_as)?;
        // From here on, dropping `cluster` (also on `?`) cleans up.
        let mut cluster = LocalCluster {
            dir,
            bin_dir,
            run_as,
            nodes: Vec::new(),
            watchdog: None,
            stopped: false,
        };
        cluster.spawn_watchdog()?;
        cluster.init_primary(opts)?;
        cluster.create_app_role(opts)?;
        for index in 1..=opts.replicas {
            cluster.add_replica(index)?;
        }
        Ok(cluster)
    }

    /// The initial primary (`node0`), even after a test promoted a replica.
    pub fn primary(&self) -> &NodeInfo {
        &self.nodes[0]
    }

    pub fn replicas(&self) -> &[NodeInfo] {
        &self.nodes[1..]
    }

    /// The bootstrap superuser: trusted over the unix socket and from 127.0.0.1.
    pub fn superuser(&self) -> &str {
        SUPERUSER
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The cluster's temp dir; removed by `stop`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Fast shutdown of every node, then removes the temp dir. Idempotent; errors are
    /// logged, not returned, because this also runs from `Drop`.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        // First, so it does not race us with an immediate shutdown and `rm -rf`.
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.disarm();
        }
        // Replicas first: a primary in fast shutdown would otherwise wait for its
        // walsenders to hand the shutdown checkpoint to them.
        for node in self.nodes.iter().rev() {
            if !is_running(node) {
                continue;
            }
            if let Err(error) = self.pg_ctl_stop(node, "fast") {
                tracing::warn!(%error, node = %node.name(), "fast shutdown failed, trying immediate");
                self.kill_node(node);
            }
        }
        if let Err(error) = fs::remove_dir_all(&self.dir) {
            if error.kind() != io::ErrorKind::NotFound {
                tracing::warn!(%error, dir = %self.dir.display(), "could not remove the cluster dir");
            }
        }
    }

    /// Immediate shutdown (`pg_ctl stop -m immediate`): the node dies as if it crashed.
    /// A node that is not running is left alone.
    pub fn kill_node(&self, node: &NodeInfo) {
        if !is_running(node) {
            return;
        }
        if let Err(error) = self.pg_ctl_stop(node, "immediate") {
            tracing::warn!(%error, node = %node.name(), "immediate shutdown failed");
        }
    }

    /// Starts a stopped node again on its port, with its current config.
    pub fn start_node(&self, node: &NodeInfo) -> Result<(), ClusterError> {
        self.pg_ctl_start(node)
    }

    /// Runs `sql` with `psql -At` as the superuser over the node's unix socket and returns
    /// its stdout without the final newline. Several statements in `sql` run as one
    /// implicit transaction (so not `CREATE DATABASE` together with anything else).
    pub fn psql(&self, node: &NodeInfo, db: &str, sql: &str) -> Result<String, ClusterError> {
        self.psql_commands(node, db, &[sql])
    }

    /// Waits until every replica has replayed all the primary has committed so far.
    pub fn wait_replicas_caught_up(&self, timeout: Duration) -> Result<(), ClusterError> {
        let deadline = Instant::now() + timeout;
        // With synchronous_commit=off the WAL of a just-acknowledged commit may not be
        // written yet, so pg_current_wal_lsn() can be behind it. A synchronous commit
        // flushes everything before it; it must write WAL of its own to count (a bare
        // xid assignment commits asynchronously), hence the transactional message.
        // Separate -c's are separate transactions in one session.
        let out = self.psql_commands(
            self.primary(),
            "postgres",
            &[
                "SET synchronous_commit = on",
                "SELECT pg_logical_emit_message(true, 'shardgate', '')",
                "SELECT pg_current_wal_lsn()",
            ],
        )?;
        let lsn = out.lines().last().unwrap_or_default().to_owned();
        let check = format!(
            "SELECT pg_last_wal_replay_lsn() >= {}::pg_lsn",
            quote_literal(&lsn)
        );
        for replica in self.replicas() {
            let left = deadline.saturating_duration_since(Instant::now());
            let what = format!("{} to replay the primary's WAL up to {lsn}", replica.name());
            wait_until(&what, left, || {
                Ok(self.psql(replica, "postgres", &check)? == "t")
            })?;
        }
        Ok(())
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

// Start-up steps.
impl LocalCluster {
    fn spawn_watchdog(&mut self) -> Result<(), ClusterError> {
        let (lifeline_reader, lifeline) =
            io::pipe().map_err(io_err("creating the watchdog pipe"))?;
        // $1 = pg_ctl, $2 = the cluster dir. `cat` returns at EOF on the lifeline.
        let script = r#"cat >/dev/null
for d in "$2"/node*/data; do
  [ -f "$d/postmaster.pid" ] && "$1" -D "$d" stop -m immediate -w -t 30
done
rm -rf "$2""#;
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(script)
            .arg("shardgate-cluster-watchdog")
            .arg(self.bin_dir.join("pg_ctl"))
            .arg(&self.dir)
            .current_dir("/")
            .stdin(Stdio::from(lifeline_reader))
            // Inheriting the test harness's stdout/stderr would keep its pipes open after
            // we exit, and `cargo test` would wait for them.
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Own process group: a terminal's Ctrl-C must not kill it before it cleans up.
            .process_group(0);
        // As the postgres user (when root) because pg_ctl refuses root; that user owns the
        // temp dir, so it can also remove it.
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        let child = command
            .spawn()
            .map_err(io_err("spawning the cleanup watchdog"))?;
        self.watchdog = Some(Watchdog {
            child,
            _lifeline: lifeline,
        });
        Ok(())
    }

    fn init_primary(&mut self, opts: &ClusterOptions) -> Result<(), ClusterError> {
        let node = self.new_node(0)?;
        let mut initdb = self.command("initdb");
        initdb.arg("-D").arg(&node.data_dir);
        initdb.args([
            "-E",
            "UTF8",
            "--locale=C",
            "-A",
            "trust",
            "-U",
            SUPERUSER,
            "--no-sync",
        ]);
        run(&mut initdb)?;

        // Replicas copy these two files with the base backup; only NODE_CONF differs.
        let mut conf =
            String::from("\n# Added by shardgate's local cluster (src/local_cluster.rs).\n");
        for line in shared_settings().iter().chain(&opts.extra_conf) {
            conf.push_str(line);
            conf.push('\n');
        }
        conf.push_str(&format!("include '{NODE_CONF}'\n"));
        let conf_path = node.data_dir.join("postgresql.conf");
        OpenOptions::new()
            .append(true)
            .open(&conf_path)
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .map_err(io_err(format!("appending to {}", conf_path.display())))?;
        let hba = format!(
            "# Written by shardgate's local cluster: trust for the superuser, SCRAM for everyone else over TCP.\n\
             local all all trust\n\
             host all {SUPERUSER} 127.0.0.1/32 trust\n\
             host replication {SUPERUSER} 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n"
        );
        let hba_path = node.data_dir.join("pg_hba.conf");
        fs::write(&hba_path, hba).map_err(io_err(format!("writing {}", hba_path.display())))?;

        self.nodes.push(node);
        self.start_new_node(0)
    }

    fn create_app_role(&self, opts: &ClusterOptions) -> Result<(), ClusterError> {
        let primary = self.primary();
        let role = quote_ident(&opts.app_user);
        // password_encryption = scram-sha-256 (shared_settings) stores a SCRAM verifier.
        let create_role = format!(
            "CREATE ROLE {role} LOGIN PASSWORD {}",
            quote_literal(&opts.app_password)
        );
        self.psql(primary, "postgres", &create_role)?;
        let create_db = format!(
            "CREATE DATABASE {} OWNER {role}",
            quote_ident(&opts.database)
        );
        self.psql(primary, "postgres", &create_db)?;
        Ok(())
    }

    fn add_replica(&mut self, index: usize) -> Result<(), ClusterError> {
        let node = self.new_node(index)?;
        let primary_port = self.primary().port.to_string();
        let mut basebackup = self.command("pg_basebackup");
        basebackup.args([
            "-h",
            "127.0.0.1",
            "-p",
            &primary_port,
            "-U",
            SUPERUSER,
            "-D",
        ]);
        basebackup.arg(&node.data_dir);
        // -R writes primary_conninfo and standby.signal. No replication slot: a slot would
        // not exist on a promoted replica, and the others could not follow it.
        basebackup.args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]);
        run(&mut basebackup)?;
        self.nodes.push(node);
        self.start_new_node(index)?;

        let replica = &self.nodes[index];
        let streaming = format!(
            "SELECT count(*) FROM pg_stat_replication WHERE application_name = {} AND state = 'streaming'",
            quote_literal(&replica.name())
        );
        let what = format!("{} to stream from the primary", replica.name());
        wait_until(&what, STREAMING_TIMEOUT, || {
            Ok(
                self.psql(replica, "postgres", "SELECT pg_is_in_recovery()")? == "t"
                    && self.psql(self.primary(), "postgres", &streaming)? == "1",
            )
        })?;
        tracing::info!(node = %replica.name(), port = replica.port, "replica streaming");
        Ok(())
    }

    /// Creates `node<index>/` (owned by the user postgres runs as) and picks a port.
    fn new_node(&self, index: usize) -> Result<NodeInfo, ClusterError> {
        let node_dir = self.dir.join(format!("node{index}"));
        make_owned_dir(&node_dir, self.run_as)?;
        Ok(NodeInfo {
            host: "127.0.0.1".into(),
            port: try_free_port()?,
            data_dir: node_dir.join("data"),
        })
    }

    /// Writes the node's own settings and starts it, moving to another port when the
    /// picked one was taken in the meantime.
    fn start_new_node(&mut self, index: usize) -> Result<(), ClusterError> {
        let mut attempt = 1;
        loop {
            let node = &self.nodes[index];
            write_node_conf(node, self.run_as)?;
            match self.pg_ctl_start(node) {
                Ok(()) => {
                    tracing::info!(node = %node.name(), port = node.port, "postgres started");
                    return Ok(());
                }
                Err(ClusterError::Start { log_tail, .. })
                    if attempt < PORT_ATTEMPTS && log_tail.contains("could not bind") =>
                {
                    tracing::debug!(node = %node.name(), port = node.port, "port taken, retrying");
                    self.nodes[index].port = try_free_port()?;
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }
}

// Running PostgreSQL binaries.
impl LocalCluster {
    /// A command for one of the PostgreSQL binaries, as the right user, with a clean
    /// client environment and a HOME and working dir that user can read.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin_dir.join(program));
        command
            .current_dir(&self.dir)
            .env("HOME", &self.dir)
            .stdin(Stdio::null());
        for var in PG_CLIENT_ENV {
            command.env_remove(var);
        }
        if let Some((uid, gid)) = self.run_as {
            // std drops supplementary groups when a root parent sets uid.
            command.uid(uid).gid(gid);
        }
        command
    }

    fn psql_commands(
        &self,
        node: &NodeInfo,
        db: &str,
        sqls: &[&str],
    ) -> Result<String, ClusterError> {
        let mut psql = self.command("psql");
        psql.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"]);
        psql.arg(node.node_dir());
        psql.args(["-p", &node.port.to_string(), "-U", SUPERUSER, "-d", db]);
        for sql in sqls {
            psql.arg("-c").arg(sql);
        }
        let output = run(&mut psql)?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        Ok(stdout.strip_suffix('\n').unwrap_or(&stdout).to_owned())
    }

    fn pg_ctl_start(&self, node: &NodeInfo) -> Result<(), ClusterError> {
        let log = node.log_file();
        // Only this attempt's part of the log explains its failure.
        let log_start = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let mut pg_ctl = self.command("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(&node.data_dir)
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "-l"]);
        pg_ctl.arg(&log).arg("start");
        run(&mut pg_ctl)
            .map(drop)
            .map_err(|error| ClusterError::Start {
                node: format!("{} (port {})", node.name(), node.port),
                reason: error.to_string(),
                log: log.display().to_string(),
                log_tail: log_tail(&log, log_start),
            })
    }

    fn pg_ctl_stop(&self, node: &NodeInfo, mode: &str) -> Result<(), ClusterError> {
        let mut pg_ctl = self.command("pg_ctl");
        pg_ctl.arg("-D").arg(&node.data_dir);
        pg_ctl.args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "-m", mode, "stop"]);
        run(&mut pg_ctl).map(drop)
    }
}

impl Watchdog {
    /// Kills the watchdog before it sees EOF, so it does not clean up behind our back.
    fn disarm(mut self) {
        // Its process group: the shell and its `cat`.
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) with a negative pid only sends a signal to that process group,
        // which is the watchdog's own (process_group(0) at spawn).
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// The settings every node shares; `extra_conf` comes after them, NODE_CONF last.
fn shared_settings() -> Vec<String> {
    [
        "listen_addresses = '127.0.0.1'",
        "wal_level = logical",
        // Resharding jobs (logical replication): a slot, a sender and apply and
        // table-sync workers per job, several jobs at once in the tests.
        "max_wal_senders = 20",
        "max_replication_slots = 20",
        "max_worker_processes = 24",
        "max_logical_replication_workers = 12",
        "max_sync_workers_per_subscription = 4",
        "hot_standby = on",
        // A throwaway cluster: durability buys nothing and costs seconds per test run.
        "fsync = off",
        "synchronous_commit = off",
        "full_page_writes = off",
        "shared_buffers = 32MB",
        "max_connections = 200",
        "password_encryption = 'scram-sha-256'",
        // Replicas use no slots (see add_replica); keep some WAL for one that was
        // stopped for a while by a test.
        "wal_keep_size = '128MB'",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// What differs per node: port, socket dir, and a name that shows up in `ps` and as the
/// node's `application_name` in `pg_stat_replication`.
fn write_node_conf(node: &NodeInfo, run_as: Option<(u32, u32)>) -> Result<(), ClusterError> {
    let conf = format!(
        "# Written by shardgate's local cluster: this node's own settings.\n\
         port = {}\nunix_socket_directories = {}\ncluster_name = {}\n",
        node.port,
        quote_literal(&node.node_dir().to_string_lossy()),
        quote_literal(&node.name()),
    );
    let path = node.data_dir.join(NODE_CONF);
    fs::write(&path, conf).map_err(io_err(format!("writing {}", path.display())))?;
    chown_to(&path, run_as)
}

fn is_running(node: &NodeInfo) -> bool {
    node.data_dir.join("postmaster.pid").exists()
}

/// Runs a command to completion; a non-zero exit becomes `ClusterError::Command` with
/// its stderr (or stdout, when stderr is empty).
fn run(command: &mut Command) -> Result<Output, ClusterError> {
    let described = describe(command);
    let output = command
        .output()
        .map_err(io_err(format!("running `{described}`")))?;
    if output.status.success() {
        return Ok(output);
    }
    let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if stderr.is_empty() {
        stderr = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    }
    Err(ClusterError::Command {
        command: described,
        status: output.status.to_string(),
        stderr,
    })
}

fn describe(command: &Command) -> String {
    let program = Path::new(command.get_program());
    let name = program
        .file_name()
        .unwrap_or(program.as_os_str())
        .to_string_lossy();
    let args: Vec<_> = command.get_args().map(|a| a.to_string_lossy()).collect();
    format!("{name} {}", args.join(" "))
}

/// Calls `ready` every POLL until it says yes or `timeout` passes. Errors while polling
/// (a node still starting) are not final; the last one is reported on timeout.
fn wait_until(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> Result<bool, ClusterError>,
) -> Result<(), ClusterError> {
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match ready() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(error) => last_error = Some(error),
        }
        if Instant::now() >= deadline {
            return Err(ClusterError::Timeout {
                what: what.to_owned(),
                timeout,
                detail: last_error
                    .map(|e| format!(", last error: {e}"))
                    .unwrap_or_default(),
            });
        }
        std::thread::sleep(POLL);
    }
}

/// The last LOG_TAIL_LINES lines written to `path` from byte `from` on.
fn log_tail(path: &Path, from: u64) -> String {
    let mut text = String::new();
    let read = fs::File::open(path).and_then(|mut f| {
        f.seek(SeekFrom::Start(from))?;
        f.read_to_string(&mut text)
    });
    if let Err(error) = read {
        return format!("(could not read the log: {error})");
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// Finds the PostgreSQL server binaries: `$PG_BINDIR`, else `pg_config --bindir`, else the
/// newest `/usr/lib/postgresql/<version>/bin` (Debian/Ubuntu). The dir must hold
/// `initdb` and `pg_ctl`.
pub fn find_bin_dir() -> Result<PathBuf, ClusterError> {
    let has_server_tools =
        |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    // An explicit choice is not second-guessed.
    if let Some(dir) = std::env::var_os("PG_BINDIR") {
        let dir = PathBuf::from(dir);
        if has_server_tools(&dir) {
            return Ok(dir);
        }
        return Err(ClusterError::NoBinDir {
            searched: format!("PG_BINDIR={}", dir.display()),
        });
    }
    let mut searched = Vec::new();
    // On Debian pg_config may come from libpq-dev of another version than the server.
    match Command::new("pg_config").arg("--bindir").output() {
        Ok(out) if out.status.success() => {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_server_tools(&dir) {
                return Ok(dir);
            }
            searched.push(format!("{} (from pg_config --bindir)", dir.display()));
        }
        _ => searched.push("pg_config --bindir (not available)".to_owned()),
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let version: Option<Vec<u32>> = name.split('.').map(|p| p.parse().ok()).collect();
            Some((version?, entry.path().join("bin")))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions
        .into_iter()
        .rev()
        .find(|(_, dir)| has_server_tools(dir))
    {
        return Ok(dir);
    }
    searched.push("/usr/lib/postgresql/*/bin".to_owned());
    Err(ClusterError::NoBinDir {
        searched: searched.join(", "),
    })
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bind port 0, read, close).
///
/// # Panics
/// When 127.0.0.1 cannot be bound at all, i.e. the machine has no usable loopback.
pub fn free_port() -> u16 {
    match try_free_port() {
        Ok(port) => port,
        Err(error) => panic!("cannot find a free port on 127.0.0.1: {error}"),
    }
}

fn try_free_port() -> Result<u16, ClusterError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(io_err("binding 127.0.0.1:0 to find a free port"))
}

/// `Some((uid, gid))` of the `postgres` user when we run as root, `None` otherwise.
fn postgres_ids_if_root() -> Result<Option<(u32, u32)>, ClusterError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    // SAFETY: passwd is plain old data; all-zero is a valid (empty) value.
    let mut passwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the duration of the call and `buf.len()` is its
    // size; we only read the integer fields, which do not point into `buf`.
    let rc = unsafe {
        libc::getpwnam_r(
            c"postgres".as_ptr(),
            &mut passwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(ClusterError::NoPostgresUser);
    }
    Ok(Some((passwd.pw_uid, passwd.pw_gid)))
}

/// `$TMPDIR/shardgate-<pid>-<random>`, mode 0700, owned by the user postgres runs as.
fn make_temp_dir(run_as: Option<(u32, u32)>) -> Result<PathBuf, ClusterError> {
    let name = format!(
        "shardgate-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    let dir = std::env::temp_dir().join(name);
    make_owned_dir(&dir, run_as)?;
    Ok(dir)
}

fn make_owned_dir(dir: &Path, run_as: Option<(u32, u32)>) -> Result<(), ClusterError> {
    DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(io_err(format!("creating {}", dir.display())))?;
    chown_to(dir, run_as)
}

fn chown_to(path: &Path, run_as: Option<(u32, u32)>) -> Result<(), ClusterError> {
    match run_as {
        Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(io_err(
            format!("chown {} to the postgres user", path.display()),
        )),
        None => Ok(()),
    }
}

/// An SQL identifier, double-quoted so any name works.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// An SQL string literal (standard_conforming_strings is on by default).
fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}
