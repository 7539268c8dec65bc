#!/usr/bin/env bash
# GPU benchmarks of issue 6 in one short call on a CUDA machine (H100/H200); installs nothing.
#
#   bash bench/gpu_bench.sh [--budget 420] [--skip-rollout]
#
# Runs `python -m bench.gpu_bench` (interference at V=151,936, log-prob memory, training fwd+bwd tokens/s
# and MFU, resrl vs grpo step time, the probe pass against its memory plan, the diversity sampler against
# per-prompt `generate`, then bench/bench_rollout_gpu.py with the time left), prints a markdown
# table, writes $OUT/gpu_section.md and $OUT/gpu_bench.json when $OUT is set, and updates the GPU section
# of bench/RESULTS.md on that machine (bring it back with
# `python -m bench.gpu_bench --apply <files_at>/gpu_section.md`).
# Exits 2 with a message when there is no CUDA GPU. A hard wall-clock cap (GPU_BENCH_TIMEOUT, 480 s)
# sits above the script's own budget.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-}
if [ -z "$PY" ]; then
    for cand in .venv/bin/python python3 python; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" 2>/dev/null; then PY=$cand; break; fi
    done
fi
if [ -z "$PY" ]; then
    echo "gpu_bench.sh: no python with torch found (set PY=...)" >&2
    exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
echo "gpu_bench.sh: $("$PY" -c 'import sys, torch, transformers; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())')"
exec timeout --signal=INT --kill-after=20 "${GPU_BENCH_TIMEOUT:-480}" "$PY" -m bench.gpu_bench "$@"
