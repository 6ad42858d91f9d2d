//! sqlx driver program for shardgate's driver suite (integration-tests/drivers.rs).
//!
//! Connection parameters come from PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE
//! (sqlx's `PgConnectOptions::new()` reads them); TABLE_PREFIX makes the table names
//! unique per run. Each step asserts its results; the program prints "ok <step>" or
//! "FAIL <step>: <error>" per step and exits non-zero if any step failed.

use std::future::Future;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, Executor, Row};

type Result<T> = std::result::Result<T, String>;

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

macro_rules! ensure_eq {
    ($actual:expr, $expected:expr, $($what:tt)+) => {{
        let (actual, expected) = (&$actual, &$expected);
        if actual != expected {
            return Err(format!("{}: expected {:?}, got {:?}", format!($($what)+), expected, actual));
        }
    }};
}

struct Tables {
    items: String,
    tasks: String,
    tx: String,
}

impl Tables {
    fn new(prefix: &str) -> Tables {
        Tables {
            items: format!("{prefix}_items"),
            tasks: format!("{prefix}_tasks"),
            tx: format!("{prefix}_tx"),
        }
    }

    fn all(&self) -> String {
        format!("{}, {}, {}", self.items, self.tasks, self.tx)
    }
}

/// Retries `check` for up to 10 s: through the proxy a fresh connection's read may be
/// served by a replica that has not replayed the write yet.
async fn eventually<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match check().await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(format!("{what} (still failing after 10 s): {e}"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn setup(pool: &PgPool, t: &Tables) -> Result<()> {
    let mut conn = pool.acquire().await.map_err(err("acquire"))?;
    conn.execute(format!("DROP TABLE IF EXISTS {}", t.all()).as_str())
        .await
        .map_err(err("drop"))?;
    conn.execute(
        format!(
            "CREATE TABLE {} (id int PRIMARY KEY, val text NOT NULL, amount bigint NOT NULL);
             INSERT INTO {0} SELECT g, 'item-' || g, g * 3 FROM generate_series(1, 500) g;
             CREATE TABLE {} (task int, n int, payload text NOT NULL, PRIMARY KEY (task, n));
             CREATE TABLE {} (id int PRIMARY KEY, state text NOT NULL)",
            t.items, t.tasks, t.tx
        )
        .as_str(),
    )
    .await
    .map_err(err("create"))?;
    drop(conn);
    eventually("setup rows visible on every pooled connection", || async {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", t.items))
            .fetch_one(pool)
            .await
            .map_err(err("count"))?;
        ensure_eq!(n, 500i64, "items");
        Ok(())
    })
    .await
}

/// Many tasks sharing a pool of 4 connections, each running the same few statements over
/// and over: sqlx prepares each statement once per connection (named, cached) and then
/// only Binds/Executes it.
async fn concurrent_cached_statements(pool: &PgPool, t: &Tables) -> Result<()> {
    const TASKS: i32 = 24;
    const ROUNDS: i32 = 25;
    let insert = format!(
        "INSERT INTO {} (task, n, payload) VALUES ($1, $2, $3) RETURNING payload",
        t.tasks
    );
    let select_one = format!("SELECT payload FROM {} WHERE task = $1 AND n = $2", t.tasks);
    let lookup = format!("SELECT id, val, amount FROM {} WHERE id = $1", t.items);
    let mut handles = Vec::new();
    for task in 0..TASKS {
        let pool = pool.clone();
        let (insert, select_one, lookup) = (insert.clone(), select_one.clone(), lookup.clone());
        handles.push(tokio::spawn(async move {
            for n in 0..ROUNDS {
                let payload = format!(
                    "task{task}-n{n}-{}",
                    "z".repeat(((task * 13 + n) % 40) as usize)
                );
                // Insert and read back on one connection: read-your-writes holds there.
                let mut conn = pool.acquire().await.map_err(err("acquire"))?;
                let returned: String = sqlx::query_scalar(&insert)
                    .bind(task)
                    .bind(n)
                    .bind(&payload)
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(err(&format!("insert task {task} n {n}")))?;
                ensure_eq!(returned, payload, "RETURNING task {task} n {n}");
                let read: Option<String> = sqlx::query_scalar(&select_one)
                    .bind(task)
                    .bind(n)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(err(&format!("select task {task} n {n}")))?;
                ensure_eq!(read, Some(payload.clone()), "read back task {task} n {n}");
                drop(conn);
                // A read-only statement straight on the pool.
                let id = 1 + (task * 31 + n * 7) % 500;
                let row = sqlx::query(&lookup)
                    .bind(id)
                    .fetch_one(&pool)
                    .await
                    .map_err(err(&format!("lookup {id}")))?;
                ensure_eq!(row.get::<i32, _>(0), id, "lookup id");
                ensure_eq!(row.get::<String, _>(1), format!("item-{id}"), "lookup val");
                ensure_eq!(row.get::<i64, _>(2), i64::from(id) * 3, "lookup amount");
                // Typed parameters of several kinds through one cached statement.
                let echo = sqlx::query(
                    "SELECT $1::int4 + 1, $2::text || '!', $3::float8 * 2, $4::bool, $5::int8[]",
                )
                .bind(n)
                .bind(format!("t{task}"))
                .bind(f64::from(task) / 4.0)
                .bind(n % 2 == 0)
                .bind(vec![i64::from(task), i64::from(n)])
                .fetch_one(&pool)
                .await
                .map_err(err("echo"))?;
                ensure_eq!(echo.get::<i32, _>(0), n + 1, "echo int");
                ensure_eq!(echo.get::<String, _>(1), format!("t{task}!"), "echo text");
                ensure_eq!(echo.get::<f64, _>(2), f64::from(task) / 2.0, "echo float");
                ensure_eq!(echo.get::<bool, _>(3), n % 2 == 0, "echo bool");
                ensure_eq!(
                    echo.get::<Vec<i64>, _>(4),
                    vec![i64::from(task), i64::from(n)],
                    "echo array"
                );
            }
            Ok::<(), String>(())
        }));
    }
    let mut errors = Vec::new();
    for h in handles {
        match h.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(format!("task panicked: {e}")),
        }
    }
    if !errors.is_empty() {
        errors.truncate(5);
        return Err(errors.join("; "));
    }
    eventually("all task rows visible", || async {
        let row = sqlx::query(&format!(
            "SELECT count(*), count(DISTINCT task) FROM {}",
            t.tasks
        ))
        .fetch_one(pool)
        .await
        .map_err(err("count"))?;
        ensure_eq!(row.get::<i64, _>(0), i64::from(TASKS * ROUNDS), "task rows");
        ensure_eq!(row.get::<i64, _>(1), i64::from(TASKS), "distinct tasks");
        Ok(())
    })
    .await
}

async fn transaction_rollback(pool: &PgPool, t: &Tables) -> Result<()> {
    let insert = format!("INSERT INTO {} (id, state) VALUES ($1, $2)", t.tx);
    let count = format!("SELECT count(*) FROM {}", t.tx);
    // Committed.
    let mut tx = pool.begin().await.map_err(err("begin"))?;
    sqlx::query(&insert)
        .bind(1)
        .bind("committed")
        .execute(&mut *tx)
        .await
        .map_err(err("insert 1"))?;
    tx.commit().await.map_err(err("commit"))?;
    // Rolled back explicitly: visible inside, gone after.
    let mut tx = pool.begin().await.map_err(err("begin"))?;
    for id in 2..5 {
        sqlx::query(&insert)
            .bind(id)
            .bind("rolled back")
            .execute(&mut *tx)
            .await
            .map_err(err("insert in rolled back tx"))?;
    }
    let inside: i64 = sqlx::query_scalar(&count)
        .fetch_one(&mut *tx)
        .await
        .map_err(err("count inside"))?;
    ensure_eq!(inside, 4i64, "rows inside the transaction");
    tx.rollback().await.map_err(err("rollback"))?;
    // Dropped without commit: rolled back too.
    {
        let mut tx = pool.begin().await.map_err(err("begin"))?;
        sqlx::query(&insert)
            .bind(5)
            .bind("dropped")
            .execute(&mut *tx)
            .await
            .map_err(err("insert 5"))?;
    }
    // An error inside a transaction, then rollback; the connection is fine afterwards.
    let mut tx = pool.begin().await.map_err(err("begin"))?;
    let dup = sqlx::query(&insert)
        .bind(1)
        .bind("duplicate")
        .execute(&mut *tx)
        .await;
    match dup {
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {}
        other => return Err(format!("duplicate insert: expected 23505, got {other:?}")),
    }
    tx.rollback().await.map_err(err("rollback after error"))?;
    // A savepoint (nested transaction).
    let mut tx = pool.begin().await.map_err(err("begin"))?;
    sqlx::query(&insert)
        .bind(6)
        .bind("outer")
        .execute(&mut *tx)
        .await
        .map_err(err("insert 6"))?;
    {
        let mut nested = tx.begin().await.map_err(err("savepoint"))?;
        sqlx::query(&insert)
            .bind(7)
            .bind("nested")
            .execute(&mut *nested)
            .await
            .map_err(err("insert 7"))?;
        nested
            .rollback()
            .await
            .map_err(err("rollback to savepoint"))?;
    }
    tx.commit().await.map_err(err("commit outer"))?;
    // Every pooled connection agrees on what was committed.
    let ids_query = format!("SELECT id FROM {} ORDER BY id", t.tx);
    eventually("committed rows after the transactions", || async {
        for _ in 0..6 {
            let ids: Vec<i32> = sqlx::query_scalar(&ids_query)
                .fetch_all(pool)
                .await
                .map_err(err("ids"))?;
            ensure_eq!(ids, vec![1, 6], "committed ids");
        }
        Ok(())
    })
    .await?;
    // And a dedicated connection outside the pool sees them and no open transaction.
    let mut conn = sqlx::PgConnection::connect_with(&PgConnectOptions::new())
        .await
        .map_err(err("connect"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ids: Vec<i32> = sqlx::query_scalar(&ids_query)
            .fetch_all(&mut conn)
            .await
            .map_err(err("ids on a separate connection"))?;
        if ids == [1, 6] {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "committed ids on a separate connection: expected [1, 6], got {ids:?} after 10 s"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Simple protocol, so the statement is its own transaction unless one is still open.
    let fresh: bool = sqlx::raw_sql("SELECT now() = statement_timestamp()")
        .fetch_one(&mut conn)
        .await
        .map_err(err("fresh"))?
        .get(0);
    ensure_eq!(fresh, true, "separate connection outside a transaction");
    conn.close().await.map_err(err("close"))?;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let deadline: u64 = std::env::var("DRIVER_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150_000);
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(deadline));
        println!("FAIL: timed out after {deadline} ms (hung driver or proxy)");
        std::process::exit(3);
    });
    let prefix = std::env::var("TABLE_PREFIX")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| format!("drv_sqlx_{}", std::process::id()));
    let t = Tables::new(&prefix);
    let pool = match PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(PgConnectOptions::new().application_name("drivers-sqlx"))
        .await
    {
        Ok(pool) => pool,
        Err(e) => {
            println!("FAIL connect: {e}");
            std::process::exit(1);
        }
    };
    let mut failures = Vec::new();
    macro_rules! step {
        ($name:literal, $f:expr) => {{
            let started = Instant::now();
            match $f.await {
                Ok(()) => println!("ok {} ({} ms)", $name, started.elapsed().as_millis()),
                Err(e) => {
                    println!("FAIL {}: {e}", $name);
                    failures.push($name);
                }
            }
        }};
    }
    step!("setup", setup(&pool, &t));
    if failures.is_empty() {
        step!(
            "concurrent_cached_statements",
            concurrent_cached_statements(&pool, &t)
        );
        step!("transaction_rollback", transaction_rollback(&pool, &t));
    }
    if let Err(e) = pool
        .execute(format!("DROP TABLE IF EXISTS {}", t.all()).as_str())
        .await
    {
        println!("warning: cleanup failed: {e}");
    }
    pool.close().await;
    if !failures.is_empty() {
        println!(
            "sqlx: {} step(s) failed: {}",
            failures.len(),
            failures.join(", ")
        );
        std::process::exit(1);
    }
    println!("sqlx: all steps passed");
}
