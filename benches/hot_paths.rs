//! Criterion benchmarks of the per-statement hot paths: frame decoding, statement
//! analysis (cold parse and cache hit), and the full route decision. Targets (issue 3):
//! a cold analysis of a pgbench-sized SELECT under 10 µs, a cache hit under 1 µs.
//! Run with `cargo bench --bench hot_paths`.

use std::hint::black_box;

use bytes::{BufMut, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion};

use shardgate::protocol::decode_frame;
use shardgate::routing::analyze::analyze;
use shardgate::routing::cache::AnalysisCache;
use shardgate::routing::route::{route, SessionRoute};
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

criterion_group!(benches, analysis, routing, frames);
criterion_main!(benches);
