#!/bin/bash
# Entrypoint of a compose replica: on first start, clone the primary named by $1 with
# pg_basebackup -R (which writes primary_conninfo and standby.signal), then run postgres
# as a hot standby. Runs as the postgres user; PGPASSWORD is the superuser's password.
set -euo pipefail

primary="${1:?usage: replica-entrypoint.sh PRIMARY_HOST}"
PGDATA="${PGDATA:-/var/lib/postgresql/data}"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    # compose starts us once the primary is healthy; this covers it restarting meanwhile.
    until pg_isready -q -h "$primary" -U postgres; do
        sleep 1
    done
    # What a base backup interrupted on an earlier start left behind.
    find "$PGDATA" -mindepth 1 -delete
    pg_basebackup -h "$primary" -U postgres -D "$PGDATA" -R -X stream -c fast -P
    # The image creates the volume's directory with mode 1777; postgres insists on 0700.
    chmod 0700 "$PGDATA"
fi

exec postgres
