#!/usr/bin/env bash
# Runs Breakwater's whole test suite on a fresh Debian/Ubuntu machine: installs what is missing
# (PostgreSQL server binaries, psql, pgbench, podman and runc), builds, and runs every unit and
# end-to-end test against real PostgreSQL started by the test kit.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

have_pg_server() {
  [ -n "${PG_BIN_DIR:-}" ] && [ -x "$PG_BIN_DIR/initdb" ] && return 0
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && return 0
  command -v initdb >/dev/null 2>&1
}

if ! have_pg_server || ! command -v pgbench >/dev/null 2>&1 || ! command -v psql >/dev/null 2>&1; then
  echo "== installing PostgreSQL server, psql and pgbench (apt-get)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql postgresql-contrib >/dev/null
fi
# Debian's postgresql package starts a cluster of its own; the tests never use it.

# The asyncpg test makes a Python venv (under target/) and installs asyncpg from PyPI.
if ! python3 -m venv --help >/dev/null 2>&1; then
  echo "== installing python3-venv (apt-get)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq python3 python3-venv >/dev/null
fi

# The container test builds examples/container's image and runs it with podman (runc runtime).
if ! command -v podman >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1; then
  echo "== installing podman and runc (apt-get)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq podman runc >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust (https://rustup.rs) and re-run" >&2
  exit 1
fi

# The house rules (no unwrap/expect/panic/unchecked indexing on the data path, see the
# `deny` at the top of proto's, upstream's and proxy's lib.rs) are compiler errors here.
if cargo clippy --version >/dev/null 2>&1; then
  echo "== cargo clippy"
  cargo clippy --workspace --all-targets --quiet -- -D warnings
else
  echo "== cargo clippy is not installed (rustup component add clippy): lints not checked" >&2
fi
# One layout for every file, so a diff shows only what changed.
if cargo fmt --version >/dev/null 2>&1; then
  echo "== cargo fmt --check"
  cargo fmt --all --check
else
  echo "== rustfmt is not installed (rustup component add rustfmt): layout not checked" >&2
fi

# The image's static binary, once per run and before the tests, so its build time shows here
# and not inside the container test's time limit (the test's own build.sh call is then a no-op).
echo "== building the static binary for the container image"
started=$SECONDS
BUILD_ONLY=1 examples/container/build.sh >/dev/null
echo "   took $((SECONDS - started)) s"

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
