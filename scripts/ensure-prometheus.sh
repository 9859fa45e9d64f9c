#!/usr/bin/env bash
# Make a Prometheus binary available for the local stack (Debian's `prometheus` package).
# Order: $AML_ROLLOUT_PROMETHEUS, `prometheus` on PATH, .cache/prometheus (unpacked .deb), then
# install: as root `apt-get install`, otherwise `apt-get download` + `dpkg-deb -x` (no root needed).
set -euo pipefail
cd "$(dirname "$0")/.."
local_bin=.cache/prometheus/usr/bin/prometheus
if [ -n "${AML_ROLLOUT_PROMETHEUS:-}" ] && [ -x "${AML_ROLLOUT_PROMETHEUS}" ]; then exit 0; fi
if command -v prometheus >/dev/null 2>&1 || [ -x "$local_bin" ]; then exit 0; fi
echo "prometheus not found: installing Debian's prometheus package" >&2
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  if (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1); then
    mkdir -p .cache/prometheus && dpkg-deb -x "$tmp"/prometheus_*.deb .cache/prometheus
    rm -rf "$tmp"; exit 0
  fi
  rm -rf "$tmp"
fi
echo "error: Prometheus is required: run 'sudo apt-get install prometheus' or set AML_ROLLOUT_PROMETHEUS=/path/to/prometheus" >&2
exit 1
