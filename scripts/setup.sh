#!/usr/bin/env bash
# Idempotent set-up on a machine with only Python: a virtual environment in .venv with tokenfeed
# and its test dependencies. An already-installed torch in the accepted range is reused (the venv
# sees system site-packages); otherwise torch==2.13.0 is installed (the CPU wheel where pip's
# find-links offer one; set TORCH_SPEC to choose another build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv --system-site-packages .venv
fi
PY=.venv/bin/python
torch_ok() {
  "$PY" - <<'PY' 2>/dev/null
import torch
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
raise SystemExit(0 if (2, 4) <= (major, minor) < (2, 14) else 1)
PY
}
if ! torch_ok; then
  echo "setup: installing ${TORCH_SPEC:-torch==2.13.0}"
  "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
"$PY" -m pip install -q -e ".[dev]"
echo "setup: $("$PY" -c 'import torch, grpc; print("torch", torch.__version__, "grpcio", grpc.__version__)')"
