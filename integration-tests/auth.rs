//! Client-facing connection setup: SCRAM passwords, TLS, the connection limit.

mod common;

use common::proxy::{pg_bin, run_cmd, start_proxy, temp_dir, ProxyOptions};
use common::shared_cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_unknown_user_get_28p01() {
    let cluster = shared_cluster();
    let proxy = start_proxy(cluster, ProxyOptions::default()).await;
    for (user, password) in [(cluster.app_user.as_str(), "wrong"), ("nobody", "whatever")] {
        let dsn = format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname={}",
            proxy.port(),
            cluster.database
        );
        let err = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
            .await
            .err()
            .expect("login must fail");
        assert_eq!(err.code().map(|c| c.code()), Some("28P01"), "{user}: {err}");
    }
    // The right password works, and an unknown database is refused clearly.
    proxy.client().await.simple_query("SELECT 1").await.unwrap();
    let dsn = format!(
        "host=127.0.0.1 port={} user={} password={} dbname=nope",
        proxy.port(),
        cluster.app_user,
        cluster.app_password
    );
    let err = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code().map(|c| c.code()), Some("3D000"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_clients_get_53300() {
    let cluster = shared_cluster();
    let proxy = start_proxy(
        cluster,
        ProxyOptions {
            max_client_connections: 2,
            ..Default::default()
        },
    )
    .await;
    let a = proxy.client().await;
    let b = proxy.client().await;
    let err = tokio_postgres::connect(&proxy.dsn(), tokio_postgres::NoTls)
        .await
        .err()
        .expect("third client refused");
    assert_eq!(err.code().map(|c| c.code()), Some("53300"), "{err}");
    drop(a);
    // The slot frees once the first session has ended.
    common::wait_for(
        "a free client slot",
        std::time::Duration::from_secs(10),
        || async {
            tokio_postgres::connect(&proxy.dsn(), tokio_postgres::NoTls)
                .await
                .is_ok()
        },
    )
    .await;
    b.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_when_configured_and_a_plain_no_otherwise() {
    let cluster = shared_cluster();
    let dir = temp_dir("tls");
    let (cert, key) = (dir.0.join("server.crt"), dir.0.join("server.key"));
    let (ok, _, stderr) = run_cmd(
        std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=localhost",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    );
    assert!(ok, "openssl: {stderr}");
    let proxy = start_proxy(
        cluster,
        ProxyOptions {
            tls: Some((cert, key)),
            ..Default::default()
        },
    )
    .await;
    let (ok, stdout, stderr) = run_cmd(
        std::process::Command::new(pg_bin("psql"))
            .arg(format!("{}?sslmode=require", proxy.url()))
            .args(["-X", "-At", "-c", "SELECT 40 + 2", "-c", "\\conninfo"]),
    );
    assert!(ok, "psql over TLS: {stderr}");
    assert!(stdout.contains("42"), "{stdout}");
    assert!(stdout.contains("SSL connection"), "{stdout}");

    let plain = start_proxy(cluster, ProxyOptions::default()).await;
    let (ok, _, stderr) = run_cmd(
        std::process::Command::new(pg_bin("psql"))
            .arg(format!("{}?sslmode=require", plain.url()))
            .args(["-X", "-At", "-c", "SELECT 1"]),
    );
    assert!(!ok);
    assert!(stderr.contains("does not support SSL"), "{stderr}");
    let (ok, stdout, _) = run_cmd(
        std::process::Command::new(pg_bin("psql"))
            .arg(format!("{}?sslmode=prefer", plain.url()))
            .args(["-X", "-At", "-c", "SELECT 1"]),
    );
    assert!(ok && stdout.trim() == "1");
}
