#!/usr/bin/env bash
# Start a throwaway local PostgreSQL for the billing tests and print the SQLAlchemy URL that reaches it.
# Sourced by .ci/run; any failure is reported on stderr and leaves DEEPSERVE_TEST_DATABASE_URL unset, so the
# tests still run on SQLite. Usage: url="$(.ci/postgres.sh)" (stdout carries only the URL).
set -euo pipefail

PG_PORT="${DEEPSERVE_PG_PORT:-55432}"
PG_ROOT="${DEEPSERVE_PG_ROOT:-/tmp/deepserve-ci-pg}"
PG_USER=deepserve
PG_PASSWORD=deepserve
PG_DB=deepserve_test

say() { echo "postgres: $*" >&2; }

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
        say "not installed and not root: cannot apt-get install postgresql"
        exit 1
    fi
    say "installing the postgresql Debian package"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq >&2
    timeout 600 apt-get install -y -qq postgresql >&2
fi
BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"

# The server refuses to run as root: everything below runs as the postgres user (created by the package).
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

if [ -d "$PG_ROOT" ]; then  # a cluster left by an earlier run: stop it, start anew
    as_pg "$BIN/pg_ctl" -D "$PG_ROOT/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$PG_ROOT"
fi
mkdir -p "$PG_ROOT"
if [ "$(id -u)" = 0 ]; then chown postgres: "$PG_ROOT"; fi
as_pg "$BIN/initdb" -D "$PG_ROOT/data" -U postgres -A trust -E UTF8 >/dev/null
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# 55432 sits in the kernel's ephemeral range: a client socket of anything else on the machine can hold it for a
# moment (seen once here: "could not bind ... Address already in use"). Then take a port the kernel says is free.
for attempt in 1 2 3; do
    if as_pg "$BIN/pg_ctl" -D "$PG_ROOT/data" -l "$PG_ROOT/server.log" -w -t 60 \
        -o "-p $PG_PORT -k $PG_ROOT -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off" start >&2; then
        break
    fi
    if [ "$attempt" = 3 ] || [ -n "${DEEPSERVE_PG_PORT:-}" ] || ! grep -q "Address already in use" "$PG_ROOT/server.log"; then
        exit 1
    fi
    PG_PORT="$(free_port)"
    say "port taken, trying $PG_PORT"
done
as_pg "$BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 -q \
    -c "CREATE ROLE $PG_USER LOGIN PASSWORD '$PG_PASSWORD'" \
    -c "CREATE DATABASE $PG_DB OWNER $PG_USER" >&2
say "running on 127.0.0.1:$PG_PORT (data in $PG_ROOT)"
echo "postgresql+psycopg://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB"
