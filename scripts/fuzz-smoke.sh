#!/usr/bin/env bash
# Runs every fuzz target briefly over its checked-in corpus: a smoke test that the targets build
# and the corpus still passes, not a fuzzing campaign (see fuzz/README.md). Needs nightly and
# cargo-fuzz; building the targets takes several minutes the first time, so CI does not run it.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${FUZZ_SECONDS:-10}"
for target in $(cargo +nightly fuzz list); do
  echo "== $target (${secs}s)"
  cargo +nightly fuzz run "$target" -- -max_total_time="$secs" -rss_limit_mb=512 2>&1 | tail -n 2
done
