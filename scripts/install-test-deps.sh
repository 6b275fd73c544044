#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine: real clients and servers the
# integration tests start on ephemeral loopback ports. Idempotent; skips what is present.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi

need_apt=()
command -v curl >/dev/null || need_apt+=(curl)
command -v h2load >/dev/null || need_apt+=(nghttp2-client)
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v redis-benchmark >/dev/null || need_apt+=(redis-tools)
command -v named >/dev/null || need_apt+=(bind9)
command -v nsupdate >/dev/null && command -v dig >/dev/null || need_apt+=(bind9-dnsutils)
command -v openssl >/dev/null || need_apt+=(openssl)

if [ ${#need_apt[@]} -gt 0 ]; then
    echo "installing: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

# rnacos: a Nacos-compatible server (Nacos 2.x gRPC and v1 open API) for the Nacos tests.
# A debug build takes about half the time of a release build and is enough for tests.
if ! command -v rnacos >/dev/null; then
    echo "installing rnacos 0.8.8 (cargo install --debug; several minutes on 2 cores)"
    cargo install rnacos --version 0.8.8 --locked --debug --quiet
fi
