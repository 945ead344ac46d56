#!/usr/bin/env bash
# Runs Breakwater. With a config file argument it runs that config; without one it starts a
# throwaway local PostgreSQL (installing the server binaries with apt-get if missing), puts
# Breakwater in front of it, and prints how to connect with psql. Ctrl-C stops both.
#
#   scripts/quickstart.sh                # throwaway Postgres + Breakwater on 127.0.0.1:6432
#   scripts/quickstart.sh pooler.toml    # your own config
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

echo "== building breakwater (release)"
cargo build --release --quiet -p breakwater
BIN="$PWD/target/release/breakwater"

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

cleanup() {
  run_pg pg_ctl -D "$work/data" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

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

Config: $work/pooler.toml   (Ctrl-C stops Breakwater and the throwaway Postgres)

MSG
"$BIN" --config "$work/pooler.toml"
