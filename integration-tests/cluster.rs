//! The test cluster itself, checked directly with tokio-postgres (no proxy): replicas
//! stream from the primary, the application role must use SCRAM over TCP, and a local
//! cluster stops cleanly — or is cleaned up by its watchdog when its process is killed.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{own_cluster, shared_cluster, superuser_client, unique_name, wait_for};
use tokio_postgres::error::SqlState;

const REPLAY_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn replicas_are_in_recovery_and_replay_primary_writes() {
    let c = shared_cluster();
    assert!(!c.replicas.is_empty(), "the shared cluster has replicas");
    let primary = superuser_client(c, c.primary.1, &c.database).await;
    let in_recovery = "SELECT pg_is_in_recovery()";
    assert!(!primary
        .query_one(in_recovery, &[])
        .await
        .unwrap()
        .get::<_, bool>(0));

    let table = unique_name("replay");
    primary
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, note text);
             INSERT INTO {table} VALUES (1, 'written on the primary')"
        ))
        .await
        .unwrap();

    for &(_, port) in &c.replicas {
        let replica = superuser_client(c, port, &c.database).await;
        assert!(replica
            .query_one(in_recovery, &[])
            .await
            .unwrap()
            .get::<_, bool>(0));
        let select = format!("SELECT note FROM {table} WHERE id = 1");
        wait_for(
            &format!("the replica on port {port} to replay {table}"),
            REPLAY_TIMEOUT,
            || {
                let (replica, select) = (&replica, &select);
                async move {
                    // An error (table not replayed yet) counts as "not yet".
                    let row = replica.query_opt(select.as_str(), &[]).await.ok().flatten();
                    row.is_some_and(|r| r.get::<_, String>(0) == "written on the primary")
                }
            },
        )
        .await;
        let write = replica
            .batch_execute(&format!("INSERT INTO {table} VALUES (2, 'x')"))
            .await;
        let error = write.expect_err("a replica refuses writes");
        assert_eq!(
            error.code(),
            Some(&SqlState::READ_ONLY_SQL_TRANSACTION),
            "{error}"
        );
    }

    primary
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn app_role_must_log_in_with_its_scram_password() {
    let c = shared_cluster();
    let port = c.primary.1;

    let mut wrong = c.app_config(port);
    wrong.password("not-the-password");
    let error = wrong
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("a wrong password is refused");
    assert_eq!(error.code(), Some(&SqlState::INVALID_PASSWORD), "{error}");

    for &(_, port) in std::iter::once(&c.primary).chain(&c.replicas) {
        let (client, connection) = c
            .app_config(port)
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let row = client
            .query_one("SELECT current_user::text, current_database()::text", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), c.app_user);
        assert_eq!(row.get::<_, String>(1), c.database);
    }

    // The stored verifier is SCRAM, so the exchange above was SCRAM-SHA-256, not md5.
    let superuser = superuser_client(c, port, "postgres").await;
    let verifier = superuser
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&c.app_user],
        )
        .await
        .unwrap();
    assert!(verifier.get::<_, String>(0).starts_with("SCRAM-SHA-256$"));
}

#[test]
fn own_cluster_starts_restarts_a_node_and_stops_cleanly() {
    let mut c = own_cluster(1);
    let local = c.local.as_mut().expect("own_cluster is local");
    let dir = local.dir().to_path_buf();
    let primary = local.primary().clone();
    let replica = local.replicas()[0].clone();
    assert!(dir.is_dir());

    // wait_replicas_caught_up alone makes the row visible: no polling on the replica.
    local
        .psql(
            &primary,
            "app",
            "CREATE TABLE t (id int); INSERT INTO t VALUES (1)",
        )
        .unwrap();
    local.wait_replicas_caught_up(REPLAY_TIMEOUT).unwrap();
    assert_eq!(
        local
            .psql(&replica, "app", "SELECT count(*) FROM t")
            .unwrap(),
        "1"
    );

    local.kill_node(&replica);
    assert!(
        local.psql(&replica, "app", "SELECT 1").is_err(),
        "a killed node is down"
    );
    local.start_node(&replica).unwrap();
    assert_eq!(
        local
            .psql(&replica, "app", "SELECT pg_is_in_recovery()")
            .unwrap(),
        "t"
    );

    local.stop();
    assert!(!dir.exists(), "{} is removed", dir.display());
    for node in [&primary, &replica] {
        assert!(
            TcpStream::connect((node.host.as_str(), node.port)).is_err(),
            "port {} is closed",
            node.port
        );
    }
    local.stop(); // idempotent
}

/// Set for the child process of `watchdog_removes_the_cluster_of_a_killed_process`.
const CHILD_ENV: &str = "SHARDGATE_TEST_WATCHDOG_CHILD";

#[test]
fn watchdog_removes_the_cluster_of_a_killed_process() {
    // Run this test binary again as a child that starts a cluster, then SIGKILL it:
    // no Drop runs, so only the watchdog can clean up.
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "watchdog_child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped()) // the child exits when this closes, should we panic first
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    // Read on a thread so a child that never reports cannot hang this test.
    let (found, report) = mpsc::channel();
    std::thread::spawn(move || {
        // libtest prints "test watchdog_child_process ... " on the same line first.
        let dir = stdout.lines().map_while(Result::ok).find_map(|line| {
            line.split_once("CLUSTER_DIR=")
                .map(|(_, dir)| PathBuf::from(dir))
        });
        let _ = found.send(dir);
    });
    let dir = report.recv_timeout(Duration::from_secs(120)).ok().flatten();
    let Some(dir) = dir else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the child did not report its cluster dir");
    };
    assert!(dir.is_dir());

    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while dir.exists() {
        assert!(
            Instant::now() < deadline,
            "the watchdog did not remove {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Not a test of its own: the child half of the test above (a no-op unless CHILD_ENV).
#[test]
fn watchdog_child_process() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let c = own_cluster(0);
    let local = c.local.as_ref().unwrap();
    println!("CLUSTER_DIR={}", local.dir().display());
    // Hold the cluster until killed; EOF on stdin means the parent is gone.
    let _ = std::io::stdin().lines().count();
    drop(c);
}
