//! The admin console (virtual database `shardgate`) and the HTTP endpoint (`/metrics`,
//! `/healthz`, `/readyz`) against a real primary with two replicas.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::proxy::{pg_bin, run_cmd, write_config, ProxyOptions, TempDir};
use common::{shared_cluster, wait_for, TestCluster};
use shardgate::app::{self, ProxyHandle};
use shardgate::config::Config;
use shardgate::shard_map::ShardMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::SimpleQueryMessage;

const ADMIN: &str = "admin";
const ADMIN_PASSWORD: &str = "admin-secret";

struct AdminProxy {
    handle: ProxyHandle,
    _dir: TempDir,
}

impl AdminProxy {
    fn port(&self) -> u16 {
        self.handle.local_addr.port()
    }

    fn dsn(&self, user: &str, password: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname=shardgate",
            self.port()
        )
    }

    async fn console(&self) -> tokio_postgres::Client {
        common::proxy::connect(&self.dsn(ADMIN, ADMIN_PASSWORD)).await
    }

    fn metrics_addr(&self) -> SocketAddr {
        self.handle.metrics_addr.expect("metrics endpoint is on")
    }
}

/// A proxy with the console and the metrics endpoint on (port 0: any free port).
async fn start(cluster: &TestCluster) -> AdminProxy {
    let (dir, path) = write_config(cluster, &ProxyOptions::default(), "127.0.0.1:0");
    let mut yaml = std::fs::read_to_string(&path).expect("read config");
    yaml.push_str(&format!(
        "admin: {{ user: {ADMIN}, password: {ADMIN_PASSWORD} }}\nmetrics: 127.0.0.1:0\n"
    ));
    std::fs::write(&path, yaml).expect("write config");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let map = ShardMap::load(&config.shard_map).unwrap_or_else(|e| panic!("{e}"));
    let handle = app::start(&config, &map).await.expect("proxy starts");
    let proxy = AdminProxy { handle, _dir: dir };
    let replicas = cluster.replicas.len();
    // Every replica probed and serving: the figures below are real ones.
    wait_for("replicas to be probed", Duration::from_secs(20), || {
        let fe = proxy.handle.frontend.clone();
        async move {
            let topology = fe.topology.load();
            topology.shards[0].fresh.load().eligible_replicas().count() == replicas
        }
    })
    .await;
    proxy
}

/// (column names, rows) of each result set of a simple query.
type ResultSet = (Vec<String>, Vec<Vec<Option<String>>>);

async fn sets(client: &tokio_postgres::Client, sql: &str) -> Vec<ResultSet> {
    let messages = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let mut out: Vec<ResultSet> = Vec::new();
    let mut current: Option<ResultSet> = None;
    for m in messages {
        match m {
            SimpleQueryMessage::RowDescription(columns) => {
                let names = columns.iter().map(|c| c.name().to_owned()).collect();
                current = Some((names, Vec::new()));
            }
            SimpleQueryMessage::Row(row) => {
                let values = (0..row.len())
                    .map(|i| row.get(i).map(str::to_owned))
                    .collect();
                current
                    .as_mut()
                    .expect("row after description")
                    .1
                    .push(values);
            }
            SimpleQueryMessage::CommandComplete(_) => out.extend(current.take()),
            _ => {}
        }
    }
    out
}

fn column<'a>(set: &'a ResultSet, row: usize, name: &str) -> Option<&'a str> {
    let i = set
        .0
        .iter()
        .position(|c| c == name)
        .unwrap_or_else(|| panic!("no column {name} in {:?}", set.0));
    set.1[row][i].as_deref()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_answers_through_simple_query() {
    let cluster = shared_cluster();
    let proxy = start(cluster).await;
    // Some traffic, so pools and clients have something to show.
    let app = common::proxy::connect(&format!(
        "host=127.0.0.1 port={} user={} password={} dbname={}",
        proxy.port(),
        cluster.app_user,
        cluster.app_password,
        cluster.database
    ))
    .await;
    app.simple_query("SELECT 1").await.unwrap();
    let console = proxy.console().await;
    let nodes_total = 1 + cluster.replicas.len();

    let shards = sets(&console, "SHOW SHARDS").await;
    assert_eq!(shards.len(), 1);
    assert_eq!(shards[0].0[..3], ["shard", "is_default", "primary"]);
    assert_eq!(column(&shards[0], 0, "shard"), Some("s0"));
    assert_eq!(column(&shards[0], 0, "writable"), Some("t"));

    let nodes = sets(&console, "show nodes;").await;
    let nodes = &nodes[0];
    assert_eq!(nodes.1.len(), nodes_total);
    for name in [
        "shard",
        "address",
        "role",
        "health",
        "lag_bytes",
        "lag_ms",
        "in_use",
        "idle",
        "excluded",
        "fenced",
    ] {
        assert!(nodes.0.iter().any(|c| c == name), "SHOW NODES lacks {name}");
    }
    assert_eq!(column(nodes, 0, "role"), Some("primary"));
    assert_eq!(column(nodes, 1, "role"), Some("replica"));
    for row in 0..nodes_total {
        assert_eq!(column(nodes, row, "health"), Some("up"));
        assert_eq!(column(nodes, row, "excluded"), None, "row {row}");
    }

    let lag = sets(&console, "SHOW LAG").await;
    assert_eq!(lag.len(), 2, "replicas, then route counts");
    assert_eq!(lag[0].1.len(), cluster.replicas.len());
    assert_eq!(column(&lag[0], 0, "gets_reads"), Some("t"));
    assert!(column(&lag[0], 0, "lag_bytes").is_some());
    assert_eq!(lag[1].0, ["route_reason", "count"]);
    let reads = lag[1]
        .1
        .iter()
        .find(|r| r[0].as_deref() == Some("replica"))
        .expect("replica reason");
    assert!(
        reads[1].as_deref().unwrap().parse::<u64>().unwrap() >= 1,
        "SELECT 1 went to a replica"
    );

    let pools = sets(&console, "SHOW POOLS").await;
    assert!(!pools[0].1.is_empty(), "the app's pools are listed");
    assert_eq!(
        column(&pools[0], 0, "user"),
        Some(cluster.app_user.as_str())
    );

    let clients = sets(&console, "SHOW CLIENTS").await;
    let dbs: Vec<_> = (0..clients[0].1.len())
        .map(|r| column(&clients[0], r, "database").unwrap().to_owned())
        .collect();
    assert!(
        dbs.contains(&cluster.database) && dbs.contains(&"shardgate".to_owned()),
        "{dbs:?}"
    );

    let map = sets(&console, "SHOW MAP").await;
    assert_eq!(column(&map[0], 0, "version"), Some("1"));
    assert!(column(&map[0], 0, "file").unwrap().ends_with("map.yaml"));
    assert_eq!(column(&map[0], 0, "last_reload_error"), None);

    let reshard = sets(&console, "SHOW RESHARD").await;
    assert!(reshard[0].1.is_empty());
    assert_eq!(reshard[0].0[..2], ["job", "phase"]);

    let help = sets(&console, "SHOW HELP").await;
    assert!(help[0].1.len() >= 11);

    let reload = sets(&console, "RELOAD").await;
    assert_eq!(column(&reload[0], 0, "result"), Some("unchanged"));
    let map = sets(&console, "SHOW MAP").await;
    assert_eq!(column(&map[0], 0, "last_reload_result"), Some("unchanged"));

    // An invalid map is refused with its reason, and SHOW MAP keeps it.
    std::fs::write(proxy._dir.0.join("map.yaml"), "version: 2\nshards: [").unwrap();
    let err = console.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("F0000"), "{err}");
    let map = sets(&console, "SHOW MAP").await;
    assert_eq!(column(&map[0], 0, "version"), Some("1"));
    assert_eq!(column(&map[0], 0, "last_reload_result"), Some("refused"));
    assert!(column(&map[0], 0, "last_reload_error").is_some());

    // Unknown commands list what exists; unknown shards are named.
    let err = console.simple_query("SHOW DATABASES").await.unwrap_err();
    let db = err.as_db_error().expect("server error");
    assert_eq!(db.code().code(), "42601");
    assert!(
        db.message().contains("SHOW NODES") && db.message().contains("PROMOTE"),
        "{}",
        db.message()
    );
    let err = console.simple_query("PAUSE nosuch").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("42704"));
    let err = console.simple_query("PROMOTE nosuch").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("42704"));
    // PROMOTE on a real shard answers (an error until promotion is wired in; never a hang).
    let _ = tokio::time::timeout(
        Duration::from_secs(60),
        console.simple_query("PROMOTE s0 127.0.0.1:1"),
    )
    .await
    .expect("PROMOTE answers");
    console
        .simple_query("SET application_name = 'x'")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_new_transactions_until_resume() {
    let cluster = shared_cluster();
    let proxy = start(cluster).await;
    let console = proxy.console().await;
    console.simple_query("PAUSE s0").await.unwrap();
    let shards = sets(&console, "SHOW SHARDS").await;
    assert_eq!(column(&shards[0], 0, "paused"), Some("t"));
    let fe = proxy.handle.frontend.clone();
    assert!(fe.pauses.is_paused("s0"));
    let waiter = {
        let fe = fe.clone();
        tokio::spawn(async move { fe.pauses.wait_if_paused("s0").await })
    };
    wait_for("a transaction to wait", Duration::from_secs(5), || {
        let fe = fe.clone();
        async move { fe.pauses.waiting() == 1 }
    })
    .await;
    console.simple_query("RESUME s0").await.unwrap();
    waiter.await.unwrap().expect("resumed, not timed out");
    console.simple_query("PAUSE").await.unwrap();
    assert!(fe.pauses.is_paused("any"));
    console.simple_query("RESUME").await.unwrap();
    assert!(!fe.pauses.is_paused("s0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_gets_an_error_not_a_hang() {
    let cluster = shared_cluster();
    let proxy = start(cluster).await;
    let console = proxy.console().await;
    let err = tokio::time::timeout(Duration::from_secs(10), console.query("SHOW NODES", &[]))
        .await
        .expect("answered")
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("0A000"), "{err}");
    // The connection is still usable.
    assert_eq!(sets(&console, "SHOW SHARDS").await[0].1.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_admin_gets_in() {
    let cluster = shared_cluster();
    let proxy = start(cluster).await;
    let code = |dsn: String| async move {
        tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
            .await
            .err()
            .expect("login must fail")
            .code()
            .map(|c| c.code().to_owned())
    };
    assert_eq!(
        code(proxy.dsn(ADMIN, "wrong")).await.as_deref(),
        Some("28P01")
    );
    assert_eq!(
        code(proxy.dsn("nobody", "x")).await.as_deref(),
        Some("28P01")
    );
    assert_eq!(
        code(proxy.dsn(&cluster.app_user, &cluster.app_password))
            .await
            .as_deref(),
        Some("28000")
    );
    assert_eq!(
        code(proxy.dsn(&cluster.app_user, "wrong")).await.as_deref(),
        Some("28P01")
    );
    // The admin cannot use the app database.
    let dsn = format!(
        "host=127.0.0.1 port={} user={ADMIN} password={ADMIN_PASSWORD} dbname={}",
        proxy.port(),
        cluster.database
    );
    assert_eq!(code(dsn).await.as_deref(), Some("28P01"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_shows_every_command_as_a_table() {
    let cluster = shared_cluster();
    let proxy = start(cluster).await;
    let psql = |sql: &str| {
        run_cmd(
            std::process::Command::new(pg_bin("psql"))
                .env("PGPASSWORD", ADMIN_PASSWORD)
                .args(["-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p"])
                .arg(proxy.port().to_string())
                .args(["-U", ADMIN, "-d", "shardgate", "-c", sql]),
        )
    };
    for (sql, header) in [
        ("SHOW SHARDS", "readable_replicas"),
        ("SHOW NODES", "lag_bytes"),
        ("SHOW LAG", "route_reason"),
        ("SHOW POOLS", "in_use"),
        ("SHOW CLIENTS", "connected_at"),
        ("SHOW MAP", "last_reload_error"),
        ("SHOW RESHARD", "(0 rows)"),
        ("RELOAD", "unchanged"),
        ("PAUSE s0", "PAUSE"),
        ("RESUME s0", "RESUME"),
        ("PAUSE", "PAUSE"),
        ("RESUME", "RESUME"),
    ] {
        let (ok, out, err) = psql(sql);
        assert!(ok, "{sql}: {err}");
        assert!(out.contains(header), "{sql}: {out}");
    }
    let (ok, _, err) = psql("SHOW NOTHING");
    assert!(!ok);
    assert!(
        err.contains("unknown command") && err.contains("SHOW CLIENTS"),
        "{err}"
    );
}

/// GET over plain HTTP/1.1; (status, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (status, body.to_owned())
}

/// Checks the Prometheus text exposition format line by line; returns the samples as
/// (name, labels, value).
fn parse_prometheus(text: &str) -> Vec<(String, String, f64)> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            match parts.next() {
                Some("HELP") => assert!(parts.next().is_some_and(valid_name), "{line}"),
                Some("TYPE") => {
                    assert!(parts.next().is_some_and(valid_name), "{line}");
                    let kind = parts.next().unwrap_or_default();
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "{line}"
                    );
                }
                _ => {}
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let labels = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels: {line}"));
                for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair
                        .split_once("=\"")
                        .unwrap_or_else(|| panic!("bad label: {line}"));
                    assert!(valid_name(k), "bad label name: {line}");
                    assert!(!v.trim_end_matches('"').contains('\n'));
                }
                (name, labels.to_owned())
            }
            None => (series, String::new()),
        };
        assert!(valid_name(name), "bad metric name: {line}");
        samples.push((name.to_owned(), labels, value));
    }
    samples
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_healthz_and_readyz() {
    let cluster = shared_cluster();
    let proxy = start(cluster).await;
    let app = common::proxy::connect(&format!(
        "host=127.0.0.1 port={} user={} password={} dbname={}",
        proxy.port(),
        cluster.app_user,
        cluster.app_password,
        cluster.database
    ))
    .await;
    app.simple_query("SELECT 1").await.unwrap();
    assert!(app.simple_query("SELECT 1/0").await.is_err());
    let addr = proxy.metrics_addr();
    assert_eq!(get(addr, "/healthz").await.0, 200);
    wait_for("readyz", Duration::from_secs(10), || async move {
        get(addr, "/readyz").await.0 == 200
    })
    .await;
    assert_eq!(get(addr, "/nope").await.0, 404);

    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let samples = parse_prometheus(&body);
    let has = |name: &str, label: &str| {
        samples
            .iter()
            .any(|(n, l, _)| n == name && l.contains(label))
    };
    for (i, (host, port)) in cluster.replicas.iter().enumerate() {
        let node = format!("node=\"{host}:{port}\"");
        assert!(
            has("shardgate_node_lag_bytes", &node),
            "replica {i} lag bytes: {body}"
        );
        assert!(
            has("shardgate_node_lag_seconds", &node),
            "replica {i} lag seconds: {body}"
        );
        assert!(
            has("shardgate_node_up", &node),
            "replica {i} health: {body}"
        );
    }
    assert!(has("shardgate_map_version", ""));
    assert!(has("shardgate_routes_total", "reason=\"replica\""));
    assert!(has("shardgate_reloads_total", "result=\"applied\""));
    assert!(has("shardgate_clients", "state=\"idle\""), "{body}");
    assert!(
        has("shardgate_server_connections", "state=\"idle\""),
        "{body}"
    );
    assert!(has("shardgate_shard_writable", "shard=\"s0\""));
    // Wired in the session: statements by route and shard, latency, errors by class.
    assert!(has("shardgate_queries_total", "shard=\"s0\""), "{body}");
    assert!(has("shardgate_query_duration_seconds_count", ""), "{body}");
    assert!(has("shardgate_errors_total", "class=\"22\""), "{body}");
    let ready = samples
        .iter()
        .find(|(n, _, _)| n == "shardgate_shard_writable")
        .unwrap();
    assert_eq!(ready.2, 1.0);
}
