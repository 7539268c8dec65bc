"""Test support for the multi-process probe tests, run as a script under torchrun (2 CPU processes, gloo).

``python tests/probe_runner.py probe ARGS...`` is ``resrl probe ARGS...`` with one more registered probe, ``fault``:
with ``--fault raise`` or ``--fault kill`` it raises, or kills its own process (SIGKILL), on rank ``--fault-rank``
while probing its first group batch (the other ranks go on until a collective finds the rank gone).

``python tests/probe_runner.py verl-shards SRC DST_ACTOR [SRC DST_ACTOR ...]`` writes each Hugging Face checkpoint
``SRC`` the way verl's
FSDP checkpoint manager does, from FSDP2 under torchrun: each rank's ``model.state_dict()`` (DTensor shards) as
``DST_ACTOR/model_world_size_W_rank_R.pt``, and on rank 0 ``fsdp_config.json`` and ``huggingface/`` (config and
tokenizer, no weights).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resrl_analysis.probes.registry import REGISTRY, GroupsContext, Probe, option, register_probe  # noqa: E402
from resrl_analysis.results import ScoresResult  # noqa: E402


@dataclass(frozen=True)
class FaultOptions:
    """Options of the test-only ``fault`` probe."""

    fault: str = option("none", "test only: what the fault probe does on --fault-rank",
                        choices=("none", "raise", "kill"))
    fault_rank: int = option(1, "test only: the rank that fails")


class FaultProbe(Probe):
    """Fails on one rank (test only); else measures nothing."""

    name = "fault"
    summary = "test only: raises or dies on one rank"
    result = ScoresResult
    table = "fault"
    scope = "groups"
    needs = frozenset({"logp"})
    Options = FaultOptions

    def on_groups(self, ctx: GroupsContext) -> None:
        if int(os.environ.get("RANK", "0")) == self.options.fault_rank:
            if self.options.fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.options.fault == "raise":
                raise RuntimeError("injected fault in the fault probe")
        return None


def register_fault_probe() -> None:
    """Register :class:`FaultProbe` (once)."""
    if "fault" not in REGISTRY:
        register_probe(FaultProbe)


def write_verl_shards(pairs: list[tuple[Path, Path]]) -> None:
    """Each (src, actor): ``src`` (an HF checkpoint) as verl's raw FSDP actor checkpoint under ``actor`` (run under
    torchrun)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from resrl_analysis.distributed import setup_distributed, teardown_distributed, wrap_model

    hf_logging.disable_progress_bar()
    ctx = setup_distributed("cpu", "on")
    for src, actor in pairs:
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
        model = wrap_model(model, ctx, torch.float32)
        actor.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), actor / f"model_world_size_{ctx.world_size}_rank_{ctx.rank}.pt")
        if ctx.is_main:
            hf = actor / "huggingface"
            model.config.save_pretrained(hf)
            AutoTokenizer.from_pretrained(str(src)).save_pretrained(hf)
            (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": ctx.world_size}))
    teardown_distributed(ctx)


if __name__ == "__main__":
    what, args = sys.argv[1], sys.argv[2:]
    if what == "verl-shards":
        write_verl_shards([(Path(a), Path(b)) for a, b in zip(args[::2], args[1::2])])
        raise SystemExit(0)
    register_fault_probe()
    from resrl_analysis.probes.runner import main

    raise SystemExit(main(args))
