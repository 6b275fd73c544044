#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine: real clients and servers the
# integration tests start on ephemeral loopback ports. Idempotent; skips what is present.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi

need_apt=()
command -v curl >/dev/null || need_apt+=(curl)
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
