//! Two shards for the sharding tests: the shared shard clusters (each a primary and a
//! streaming replica), the map they are routed by (`users`/`orders` hashed by user,
//! `events` by month, `countries` a reference table), and a proxy over them with a
//! database of the test's own.

use super::proxy::{shard_entry, start_proxy_with_map, ProxyOptions, TestProxy};
use super::{create_database, shard_clusters, superuser_client, unique_name};

/// Buckets 0-511 on s0, 512-1023 on s1 (DESIGN.md 4).
pub const BUCKETS: [(u32, u32); 2] = [(0, 511), (512, 1023)];

pub fn map(database: &str) -> String {
    let c = shard_clusters();
    format!(
        "version: 1
database: {database}
shards:
  s0: {}
  s1: {}
keyspaces:
  users:
    type: hash
    buckets: 1024
    map:
      - {{ buckets: 0-511, shard: s0 }}
      - {{ buckets: 512-1023, shard: s1 }}
  months:
    type: time
    map:
      - {{ until: 2026-01-01T00:00:00Z, shard: s0 }}
      - {{ from: 2026-01-01T00:00:00Z, shard: s1 }}
tables:
  users: {{ column: id, keyspace: users }}
  orders: {{ column: user_id, keyspace: users }}
  events: {{ column: created_at, keyspace: months }}
  countries: {{ reference: true }}
default_shard: s0
",
        shard_entry(&c[0]),
        shard_entry(&c[1])
    )
}

/// A database of its own on both shards and a proxy routing over them.
pub async fn setup() -> (TestProxy, String) {
    let clusters = shard_clusters();
    let db = unique_name("shdb");
    create_database(clusters, &db).await;
    let mut proxy = start_proxy_with_map(
        &clusters[0],
        &map(&db),
        ProxyOptions {
            pool_size: 4,
            ..Default::default()
        },
    )
    .await;
    // Clients ask for the map's database by name.
    proxy.database = db.clone();
    (proxy, db)
}

pub async fn on_shard(shard: usize, db: &str) -> tokio_postgres::Client {
    let c = &shard_clusters()[shard];
    superuser_client(c, c.primary.1, db).await
}

/// The shard of user `id` under `map` (buckets by PostgreSQL's own hash).
pub fn shard_of(id: i64) -> usize {
    let bucket = shardgate::shard_map::hash::bucket(
        shardgate::shard_map::hash::hashint8extended(id, 0),
        1024,
    );
    usize::from(bucket >= 512)
}
