//! Real drivers (node-postgres, pgjdbc, psycopg2, asyncpg, psycopg 3, sqlx) run through
//! the proxy and, as a control, directly against the primary.
//!
//! Each driver program lives in `integration-tests/drivers/<driver>/`, asserts its own
//! results and exits non-zero with `FAIL <step>: <message>` lines when something is
//! wrong. A test first runs its program against the primary: if that control run fails,
//! the environment or the program is broken, not the proxy. Then it runs the same program
//! through a proxy with a small pool, so server connections are shared between clients.
//!
//! When a driver's runtime is missing (node or its npm packages, java or the pgjdbc jar,
//! psycopg2, asyncpg, psycopg 3, the sqlx build), the test prints a SKIPPED line and
//! passes, unless `SHARDGATE_DRIVERS_REQUIRED=1` (CI sets it), in which case it fails.
//! `integration-tests/drivers/setup.sh` installs and builds everything.
//!
//! Overrides: `SHARDGATE_PYTHON` (default `python3`), `SHARDGATE_PGJDBC_JAR` (default
//! `/usr/share/java/postgresql.jar`).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::proxy::{start_proxy, ProxyOptions, TempDir};
use common::{shared_cluster, unique_name};

/// How long one program run may take before it is killed (each program also has its own
/// watchdog, DRIVER_TIMEOUT_MS, that reports the step it hung in).
const RUN_TIMEOUT: Duration = Duration::from_secs(240);
const PROGRAM_TIMEOUT_MS: u64 = 180_000;
/// Small, so the programs' clients share server connections.
const PROXY_POOL_SIZE: usize = 2;

fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("integration-tests/drivers")
}

fn required() -> bool {
    std::env::var("SHARDGATE_DRIVERS_REQUIRED").is_ok_and(|v| v == "1")
}

/// Written straight to the process's stderr, past libtest's output capture, so a skip is
/// seen in a normal `cargo test` run.
fn loud(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
    let _ = err.flush();
}

fn skip_or_fail(driver: &str, reason: &str) {
    if required() {
        panic!(
            "driver suite {driver}: runtime missing and SHARDGATE_DRIVERS_REQUIRED=1: {reason}\n\
             (run integration-tests/drivers/setup.sh)"
        );
    }
    loud(&format!(
        "\n########## SKIPPED driver suite {driver}: {reason}\n\
         ########## (run integration-tests/drivers/setup.sh; SHARDGATE_DRIVERS_REQUIRED=1 makes this a failure)\n"
    ));
}

/// Runs a setup command to completion; Err carries its output.
fn run_setup(cmd: &mut Command) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{shown} failed ({}):\n{text}", out.status))
    }
}

/// A driver program ready to run: the command and what it needs kept alive.
struct Program {
    program: PathBuf,
    args: Vec<String>,
    cwd: PathBuf,
    _build_dir: Option<TempDir>,
}

fn prepare_node() -> Result<Program, String> {
    let dir = drivers_dir().join("node");
    run_setup(Command::new("node").arg("--version"))?;
    let installed = ["pg", "pg-cursor", "pg-query-stream", "pg-copy-streams"]
        .iter()
        .all(|m| {
            dir.join("node_modules")
                .join(m)
                .join("package.json")
                .exists()
        });
    if !installed {
        run_setup(
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&dir),
        )
        .map_err(|e| format!("npm packages not installed and `npm ci` failed: {e}"))?;
    }
    Ok(Program {
        program: "node".into(),
        args: vec!["test.js".into()],
        cwd: dir,
        _build_dir: None,
    })
}

fn prepare_java() -> Result<Program, String> {
    java_program("DriverTest")
}

fn prepare_java_sharded() -> Result<Program, String> {
    java_program("ShardedTest")
}

/// `java/<class>.java` compiled against the pgjdbc jar.
fn java_program(class: &str) -> Result<Program, String> {
    let jar = std::env::var("SHARDGATE_PGJDBC_JAR")
        .unwrap_or_else(|_| "/usr/share/java/postgresql.jar".into());
    if !Path::new(&jar).exists() {
        return Err(format!(
            "pgjdbc jar {jar} not found (apt-get install libpostgresql-jdbc-java)"
        ));
    }
    run_setup(Command::new("java").arg("-version"))?;
    let build = common::proxy::temp_dir("shardgate-drivers-java");
    let source = drivers_dir().join(format!("java/{class}.java"));
    run_setup(
        Command::new("javac")
            .args(["-encoding", "UTF-8", "-cp", &jar, "-d"])
            .arg(&build.0)
            .arg(&source),
    )
    .map_err(|e| format!("javac: {e}"))?;
    let classpath = format!("{}:{jar}", build.0.display());
    Ok(Program {
        program: "java".into(),
        args: vec!["-cp".into(), classpath, class.into()],
        cwd: drivers_dir().join("java"),
        _build_dir: Some(build),
    })
}

fn python() -> String {
    std::env::var("SHARDGATE_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn prepare_python() -> Result<Program, String> {
    python_program(
        "psycopg2_driver.py",
        "import psycopg2; assert psycopg2.__version__.startswith('2.9'), psycopg2.__version__",
        "'psycopg2-binary>=2.9,<2.10'",
    )
}

/// A python program in `python/` whose driver `check` (python source) finds importable.
fn python_program(script: &str, check: &str, install: &str) -> Result<Program, String> {
    let python = python();
    run_setup(Command::new(&python).args(["-c", check]))
        .map_err(|e| format!("not importable by {python} (pip install {install}): {e}"))?;
    Ok(Program {
        program: python.into(),
        args: vec![script.into()],
        cwd: drivers_dir().join("python"),
        _build_dir: None,
    })
}

fn prepare_asyncpg() -> Result<Program, String> {
    python_program(
        "asyncpg_driver.py",
        "import asyncpg; v = tuple(int(p) for p in asyncpg.__version__.split('.')[:2]); \
         assert v >= (0, 29), asyncpg.__version__",
        "'asyncpg>=0.29'",
    )
}

/// psycopg 3 with its binary (C) implementation; psycopg_pool is used when importable.
fn prepare_psycopg3() -> Result<Program, String> {
    python_program(
        "psycopg3_driver.py",
        "import psycopg; v = tuple(int(p) for p in psycopg.__version__.split('.')[:2]); \
         assert (3, 1) <= v < (4, 0), psycopg.__version__; \
         assert psycopg.pq.__impl__ in ('binary', 'c'), psycopg.pq.__impl__",
        "'psycopg[binary]>=3.1' psycopg-pool",
    )
}

/// Builds the separate sqlx project (its own lock file, its own target dir under the
/// parent's ignored `target/`). A no-op when setup.sh already built it.
fn prepare_sqlx() -> Result<Program, String> {
    let dir = drivers_dir().join("sqlx");
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/drivers-sqlx");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_setup(
        Command::new(cargo)
            .args(["build", "--locked", "--quiet", "--manifest-path"])
            .arg(dir.join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(&dir),
    )
    .map_err(|e| format!("building the sqlx driver program: {e}"))?;
    Ok(Program {
        program: target.join("debug/shardgate-driver-sqlx"),
        args: Vec::new(),
        cwd: dir,
        _build_dir: None,
    })
}

struct Endpoint {
    label: String,
    host: String,
    port: u16,
    user: String,
    password: String,
    database: String,
}

struct RunResult {
    ok: bool,
    output: String,
    elapsed: Duration,
}

impl RunResult {
    fn failed_steps(&self) -> Vec<&str> {
        self.output
            .lines()
            .filter(|l| l.starts_with("FAIL"))
            .collect()
    }
}

async fn run_program(driver: &str, program: &Program, at: &Endpoint) -> RunResult {
    let started = Instant::now();
    let safe: String = driver
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let prefix = unique_name(&format!("drv_{safe}"));
    let mut cmd = tokio::process::Command::new(&program.program);
    cmd.args(&program.args)
        .current_dir(&program.cwd)
        .env("PGHOST", &at.host)
        .env("PGPORT", at.port.to_string())
        .env("PGUSER", &at.user)
        .env("PGPASSWORD", &at.password)
        .env("PGDATABASE", &at.database)
        .env("PGSSLMODE", "disable")
        .env("TABLE_PREFIX", &prefix)
        .env("DRIVER_TIMEOUT_MS", PROGRAM_TIMEOUT_MS.to_string())
        .env_remove("PGSERVICE")
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            return RunResult {
                ok: false,
                output: format!("cannot start {:?}: {e}", program.program),
                elapsed: started.elapsed(),
            }
        }
    };
    let (ok, output) = match tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(out)) => (
            out.status.success(),
            format!(
                "{}{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                if out.status.success() {
                    String::new()
                } else {
                    format!("(exit status: {})\n", out.status)
                }
            ),
        ),
        Ok(Err(e)) => (false, format!("waiting for the program: {e}")),
        Err(_) => (
            false,
            format!("killed after {RUN_TIMEOUT:?} (hung; its own watchdog did not fire)"),
        ),
    };
    let result = RunResult {
        ok,
        output,
        elapsed: started.elapsed(),
    };
    println!(
        "----- {driver} {} ({}:{}), {:.1}s, {} -----\n{}",
        at.label,
        at.host,
        at.port,
        result.elapsed.as_secs_f64(),
        if result.ok { "passed" } else { "FAILED" },
        result.output.trim_end()
    );
    result
}

/// The control run against the primary, then the same program through the proxy.
async fn drive(driver: &str, prepare: fn() -> Result<Program, String>) {
    let suite_started = Instant::now();
    let program = match tokio::task::spawn_blocking(prepare).await.unwrap() {
        Ok(program) => program,
        Err(reason) => return skip_or_fail(driver, &reason),
    };
    let cluster = shared_cluster();
    let direct = Endpoint {
        label: "direct to the primary (control)".into(),
        host: cluster.primary.0.clone(),
        port: cluster.primary.1,
        user: cluster.app_user.clone(),
        password: cluster.app_password.clone(),
        database: cluster.database.clone(),
    };
    let control = run_program(driver, &program, &direct).await;
    if !control.ok {
        panic!(
            "CONTROL RUN FAILED: the {driver} program fails directly against the primary, \
             without the proxy. This is an environment or driver-program problem, not a proxy \
             bug.\n{}",
            control.output
        );
    }
    let proxy = start_proxy(
        cluster,
        ProxyOptions {
            pool_size: PROXY_POOL_SIZE,
            ..Default::default()
        },
    )
    .await;
    let through = Endpoint {
        label: format!("through shardgate (pool size {PROXY_POOL_SIZE})"),
        host: "127.0.0.1".into(),
        port: proxy.port(),
        user: proxy.user.clone(),
        password: proxy.password.clone(),
        database: proxy.database.clone(),
    };
    let proxied = run_program(driver, &program, &through).await;
    proxy.handle.shutdown();
    println!(
        "{driver}: suite took {:.1}s (control {:.1}s, proxy {:.1}s)",
        suite_started.elapsed().as_secs_f64(),
        control.elapsed.as_secs_f64(),
        proxied.elapsed.as_secs_f64()
    );
    assert!(
        proxied.ok,
        "PROXY FAILURE: the {driver} program passes directly against the primary but fails \
         through shardgate:\n  {}\n\nfull output:\n{}",
        proxied.failed_steps().join("\n  "),
        proxied.output
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_cursor_stream_copy_pool() {
    drive("node-postgres", prepare_node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_prepared_batch_fetch_copy_readonly() {
    drive("pgjdbc", prepare_java).await;
}

/// pgjdbc's transactions over two shards (BEGIN pipelined with the first statement,
/// reads of other shards, REPEATABLE READ, an error aborting): the control run is one
/// server holding every row, the proxied run a map hashing `users` over two shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_transactions_over_two_shards() {
    let driver = "pgjdbc (sharded)";
    let program = match tokio::task::spawn_blocking(prepare_java_sharded)
        .await
        .unwrap()
    {
        Ok(program) => program,
        Err(reason) => return skip_or_fail(driver, &reason),
    };
    let cluster = shared_cluster();
    let control_db = unique_name("jdbc_one");
    common::create_database(std::slice::from_ref(cluster), &control_db).await;
    let direct = Endpoint {
        label: "direct to one server (control)".into(),
        host: cluster.primary.0.clone(),
        port: cluster.primary.1,
        user: cluster.app_user.clone(),
        password: cluster.app_password.clone(),
        database: control_db,
    };
    let control = run_program(driver, &program, &direct).await;
    assert!(control.ok, "CONTROL RUN FAILED:\n{}", control.output);
    let (proxy, db) = common::sharded::setup().await;
    let through = Endpoint {
        label: "through shardgate over two shards".into(),
        host: "127.0.0.1".into(),
        port: proxy.port(),
        user: proxy.user.clone(),
        password: proxy.password.clone(),
        database: db,
    };
    let proxied = run_program(driver, &program, &through).await;
    proxy.handle.shutdown();
    assert!(
        proxied.ok,
        "PROXY FAILURE: {}\n\nfull output:\n{}",
        proxied.failed_steps().join("\n  "),
        proxied.output
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg2_named_cursors_copy_transactions() {
    drive("psycopg2", prepare_python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_pool_copy_records_reprepare_listen() {
    drive("asyncpg", prepare_asyncpg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_prepared_pipeline_copy_readonly_pool() {
    drive("psycopg3", prepare_psycopg3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_pool_of_four_with_cached_statements() {
    drive("sqlx", prepare_sqlx).await;
}
