#!/usr/bin/env bash
# Make a `prometheus` binary available for the integration tests (idempotent).
# Uses one already on PATH; otherwise installs Debian's `prometheus` package (root or sudo).
set -euo pipefail

if command -v prometheus >/dev/null 2>&1; then
    echo "prometheus: using $(command -v prometheus)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "prometheus: not on PATH and no apt-get to install it; install it by hand" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "prometheus: not on PATH and not root (no sudo) to install it" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
# The package's maintainer scripts try to start a service; there is no init system here, and
# policy-rc.d exit 101 tells invoke-rc.d not to start anything.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
echo "prometheus: installed $(command -v prometheus) ($(prometheus --version 2>&1 | head -1))"
