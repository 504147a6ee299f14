#!/usr/bin/env bash
# The comparison suite of issue 9 in one command:
#   bash benchmarks/run_compare.sh            # ~200 M tokens; results in benchmarks/results/compare.*
#   bash benchmarks/run_compare.sh --quick    # ~25 M tokens, one repeat (~5 min): compare-quick.*
# Any other arguments go to `python -m benchmarks.compare` (e.g. --only q1,q3, --cache DIR).
#
# tokenfeed runs from the project's .venv (made by scripts/setup.sh if missing). The peers run
# in a SEPARATE environment, .venv-bench, made here from the `bench` extra of pyproject.toml:
# mosaicml-streaming 0.13 needs huggingface-hub<1.0, which the project's datasets 5 does not
# accept. `import streaming` imports torchvision, whose PyPI wheel fails to import with the CPU
# torch; it is uninstalled from .venv-bench and benchmarks/compare/stubs/torchvision (names only,
# on the peers' PYTHONPATH) satisfies the import. The corpus and every peer's format are written
# once under /tmp/tokenfeed-bench (TOKENFEED_BENCH_CACHE) and reused: ~2 GB for the full scale.
# The plot needs matplotlib, which the project's .venv need not have (a fresh clone's does not):
# the report then draws it with .venv-bench's python, where the bench extra installs it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || bash scripts/setup.sh

BENCH=${BENCH_VENV:-.venv-bench}
STAMP="$BENCH/.bench-extra"
WANT=$(.venv/bin/python - <<'PY'
try:
    import tomllib
except ImportError:  # Python 3.10: the copy pip vendors
    from pip._vendor import tomli as tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["bench"]))
PY
)
if [ ! -x "$BENCH/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "run_compare: setting up $BENCH (the peers, from the bench extra)"
  [ -x "$BENCH/bin/python" ] || "$PYTHON" -m venv "$BENCH"   # no system site-packages
  REQS=$(mktemp)
  printf '%s\n' "$WANT" > "$REQS"
  # The extra alone, not tokenfeed itself: the peers need none of it. torch resolves to the local
  # CPU wheel where pip's find-links offer one (set TORCH_SPEC to choose another build).
  "$BENCH/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" -r "$REQS"
  "$BENCH/bin/python" -m pip uninstall -q -y torchvision 2>/dev/null || true
  rm -f "$REQS"
  printf '%s' "$WANT" > "$STAMP"
fi

exec .venv/bin/python -m benchmarks.compare --bench-python "$BENCH/bin/python" "$@"
