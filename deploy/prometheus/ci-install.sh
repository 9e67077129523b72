#!/usr/bin/env bash
# Installs Debian's `prometheus` package for tests/tests/metrics.rs, which starts a real
# Prometheus server of its own (on a loopback port, with a throw-away TSDB) and scrapes
# the coordinator's and a worker's /metrics endpoints with it. Nothing is started here:
# the package's systemd unit is not used (the test runs /usr/bin/prometheus itself).
# Idempotent: returns at once when /usr/bin/prometheus exists.
#
#   deploy/prometheus/ci-install.sh           # as root, or with sudo available
#   DMQSM_PROMETHEUS_NO_APT=1 deploy/prometheus/ci-install.sh   # check only
set -euo pipefail

log() { echo "[prometheus-ci] $*" >&2; }

BIN=${DMQSM_PROMETHEUS_BIN:-/usr/bin/prometheus}
if [ -x "$BIN" ]; then
    log "present: $("$BIN" --version 2>&1 | head -n1)"
    exit 0
fi
if [ -n "${DMQSM_PROMETHEUS_NO_APT:-}" ]; then
    log "$BIN is missing and DMQSM_PROMETHEUS_NO_APT is set"; exit 1
fi

if [ "$(id -u)" = 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
else
    log "must run as root (or with sudo) to install prometheus"; exit 1
fi

log "installing prometheus (apt)"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
# policy-rc.d 101 keeps the package's post-install from starting a server on :9090
# where an init system is running.
POLICY=/usr/sbin/policy-rc.d
ADDED_POLICY=
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod +x "$POLICY"
    ADDED_POLICY=1
fi
status=0
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null || status=$?
if [ -n "$ADDED_POLICY" ]; then "${SUDO[@]}" rm -f "$POLICY"; fi
if [ "$status" != 0 ]; then log "apt-get install prometheus failed ($status)"; exit "$status"; fi

if [ ! -x "$BIN" ]; then log "installed, but $BIN is missing"; exit 1; fi
log "installed: $("$BIN" --version 2>&1 | head -n1)"
