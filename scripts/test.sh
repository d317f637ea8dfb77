#!/usr/bin/env bash
# Every test tier (tests/README.md): unit, store, runtime (real python3/node), API and CLI end
# to end, then the seed quickstart acceptance script against the real binary.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace
cargo build --bin dispatch

if [ -x ../shared/acceptance/quickstart.sh ] || [ -f ../shared/acceptance/quickstart.sh ]; then
  DISPATCH_BIN="$PWD/target/debug/dispatch" bash ../shared/acceptance/quickstart.sh
else
  echo "acceptance: ../shared/acceptance/quickstart.sh not found beside the repository"
  if [ -n "${CI:-}" ]; then exit 1; fi
  echo "acceptance: skipped (not in CI)"
fi
