#!/usr/bin/env bash
# Installs and builds what the driver suite (integration-tests/drivers.rs) runs:
#   - pgjdbc 42.5 from Debian (libpostgresql-jdbc-java, /usr/share/java/postgresql.jar);
#     java and javac (17) are expected on the machine; the test compiles DriverTest.java
#   - psycopg2 2.9, asyncpg (0.29+), psycopg 3 (3.1+, binary wheel) and psycopg-pool for
#     the `python3` on PATH (or $SHARDGATE_PYTHON), from PyPI
#   - node-postgres and friends: `npm ci` in node/ (node and npm expected on the machine)
#   - the separate sqlx project in sqlx/, built into <repo>/target/drivers-sqlx
# Idempotent: each step is skipped when its result is already there.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${SHARDGATE_PYTHON:-python3}"

step() { printf '[drivers/setup] %s\n' "$*"; }

if [ ! -f /usr/share/java/postgresql.jar ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "pgjdbc missing: apt-get install libpostgresql-jdbc-java (as root)" >&2
    exit 1
  fi
  step "installing libpostgresql-jdbc-java"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends libpostgresql-jdbc-java \
    || { apt-get update -q && apt-get install -y -q --no-install-recommends libpostgresql-jdbc-java; }
fi
for tool in java javac node npm; do
  command -v "$tool" >/dev/null 2>&1 || { echo "$tool not found on PATH" >&2; exit 1; }
done

if ! "$python" -c 'import psycopg2; assert psycopg2.__version__.startswith("2.9")' 2>/dev/null; then
  step "installing psycopg2-binary 2.9 for $("$python" -c 'import sys; print(sys.executable)')"
  "$python" -m pip install --quiet --disable-pip-version-check 'psycopg2-binary>=2.9,<2.10'
fi

if ! "$python" -c 'import asyncpg; assert tuple(int(p) for p in asyncpg.__version__.split(".")[:2]) >= (0, 29)' 2>/dev/null; then
  step "installing asyncpg for $("$python" -c 'import sys; print(sys.executable)')"
  "$python" -m pip install --quiet --disable-pip-version-check 'asyncpg>=0.29,<1'
fi

if ! "$python" -c 'import psycopg, psycopg_pool; assert (3, 1) <= tuple(int(p) for p in psycopg.__version__.split(".")[:2]) < (4, 0); assert psycopg.pq.__impl__ in ("binary", "c")' 2>/dev/null; then
  step "installing psycopg 3 (binary) and psycopg-pool for $("$python" -c 'import sys; print(sys.executable)')"
  "$python" -m pip install --quiet --disable-pip-version-check 'psycopg[binary]>=3.1,<4' 'psycopg-pool>=3.1,<4'
fi

# npm ci wipes node_modules: run it only when the lock file changed since the last one.
if ! cmp -s "$here/node/package-lock.json" "$here/node/node_modules/.shardgate-lock" 2>/dev/null; then
  step "npm ci in integration-tests/drivers/node"
  (cd "$here/node" && npm ci --no-audit --no-fund --loglevel=error)
  cp "$here/node/package-lock.json" "$here/node/node_modules/.shardgate-lock"
fi

step "building the sqlx driver program"
CARGO_TARGET_DIR="$repo/target/drivers-sqlx" \
  cargo build --locked --quiet --manifest-path "$here/sqlx/Cargo.toml"

step "ready"
