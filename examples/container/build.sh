#!/usr/bin/env bash
# Builds a static breakwater and a FROM-scratch container image around it.
#
#   examples/container/build.sh [IMAGE]     # default localhost/breakwater:latest
#   BUILD_ONLY=1 examples/container/build.sh    # just the static binary; prints its path
#   CONTAINER=docker examples/container/build.sh
#
# The binary is linked statically against glibc (-C target-feature=+crt-static on the gnu
# target), so the image needs no libc and the image build fetches nothing. Compiled with the
# `container` cargo profile (release without LTO), into target/<host triple>/container/.
# A static glibc binary cannot load NSS modules: give listen_addr and hosts as IP addresses, or
# names that DNS answers (Breakwater resolves upstream hosts itself), not /etc/hosts-only names.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
image=${1:-localhost/breakwater:latest}
engine=${CONTAINER:-podman}
triple=$(rustc -vV | sed -n 's/^host: //p')
case "$triple" in
  *-linux-gnu) ;;
  *) echo "build.sh: needs a *-linux-gnu host, not $triple" >&2; exit 1 ;;
esac

# Run from inside cargo (the container test), the variables cargo set for that package would
# look like a change to build scripts that watch them (ring's), and everything would rebuild.
for v in $(compgen -e); do
  case "$v" in
    CARGO_MANIFEST_*|CARGO_PKG_*|CARGO_CRATE_*|CARGO_BIN_*|CARGO_PRIMARY_PACKAGE|CARGO_TARGET_TMPDIR|OUT_DIR) unset "$v" ;;
  esac
done

# --target keeps build scripts and proc macros dynamic (they run on the host) while the
# binary itself is static.
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --locked --quiet --profile container --target "$triple" -p breakwater
bin="$root/target/$triple/container/breakwater"
if [ "${BUILD_ONLY:-}" = 1 ]; then
  echo "$bin"
  exit 0
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$bin" "$ctx/breakwater"
cp "$root/examples/container/Containerfile" "$ctx/Containerfile"
"$engine" build --quiet --pull=never --network=none -t "$image" -f "$ctx/Containerfile" "$ctx" >/dev/null
echo "$image"
