#!/bin/bash
# Entrypoint of the PostgreSQL node image (docker/postgres/Dockerfile), for both roles.
# Runs as the `postgres` user. The data directory $PGDATA lives one level below the
# volume (/var/lib/postgresql/data/pgdata): it is made in a sibling temp dir and renamed
# into place, so a first start interrupted half-way starts over instead of running a
# half-made server.
#
# Environment (defaults in brackets):
#   NODE_ROLE          primary | replica                                  [primary]
#   NODE_NAME          cluster_name, and the replica's application_name   [hostname]
#   PGPORT             the port the server listens on                     [5432]
#   POSTGRES_PASSWORD  the superuser `postgres` (primary, first start)    [required]
#   REPLICATION_USER / REPLICATION_PASSWORD   the role replicas stream as [replicator / required]
#   APP_USER / APP_PASSWORD / APP_DB          the application role and database (primary)
#   PRIMARY_HOST / PRIMARY_PORT               where a replica clones and streams from
# Extra arguments are passed to `postgres` (e.g. `-c log_min_messages=debug1`).
set -euo pipefail

role="${NODE_ROLE:-primary}"
name="${NODE_NAME:-$(hostname)}"
port="${PGPORT:-5432}"
staging="$PGDATA.new"

log() { echo "shardgate-postgres[$name]: $*" >&2; }

# Settings for every node, written before the server first starts. A replica gets them
# with the base backup, so a promoted replica behaves like the primary it replaces.
write_conf() {
    cat >>"$1/postgresql.conf" <<CONF

# shardgate compose cluster (docker/postgres/entrypoint.sh)
listen_addresses = '*'
password_encryption = 'scram-sha-256'
wal_level = logical                 # online resharding uses logical replication
# A reshard job takes, on a source, one slot and WAL sender for its subscription plus
# one per table being synchronised; on a target, an apply worker plus sync workers.
# The replicas stream without slots (wal_keep_size) but each takes a WAL sender.
max_wal_senders = 20
max_replication_slots = 20
max_worker_processes = 16
max_logical_replication_workers = 8
max_sync_workers_per_subscription = 4
wal_keep_size = '256MB'             # the replicas use no slot
hot_standby = on
hot_standby_feedback = on
log_line_prefix = '%m [%p] %q%u@%d '
CONF
    cat >"$1/pg_hba.conf" <<HBA
# TYPE  DATABASE     USER  ADDRESS  METHOD
local   all          all            trust
host    replication  all   all      scram-sha-256
host    all          all   all      scram-sha-256
HBA
}

init_primary() {
    : "${POSTGRES_PASSWORD:?the primary needs POSTGRES_PASSWORD}"
    : "${REPLICATION_PASSWORD:?the primary needs REPLICATION_PASSWORD}"
    log "initdb (SCRAM-SHA-256, wal_level=logical)"
    rm -rf "$staging"
    local pwfile
    pwfile="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb -D "$staging" -U postgres --pwfile="$pwfile" --auth-local=trust \
        --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    write_conf "$staging"
    # A temporary server on the unix socket only: nothing connects over TCP (and no
    # healthcheck passes) until the roles and the database exist.
    pg_ctl -D "$staging" -w -o "-c listen_addresses='' -p $port" start >/dev/null
    psql -v ON_ERROR_STOP=1 -q -U postgres -d postgres \
        --set repl_user="${REPLICATION_USER:-replicator}" \
        --set repl_password="$REPLICATION_PASSWORD" \
        --set app_user="${APP_USER:-app}" --set app_password="${APP_PASSWORD:-app-secret}" \
        --set app_db="${APP_DB:-app}" <<'SQL'
CREATE ROLE :"repl_user" REPLICATION LOGIN PASSWORD :'repl_password';
CREATE ROLE :"app_user" LOGIN PASSWORD :'app_password';
CREATE DATABASE :"app_db" OWNER :"app_user";
SQL
    pg_ctl -D "$staging" -w -m fast stop >/dev/null
    mv "$staging" "$PGDATA"
}

init_replica() {
    : "${PRIMARY_HOST:?a replica needs PRIMARY_HOST}"
    : "${REPLICATION_PASSWORD:?a replica needs REPLICATION_PASSWORD}"
    # The password in a file on the volume (beside $PGDATA), named in primary_conninfo:
    # the walreceiver reads it on every reconnect, also after the container is recreated.
    local passfile
    passfile="$(dirname "$PGDATA")/replication.pgpass"
    printf '*:*:*:%s:%s\n' "${REPLICATION_USER:-replicator}" "$REPLICATION_PASSWORD" >"$passfile"
    chmod 0600 "$passfile"
    local primary="host=$PRIMARY_HOST port=${PRIMARY_PORT:-5432} passfile=$passfile"
    primary="$primary user=${REPLICATION_USER:-replicator} application_name=$name"
    # Retried until the primary is up and initialised (compose may start us first, or
    # the primary may restart meanwhile). -R writes primary_conninfo and standby.signal.
    until pg_basebackup -d "$primary" -D "$staging" -R -X stream -c fast 2>/tmp/basebackup.err; do
        log "waiting for $PRIMARY_HOST:${PRIMARY_PORT:-5432}: $(tail -n 1 /tmp/basebackup.err)"
        rm -rf "$staging"
        sleep 1
    done
    chmod 0700 "$staging"
    mv "$staging" "$PGDATA"
    log "cloned $PRIMARY_HOST; starting as a streaming replica"
}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    case "$role" in
        primary) init_primary ;;
        replica) init_replica ;;
        *) log "NODE_ROLE must be primary or replica, not '$role'"; exit 2 ;;
    esac
fi

# Port and name on the command line: they differ per node, and the command line wins
# over the configuration files a replica copied from its primary.
exec postgres -D "$PGDATA" -c port="$port" -c cluster_name="$name" "$@"
