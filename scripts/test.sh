#!/usr/bin/env bash
# The whole test suite, as CI runs it: install test dependencies, check formatting and lints,
# then run every test (unit and integration) with cargo-nextest.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-test-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Benches compile (criterion smoke) without running timed loops.
cargo nextest run --workspace --locked --no-fail-fast
