# Shared by instructions.sh and syscalls.sh (sourced, not run): a throwaway PostgreSQL with
# pgbench's tables and a role `app`, and the two poolers' configs in front of it, alike in
# both scripts so that their figures compare. Needs `work` (a temp dir) set by the caller.

as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_port() { for _ in $(seq 150); do pg_isready -q -h 127.0.0.1 -p "$1" && return; sleep 0.2; done; echo "port $1 never opened" >&2; exit 1; }

# Starts the cluster on a free port (set in pg_port) and writes $work/userlist.txt with
# PostgreSQL's own SCRAM verifier for app, as the harness does: with a plain password
# PgBouncer would run PBKDF2 on every login.
start_cluster() {
  pg_port=$(free_port)
  as_pg initdb -D "$work/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  as_pg pg_ctl -D "$work/data" -l "$work/pg.log" -w \
    -o "-p $pg_port -c listen_addresses=127.0.0.1 -k $work -c fsync=off" start >/dev/null
  psql -X -q -h "$work" -p "$pg_port" -U postgres -c "CREATE ROLE app LOGIN PASSWORD 'app_pw'" \
    -c "CREATE DATABASE app OWNER app"
  PGPASSWORD=app_pw pgbench -i -q -s 1 -h 127.0.0.1 -p "$pg_port" -U app app >/dev/null 2>&1
  local verifier
  verifier=$(psql -X -At -h "$work" -p "$pg_port" -U postgres \
    -c "SELECT rolpassword FROM pg_authid WHERE rolname = 'app'")
  printf '"app" "%s"\n' "$verifier" > "$work/userlist.txt"
  if [ "$(id -u)" -eq 0 ]; then chown -R postgres "$work"; fi
}

# breakwater_conf PORT [EXTRA_POOLER_LINES] -> $work/bw.toml; clients log in with $AUTH.
breakwater_conf() {
  cat > "$work/bw.toml" <<CONF
[pooler]
listen_addr = "127.0.0.1"
listen_port = $1
auth_type = "$AUTH"
auth_file = "$work/userlist.txt"
default_pool_size = 16
min_pool_size = 16
max_client_conn = 2000
${2:-}
[databases.app]
host = "127.0.0.1"
port = $pg_port
user = "app"
password = "app_pw"
CONF
}

# pgbouncer_conf PORT -> $work/pgb.ini, readable by the postgres user PgBouncer runs as.
pgbouncer_conf() {
  cat > "$work/pgb.ini" <<CONF
[databases]
app = host=127.0.0.1 port=$pg_port dbname=app user=app password=app_pw
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $1
unix_socket_dir =
auth_type = $AUTH
auth_file = $work/userlist.txt
pool_mode = transaction
default_pool_size = 16
min_pool_size = 16
max_client_conn = 2000
log_connections = 0
log_disconnections = 0
CONF
  if [ "$(id -u)" -eq 0 ]; then chown postgres "$work/pgb.ini" "$work"; fi
}
