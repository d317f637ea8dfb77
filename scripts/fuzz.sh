#!/usr/bin/env bash
# Runs every fuzz target (tests named fuzz_*: dispatch-core, dispatch-runtime, dispatch-server)
# for MINUTES in all, on fresh random seeds, in release mode. A failure prints its seed;
# replay it with DISPATCH_FUZZ_SEED=0x… and the same test name, then keep the case as a
# regression test beside the target. `cargo test` runs the same targets on fixed seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:?usage: scripts/fuzz.sh MINUTES}"
targets=8
export DISPATCH_FUZZ_MS=$(( minutes * 60000 / targets ))
echo "fuzz: ${targets} targets, $(( DISPATCH_FUZZ_MS / 1000 )) s each"
log=$(mktemp)
status=0
for crate in dispatch-core dispatch-runtime dispatch-server; do
  cargo test --release -p "$crate" --test fuzz -- --nocapture --test-threads=1 >"$log" 2>&1 \
    || status=1
  grep -E '^fuzz |^test |Seed|panicked' "$log" || true
done
rm -f "$log"
exit "$status"
