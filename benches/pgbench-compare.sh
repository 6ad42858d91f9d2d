#!/usr/bin/env bash
# pgbench select-only through shardgate, PgBouncer and Pgpool-II, and directly, in one
# run on one machine, interleaved over several rounds so drift hits every target alike.
#
#   benches/pgbench-compare.sh [seconds-per-run (10)] [rounds (2)]
#
# Targets (all with the same pool size and 16 clients, -j2, scale 10):
#   direct      the primary itself
#   pgbouncer   PgBouncer, transaction pooling, in front of the primary
#   sg-primary  shardgate, transaction pooling, a map with the primary only
#   sg-split    shardgate with the primary and 2 streaming replicas (reads on replicas)
#   pgpool      Pgpool-II, streaming-replication mode, load balancing over the replicas
#   sg-noryw    sg-split with read_your_writes off (only in the write workload below)
#   sg-1w       sg-primary on one tokio worker thread (TOKIO_WORKER_THREADS=1)
#   replica     one replica directly (not in the default list; BENCH_TARGETS adds it)
# BENCH_TARGETS and BENCH_MODES (space-separated) narrow a run.
#
# A second, write workload (pgbench -N, prepared) runs against direct, sg-split and
# sg-noryw: the difference between the last two is the cost of read-your-writes (one
# round trip per writing transaction to learn the commit position).
#
# Prints TPS per mode and target (mean over rounds), the ratios the issues set targets
# for, and proxy CPU seconds per 10k transactions (utime+stime from /proc).
# Needs: PostgreSQL server binaries, pgbench, pgbouncer, pgpool2 (Debian packages).
set -euo pipefail

SECONDS_PER_RUN=${1:-10}
ROUNDS=${2:-2}
CLIENTS=16
JOBS=2
SCALE=10
POOL=16
read -r -a MODES <<<"${BENCH_MODES:-simple extended prepared}"
read -r -a TARGETS <<<"${BENCH_TARGETS:-direct pgbouncer sg-primary sg-1w sg-split pgpool}"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PGBIN=$(pg_config --bindir 2>/dev/null || true)
[ -x "$PGBIN/pg_ctl" ] || PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
SHARDGATE=${SHARDGATE_BIN:-$ROOT/target/release/shardgate}
if [ ! -x "$SHARDGATE" ]; then
  (cd "$ROOT" && cargo build --release)
fi

WORK=$(mktemp -d /tmp/shardgate-bench.XXXXXX)
chmod 755 "$WORK"
if [ "$(id -u)" -eq 0 ]; then
  chown postgres: "$WORK"
  as_pg() { runuser -u postgres -- "$@"; }
else
  as_pg() { "$@"; }
fi

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$WORK/pgbouncer.pid" ] && kill "$(cat "$WORK/pgbouncer.pid")" 2>/dev/null || true
  [ -f "$WORK/pgpool.pid" ] && kill -INT "$(cat "$WORK/pgpool.pid")" 2>/dev/null || true
  for d in p r1 r2; do
    [ -d "$WORK/$d" ] && as_pg "$PGBIN/pg_ctl" -D "$WORK/$d" -m immediate stop >/dev/null 2>&1 || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

P=$(free_port); R1=$(free_port); R2=$(free_port)
declare -A PORT=([direct]=$P [replica]=$R1 [pgbouncer]=$(free_port) [sg-primary]=$(free_port) [sg-split]=$(free_port) [pgpool]=$(free_port) [sg-noryw]=$(free_port) [sg-1w]=$(free_port))

echo "== cluster: primary :$P, replicas :$R1 :$R2 (in $WORK)" >&2
as_pg "$PGBIN/initdb" -D "$WORK/p" -U postgres --auth=trust >/dev/null
cat >>"$WORK/p/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
max_connections = 200
shared_buffers = 256MB
wal_level = replica
hot_standby = on
fsync = off
synchronous_commit = off
EOF
cat >"$WORK/p/pg_hba.conf" <<EOF
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
local all all trust
EOF
start_pg() { # dir port
  as_pg "$PGBIN/pg_ctl" -D "$WORK/$1" -o "-p $2" -l "$WORK/$1.log" -w start >/dev/null
}
start_pg p "$P"
psql_p() { "$PGBIN/psql" -X -q -h 127.0.0.1 -p "$P" -U postgres -v ON_ERROR_STOP=1 "$@"; }
psql_p -d postgres -c "CREATE ROLE app LOGIN" -c "CREATE DATABASE app OWNER app"
"$PGBIN/pgbench" -q -i -s "$SCALE" -h 127.0.0.1 -p "$P" -U app app >/dev/null 2>&1
for r in r1:$R1 r2:$R2; do
  dir=${r%%:*} port=${r##*:}
  as_pg "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$P" -U postgres -D "$WORK/$dir" -R -X stream -c fast >/dev/null
  start_pg "$dir" "$port"
done
echo "== waiting for the replicas to catch up" >&2
for port in $R1 $R2; do
  for _ in $(seq 1 300); do
    n=$("$PGBIN/psql" -X -At -h 127.0.0.1 -p "$port" -U postgres -d app \
      -c "SELECT count(*) FROM pgbench_branches" 2>/dev/null || echo 0)
    [ "$n" = "$SCALE" ] && break
    sleep 0.1
  done
done

# --- shardgate (two instances: primary only, and read/write split) ---
write_shardgate() { # name port replicas-yaml [read_your_writes] [worker threads]
  mkdir -p "$WORK/$1"
  cat >"$WORK/$1/map.yaml" <<EOF
version: 1
database: app
shards:
  s0: { primary: 127.0.0.1:$P, replicas: [$3] }
default_shard: s0
EOF
  cat >"$WORK/$1/shardgate.yaml" <<EOF
listen: 127.0.0.1:$2
pool: { mode: transaction, size: $POOL, acquire_timeout: 30s }
routing: { read_your_writes: ${4:-true} }
users:
  - { name: app, password: app-secret }
shard_map: map.yaml
EOF
  TOKIO_WORKER_THREADS=${5:-$(nproc)} RUST_LOG=warn "$SHARDGATE" --config "$WORK/$1/shardgate.yaml" 2>"$WORK/$1.log" &
  PIDS+=($!)
  eval "PID_${1//-/_}=$!"
}
write_shardgate sg-primary "${PORT[sg-primary]}" ""
write_shardgate sg-split "${PORT[sg-split]}" "127.0.0.1:$R1, 127.0.0.1:$R2"
write_shardgate sg-noryw "${PORT[sg-noryw]}" "127.0.0.1:$R1, 127.0.0.1:$R2" false
write_shardgate sg-1w "${PORT[sg-1w]}" "" true 1

# --- PgBouncer ---
echo '"app" ""' >"$WORK/userlist.txt"
cat >"$WORK/pgbouncer.ini" <<EOF
[databases]
app = host=127.0.0.1 port=$P dbname=app user=app
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = ${PORT[pgbouncer]}
unix_socket_dir =
auth_type = trust
auth_file = $WORK/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
max_client_conn = 200
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
EOF
chown postgres: "$WORK"/pgbouncer.ini "$WORK"/userlist.txt 2>/dev/null || true
as_pg pgbouncer -d "$WORK/pgbouncer.ini"

# --- Pgpool-II ---
cat >"$WORK/pgpool.conf" <<EOF
backend_clustering_mode = 'streaming_replication'
listen_addresses = '127.0.0.1'
port = ${PORT[pgpool]}
pcp_listen_addresses = ''
pcp_port = $(free_port)
unix_socket_directories = '$WORK'
pcp_socket_dir = '$WORK'
backend_hostname0 = '127.0.0.1'
backend_port0 = $P
backend_weight0 = 0
backend_flag0 = 'ALLOW_TO_FAILOVER'
backend_hostname1 = '127.0.0.1'
backend_port1 = $R1
backend_weight1 = 1
backend_flag1 = 'ALLOW_TO_FAILOVER'
backend_hostname2 = '127.0.0.1'
backend_port2 = $R2
backend_weight2 = 1
backend_flag2 = 'ALLOW_TO_FAILOVER'
enable_pool_hba = off
num_init_children = $((CLIENTS * 2))
max_pool = 1
load_balance_mode = on
sr_check_period = 10
sr_check_user = 'postgres'
health_check_period = 0
pid_file_name = '$WORK/pgpool.pid'
logdir = '$WORK'
EOF
: >"$WORK/pcp.conf"
chown postgres: "$WORK"/pgpool.conf "$WORK"/pcp.conf 2>/dev/null || true
as_pg pgpool -n -f "$WORK/pgpool.conf" -F "$WORK/pcp.conf" >"$WORK/pgpool.log" 2>&1 &
PIDS+=($!)

export PGPASSWORD=app-secret
for t in "${TARGETS[@]}" sg-noryw; do
  for _ in $(seq 1 100); do
    "$PGBIN/psql" -X -At -h 127.0.0.1 -p "${PORT[$t]}" -U app -d app -c "SELECT 1" >/dev/null 2>&1 && break
    sleep 0.1
  done
done

# CPU seconds (user + system) of the processes behind a target.
CLK=$(getconf CLK_TCK)
proxy_pids() {
  case $1 in
    direct | replica) ;;
    pgbouncer) cat "$WORK/pgbouncer.pid" ;;
    sg-primary) echo "$PID_sg_primary" ;;
    sg-split) echo "$PID_sg_split" ;;
    sg-noryw) echo "$PID_sg_noryw" ;;
    sg-1w) echo "$PID_sg_1w" ;;
    pgpool) pgrep -x pgpool || true ;;
  esac
}
cpu_ticks() {
  local total=0 pid
  for pid in $(proxy_pids "$1"); do
    [ -r "/proc/$pid/stat" ] || continue
    # Fields 14 and 15 (utime, stime), counted after the ")" that ends the name.
    total=$((total + $(sed 's/.*) //' "/proc/$pid/stat" | awk '{print $12 + $13}')))
  done
  echo "$total"
}

RESULTS="$WORK/results.txt"
: >"$RESULTS"
run() { # round label target pgbench-args...
  local round=$1 label=$2 t=$3
  shift 3
  local before after out ok tps tx failed
  before=$(cpu_ticks "$t")
  out=$("$PGBIN/pgbench" -n "$@" -c "$CLIENTS" -j "$JOBS" -T "$SECONDS_PER_RUN" \
    -h 127.0.0.1 -p "${PORT[$t]}" -U app app 2>&1) && ok=1 || ok=0
  after=$(cpu_ticks "$t")
  tps=$(echo "$out" | awk '/^tps = /{print $3; exit}')
  tx=$(echo "$out" | awk '/actually processed/{print $NF; exit}')
  failed=$(echo "$out" | awk '/number of failed transactions/{print $5; exit}')
  if [ "$ok" != 1 ] || [ -z "$tps" ] || [ "${failed:-0}" != 0 ]; then
    tps=fail
    echo "   $t $label failed: $(echo "$out" | grep -m1 -iE 'error|fatal|abort' || true)" >&2
  fi
  echo "$round $label $t $tps ${tx:-0} $((after - before))" >>"$RESULTS"
  echo "round $round  $label  $t: tps $tps" >&2
}
for round in $(seq 1 "$ROUNDS"); do
  for mode in "${MODES[@]}"; do
    for t in "${TARGETS[@]}"; do
      run "$round" "$mode" "$t" -S -M "$mode"
    done
  done
  for t in direct sg-split sg-noryw; do
    run "$round" write "$t" -N -M prepared
  done
done

awk -v clk="$CLK" -v modes="${MODES[*]}" -v targets="${TARGETS[*]}" '
  { key = $2 " " $3
    if ($4 == "fail") { failed[key] = 1 } else { tps[key] += $4; n[key]++ }
    tx[key] += $5; ticks[key] += $6 }
  function mean(k) { return (k in failed || n[k] == 0) ? -1 : tps[k] / n[k] }
  function show(v) { return v < 0 ? "fail" : sprintf("%.0f", v) }
  function ratio(a, b) { return (a < 0 || b <= 0) ? "-" : sprintf("%.2f", a / b) }
  END {
    nm = split(modes, M, " "); nt = split(targets, T, " ")
    printf "%-10s", "TPS"; for (j = 1; j <= nt; j++) printf "%12s", T[j]; printf "\n"
    for (i = 1; i <= nm; i++) {
      printf "%-10s", M[i]
      for (j = 1; j <= nt; j++) printf "%12s", show(mean(M[i] " " T[j])); printf "\n"
    }
    printf "\n%-10s%16s%16s%16s%16s\n", "ratios", "sg-primary/direct", "sg-primary/pgb", "sg-split/pgpool", "sg-split/pgb"
    for (i = 1; i <= nm; i++) {
      m = M[i]
      printf "%-10s%16s%16s%16s%16s\n", m, ratio(mean(m " sg-primary"), mean(m " direct")),
        ratio(mean(m " sg-primary"), mean(m " pgbouncer")), ratio(mean(m " sg-split"), mean(m " pgpool")),
        ratio(mean(m " sg-split"), mean(m " pgbouncer"))
    }
    printf "\nproxy CPU seconds per 10k transactions\n%-10s", ""
    for (j = 1; j <= nt; j++) if (T[j] != "direct" && T[j] != "replica") printf "%12s", T[j]; printf "\n"
    for (i = 1; i <= nm; i++) {
      printf "%-10s", M[i]
      for (j = 1; j <= nt; j++) { k = M[i] " " T[j]; if (T[j] == "direct" || T[j] == "replica") continue
        printf "%12s", (tx[k] > 0 && !(k in failed)) ? sprintf("%.3f", ticks[k] / clk / tx[k] * 10000) : "-" }
      printf "\n"
    }
    w = mean("write direct"); a = mean("write sg-split"); b = mean("write sg-noryw")
    printf "\nwrite workload (pgbench -N -M prepared), TPS\n%12s%12s%12s%16s\n", "direct", "sg-split", "sg-noryw", "ryw cost"
    printf "%12s%12s%12s%16s\n", show(w), show(a), show(b), (a > 0 && b > 0) ? sprintf("%.1f%%", (1 - a / b) * 100) : "-"
  }' "$RESULTS"
