#!/usr/bin/env bash
# Trainer GPU checks, for one short call on a machine with a CUDA GPU; installs nothing.
#
#   bash bench/gpu_check.sh          # from anywhere; runs in the repository root
#
# 1. the trainer's GPU tests (pytest -m gpu tests/test_trainer_gpu.py), if pytest is installed;
# 2. a few steps of the `tiny` preset on CUDA: FSDP2 in one process (bf16 compute, fp32 master weights,
#    static-KV-cache rollouts), then the plain module (fsdp=off, fp32) whose static-cache decode step is
#    compiled with CUDA graphs (the rollout falls back to eager, with a warning, if that fails);
# 3. a few steps of a Qwen3-0.6B-sized random-init model (bf16 compute, gradient checkpointing,
#    dynamic-cache rollout so that no compile time is counted),
# printing per step: step time (rollout + update), rollout and update times, peak GPU memory, reward.
# Exits 0 with a message when no CUDA GPU is visible. Environment: PY (default python3), OUT (where the
# run directories go; default a temporary directory).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible (or torch missing for $PY); nothing to check"
    exit 0
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-$(mktemp -d)}
status=0
"$PY" -c "import torch, transformers, sys; print('gpu_check:', torch.cuda.get_device_name(0), '| python',
sys.version.split()[0], '| torch', torch.__version__, '| transformers', transformers.__version__)"

echo "== 1. trainer GPU tests"
if "$PY" -c "import pytest" 2>/dev/null; then
    "$PY" -m pytest -q -p no:cacheprovider tests/test_trainer_gpu.py || status=1
else
    echo "pytest not installed: skipped"
fi

echo "== 2-3. trainer steps on CUDA"
OUT="$OUT" "$PY" - <<'PYEOF' || status=1
import json, os, sys, tempfile, time, traceback
from pathlib import Path

import torch

sys.path.insert(0, "tests")
import trainer.loop as loop
from trainer.config import preset_config
from trainer_runner import EasyTask

from bench.train_bench import coin_flip_task

out = Path(os.environ["OUT"])
task = EasyTask()  # a reward a random model half earns: groups mix
failed = False


def report(title, run):
    print(f"-- {title}")
    print(f"{'step':>4} {'step_s':>8} {'rollout_s':>9} {'update_s':>8} {'peak_GB':>8} {'reward':>7} {'resrl_w':>7} len")
    for line in (Path(run) / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        w = m.get("resrl/weight_mean")
        print(f"{m['step']:>4} {m['timing/step_s']:>8.2f} {m['timing/rollout_s']:>9.2f} {m['timing/update_s']:>8.2f} "
              f"{m.get('perf/peak_memory_gb') or 0:>8.2f} {m['reward/mean']:>7.3f} "
              f"{'-' if w is None else f'{w:.3f}':>7} {m['response/length_mean']:.0f}")


def run(title, **kw):
    global failed
    t = time.perf_counter()
    try:
        cfg = preset_config("tiny", device="cuda", progress_bar="off", log_every=10**6, cpu_threads=0,
                            tensorboard=False, **kw)
        r = loop.train(cfg, task=task if task is not None else coin_flip_task(cfg, 0.35, seed=0))
        report(title, r)
        print(f"   total {time.perf_counter() - t:.1f}s (model load, checkpoints and compile included)")
    except Exception:
        failed = True
        print(f"-- {title}: FAILED")
        traceback.print_exc()


run("tiny preset, random init, resrl, 32 prompts x 8, FSDP2 bf16, static-cache rollout",
    model="tiny-random", algorithm="resrl", steps=4, save_every=4, output_dir=str(out / "tiny"))
run("tiny preset, random init, resrl, plain module fp32 (fsdp=off), compiled static-cache rollout",
    model="tiny-random", algorithm="resrl", steps=4, save_every=4, fsdp="off", param_dtype="float32",
    output_dir=str(out / "tiny_plain"))

from transformers import AutoModelForCausalLM
from trainer.models import qwen3_0p6b_config
from trainer.tokenizer import build_char_tokenizer

tok = build_char_tokenizer()
model_dir = out / "qwen3_0p6b_random"
cfg = qwen3_0p6b_config(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
with torch.random.fork_rng(devices=[]):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(model_dir)
tok.save_pretrained(model_dir)
# Random weights never earn the task's reward: seeded coin flips (p = 0.35, about the warm start's accuracy)
# make groups mix, so that ResRL computes its weights as in a real run.
task = None  # run() builds the coin-flip task from each run's settings
run("Qwen3-0.6B-sized random init, resrl, 8 prompts x 8 x 256 new tokens, micro-batch 16, grad checkpointing",
    model=str(model_dir), algorithm="resrl", steps=3, save_every=3, prompts_per_step=8, n=8, mini_batch_size=8,
    micro_batch_size=16, max_response_length=256, lr=1e-6, gradient_checkpointing=True,
    rollout_backend="dynamic", dump_rollouts=False, output_dir=str(out / "qwen3_0p6b"))
sys.exit(1 if failed else 0)
PYEOF
echo "gpu_check: $([ $status -eq 0 ] && echo OK || echo FAILED) (run directories in $OUT)"
exit $status
