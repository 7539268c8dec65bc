#!/usr/bin/env bash
# Our `grpo` step against TRL's GRPOTrainer on the identical tiny CPU setup (issue 6, part 3).
#
# Creates bench/.venv-trl once (torch==2.13.0, the CPU wheel, first; then trl with torch held by a
# constraint so pip cannot swap in a multi-GB CUDA build), then runs `python -m bench.trl_compare compare`
# from the project's own venv (.venv, `make install`), which alternates TRL runs (in bench/.venv-trl) and
# our runs on the same model files and prompts, and prints a table row. (`make bench` records the same
# comparison in bench/RESULTS.md once bench/.venv-trl exists.)
#
#   bash bench/trl_compare.sh [--rounds 4] [--steps 6] [--threads 1] [--model DIR]
#
# Environment: PY (python for the venv, default python3), TRL_VERSION (default 1.16.0),
# TORCH_VERSION (default 2.13.0), OUR_PY (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3}
TRL_VERSION=${TRL_VERSION:-1.16.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
OUR_PY=${OUR_PY:-.venv/bin/python}
VENV=bench/.venv-trl

if [ ! -x "$OUR_PY" ]; then
    echo "trl_compare: $OUR_PY not found; run 'make install' first" >&2
    exit 1
fi
if ! "$VENV/bin/python" -c "import trl, sys; sys.exit(trl.__version__ != '$TRL_VERSION')" 2>/dev/null; then
    echo "trl_compare: creating $VENV (torch==$TORCH_VERSION, trl==$TRL_VERSION)"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
    "$VENV/bin/pip" freeze | grep -i '^torch==' > "$VENV/constraints.txt"
    "$VENV/bin/pip" install -q -c "$VENV/constraints.txt" "trl==$TRL_VERSION"
fi

exec "$OUR_PY" -m bench.trl_compare compare --trl-python "$VENV/bin/python" "$@"
