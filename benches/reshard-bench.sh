#!/usr/bin/env bash
# Resharding benchmark (issue 11, "Performance"): the reshard job's copy against
# `psql \copy (SELECT ... WHERE <membership>) | psql \copy` and `pg_dump --data-only |
# psql` of the same rows, and the cutover pause as writers through the proxy see it.
#
#   benches/reshard-bench.sh [runs (3)] [rows that move (300000)]
#
# Each run is the #[ignore]d test integration-tests/reshard_bench.rs (release build):
# three local clusters (primary + streaming replica each), `orders` hashed on user_id,
# buckets 768-1023 moving from s1 to a new s2; 4 writers through the in-process proxy
# (BENCH_WRITERS, BENCH_WRITER_PAUSE_MS) during the baselines and the job. A run takes
# about 1-2 minutes at 300k rows. Runs are sequential: on a shared 2-core machine the
# spread between them is the error bar.
#
# Writes every run's table to target/reshard-bench/<date>.md (or $BENCH_OUT) and prints
# the summary lines. Results and their reading: docs/benchmarks.md, "Resharding".
# Needs: PostgreSQL server binaries, psql and pg_dump.
set -euo pipefail

RUNS=${1:-3}
ROWS=${2:-300000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${BENCH_OUT:-$ROOT/target/reshard-bench/$(date +%Y-%m-%d-%H%M).md}
mkdir -p "$(dirname "$OUT")"

cd "$ROOT"
cargo test --release --test reshard_bench --no-run

{
    echo "# reshard benchmark, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD)"
    echo "$(nproc) cores, load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$OUT"

for run in $(seq 1 "$RUNS"); do
    echo "== run $run/$RUNS ($ROWS rows), load average $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT"
    BENCH_ROWS=$ROWS cargo test --release --test reshard_bench -- --ignored --nocapture \
        2>&1 | sed -n '/^## reshard benchmark/,/^job status/p' | tee -a "$OUT"
done

echo
echo "summary ($OUT):"
grep -E '^(job / pipe|job pause_ms|statement latency|== run)' "$OUT"
