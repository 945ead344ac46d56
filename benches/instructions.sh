#!/usr/bin/env bash
# Instructions per transaction of Breakwater's and PgBouncer's own code, counted by
# `valgrind --tool=callgrind`: repeatable whatever else the machine is doing, unlike TPS or CPU
# time on a shared 2-core box. Kernel work (syscalls, wake-ups) is not counted, so this is the
# user-space half of "pooler CPU per transaction"; the harness measures the whole.
#
# Each pooler runs under callgrind twice, for a short and a long pgbench run
# (`-S -t N` per client); the difference divided by the difference in transactions removes
# start-up and login costs. Needs valgrind, PostgreSQL's server binaries, pgbench and (for the
# comparison) pgbouncer; about 3 minutes.
#
#   benches/instructions.sh                 # simple protocol, 8 clients, pool size 16
#   CLIENTS=64 MODE=extended benches/instructions.sh
#   BUILTIN=tpcb-like EXTRA=-C KEEP=/tmp/cg BREAKWATER=path/to/breakwater benches/instructions.sh
#   AUTH=trust EXTRA=-C SHORT=20 LONG=120 benches/instructions.sh   # cost of a login, no crypto
#   VALGRIND_OPTS=--cache-sim=yes KEEP=/tmp/cg ...   # also cache misses (callgrind_annotate)
#   PGBOUNCER= BREAKWATER=/tmp/old/breakwater ...    # one Breakwater build, no PgBouncer
#   RELAY=1 benches/instructions.sh    # also a bare relay (no pool) on tokio and on epoll:
#                                      # what the event loop alone costs (benches/harness relay.rs)
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-8}
MODE=${MODE:-simple}
BUILTIN=${BUILTIN:-select-only}   # pgbench's built-in script, e.g. tpcb-like
SHORT=${SHORT:-200}
LONG=${LONG:-1200}
EXTRA=${EXTRA:-}    # more pgbench arguments, e.g. EXTRA=-C for a new connection per transaction
KEEP=${KEEP:-}      # a directory to keep the callgrind files in, for callgrind_annotate
AUTH=${AUTH:-scram-sha-256}   # the clients' auth_type at both poolers, e.g. AUTH=trust for -C

# BREAKWATER=PATH measures another build instead of building this tree's.
if [ -n "${BREAKWATER:-}" ]; then
  BIN=$(realpath "$BREAKWATER")
else
  cargo build --release --quiet -p breakwater
  BIN="$PWD/target/release/breakwater"
fi
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
export PATH="$pg_bin:$PATH"
for tool in valgrind callgrind_control pgbench initdb; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done
# PGBOUNCER= (set and empty) skips PgBouncer, to compare Breakwater builds only.
PGBOUNCER=${PGBOUNCER-$(command -v pgbouncer || ls /usr/sbin/pgbouncer 2>/dev/null || true)}
RELAY=${RELAY:-}
if [ -n "$RELAY" ]; then
  cargo build --release --quiet -p breakwater-bench --bin relay
  RELAY_BIN="$PWD/target/release/relay"
fi

# shellcheck source=benches/cluster.sh
. "$PWD/benches/cluster.sh"
work=$(mktemp -d /tmp/breakwater-instructions.XXXXXX)
chmod 755 "$work"
[ "$(id -u)" -eq 0 ] && chown postgres "$work"
cleanup() {
  # A pooler still under valgrind (the script stopped early) goes too.
  pkill -KILL -f "callgrind-out-file=$work/" 2>/dev/null || true
  as_pg pg_ctl -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

start_cluster


# wait_servers N: until PostgreSQL has N client backends in database app (the pooler's).
servers() {
  psql -X -At -h "$work" -p "$pg_port" -U postgres -c \
    "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' AND backend_type = 'client backend'"
}

wait_servers() {
  for _ in $(seq 150); do
    n=$(servers)
    [ "$n" -ge "$1" ] && return
    sleep 0.2
  done
  echo "warning: the pooler has $n server connections, not $1; the figure may include logins" >&2
}

# run_once NAME TXNS_PER_CLIENT -> total instructions
run_once() {
  local name=$1 t=$2 port out pid zero
  port=$(free_port)
  out="$work/$name-$t.callgrind"
  if [[ $name == relay-* ]]; then
    # One upstream connection per client, opened at login: nothing to warm up, and the short
    # and the long run open the same number, so the logins cancel out.
    valgrind --tool=callgrind --callgrind-out-file="$out" \
      "$RELAY_BIN" "${name#relay-}" "127.0.0.1:$port" "127.0.0.1:$pg_port" \
      >"$work/$name.log" 2>&1 </dev/null &
  elif [ "$name" = breakwater ]; then
    breakwater_conf "$port"
    RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$out" \
      "$BIN" --config "$work/bw.toml" >"$work/$name.log" 2>&1 </dev/null &
  else
    pgbouncer_conf "$port"
    as_pg valgrind --tool=callgrind --callgrind-out-file="$out" \
      "$PGBOUNCER" "$work/pgb.ini" >"$work/$name.log" 2>&1 </dev/null &
  fi
  pid=$!
  wait_port "$port"
  # Both runs start with all 16 server connections open, so the difference between them holds
  # no server login: a SCRAM login to PostgreSQL (PBKDF2) costs tens of millions of
  # instructions and would swamp a -C figure. Sixteen busy clients make both poolers grow
  # their pool to the full size (PgBouncer's min_pool_size alone does not open them); rounds
  # until they have. Then callgrind's counters are zeroed: however much the warm-up took, only
  # the measured run counts (a 2 s warm-up, counted, ran a different number of transactions in
  # the short and the long run, and the difference leaked into the per-transaction figure).
  for _ in $(seq 10); do
    [[ $name == relay-* ]] && break
    PGPASSWORD=app_pw pgbench -n -S -c 16 -j 1 -t 40 -h 127.0.0.1 -p "$port" -U app app \
      >/dev/null 2>&1
    [ "$(servers)" -ge 16 ] && break
  done
  [[ $name == relay-* ]] || wait_servers 16
  # vgdb talks to a valgrind of its own user only (PgBouncer runs as postgres when we are root).
  if [ "$name" = pgbouncer ]; then zero=(as_pg callgrind_control -z); else zero=(callgrind_control -z); fi
  "${zero[@]}" >/dev/null 2>&1 || echo "warning: could not zero callgrind's counters" >&2
  # shellcheck disable=SC2086 # EXTRA is a list of arguments
  PGPASSWORD=app_pw pgbench -b "$BUILTIN" -n -M "$MODE" $EXTRA -c "$CLIENTS" -j 1 -t "$t" \
    -h 127.0.0.1 -p "$port" -U app app >"$work/$name-$t.pgbench" 2>&1
  # SIGINT: both exit cleanly on it, and callgrind writes its file at exit.
  pkill -INT -f "callgrind-out-file=$out" || true
  wait "$pid" || true
  [ -n "$KEEP" ] && mkdir -p "$KEEP" && cp "$out" "$KEEP/"
  grep -oP 'summary: \K[0-9]+' "$out"
}

echo "instructions per transaction (callgrind), pgbench -b $BUILTIN -M $MODE $EXTRA -c $CLIENTS, pool size 16, clients $AUTH:"
targets=(breakwater)
[ -n "$PGBOUNCER" ] && targets+=(pgbouncer)
[ -n "$RELAY" ] && targets+=(relay-tokio relay-tokio-one-task relay-tokio-own-reactor relay-epoll relay-epoll-in-tokio)
for name in "${targets[@]}"; do
  a=$(run_once "$name" "$SHORT")
  z=$(run_once "$name" "$LONG")
  echo "  $name: $(( (z - a) / ((LONG - SHORT) * CLIENTS) ))"
done
