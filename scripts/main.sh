#!/usr/bin/env bash
# The main job: set up, start a data server on the embedded stdlib corpus, and train on 2 CPU ranks
# (killed after a checkpoint, resumed, finished, sampled).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m scripts.main_job "$@"
