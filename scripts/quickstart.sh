#!/usr/bin/env bash
# Runs Breakwater. With a config file argument it runs that config; without one it starts a
# throwaway local PostgreSQL (installing the server binaries with apt-get if missing), puts
# Breakwater in front of it, and prints how to connect with psql. Ctrl-C, or `kill` of this
# script's pid, stops both.
#
#   scripts/quickstart.sh                # throwaway Postgres + Breakwater on 127.0.0.1:6432
#   scripts/quickstart.sh pooler.toml    # your own config
#   PG_PORT=54329 BW_PORT=6432 BW_BIN=path/to/breakwater scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if [ -n "${BW_BIN:-}" ]; then
  BIN=$BW_BIN             # a binary you built already (the tests use this)
else
  echo "== building breakwater (release)"
  cargo build --release --quiet -p breakwater
  BIN="$PWD/target/release/breakwater"
fi

if [ $# -ge 1 ]; then
  exec "$BIN" --config "$1"
fi

pg_dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
if [ -z "$pg_dir" ] && ! command -v initdb >/dev/null 2>&1; then
  echo "== installing PostgreSQL server binaries (apt-get)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql >/dev/null
  pg_dir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
fi
[ -n "$pg_dir" ] && export PATH="$pg_dir:$PATH"

work=$(mktemp -d /tmp/breakwater-quickstart.XXXXXX)
chmod 755 "$work"
pg_port=${PG_PORT:-54329}
bw_port=${BW_PORT:-6432}
run_pg() {
  # Postgres refuses to run as root: use the postgres OS user then.
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
if [ "$(id -u)" -eq 0 ]; then chown postgres "$work"; fi

bw_pid=
cleanup() {
  # Breakwater first (it would log failed reconnects to a stopped Postgres), and wait for it so
  # its port is free when this script is gone.
  if [ -n "$bw_pid" ] && kill -0 "$bw_pid" 2>/dev/null; then
    kill -TERM "$bw_pid" 2>/dev/null || true
    # The second TERM is immediate: clients still connected are not waited for.
    sleep 0.2; kill -TERM "$bw_pid" 2>/dev/null || true
    wait "$bw_pid" 2>/dev/null || true
  fi
  run_pg pg_ctl -D "$work/data" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
# A plain `kill <pid>` of this script (SIGTERM) must stop Breakwater too; bash runs the EXIT
# trap only if the signal is trapped.
trap 'exit 143' TERM
trap 'exit 130' INT HUP

echo "== starting a throwaway PostgreSQL on 127.0.0.1:$pg_port ($work)"
run_pg initdb -D "$work/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C >/dev/null
run_pg pg_ctl -D "$work/data" -l "$work/postgres.log" -w \
  -o "-p $pg_port -c listen_addresses=127.0.0.1 -k $work" start >/dev/null
psql -X -q -h "$work" -p "$pg_port" -U postgres -c "CREATE ROLE app LOGIN PASSWORD 'app_pw'" >/dev/null
psql -X -q -h "$work" -p "$pg_port" -U postgres -c "CREATE DATABASE app OWNER app" >/dev/null

cat > "$work/userlist.txt" <<USERS
"app" "app_pw"
"admin" "admin_pw"
USERS
cat > "$work/pooler.toml" <<CONF
[pooler]
listen_addr = "127.0.0.1"
listen_port = $bw_port
auth_type = "scram-sha-256"
auth_file = "userlist.txt"
admin_users = ["admin"]
default_pool_size = 20
min_pool_size = 2

[databases.app]
host = "127.0.0.1"
port = $pg_port
user = "app"
CONF

cat <<MSG

Breakwater is starting on 127.0.0.1:$bw_port in front of PostgreSQL on 127.0.0.1:$pg_port.
Connect with:

    PGPASSWORD=app_pw psql -h 127.0.0.1 -p $bw_port -U app app
    DATABASE_URL=postgres://app:app_pw@127.0.0.1:$bw_port/app

Admin console (user admin, password admin_pw):

    PGPASSWORD=admin_pw psql -h 127.0.0.1 -p $bw_port -U admin breakwater -c 'SHOW POOLS'
    PGPASSWORD=admin_pw $BIN stats -p $bw_port -U admin

Config: $work/pooler.toml
Stop:   Ctrl-C, or kill $$ (stops Breakwater and the throwaway Postgres)

MSG
# In the background and waited for, so the traps above run when this script is signalled
# (bash defers traps while a foreground child runs).
"$BIN" --config "$work/pooler.toml" &
bw_pid=$!
wait "$bw_pid"
