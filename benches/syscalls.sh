#!/usr/bin/env bash
# The kernel's half of "pooler CPU per transaction": system calls, context switches and CPU
# time per transaction of each pooler, counted by `perf stat` on the pooler's process while
# pgbench runs a fixed number of transactions. Counts (calls, switches) barely move with the
# machine's load, unlike CPU time; they show what instructions.sh cannot: wake-ups that cross
# threads (futex, eventfd writes), sockets moved between runtimes (dup, epoll_ctl, close).
#
#   benches/syscalls.sh                          # -S -M simple -c 64, pool size 16
#   CLIENTS=8 MODE=extended benches/syscalls.sh
#   WORKERS=1 benches/syscalls.sh               # Breakwater on one runtime thread
#   RECORD=/tmp/rec benches/syscalls.sh          # and a CPU profile of each (perf report)
#   PGBOUNCER= BREAKWATER=/tmp/old/breakwater benches/syscalls.sh   # one Breakwater build only
#   RELAY=1 benches/syscalls.sh                  # also the bare relays of instructions.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-64}
MODE=${MODE:-simple}
TXNS=${TXNS:-300}     # per client
EXTRA=${EXTRA:-}
AUTH=${AUTH:-scram-sha-256}
WORKERS=${WORKERS:-0}  # Breakwater's `workers` (0 = one per core)
RECORD=${RECORD:-}     # a directory: also `perf record` each pooler there (perf report -i DIR/NAME.data)

if [ -n "${BREAKWATER:-}" ]; then
  BIN=$(realpath "$BREAKWATER")
else
  cargo build --release --quiet -p breakwater
  BIN="$PWD/target/release/breakwater"
fi
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
export PATH="$pg_bin:$PATH"
for tool in perf pgbench initdb; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done
PGBOUNCER=${PGBOUNCER-$(command -v pgbouncer || ls /usr/sbin/pgbouncer 2>/dev/null || true)}
RELAY=${RELAY:-}
if [ -n "$RELAY" ]; then
  cargo build --release --quiet -p breakwater-bench --bin relay
  RELAY_BIN="$PWD/target/release/relay"
fi

# shellcheck source=benches/cluster.sh
. "$PWD/benches/cluster.sh"
work=$(mktemp -d /tmp/breakwater-syscalls.XXXXXX)
chmod 755 "$work"
[ "$(id -u)" -eq 0 ] && chown postgres "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  as_pg pg_ctl -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

start_cluster


events=task-clock,context-switches,raw_syscalls:sys_enter
for s in futex epoll_wait epoll_ctl sendto recvfrom write read fcntl close accept4; do
  events+=",syscalls:sys_enter_$s"
done

run() {
  local name=$1 port pid
  port=$(free_port)
  if [[ $name == relay-* ]]; then
    # One PostgreSQL connection per client, opened at its login (counted: CLIENTS logins).
    "$RELAY_BIN" "${name#relay-}" "127.0.0.1:$port" "127.0.0.1:$pg_port" >"$work/$name.log" 2>&1 </dev/null &
    pid=$!
  elif [ "$name" = breakwater ]; then
    breakwater_conf "$port" "workers = $WORKERS"
    RUST_LOG=warn "$BIN" --config "$work/bw.toml" >"$work/$name.log" 2>&1 </dev/null &
    pid=$!
  else
    pgbouncer_conf "$port"
    as_pg "$PGBOUNCER" "$work/pgb.ini" >"$work/$name.log" 2>&1 </dev/null &
    pid=$!
    sleep 0.2
    pid=$(pgrep -n -f "pgbouncer $work/pgb.ini" || echo "$pid")
  fi
  pids+=("$pid")
  wait_port "$port"
  # Warm up: every server connection open, every client logged in before counting starts
  # would need a pgbench that pauses; instead run the clients long enough that their logins
  # are a small share (TXNS per client) and report logins separately.
  PGPASSWORD=app_pw pgbench -n -S -c 16 -j 1 -t 100 -h 127.0.0.1 -p "$port" -U app app >/dev/null 2>&1
  # shellcheck disable=SC2086
  perf stat -x, -e "$events" -p "$pid" -o "$work/$name.perf" -- \
    env PGPASSWORD=app_pw pgbench -n -S -M "$MODE" $EXTRA -c "$CLIENTS" -j 2 -t "$TXNS" \
    -h 127.0.0.1 -p "$port" -U app app >"$work/$name.pgbench" 2>&1
  if [ -n "$RECORD" ]; then
    mkdir -p "$RECORD"
    # shellcheck disable=SC2086
    perf record -q -F 2000 -g -e cpu-clock -p "$pid" -o "$RECORD/$name.data" -- \
      env PGPASSWORD=app_pw pgbench -n -S -M "$MODE" $EXTRA -c "$CLIENTS" -j 2 -t "$TXNS" \
      -h 127.0.0.1 -p "$port" -U app app >/dev/null 2>&1
  fi
  kill -INT "$pid" 2>/dev/null || true
  local n=$((CLIENTS * TXNS))
  printf '  %-10s' "$name"
  awk -F, -v n="$n" '
    /^#/ || NF < 3 { next }
    { v = $1; e = $3; sub(/^syscalls:sys_enter_/, "", e); sub(/^raw_syscalls:sys_enter/, "syscalls", e)
      if (e == "task-clock") printf " cpu_us=%.1f", v * 1000 / n; else printf " %s=%.2f", e, v / n }
    END { print "" }' "$work/$name.perf"
}

echo "per transaction (perf stat on the pooler), pgbench -S -M $MODE $EXTRA -c $CLIENTS -t $TXNS, pool size 16:"
run breakwater
[ -n "$PGBOUNCER" ] && run pgbouncer
if [ -n "$RELAY" ]; then
  for mode in tokio tokio-own-reactor epoll epoll-in-tokio; do run "relay-$mode"; done
fi
