#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# A real Prometheus for the metrics integration test (Debian package). tests/test_prometheus.py
# fails without it, so a failed install stops the run here, with the installer's reason.
if ! bash scripts/install_prometheus.sh; then
    echo "test: scripts/install_prometheus.sh failed; tests/test_prometheus.py needs a prometheus binary" >&2
    exit 1
fi
exec .venv/bin/python -m pytest -q "$@"
