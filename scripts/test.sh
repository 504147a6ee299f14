#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# A real Prometheus for the metrics integration test (Debian package; skipped where it cannot be had).
bash scripts/install_prometheus.sh || echo "test: prometheus unavailable; its integration test will skip"
exec .venv/bin/python -m pytest -q "$@"
