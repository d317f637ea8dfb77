#!/usr/bin/env bash
# Supply chain (deny.toml): licenses, bans (one TLS stack, one rustls provider, no second
# tokio/hyper/rustls/ring) and sources must pass; RustSec advisories must pass whenever the
# advisory database can be fetched (it lives on GitHub; a machine without that route says
# so loudly instead). cargo-deny's advisories check is the RustSec check cargo-audit runs.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-deny >/dev/null; then
  echo "supply-chain: installing cargo-deny (once; ~10 min on 2 cores)"
  cargo install --locked cargo-deny
fi
cargo deny --version
cargo deny check licenses bans sources
if cargo deny fetch db >/dev/null 2>&1; then
  cargo deny check --disable-fetch advisories
else
  echo "supply-chain: WARNING: the RustSec advisory database (github.com/RustSec/advisory-db)" \
       "cannot be fetched from this machine: advisories NOT checked" >&2
fi
