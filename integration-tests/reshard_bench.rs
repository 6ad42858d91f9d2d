//! Resharding benchmark (issue 11, "Performance"): the reshard job's copy against
//! `psql \copy | psql \copy` and `pg_dump --data-only | psql` of the same rows, and the
//! cutover pause as writers through the proxy see it. `#[ignore]`d: run it with
//! `benches/reshard-bench.sh` (release build, `--ignored --nocapture`); results in
//! docs/benchmarks.md, "Resharding".
//!
//! Setup: three local clusters (primary + streaming replica each, `wal_level=logical`);
//! `orders` (~256 bytes a row) hashed on `user_id` into 1024 buckets, s0 0-511 and s1
//! 512-1023; the map then moves buckets 768-1023 from s1 to s2 (new, without schema).
//! The writers start before the baselines and run until the job is done, so every copy
//! shares the machine with the same load; their CPU rate alone (measured first) is
//! subtracted from each copy's server CPU. Besides wall time, every copy
//! reports the CPU seconds of all six PostgreSQL nodes (postmasters and their children,
//! exited ones included) and of the client programs: on a shared 2-core machine the
//! CPU cost is the steadier comparison. Knobs: `BENCH_ROWS` (rows that move, default
//! 300000), `BENCH_WRITERS` (default 4), `BENCH_WRITER_PAUSE_MS` (sleep between a
//! writer's transactions, default 5).

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::proxy::{pg_bin, shard_entry, start_proxy_with_map, ProxyOptions, TestProxy};
use common::{superuser_client, unique_name, TestCluster};
use shardgate::app::reload::ReloadOutcome;
use shardgate::shard_map::hash::{key_hash, KeyValue};
use tokio_postgres::Client;

fn shards() -> &'static [TestCluster] {
    static CLUSTERS: OnceLock<Vec<TestCluster>> = OnceLock::new();
    CLUSTERS.get_or_init(|| {
        let a = std::thread::spawn(|| common::own_cluster(1));
        let b = std::thread::spawn(|| common::own_cluster(1));
        let c = common::own_cluster(1);
        vec![a.join().expect("shard 0"), b.join().expect("shard 1"), c]
    })
}

/// The rows that move, by the server's own hash (the job's publication filter).
const MOVED: &str = "(hashint8extended(user_id, 0) & 1023) BETWEEN 768 AND 1023";

const SCHEMA: &str = "CREATE TABLE orders (id bigserial PRIMARY KEY, user_id int8 NOT NULL, \
     amount int NOT NULL, status text NOT NULL, note text NOT NULL, \
     created_at timestamptz NOT NULL DEFAULT now());
     CREATE INDEX orders_user_id_idx ON orders (user_id)";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn map(version: u64, db: &str, buckets: &[(&str, u32, u32)]) -> String {
    let c = shards();
    let mut out = format!("version: {version}\ndatabase: {db}\nshards:\n");
    for (i, name) in ["s0", "s1", "s2"].iter().enumerate() {
        if buckets.iter().any(|b| b.0 == *name) {
            out.push_str(&format!("  {name}: {}\n", shard_entry(&c[i])));
        }
    }
    out.push_str("keyspaces:\n  users:\n    type: hash\n    buckets: 1024\n    map:\n");
    for (shard, lo, hi) in buckets {
        out.push_str(&format!(
            "      - {{ buckets: {lo}-{hi}, shard: {shard} }}\n"
        ));
    }
    out.push_str("tables:\n  orders: { column: user_id, keyspace: users }\ndefault_shard: s0\n");
    out
}

async fn on_shard(shard: usize, db: &str) -> Client {
    let c = &shards()[shard];
    superuser_client(c, c.primary.1, db).await
}

/// `-h .. -p .. -U .. -d db` for psql and pg_dump, as the superuser on a primary.
fn conn_args(shard: usize, db: &str) -> String {
    let c = &shards()[shard];
    let dsn: tokio_postgres::Config = c.superuser_dsn_primary.parse().expect("superuser dsn");
    let user = dsn.get_user().unwrap_or("postgres");
    format!("-h {} -p {} -U {user} -d {db}", c.primary.0, c.primary.1)
}

/// Runs a bash pipeline (pipefail); returns its wall time in seconds.
async fn timed_shell(script: &str) -> f64 {
    let started = Instant::now();
    let out = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail; {script}"))
        .output()
        .await
        .expect("spawn bash");
    let secs = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    secs
}

/// Database `db` on all three shards, the schema through the proxy (s0, s1), and
/// `4 * rows` orders of users `1..=rows` (4 each) generated on s1 for its buckets.
async fn setup(rows: u64) -> (TestProxy, String) {
    let db = unique_name("rb");
    common::create_database(shards(), &db).await;
    let options = ProxyOptions {
        pool_size: 8,
        acquire_timeout: "10s",
        extra_users: vec![("postgres".into(), "unused".into())],
        extra: "control: { user: postgres }\nreshard: { max_pause: 2000ms }\n".into(),
        ..Default::default()
    };
    let mut proxy = start_proxy_with_map(
        &shards()[0],
        &map(1, &db, &[("s0", 0, 511), ("s1", 512, 1023)]),
        options,
    )
    .await;
    proxy.database = db.clone();
    let client = proxy.client().await;
    client.batch_execute(SCHEMA).await.expect("schema");
    let s1 = on_shard(1, &db).await;
    let started = Instant::now();
    s1.batch_execute(&format!(
        "INSERT INTO orders (user_id, amount, status, note, created_at)
         SELECT u, g % 1000, 'shipped', repeat(md5(g::text), 6), now() - g * interval '1 s'
         FROM generate_series(1, {n}) g, LATERAL (SELECT ((g + 3) / 4)::int8 AS u) x
         WHERE (hashint8extended(u, 0) & 1023) >= 512",
        n = 4 * rows
    ))
    .await
    .expect("load s1");
    for sql in ["VACUUM ANALYZE orders", "CHECKPOINT"] {
        s1.batch_execute(sql).await.expect(sql);
    }
    eprintln!("loaded s1 in {:.1} s", started.elapsed().as_secs_f64());
    (proxy, db)
}

/// (rows, bytes) of the moved rows on s1; bytes are `pg_column_size` of the row.
async fn moved_size(s1: &Client) -> (i64, i64) {
    let row = s1
        .query_one(
            &format!(
                "SELECT count(*), coalesce(sum(pg_column_size(o.*)), 0)::int8 FROM orders o WHERE {MOVED}"
            ),
            &[],
        )
        .await
        .expect("moved size");
    (row.get(0), row.get(1))
}

/// A fresh database on s2 with the schema (indexes optional) for a baseline copy.
async fn baseline_db(db: &str, suffix: &str, indexes: bool) -> String {
    let name = format!("{db}_{suffix}");
    let s2 = on_shard(2, "postgres").await;
    s2.batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("baseline db");
    let schema = if indexes {
        SCHEMA.to_owned()
    } else {
        SCHEMA.replace("PRIMARY KEY", "").replace(
            "CREATE INDEX orders_user_id_idx ON orders (user_id)",
            "SELECT 1",
        )
    };
    on_shard(2, &name)
        .await
        .batch_execute(&schema)
        .await
        .expect("baseline schema");
    name
}

async fn drop_db(name: &str) {
    let s2 = on_shard(2, "postgres").await;
    s2.batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .expect("drop baseline db");
}

async fn checkpoint() {
    for shard in 1..=2 {
        on_shard(shard, "postgres")
            .await
            .batch_execute("CHECKPOINT")
            .await
            .expect("checkpoint");
    }
}

/// CPU seconds used so far by the six PostgreSQL nodes and by this process's exited
/// children (bash, psql, pg_dump).
#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    server: f64,
    client: f64,
}

impl Cpu {
    fn now() -> Cpu {
        let mut postmasters = Vec::new();
        for c in shards() {
            let local = c.local.as_ref().expect("local clusters");
            for node in std::iter::once(local.primary()).chain(local.replicas()) {
                let pid = std::fs::read_to_string(node.data_dir.join("postmaster.pid"))
                    .ok()
                    .and_then(|t| t.lines().next()?.trim().parse::<u32>().ok());
                postmasters.extend(pid);
            }
        }
        let mut ticks = 0u64;
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Some(f) = proc_stat(pid) else { continue };
            // Fields after the command: state ppid ... utime(11) stime cutime cstime.
            let ppid: u32 = f[1].parse().unwrap_or(0);
            let t = |i: usize| f[i].parse::<u64>().unwrap_or(0);
            if postmasters.contains(&pid) {
                // cutime/cstime: the backends and workers that have exited.
                ticks += t(11) + t(12) + t(13) + t(14);
            } else if postmasters.contains(&ppid) {
                ticks += t(11) + t(12);
            }
        }
        // SAFETY: sysconf and getrusage only write to the struct passed in.
        let (hz, usage) = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
            (libc::sysconf(libc::_SC_CLK_TCK) as f64, usage)
        };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Cpu {
            server: ticks as f64 / hz,
            client: secs(usage.ru_utime) + secs(usage.ru_stime),
        }
    }

    fn since(self, start: Cpu) -> Cpu {
        Cpu {
            server: self.server - start.server,
            client: self.client - start.client,
        }
    }
}

/// The fields of /proc/<pid>/stat after the `(command)`.
fn proc_stat(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// One measured copy: wall seconds, rows and CPU.
struct Measure {
    label: String,
    secs: f64,
    rows: i64,
    cpu: Cpu,
}

/// The three baselines, each into a fresh database on s2.
async fn baselines(db: &str, moved: i64) -> Vec<Measure> {
    let (psql, pg_dump) = (pg_bin("psql"), pg_bin("pg_dump"));
    let (psql, pg_dump) = (psql.display(), pg_dump.display());
    let src = conn_args(1, db);
    let pipe = |target: &str| {
        format!(
            "{psql} -X -q {src} -c '\\copy (SELECT * FROM orders WHERE {MOVED}) TO STDOUT' \
             | {psql} -X -q -v ON_ERROR_STOP=1 {} -c '\\copy orders FROM STDIN'",
            conn_args(2, target)
        )
    };
    let mut out = Vec::new();
    checkpoint().await;
    let target = baseline_db(db, "pipe", true).await;
    let cpu = Cpu::now();
    let secs = timed_shell(&pipe(&target)).await;
    out.push(Measure {
        label: "filtered COPY pipe (psql \\copy \\| psql \\copy), target indexed".into(),
        secs,
        cpu: Cpu::now().since(cpu),
        rows: count(&target, "SELECT count(*) FROM orders").await,
    });
    drop_db(&target).await;

    checkpoint().await;
    let target = baseline_db(db, "bare", false).await;
    let cpu = Cpu::now();
    let copy = timed_shell(&pipe(&target)).await;
    let started = Instant::now();
    on_shard(2, &target)
        .await
        .batch_execute("ALTER TABLE orders ADD PRIMARY KEY (id); CREATE INDEX ON orders (user_id)")
        .await
        .expect("indexes after");
    let index = started.elapsed().as_secs_f64();
    eprintln!("pipe into a bare table: copy {copy:.2} s + indexes {index:.2} s");
    out.push(Measure {
        label: format!(
            "same, target without indexes, then indexes built ({copy:.1} s + {index:.1} s)"
        ),
        secs: copy + index,
        cpu: Cpu::now().since(cpu),
        rows: count(&target, "SELECT count(*) FROM orders").await,
    });
    drop_db(&target).await;

    checkpoint().await;
    let target = baseline_db(db, "dump", true).await;
    let cpu = Cpu::now();
    let secs = timed_shell(&format!(
        "{pg_dump} --data-only -t orders {src} | {psql} -X -q -v ON_ERROR_STOP=1 {}",
        conn_args(2, &target)
    ))
    .await;
    let cpu = Cpu::now().since(cpu);
    let rows = count(&target, "SELECT count(*) FROM orders").await;
    out.push(Measure {
        label: format!("pg_dump --data-only -t orders \\| psql (all {rows} rows of s1)"),
        secs,
        rows,
        cpu,
    });
    drop_db(&target).await;
    assert!(
        out[0].rows >= moved,
        "pipe copied {} of {moved}",
        out[0].rows
    );
    out
}

async fn count(db: &str, sql: &str) -> i64 {
    on_shard(2, db)
        .await
        .query_one(sql, &[])
        .await
        .expect(sql)
        .get(0)
}

/// Statement and transaction latencies of one writer: (start, seconds since the
/// benchmark's base instant; latency in ms).
#[derive(Default)]
struct WriterLog {
    statements: Vec<(f64, f64)>,
    transactions: Vec<(f64, f64)>,
    errors: Vec<String>,
}

async fn timed<T>(log: &mut Vec<(f64, f64)>, base: Instant, f: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let out = f.await;
    log.push((
        started.duration_since(base).as_secs_f64(),
        started.elapsed().as_secs_f64() * 1e3,
    ));
    out
}

/// A small transaction on a moving user: one new order, the user's orders updated.
async fn transaction(
    client: &mut Client,
    user: i64,
    log: &mut Vec<(f64, f64)>,
    base: Instant,
) -> Result<(), tokio_postgres::Error> {
    let tx = timed(log, base, client.transaction()).await?;
    let insert = "INSERT INTO orders (user_id, amount, status, note) VALUES ($1, 1, 'new', 'live')";
    timed(log, base, tx.execute(insert, &[&user])).await?;
    let update = "UPDATE orders SET amount = amount + 1 WHERE user_id = $1";
    timed(log, base, tx.execute(update, &[&user])).await?;
    timed(log, base, tx.commit()).await
}

fn spawn_writer(
    dsn: String,
    w: usize,
    users: Arc<Vec<i64>>,
    base: Instant,
    pause: Duration,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<WriterLog> {
    tokio::spawn(async move {
        let mut client = common::proxy::connect(&dsn).await;
        let mut log = WriterLog::default();
        let mut i = w * 7919;
        while !stop.load(Ordering::Relaxed) {
            i += 4;
            let user = users[i % users.len()];
            let started = Instant::now();
            let result = transaction(&mut client, user, &mut log.statements, base).await;
            log.transactions.push((
                started.duration_since(base).as_secs_f64(),
                started.elapsed().as_secs_f64() * 1e3,
            ));
            if let Err(e) = result {
                let text = match e.as_db_error() {
                    Some(db) => format!("{} {}", db.code().code(), db.message()),
                    None => e.to_string(),
                };
                log.errors.push(text);
            }
            tokio::time::sleep(pause).await;
        }
        log
    })
}

/// First time each label was seen: seconds since `base`, and the CPU used by then.
struct Timeline {
    base: Instant,
    marks: Vec<(String, f64, Cpu)>,
}

impl Timeline {
    fn mark(&mut self, label: String) {
        if !self.marks.iter().any(|m| m.0 == label) {
            let at = self.base.elapsed().as_secs_f64();
            self.marks.push((label, at, Cpu::now()));
        }
    }

    fn at(&self, label: &str) -> Option<(f64, Cpu)> {
        self.marks.iter().find(|m| m.0 == label).map(|m| (m.1, m.2))
    }
}

/// Polls the job's status and the target's subscription state every 20 ms until the
/// job ends; returns its last status.
async fn watch_job(
    proxy: &TestProxy,
    db: &str,
    moved: i64,
    tl: &mut Timeline,
) -> shardgate::reshard::Status {
    let s2 = on_shard(2, db).await;
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        if let Some(s) = proxy.handle.frontend.reshard.status() {
            tl.mark(format!("phase {}", s.phase));
            if s.rows_copied as i64 >= moved {
                tl.mark("rows_copied reached the moved rows".into());
            }
            if ["done", "failed", "cancelled"].contains(&s.phase.as_str()) {
                return s;
            }
        }
        let states = "SELECT r.srrelid::regclass::text, r.srsubstate::text FROM pg_subscription_rel r \
                      JOIN pg_subscription s ON s.oid = r.srsubid WHERE s.subname LIKE 'shardgate_reshard%'";
        for row in s2.query(states, &[]).await.unwrap_or_default() {
            let (table, state): (String, String) = (row.get(0), row.get(1));
            tl.mark(format!("target: {table} sync state {state}"));
        }
        let progress =
            "SELECT count(*) FROM pg_stat_progress_copy WHERE relid = to_regclass('public.orders')";
        if let Ok(row) = s2.query_one(progress, &[]).await {
            if row.get::<_, i64>(0) > 0 {
                tl.mark("target: COPY into orders running".into());
            }
        }
        assert!(
            Instant::now() < deadline,
            "job did not finish: {:?}",
            tl.marks
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn longest(v: &[(f64, f64)]) -> (f64, f64) {
    v.iter()
        .copied()
        .fold((0.0, 0.0), |m, x| if x.1 > m.1 { x } else { m })
}

/// A table row: wall time and rates, then CPU and rows per CPU second; ratios to
/// `reference` (the pipe's rows/s and rows per CPU second).
fn row(m: &Measure, bytes_per_row: f64, reference: (f64, f64)) -> String {
    let rate = m.rows as f64 / m.secs;
    let cpu = m.cpu.server + m.cpu.client;
    let per_cpu = m.rows as f64 / cpu;
    format!(
        "| {} | {:.2} | {} | {:.0} | {:.1} | {:.2} | {:.1} + {:.1} | {:.0} | {:.2} |",
        m.label,
        m.secs,
        m.rows,
        rate,
        rate * bytes_per_row / 1e6,
        rate / reference.0,
        m.cpu.server,
        m.cpu.client,
        per_cpu,
        per_cpu / reference.1,
    )
}

fn report_writers(logs: &[WriterLog], tl: &Timeline, status: &shardgate::reshard::Status) {
    let stmts: Vec<(f64, f64)> = logs.iter().flat_map(|l| l.statements.clone()).collect();
    let txs: Vec<(f64, f64)> = logs.iter().flat_map(|l| l.transactions.clone()).collect();
    let errors: Vec<&String> = logs.iter().flat_map(|l| &l.errors).collect();
    let (s_at, s_ms) = longest(&stmts);
    let (t_at, t_ms) = longest(&txs);
    let span = txs.iter().map(|t| t.0).fold(0.0, f64::max) - txs.first().map_or(0.0, |t| t.0);
    println!(
        "writers: {} transactions ({:.0}/s), {} errors{}",
        txs.len(),
        txs.len() as f64 / span.max(0.001),
        errors.len(),
        errors
            .first()
            .map_or(String::new(), |e| format!(" (first: {e})"))
    );
    println!(
        "statement latency ms: p50 {:.2}, p99 {:.2}, max {s_ms:.0} (started at t={s_at:.2} s)",
        percentile(stmts.iter().map(|s| s.1).collect(), 0.5),
        percentile(stmts.iter().map(|s| s.1).collect(), 0.99)
    );
    println!("longest transaction: {t_ms:.0} ms (started at t={t_at:.2} s)");
    let (from, to) = (tl.at("phase cutover"), tl.at("phase verify"));
    if let (Some((from, _)), Some((to, _))) = (from, to) {
        let window: Vec<f64> = stmts
            .iter()
            .filter(|s| s.0 + s.1 / 1e3 >= from && s.0 <= to)
            .map(|s| s.1)
            .collect();
        println!(
            "cutover window t={from:.2}..{to:.2} s: {} statements, longest {:.0} ms",
            window.len(),
            window.iter().copied().fold(0.0, f64::max)
        );
    }
    println!(
        "job pause_ms {:?}, cutover attempts {}; pause target < 500 ms: {}",
        status.pause_ms,
        status.cutover_attempts,
        if s_ms < 500.0 { "met" } else { "NOT met" }
    );
}

/// Starts the writers and measures the servers' CPU rate with writers alone (to
/// subtract from each copy's CPU).
async fn start_writers(
    proxy: &TestProxy,
    rows: u64,
    base: Instant,
    stop: &Arc<AtomicBool>,
) -> (Vec<tokio::task::JoinHandle<WriterLog>>, f64) {
    let writers = env_or("BENCH_WRITERS", 4) as usize;
    let pause = Duration::from_millis(env_or("BENCH_WRITER_PAUSE_MS", 5));
    let users: Arc<Vec<i64>> = Arc::new(
        (1..=rows as i64)
            .filter(|u| key_hash(&KeyValue::Int(*u)) & 1023 >= 768)
            .collect(),
    );
    let handles = (0..writers)
        .map(|w| spawn_writer(proxy.dsn(), w, users.clone(), base, pause, stop.clone()))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (cpu, started) = (Cpu::now(), Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rate = Cpu::now().since(cpu).server / started.elapsed().as_secs_f64();
    println!(
        "writers: {writers} (pause {} ms); servers' CPU with writers alone: {rate:.2} s/s",
        pause.as_millis()
    );
    (handles, rate)
}

/// Wall time and CPU between two timeline marks, less the writers' share of CPU.
fn job_measure(tl: &Timeline, label: &str, from: &str, to: &str, rows: i64, idle: f64) -> Measure {
    let (Some((t0, c0)), Some((t1, c1))) = (tl.at(from), tl.at(to)) else {
        panic!(
            "no marks {from:?} and {to:?}: {:?}",
            tl.marks.iter().map(|m| &m.0).collect::<Vec<_>>()
        );
    };
    let mut cpu = c1.since(c0);
    cpu.server -= idle * (t1 - t0);
    Measure {
        label: label.into(),
        secs: t1 - t0,
        rows,
        cpu,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: benches/reshard-bench.sh"]
async fn reshard_copy_and_cutover_against_pg_dump() {
    let rows = env_or("BENCH_ROWS", 300_000);
    let (proxy, db) = setup(rows).await;
    let s1 = on_shard(1, &db).await;
    let base = Instant::now();
    let (moved, bytes) = moved_size(&s1).await;
    let per_row = bytes as f64 / moved as f64;
    checkpoint().await;
    let stop = Arc::new(AtomicBool::new(false));
    let (handles, idle) = start_writers(&proxy, rows, base, &stop).await;
    let mut all = baselines(&db, moved).await;
    for m in &mut all {
        m.cpu.server -= idle * m.secs;
    }

    checkpoint().await;
    let (moved, bytes) = moved_size(&s1).await;
    let mut tl = Timeline {
        base,
        marks: Vec::new(),
    };
    let new_map = map(
        2,
        &db,
        &[("s0", 0, 511), ("s1", 512, 767), ("s2", 768, 1023)],
    );
    std::fs::write(proxy.map_file(), new_map).expect("write map");
    tl.mark("RELOAD".into());
    match proxy.handle.reload().await {
        Ok(ReloadOutcome::ReshardStarted { .. }) => {}
        other => panic!("expected a reshard job, got {other:?}"),
    }
    let status = watch_job(&proxy, &db, moved, &mut tl).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut logs = Vec::new();
    for h in handles {
        logs.push(h.await.expect("writer"));
    }
    assert_eq!(status.phase, "done", "{status:?}");
    assert!(
        status.verify.as_deref().unwrap_or("").starts_with("ok"),
        "{status:?}"
    );

    let reached = "rows_copied reached the moved rows";
    for (label, from, to) in [
        (
            "job: RELOAD -> copy phase ends (schema + copy + catch-up)",
            "RELOAD",
            "phase cutover",
        ),
        (
            "job: copy phase alone (enters -> leaves `copy`)",
            "phase copy",
            "phase cutover",
        ),
        (
            "job: RELOAD -> rows_copied reaches the moved rows",
            "RELOAD",
            reached,
        ),
    ] {
        all.push(job_measure(&tl, label, from, to, moved, idle));
    }
    print_report(&all, moved, bytes, per_row);
    let reload = tl.at("RELOAD").map_or(0.0, |m| m.0);
    println!("\njob timeline (s after RELOAD; servers' CPU s since RELOAD):");
    let cpu0 = tl.at("RELOAD").map(|m| m.1).unwrap_or_default();
    for (label, at, cpu) in &tl.marks {
        println!(
            "  {:>7.2}  {:>6.1}  {label}",
            at - reload,
            cpu.since(cpu0).server
        );
    }
    if !logs.is_empty() {
        report_writers(&logs, &tl, &status);
    }
    println!("job status: {status:?}");
}

fn print_report(all: &[Measure], moved: i64, bytes: i64, per_row: f64) {
    println!(
        "\n## reshard benchmark ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "moved: {moved} rows, {:.1} MB (pg_column_size, {per_row:.0} B/row)",
        bytes as f64 / 1e6
    );
    println!("\n| copy | s | rows | rows/s | MB/s | vs pipe | CPU s (servers + clients) | rows per CPU s | vs pipe |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let rate = |m: &Measure| m.rows as f64 / m.secs;
    let per_cpu = |m: &Measure| m.rows as f64 / (m.cpu.server + m.cpu.client);
    let reference = (rate(&all[0]), per_cpu(&all[0]));
    for m in all {
        println!("{}", row(m, per_row, reference));
    }
    let (pipe, dump, job) = (&all[0], &all[2], &all[3]);
    let best = rate(pipe).max(rate(dump));
    println!(
        "\njob / pipe {:.2}, job / pg_dump {:.2} (wall); per CPU s: job / pipe {:.2}, job / pg_dump {:.2}; copy target (>= 0.5x the faster baseline, wall): {}",
        rate(job) / rate(pipe),
        rate(job) / rate(dump),
        per_cpu(job) / per_cpu(pipe),
        per_cpu(job) / per_cpu(dump),
        if rate(job) / best >= 0.5 { "met" } else { "NOT met" }
    );
}
