"""The trainer on a CUDA GPU: FSDP2 in one process with bfloat16 compute and float32 master weights.

Skipped without CUDA; ``bash bench/gpu_check.sh`` runs these plus timed steps on a GPU machine.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from trainer_runner import FAST, EasyTask

import trainer.loop as loop
from resrl_analysis.distributed import DistContext
from trainer.config import TrainConfig
from trainer.models import build_tiny_model
from trainer.rollout import ScoredBatch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.integration
def test_tiny_resrl_on_cuda(tmp_path):
    cfg = TrainConfig(**{**FAST, "cpu_threads": 0}, device="cuda", algorithm="resrl", steps=3, save_every=3,
                      output_dir=str(tmp_path / "run"))
    run = loop.train(cfg, task=EasyTask())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all(r["perf/peak_memory_gb"] > 0 and r["train/skipped_steps"] == 0 for r in lines)
    start = load_file(str(run / "checkpoints" / "step_000000" / "model.safetensors"))
    end = load_file(str(run / "checkpoints" / "step_000003" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in end.values())  # float32 master weights are what is saved
    assert any(float((end[k] - start[k]).abs().max()) > 0 for k in end)
    assert not torch.distributed.is_initialized()


@pytest.mark.integration
def test_update_does_not_depend_on_micro_batch_size_on_cuda():
    from test_trainer_loop import _synthetic_minibatch

    dev = torch.device("cuda")
    base = build_tiny_model(seed=0, num_hidden_layers=2).to(dev)
    mb = _synthetic_minibatch(base.cpu())
    base.to(dev)
    mb = ScoredBatch(**{k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in vars(mb).items()})
    ctx = DistContext.single(dev)
    params = []
    for micro in (8, 1, 3):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        loop.optimizer_step(model, opt, sched, mb, TrainConfig(**{**FAST, "micro_batch_size": micro}), ctx)
        params.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for other in params[1:]:
        for k in other:
            torch.testing.assert_close(other[k], params[0][k], rtol=1e-4, atol=1e-5)
