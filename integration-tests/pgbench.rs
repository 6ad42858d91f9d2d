//! pgbench through the proxy in all three query modes, with zero failed transactions.
//! `-M prepared` is the case PgBouncer 1.18 fails under transaction pooling.

mod common;

use common::proxy::{pg_bin, run_cmd, start_proxy, ProxyOptions};
use common::{shared_cluster, superuser_client};

fn pgbench(proxy: &common::proxy::TestProxy, args: &[&str]) -> String {
    let (ok, stdout, stderr) = run_cmd(
        std::process::Command::new(pg_bin("pgbench"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &proxy.port().to_string(),
                "-U",
                &proxy.user,
            ])
            .args(args)
            .arg(&proxy.database)
            .env("PGPASSWORD", &proxy.password),
    );
    assert!(ok, "pgbench {args:?} failed:\n{stdout}\n{stderr}");
    stdout
}

fn field(out: &str, prefix: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{out}"))
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_in_every_mode_without_failures() {
    let cluster = shared_cluster();
    let proxy = start_proxy(
        cluster,
        ProxyOptions {
            pool_size: 3,
            ..Default::default()
        },
    )
    .await;
    // Initialisation itself goes through the proxy: DDL, COPY, VACUUM.
    pgbench(&proxy, &["-i", "-s", "1", "-q"]);
    for (i, mode) in ["simple", "extended", "prepared"].into_iter().enumerate() {
        // Only the first run vacuums: vacuuming also truncates pgbench_history, which
        // must keep every run's rows for the balance check below.
        let mut args = vec!["-M", mode, "-c", "8", "-j", "2", "-t", "150"];
        if i > 0 {
            args.push("-n");
        }
        let out = pgbench(&proxy, &args);
        assert_eq!(
            field(&out, "number of transactions actually processed:"),
            "1200/1200",
            "{mode}:\n{out}"
        );
        assert_eq!(
            field(&out, "number of failed transactions:")
                .split_whitespace()
                .next(),
            Some("0"),
            "{mode}"
        );
    }
    // Every transaction wrote exactly once: one history row each, and each balance
    // is the sum of the deltas recorded (a lost or doubled write breaks one of them).
    let direct = superuser_client(cluster, cluster.primary.1, &cluster.database).await;
    let row = direct
        .query_one(
            "SELECT (SELECT count(*) FROM pgbench_history), \
                    (SELECT coalesce(sum(delta), 0) FROM pgbench_history), \
                    (SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts), \
                    (SELECT coalesce(sum(bbalance), 0) FROM pgbench_branches), \
                    (SELECT coalesce(sum(tbalance), 0) FROM pgbench_tellers)",
            &[],
        )
        .await
        .unwrap();
    let history: i64 = row.get(0);
    let delta: i64 = row.get(1);
    let sums: [i64; 3] = [row.get(2), row.get(3), row.get(4)];
    assert_eq!(
        history,
        3 * 1200,
        "history rows after 3 x 1200 transactions"
    );
    assert_eq!(
        sums, [delta; 3],
        "sum(abalance, bbalance, tbalance) vs sum(delta)"
    );
    let out = pgbench(
        &proxy,
        &["-M", "prepared", "-S", "-c", "16", "-j", "2", "-t", "300"],
    );
    assert_eq!(
        field(&out, "number of transactions actually processed:"),
        "4800/4800"
    );
}
