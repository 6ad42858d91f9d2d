#!/bin/bash
# Init script of a compose primary (mounted into /docker-entrypoint-initdb.d, so the
# postgres image runs it once, on an empty data volume, against its temporary server):
# settings for streaming and logical replication, replication access for the replica's
# pg_basebackup, and the application role and database.
#
# Settings go through ALTER SYSTEM (postgresql.auto.conf) rather than `postgres -c`, so the
# base backup carries them to the replica and a promoted replica keeps them. They take
# effect when the image restarts the server after the init scripts.
# The image may source this file instead of executing it: no `exit`, no `set -u`.

psql -v ON_ERROR_STOP=1 --username postgres --dbname postgres \
    --set app_user="$APP_USER" --set app_password="$APP_PASSWORD" --set app_db="$APP_DB" <<'SQL'
ALTER SYSTEM SET wal_level = 'logical';            -- resharding uses logical replication
ALTER SYSTEM SET max_wal_senders = 10;
ALTER SYSTEM SET max_replication_slots = 10;
ALTER SYSTEM SET hot_standby = on;
ALTER SYSTEM SET wal_keep_size = '128MB';          -- the replica uses no slot
ALTER SYSTEM SET password_encryption = 'scram-sha-256';
SET password_encryption = 'scram-sha-256';         -- this session: a SCRAM verifier for app
CREATE ROLE :"app_user" LOGIN PASSWORD :'app_password';
CREATE DATABASE :"app_db" OWNER :"app_user";
SQL

# The image's pg_hba.conf already ends with `host all all all scram-sha-256`, which does
# not cover replication connections.
echo "host replication postgres all scram-sha-256" >> "$PGDATA/pg_hba.conf"
