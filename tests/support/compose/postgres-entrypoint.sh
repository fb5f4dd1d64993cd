#!/bin/sh
# The part of the postgres image's entrypoint compose.yaml relies on: a cluster owned by
# POSTGRES_USER with POSTGRES_PASSWORD, database POSTGRES_DB, /docker-entrypoint-initdb.d/*.sql
# run once on an empty data directory, then the server on all interfaces. Runs as `postgres`.
set -eu
bin=/usr/local/lib/pgbin
data="${PGDATA:-/var/lib/postgresql/data}"
if [ ! -s "$data/PG_VERSION" ]; then
  pwfile="$(mktemp)"
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  "$bin/initdb" -D "$data" -U "$POSTGRES_USER" --pwfile="$pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >> "$data/pg_hba.conf"
  # A private socket while initialising, so the health check (pg_isready on the default
  # socket) cannot report a server that is still being set up.
  init_socket="$(mktemp -d)"
  "$bin/pg_ctl" -D "$data" -w start \
    -o "-c listen_addresses='' -c unix_socket_directories=$init_socket" >/dev/null
  if [ "${POSTGRES_DB:-$POSTGRES_USER}" != postgres ]; then
    "$bin/psql" -h "$init_socket" -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d postgres \
      -c "CREATE DATABASE \"${POSTGRES_DB:-$POSTGRES_USER}\""
  fi
  for script in /docker-entrypoint-initdb.d/*.sql; do
    [ -e "$script" ] || continue
    "$bin/psql" -h "$init_socket" -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" \
      -d "${POSTGRES_DB:-$POSTGRES_USER}" -f "$script"
  done
  "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null
fi
exec "$bin/postgres" -D "$data" -c listen_addresses='*'
