#!/usr/bin/env bash
# The integration suite against the docker compose cluster (docker/compose.yml), in one
# command: start a Docker engine if needed, build the images, bring the cluster up, wait
# for it, run the tests, and tear everything down (containers, network, volumes), also on
# failure and Ctrl-C. See docs/docker.md.
#
#   docker/test.sh              # the whole run
#   docker/test.sh --check      # only say whether a Docker engine is (or can be) running
#
# Environment:
#   SHARDGATE_DOCKER_BINARY   proxy binary to put in the image (default: cargo build
#                             --release, then target/release/shardgate)
#   SHARDGATE_DOCKER_SUITE    test binaries run against shard s0 through an in-process
#                             proxy (default: cluster routing protocol pooling)
#   SHARDGATE_DOCKER_KEEP=1   leave the cluster running afterwards (tear down yourself:
#                             docker compose -p shardgate-test -f docker/compose.yml down -v)
#   SHARDGATE_DOCKER_RESHARD=0   skip the reshard under writers (buckets of s0 moved to
#                             s1 by a map edit and RELOAD)
#   SHARDGATE_DOCKER_FAILOVER=0  skip the last phase (a primary killed, another cut off
#                             the network: promotion and fencing)
#
# The proxy gets a copy of docker/shardgate.yaml and docker/shard-map.yaml in a temporary
# directory it may write (a promotion rewrites the map), so the repo's files stay as they
# are.
set -euo pipefail
cd "$(dirname "$0")/.."

project="${SHARDGATE_COMPOSE_PROJECT:-shardgate-test}"
started_dockerd=""
build_ctx=""
config_dir=""
start=$SECONDS

say() { echo "docker/test.sh: $*" >&2; }
phase() { say "[$((SECONDS - start))s] $*"; }

# A Docker engine: running already, or started here when we are root and dockerd exists.
# Prints exactly what is missing otherwise and returns non-zero.
ensure_engine() {
    if ! command -v docker >/dev/null 2>&1; then
        say "no docker command: install the Docker engine (Debian: apt-get install docker.io docker-compose debootstrap)"
        return 1
    fi
    docker info >/dev/null 2>&1 && return 0
    if ! command -v dockerd >/dev/null 2>&1; then
        say "the Docker engine is not running and there is no dockerd here to start (install docker.io)"
        return 1
    fi
    if [ "$(id -u)" -ne 0 ]; then
        say "the Docker engine is not running; start it (sudo dockerd, or systemctl start docker) or run this as root"
        return 1
    fi
    say "starting dockerd (log: /tmp/shardgate-dockerd.log)"
    # A session of its own: a Ctrl-C in the terminal (SIGINT to the foreground process
    # group) must reach this script, not the engine it still needs for the teardown.
    setsid dockerd >/tmp/shardgate-dockerd.log 2>&1 &
    started_dockerd=$!
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && return 0
        kill -0 "$started_dockerd" 2>/dev/null || break
        sleep 0.5
    done
    say "dockerd did not come up; the end of /tmp/shardgate-dockerd.log:"
    tail -n 15 /tmp/shardgate-dockerd.log >&2
    return 1
}

# Compose v2 (`docker compose`) when the plugin is there, else docker-compose 1.x.
compose_cmd() {
    if docker compose version >/dev/null 2>&1; then
        echo "docker compose"
    elif command -v docker-compose >/dev/null 2>&1; then
        echo "docker-compose"
    else
        return 1
    fi
}

stop_dockerd() {
    if [ -n "$started_dockerd" ]; then
        kill "$started_dockerd" 2>/dev/null || true
        wait "$started_dockerd" 2>/dev/null || true
    fi
}

if [ "${1:-}" = "--check" ]; then
    ensure_engine || exit 1
    compose_cmd >/dev/null || { say "no docker compose plugin and no docker-compose (apt-get install docker-compose)"; stop_dockerd; exit 1; }
    stop_dockerd
    exit 0
fi

ensure_engine || exit 1
compose="$(compose_cmd)" || { say "no docker compose plugin and no docker-compose (apt-get install docker-compose)"; exit 1; }
dc() { $compose -p "$project" -f docker/compose.yml "$@"; }

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [ "$status" -ne 0 ] && [ -n "${cluster_up:-}" ]; then
        say "failed (exit $status); the cluster's last log lines:"
        dc logs --no-color --tail 30 2>&1 | tail -n 120 >&2 || true
    fi
    if [ -n "${cluster_up:-}" ] && [ "${SHARDGATE_DOCKER_KEEP:-}" != 1 ]; then
        phase "tearing down (containers, network, volumes)"
        dc down -v --remove-orphans --timeout 5 >/dev/null 2>&1 || say "compose down failed"
    fi
    [ -n "$build_ctx" ] && rm -rf "$build_ctx"
    [ -n "$config_dir" ] && rm -rf "$config_dir"
    stop_dockerd
    phase "done, exit $status"
    exit "$status"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

phase "images: base"
docker/base-image.sh
phase "images: shardgate-postgres:15 (docker/postgres)"
docker build -q -t shardgate-postgres:15 docker/postgres >/dev/null

binary="${SHARDGATE_DOCKER_BINARY:-}"
if [ -z "$binary" ]; then
    phase "cargo build --release --bin shardgate"
    cargo build --release --locked --bin shardgate
    binary=target/release/shardgate
fi
phase "images: shardgate:local from $binary (docker/Dockerfile.runtime)"
build_ctx="$(mktemp -d /tmp/shardgate-image.XXXXXX)"
cp "$binary" "$build_ctx/shardgate"
docker build -q -f docker/Dockerfile.runtime -t shardgate:local "$build_ctx" >/dev/null
# A reshard job creates missing tables on its target with pg_dump, run by the proxy.
docker run --rm --entrypoint pg_dump shardgate:local --version >/dev/null \
    || { say "the proxy image has no working pg_dump"; exit 1; }

# The proxy's config directory: a copy it can write (uid 10001 in the image), since a
# promotion rewrites the shard map (compose.yml mounts SHARDGATE_CONFIG_DIR).
config_dir="$(mktemp -d /tmp/shardgate-config.XXXXXX)"
cp docker/shardgate.yaml docker/shard-map.yaml "$config_dir/"
chown -R 10001 "$config_dir" 2>/dev/null || chmod -R a+rwX "$config_dir"
export SHARDGATE_CONFIG_DIR="$config_dir"

phase "cluster: up (compose project $project)"
# A leftover of an earlier run killed hard (SIGKILL skips the trap).
dc down -v --remove-orphans --timeout 5 >/dev/null 2>&1 || true
cluster_up=1
# depends_on waits for every node to be healthy before the proxy starts.
dc up -d --no-build --quiet-pull 2>/dev/null || dc up -d --no-build

phase "cluster: waiting for the proxy on 127.0.0.1:6432"
for i in $(seq 120); do
    (exec 3<>/dev/tcp/127.0.0.1/6432) 2>/dev/null && break
    [ "$i" -eq 120 ] && { say "the proxy never listened on 127.0.0.1:6432"; exit 1; }
    sleep 0.5
done

# The nodes as the tests reach them (published ports = the ports inside the containers),
# and the container behind each port for the kill and partition tests.
containers=""
for node in s0-primary:5432 s0-replica1:5433 s0-replica2:5434 s1-primary:5442 s1-replica1:5443 s1-replica2:5444; do
    id="$(dc ps -q "${node%%:*}")"
    containers="${containers:+$containers,}${node##*:}=$id"
done
export SHARDGATE_TEST_PROXY=127.0.0.1:6432
export SHARDGATE_TEST_SHARDS="s0=127.0.0.1:5432,127.0.0.1:5433,127.0.0.1:5434;s1=127.0.0.1:5442,127.0.0.1:5443,127.0.0.1:5444"
export SHARDGATE_TEST_SHARD_MAP="$config_dir/shard-map.yaml"
export SHARDGATE_TEST_CONTAINERS="$containers"
# The compose network the proxy reaches the nodes on (the partition test leaves it).
SHARDGATE_TEST_NETWORK="$(docker inspect -f '{{range $name, $_ := .NetworkSettings.Networks}}{{$name}}{{end}}' "$(dc ps -q s1-primary)")"
export SHARDGATE_TEST_NETWORK
export SHARDGATE_TEST_ADMIN=admin:admin-secret
export SHARDGATE_TEST_SUPERUSER_DSN="host=127.0.0.1 port=5432 user=postgres password=postgres-secret dbname=postgres"

phase "tests: the dockerized proxy (cargo test --test docker_cluster)"
cargo test --locked --test docker_cluster -- --skip failover_ --skip reshard_

# In a process of its own: it leaves the proxy on a new map (s0's upper buckets on s1),
# which the tests above loaded before; later phases read the map afresh.
if [ "${SHARDGATE_DOCKER_RESHARD:-1}" != 0 ]; then
    phase "tests: a reshard under writers (map edit + RELOAD through the dockerized proxy)"
    SHARDGATE_TEST_RESHARD=1 cargo test --locked --test docker_cluster reshard_ -- --nocapture
fi

# The existing suite's external-cluster mode: its shared-cluster tests run against shard
# s0's containers through an in-process proxy (tests that kill or promote nodes still
# start local clusters of their own).
export SHARDGATE_TEST_PRIMARY=127.0.0.1:5432
export SHARDGATE_TEST_REPLICAS=127.0.0.1:5433,127.0.0.1:5434
suite=()
for t in ${SHARDGATE_DOCKER_SUITE:-cluster routing protocol pooling}; do suite+=(--test "$t"); done
phase "tests: shard s0's containers as the external cluster (cargo test ${suite[*]})"
cargo test --locked "${suite[@]}"

# Last, since they leave both shards with new primaries: s0's primary container killed,
# s1's cut off the network while it keeps running (a partition), then reconnected.
if [ "${SHARDGATE_DOCKER_FAILOVER:-1}" != 0 ]; then
    phase "tests: failover (docker kill and docker network disconnect of primaries)"
    SHARDGATE_TEST_FAILOVER=1 cargo test --locked --test docker_cluster failover_ -- --test-threads=1 --nocapture
fi
phase "all passed"
