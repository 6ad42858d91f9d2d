#!/usr/bin/env bash
# Sharded routing under load (issue 7): shardgate over two shards against shardgate
# over one unsharded server, in one run on one machine, interleaved over rounds.
#
#   benches/pgbench-sharded.sh [seconds-per-run (10)] [rounds (2)] [rows (1000000)]
#
# Three PostgreSQL servers in a temp dir: `one` holds the whole table, `s0` and `s1`
# are the two shards. Targets:
#   sg-two       shardgate, map with s0 and s1; `accounts` hashed on id (1024 buckets)
#   sg-two-same  shardgate, the same two-shard map, both shards on server `one` and its
#                database app, as roles app0 and app1 whose search_path is their own
#                schema: s0's rows are app0.accounts, s1's app1.accounts. (`one` is
#                named 127.0.0.1 for s0 and 127.0.0.2 for s1, since a map may not list
#                a server twice; a node's dbname would be the obvious separation, but
#                the data path's pools ignore it and use the map's `database`.)
#   sg-one       shardgate, map with `one` only (the sg-primary target of
#                pgbench-compare.sh): public.accounts of database app
#   direct       `one` itself (fan-out section only)
#
# The table is created through each proxy (on sg-two and sg-two-same the DDL runs on
# both shards) and loaded through it with multi-row INSERTs of 1000 rows (simple
# protocol; the two-shard proxies split each one per shard). The row counts per shard
# are checked against the total.
#
# 1. Point selects: a custom script (`\set id random(1, rows)`, `SELECT abalance FROM
#    accounts WHERE id = :id`), 16 clients, -j2, -M simple and -M prepared, on sg-one,
#    sg-two-same and sg-two in turn. Target: sg-two TPS >= 0.9 x sg-one.
#    sg-two-same / sg-one holds the PostgreSQL side equal (one server, the same rows,
#    the same hot set, the same idle servers): what is left is the proxy finding the
#    key, plus a second pool of 16 on that server (the script prints the server
#    connections each proxy holds and the primary-key index depth per database).
#    sg-two / sg-one adds spreading the work over two servers (docs/benchmarks.md).
# 2. Fan-out latency: keyless reads (count(*), ORDER BY abalance DESC LIMIT 100, ORDER
#    BY id LIMIT 100) on one client, -M simple, on sg-two, sg-one and direct: pgbench's
#    mean latency per statement.
#
# Prints TPS, the ratio, proxy CPU seconds per 10k transactions, and latencies.
# BENCH_MODES narrows part 1; BENCH_FANOUT=0 skips part 2. Defaults take about 5 minutes
# (load ~30 s, 120 s of point selects, 90 s of fan-out): the machine is shared, keep
# runs short. Results and their reading: docs/benchmarks.md.
# Needs: PostgreSQL server binaries, pgbench, python3, bc.
set -euo pipefail

SECONDS_PER_RUN=${1:-10}
ROUNDS=${2:-2}
ROWS=${3:-1000000}
CLIENTS=16
JOBS=2
POOL=16
BATCH=1000
read -r -a MODES <<<"${BENCH_MODES:-simple prepared}"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PGBIN=$(pg_config --bindir 2>/dev/null || true)
[ -x "$PGBIN/pg_ctl" ] || PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
SHARDGATE=${SHARDGATE_BIN:-$ROOT/target/release/shardgate}
if [ ! -x "$SHARDGATE" ]; then
  (cd "$ROOT" && cargo build --release)
fi

WORK=$(mktemp -d /tmp/shardgate-sharded.XXXXXX)
chmod 755 "$WORK"
if [ "$(id -u)" -eq 0 ]; then
  chown postgres: "$WORK"
  as_pg() { runuser -u postgres -- "$@"; }
else
  as_pg() { "$@"; }
fi

SERVERS=(one s0 s1)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for d in "${SERVERS[@]}"; do
    [ -d "$WORK/$d" ] && as_pg "$PGBIN/pg_ctl" -D "$WORK/$d" -m immediate stop >/dev/null 2>&1 || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
declare -A PORT
TARGETS=(sg-one sg-two-same sg-two)
for t in "${SERVERS[@]}" "${TARGETS[@]}"; do PORT[$t]=$(free_port); done
PORT[direct]=${PORT[one]}

echo "== servers: one :${PORT[one]}, s0 :${PORT[s0]}, s1 :${PORT[s1]} (in $WORK)" >&2
for d in "${SERVERS[@]}"; do
  as_pg "$PGBIN/initdb" -D "$WORK/$d" -U postgres --auth=trust >/dev/null
  # 127.0.0.2 (loopback too) only serves sg-two-same's second name for `one`.
  cat >>"$WORK/$d/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1,127.0.0.2'
unix_socket_directories = '$WORK'
max_connections = 200
shared_buffers = 256MB
fsync = off
synchronous_commit = off
EOF
  cat >"$WORK/$d/pg_hba.conf" <<EOF
host all all 127.0.0.0/8 trust
local all all trust
EOF
  as_pg "$PGBIN/pg_ctl" -D "$WORK/$d" -o "-p ${PORT[$d]}" -l "$WORK/$d.log" -w start >/dev/null
  "$PGBIN/psql" -X -q -h 127.0.0.1 -p "${PORT[$d]}" -U postgres -d postgres -v ON_ERROR_STOP=1 \
    -c "CREATE ROLE app LOGIN" -c "CREATE DATABASE app OWNER app"
done
for r in app0 app1; do
  "$PGBIN/psql" -X -q -h 127.0.0.1 -p "${PORT[one]}" -U postgres -d app -v ON_ERROR_STOP=1 \
    -c "CREATE ROLE $r LOGIN" -c "CREATE SCHEMA $r AUTHORIZATION $r" \
    -c "ALTER ROLE $r SET search_path = $r"
done

# --- shardgate: one map with the unsharded server, one with two shards ---
start_shardgate() { # name port map-yaml
  mkdir -p "$WORK/$1"
  printf '%s\n' "$3" >"$WORK/$1/map.yaml"
  cat >"$WORK/$1/shardgate.yaml" <<EOF
listen: 127.0.0.1:$2
pool: { mode: transaction, size: $POOL, acquire_timeout: 30s }
users:
  - { name: app, password: app-secret }
shard_map: map.yaml
EOF
  RUST_LOG=warn "$SHARDGATE" --config "$WORK/$1/shardgate.yaml" 2>"$WORK/$1.log" &
  PIDS+=($!)
  eval "PID_${1//-/_}=$!"
}
start_shardgate sg-one "${PORT[sg-one]}" "version: 1
database: app
shards:
  one: { primary: 127.0.0.1:${PORT[one]} }
default_shard: one"
two_shards() { # s0-address s1-address
  printf '%s\n' "version: 1
database: app
shards:
  s0: { primary: \"$1\" }
  s1: { primary: \"$2\" }
keyspaces:
  users:
    type: hash
    buckets: 1024
    map:
      - { buckets: 0-511, shard: s0 }
      - { buckets: 512-1023, shard: s1 }
tables:
  accounts: { column: id, keyspace: users }
default_shard: s0"
}
start_shardgate sg-two "${PORT[sg-two]}" "$(two_shards "127.0.0.1:${PORT[s0]}" "127.0.0.1:${PORT[s1]}")"
start_shardgate sg-two-same "${PORT[sg-two-same]}" "$(two_shards \
  "postgres://app0@127.0.0.1:${PORT[one]}" "postgres://app1@127.0.0.2:${PORT[one]}")"

export PGPASSWORD=app-secret
psql_to() { # target psql-args...
  local t=$1
  shift
  "$PGBIN/psql" -X -q -At -h 127.0.0.1 -p "${PORT[$t]}" -U app -d app -v ON_ERROR_STOP=1 "$@"
}
for t in "${TARGETS[@]}"; do
  for _ in $(seq 1 100); do
    psql_to "$t" -c "SELECT 1" >/dev/null 2>&1 && break
    sleep 0.1
  done
done

# --- schema and rows, through the proxies ---
# abalance is a scrambled function of id, so ORDER BY abalance needs a real sort.
awk -v rows="$ROWS" -v batch="$BATCH" 'BEGIN {
  for (i = 1; i <= rows; i++) {
    if ((i - 1) % batch == 0) printf "INSERT INTO accounts (id, abalance) VALUES "
    printf "(%d,%d)", i, (i * 7919) % 100003
    printf (i % batch == 0 || i == rows) ? ";\n" : ","
  } }' >"$WORK/load.sql"
for t in "${TARGETS[@]}"; do
  start=$(date +%s.%N)
  psql_to "$t" -c "CREATE TABLE accounts (id bigint PRIMARY KEY, abalance int NOT NULL, filler char(84) NOT NULL DEFAULT '')"
  psql_to "$t" -f "$WORK/load.sql" >/dev/null
  end=$(date +%s.%N)
  n=$(psql_to "$t" -c "SELECT count(*) FROM accounts")
  echo "== $t: created and loaded $n rows through the proxy in $(echo "$end - $start" | bc) s" >&2
  [ "$n" = "$ROWS" ] || { echo "expected $ROWS rows through $t, got $n" >&2; exit 1; }
done
# Every table holding rows, as server:schema (all in database app).
TABLES=(one:public one:app0 one:app1 s0:public s1:public)
sql_on() { # server sql
  "$PGBIN/psql" -X -q -At -h 127.0.0.1 -p "${PORT[$1]}" -U postgres -d app -c "$2"
}
count() { sql_on "${1%%:*}" "SELECT count(*) FROM ${1#*:}.accounts"; }
n0=$(count s0:public) n1=$(count s1:public) m0=$(count one:app0) m1=$(count one:app1)
echo "== rows per shard: s0 $n0, s1 $n1; on one: app0 $m0, app1 $m1" >&2
for pair in "$n0 $n1" "$m0 $m1"; do
  read -r a b <<<"$pair"
  [ $((a + b)) = "$ROWS" ] && [ "$a" -gt 0 ] && [ "$b" -gt 0 ] || { echo "bad split" >&2; exit 1; }
done
[ "$n0 $n1" = "$m0 $m1" ] || { echo "the two maps split differently" >&2; exit 1; }
levels=""
for d in "${SERVERS[@]}"; do
  sql_on "$d" "CREATE EXTENSION IF NOT EXISTS pageinspect" 2>/dev/null || true
done
for tb in "${TABLES[@]}"; do
  sql_on "${tb%%:*}" "VACUUM ANALYZE ${tb#*:}.accounts"
  # B-tree levels above the leaves: a shard's half of the rows may need one less.
  level=$(sql_on "${tb%%:*}" "SELECT level FROM bt_metap('${tb#*:}.accounts_pkey')" \
    2>/dev/null) || level="?"
  levels+=" $tb ${level:-?};"
done
echo "== primary key index levels:$levels" >&2

# CPU seconds (user + system) of a proxy.
CLK=$(getconf CLK_TCK)
cpu_ticks() {
  local pid
  case $1 in
    sg-one) pid=$PID_sg_one ;;
    sg-two) pid=$PID_sg_two ;;
    sg-two-same) pid=$PID_sg_two_same ;;
    *) echo 0 && return ;;
  esac
  # Fields 14 and 15 (utime, stime), counted after the ")" that ends the name.
  sed 's/.*) //' "/proc/$pid/stat" | awk '{print $12 + $13}'
}

cat >"$WORK/point.sql" <<EOF
\set id random(1, $ROWS)
SELECT abalance FROM accounts WHERE id = :id;
EOF
echo "SELECT count(*) FROM accounts;" >"$WORK/count.sql"
echo "SELECT id, abalance FROM accounts ORDER BY abalance DESC LIMIT 100;" >"$WORK/top.sql"
echo "SELECT id, abalance FROM accounts ORDER BY id LIMIT 100;" >"$WORK/first.sql"

RESULTS="$WORK/results.txt"
: >"$RESULTS"
run() { # round label target clients pgbench-args...
  local round=$1 label=$2 t=$3 clients=$4
  shift 4
  local before after out ok tps tx failed lat
  before=$(cpu_ticks "$t")
  out=$("$PGBIN/pgbench" -n "$@" -c "$clients" -j "$((clients < JOBS ? clients : JOBS))" \
    -T "$SECONDS_PER_RUN" -h 127.0.0.1 -p "${PORT[$t]}" -U app app 2>&1) && ok=1 || ok=0
  after=$(cpu_ticks "$t")
  tps=$(echo "$out" | awk '/^tps = /{print $3; exit}')
  lat=$(echo "$out" | awk '/^latency average = /{print $4; exit}')
  tx=$(echo "$out" | awk '/actually processed/{print $NF; exit}')
  failed=$(echo "$out" | awk '/number of failed transactions/{print $5; exit}')
  if [ "$ok" != 1 ] || [ -z "$tps" ] || [ "${failed:-0}" != 0 ]; then
    tps=fail lat=fail
    echo "   $t $label failed after ${tx:-0} transactions: $(echo "$out" | grep -m1 -iE 'error|fatal|abort' || true)" >&2
  fi
  echo "$round $label $t $tps ${tx:-0} $((after - before)) $lat" >>"$RESULTS"
  echo "round $round  $label  $t: tps $tps, latency $lat ms" >&2
}
for round in $(seq 1 "$ROUNDS"); do
  for mode in "${MODES[@]}"; do
    for t in "${TARGETS[@]}"; do
      run "$round" "$mode" "$t" "$CLIENTS" -M "$mode" -f "$WORK/point.sql"
    done
  done
done
# Server connections the proxies hold after the point selects (pools keep them open):
# sg-one uses `one` as app, sg-two-same `one` as app0 and app1, sg-two s0 and s1.
held=""
for su in one:app one:app0 one:app1 s0:app s1:app; do
  held+=" $su $(sql_on "${su%%:*}" "SELECT count(*) FROM pg_stat_activity
    WHERE usename = '${su#*:}' AND backend_type = 'client backend'");"
done
echo "== server connections held by the proxies:$held" >&2
if [ "${BENCH_FANOUT:-1}" != 0 ]; then
  for q in count top first; do
    for t in direct sg-one sg-two; do
      run 1 "fanout-$q" "$t" 1 -M simple -f "$WORK/$q.sql"
    done
  done
fi

awk -v clk="$CLK" -v modes="${MODES[*]}" '
  { key = $2 " " $3; per[$1 " " key] = $4; if ($1 > rounds) rounds = $1
    if ($4 == "fail") { failed[key] = 1 } else { tps[key] += $4; lat[key] += $7; n[key]++ }
    tx[key] += $5; ticks[key] += $6 }
  function mean(k) { return (k in failed || n[k] == 0) ? -1 : tps[k] / n[k] }
  function show(v) { return v < 0 ? "fail" : sprintf("%.0f", v) }
  function cpu(k) { return (tx[k] > 0 && !(k in failed)) ? sprintf("%.3f", ticks[k] / clk / tx[k] * 10000) : "-" }
  END {
    nm = split(modes, M, " ")
    printf "point select, TPS (mean of rounds)\n%-10s%10s%10s%10s%10s%10s%10s%10s%10s\n", "mode", "sg-one", "two-same", "sg-two", "same/one", "two/one", "cpu one", "cpu same", "cpu two"
    for (i = 1; i <= nm; i++) {
      a = mean(M[i] " sg-one"); s = mean(M[i] " sg-two-same"); b = mean(M[i] " sg-two")
      printf "%-10s%10s%10s%10s%10s%10s%10s%10s%10s\n", M[i], show(a), show(s), show(b),
        (a > 0 && s >= 0) ? sprintf("%.2f", s / a) : "-", (a > 0 && b >= 0) ? sprintf("%.2f", b / a) : "-",
        cpu(M[i] " sg-one"), cpu(M[i] " sg-two-same"), cpu(M[i] " sg-two")
    }
    printf "(two-same: sg-two-same; cpu: proxy CPU seconds per 10k transactions)\n"
    printf "per round (TPS sg-one / sg-two-same / sg-two):\n"
    for (r = 1; r <= rounds; r++) for (i = 1; i <= nm; i++) {
      printf "  round %d %-9s", r, M[i]
      split("sg-one sg-two-same sg-two", TT, " ")
      for (j = 1; j <= 3; j++) { k = r " " M[i] " " TT[j]; printf " %8s", (k in per) ? show(per[k] == "fail" ? -1 : per[k]) : "-" }
      printf "\n"
    }
    if (("fanout-count direct") in tx) {
      printf "\nfan-out, mean latency in ms (1 client, -M simple)\n%-14s%10s%10s%10s%16s\n", "query", "direct", "sg-one", "sg-two", "sg-two/direct"
      split("count top first", Q, " ")
      for (i = 1; i <= 3; i++) {
        printf "%-14s", Q[i]
        for (j = 1; j <= 3; j++) { k = "fanout-" Q[i] " " (j == 1 ? "direct" : j == 2 ? "sg-one" : "sg-two")
          v[j] = (k in failed || n[k] == 0) ? -1 : lat[k] / n[k]
          printf "%10s", v[j] < 0 ? "fail" : sprintf("%.3f", v[j]) }
        printf "%16s\n", (v[1] > 0 && v[3] > 0) ? sprintf("%.2f", v[3] / v[1]) : "-"
      }
    }
  }' "$RESULTS"
