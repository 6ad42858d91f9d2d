//! pgbench through the proxy in all three query modes, with zero failed transactions.
//! `-M prepared` is the case PgBouncer 1.18 fails under transaction pooling.

mod common;

use common::proxy::{pg_bin, run_cmd, start_proxy, ProxyOptions};
use common::shared_cluster;

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
    for mode in ["simple", "extended", "prepared"] {
        let out = pgbench(&proxy, &["-M", mode, "-c", "8", "-j", "2", "-t", "150"]);
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
    let out = pgbench(
        &proxy,
        &["-M", "prepared", "-S", "-c", "16", "-j", "2", "-t", "300"],
    );
    assert_eq!(
        field(&out, "number of transactions actually processed:"),
        "4800/4800"
    );
}
