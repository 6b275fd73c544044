#!/usr/bin/env bash
# The whole test suite, as CI runs it: install test dependencies, check formatting and lints,
# then run every test (unit and integration) with cargo-nextest.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-test-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo nextest run --workspace --locked --no-fail-fast
# Benchmarks never run as timed tests: each criterion benchmark runs once, so they keep compiling
# and working (cargo bench --bench hot_path measures).
cargo test --locked --benches -q
