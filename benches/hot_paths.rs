//! Criterion benchmarks of the per-statement hot paths: frame decoding, statement
//! analysis (cold parse and cache hit), the full route decision, and sharded routing
//! (shard-plan cache hit, literal extraction, shard choice). Targets: a cold analysis
//! of a pgbench-sized SELECT under 10 µs, a cache hit under 1 µs (issue 3); key
//! extraction + shard choice on a plan-cache hit under 1 µs (issue 7).
//! Run with `cargo bench --bench hot_paths`; results in docs/benchmarks.md.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion};

use shardgate::protocol::decode_frame;
use shardgate::protocol::messages::decode_bind_params;
use shardgate::routing::analyze::analyze;
use shardgate::routing::cache::{AnalysisCache, ShapeCache};
use shardgate::routing::route::{route, SessionRoute};
use shardgate::routing::shard_plan::{self, literal_spans, ShardPlan, Target, Values};
use shardgate::shard_map::ShardMap;
use shardgate::topology::{Freshness, NodeFreshness};

const PGBENCH_SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;";
const PGBENCH_SIMPLE: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = 48211;";

fn analysis(c: &mut Criterion) {
    c.bench_function("analyze/cold pgbench select", |b| {
        b.iter(|| analyze(black_box(PGBENCH_SELECT)))
    });
    let cache = AnalysisCache::new(4096);
    cache.get_or_analyze(PGBENCH_SIMPLE);
    c.bench_function("analyze/cache hit pgbench select", |b| {
        b.iter(|| cache.get_or_analyze(black_box(PGBENCH_SIMPLE)))
    });
}

fn node(lsn: u64, in_recovery: bool) -> NodeFreshness {
    NodeFreshness {
        addr: "127.0.0.1:5432".into(),
        healthy: true,
        in_recovery,
        lsn,
        lag_bytes: 0,
        lag_millis: 0,
        excluded: None,
    }
}

fn routing(c: &mut Criterion) {
    let cache = AnalysisCache::new(4096);
    let wrote_at = std::time::Instant::now();
    let fresh = Freshness {
        nodes: vec![node(1000, false), node(1000, true), node(990, true)],
        generation: 1,
        primary_marks: vec![(wrote_at, 995)],
    };
    let session = SessionRoute {
        wrote_at: Some(wrote_at),
        ..Default::default()
    };
    let load = [3usize, 1, 0];
    let mut tiebreak = 0usize;
    c.bench_function("route/cache hit + route decision", |b| {
        b.iter(|| {
            tiebreak = tiebreak.wrapping_add(1);
            let analyzed = cache.get_or_analyze(black_box(PGBENCH_SIMPLE));
            route(&analyzed, &session, &fresh, &load, 0, tiebreak)
        })
    });
}

fn frames(c: &mut Criterion) {
    // 1000 DataRows of a pgbench_accounts-like row.
    let mut wire = BytesMut::new();
    for i in 0..1000u32 {
        let value = format!("{i:>84}");
        wire.put_u8(b'D');
        wire.put_u32((4 + 2 + 4 + value.len()) as u32);
        wire.put_u16(1);
        wire.put_u32(value.len() as u32);
        wire.put_slice(value.as_bytes());
    }
    let wire = wire.freeze();
    c.bench_function("frame/decode 1000 DataRows", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&wire[..]);
            let mut n = 0;
            while let Ok(Some(frame)) = decode_frame(&mut buf, 1 << 20) {
                n += frame.raw.len();
            }
            n
        })
    });
}

/// Two shards, `users` hashed on `id` into 1024 buckets, half on each.
const TWO_SHARDS: &str = "\
version: 1
database: app
shards:
  s0: { primary: 127.0.0.1:5432 }
  s1: { primary: 127.0.0.1:5442 }
keyspaces:
  users:
    type: hash
    buckets: 1024
    map:
      - { buckets: 0-511, shard: s0 }
      - { buckets: 512-1023, shard: s1 }
tables:
  users: { column: id, keyspace: users }
default_shard: s0
";

/// Random positive ids (xorshift, fixed seed), so both shards and every hash path are
/// exercised without a random-number crate or formatting inside the timed loop.
fn random_ids(n: usize) -> Vec<i64> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 1_000_000 + 1) as i64
        })
        .collect()
}

fn sharded(c: &mut Criterion) {
    let map = match ShardMap::from_yaml_str(TWO_SHARDS, Path::new("bench-map.yaml")) {
        Ok(map) => map,
        Err(e) => panic!("{e}"),
    };
    let ids = random_ids(4096);
    // Simple protocol: the proxy's path for a Query (sharding.rs route_sharded_query):
    // plan from the shape cache, literal spans of this text, route.
    let texts: Vec<String> = ids
        .iter()
        .map(|id| format!("SELECT * FROM users WHERE id = {id}"))
        .collect();
    let plans: ShapeCache<Arc<ShardPlan>> = ShapeCache::new(4096);
    plans.get_or_compute(&texts[0], |t| Arc::new(shard_plan::plan(t)));
    let mut per_shard = [0usize; 2];
    for t in &texts {
        let plan = plans.get_or_compute(t, |t| Arc::new(shard_plan::plan(t)));
        let spans = literal_spans(t).unwrap_or_default();
        match shard_plan::route(&plan, &map, &Values::simple(t, &spans)) {
            Target::Shards(s) if s.len() == 1 => per_shard[s[0]] += 1,
            other => panic!("{t}: {other:?}"),
        }
    }
    assert!(per_shard[0] > 1000 && per_shard[1] > 1000, "{per_shard:?}");
    let mut i = 0usize;
    c.bench_function(
        "shard/simple: plan cache hit + literal_spans + route",
        |b| {
            b.iter(|| {
                i = (i + 1) % texts.len();
                let text = black_box(texts[i].as_str());
                let plan = plans.get_or_compute(text, |t| Arc::new(shard_plan::plan(t)));
                let spans = literal_spans(text).unwrap_or_default();
                shard_plan::route(&plan, &map, &Values::simple(text, &spans))
            })
        },
    );
    // The three parts alone, to show where the time goes.
    c.bench_function("shard/simple: plan cache hit only", |b| {
        b.iter(|| {
            i = (i + 1) % texts.len();
            plans.get_or_compute(black_box(texts[i].as_str()), |t| {
                Arc::new(shard_plan::plan(t))
            })
        })
    });
    c.bench_function("shard/simple: literal_spans only", |b| {
        b.iter(|| {
            i = (i + 1) % texts.len();
            literal_spans(black_box(texts[i].as_str()))
        })
    });
    let plan = plans.get_or_compute(&texts[0], |t| Arc::new(shard_plan::plan(t)));
    let spans: Vec<_> = texts
        .iter()
        .map(|t| literal_spans(t).unwrap_or_default())
        .collect();
    c.bench_function("shard/simple: route only", |b| {
        b.iter(|| {
            i = (i + 1) % texts.len();
            let values = Values::simple(black_box(texts[i].as_str()), &spans[i]);
            shard_plan::route(&plan, &map, &values)
        })
    });

    // Extended protocol: the plan lives on the prepared statement (no cache lookup);
    // per Bind the parameters are decoded and routed (route_sharded_bind).
    const PREPARED: &str = "SELECT * FROM users WHERE id = $1";
    let prepared = shard_plan::plan(PREPARED);
    let binds: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| {
            // Bind's tail: 1 format code (binary), 1 parameter of 8 bytes, int8.
            let mut rest = vec![0, 1, 0, 1, 0, 1, 0, 0, 0, 8];
            rest.extend_from_slice(&id.to_be_bytes());
            rest
        })
        .collect();
    let types = [20u32]; // int8
    let route_bind = |rest: &[u8]| {
        let params = match decode_bind_params(rest) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        let values = Values {
            text: PREPARED,
            literals: &[],
            params: &params.values,
            param_formats: &params.formats,
            param_types: &types,
            time: Default::default(),
        };
        shard_plan::route(&prepared, &map, &values)
    };
    for (rest, id) in binds.iter().zip(&ids) {
        let text = format!("SELECT * FROM users WHERE id = {id}");
        let spans = literal_spans(&text).unwrap_or_default();
        let expected = shard_plan::route(&plan, &map, &Values::simple(&text, &spans));
        assert_eq!(route_bind(rest), expected, "id {id}");
    }
    c.bench_function("shard/extended: decode Bind + route (binary int8)", |b| {
        b.iter(|| {
            i = (i + 1) % binds.len();
            route_bind(black_box(&binds[i]))
        })
    });
}

criterion_group!(benches, analysis, routing, frames, sharded);
criterion_main!(benches);
