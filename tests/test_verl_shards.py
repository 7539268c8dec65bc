"""verl's raw FSDP actor checkpoints in one process: discovery, weights-only reading, the one-line refusals.

The sharded (DTensor) layout written by FSDP2 under torchrun is tested in tests/test_probes_distributed.py; here the
shards hold plain (replicated) tensors, which verl writes for buffers and unsharded parameters.
"""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch

from resrl_analysis.checkpoints import ProbeError, load_checkpoint
from resrl_analysis.probes.runner import main
from resrl_analysis.probes.synthetic import write_fake_run
from resrl_analysis.runs import discover_run
from resrl_analysis.verl_shards import load_verl_state_dict, verl_shard_files

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def verl_run(tmp_path_factory):
    """A fake run's two checkpoints laid out as verl's raw actor checkpoints (replicated plain tensors)."""
    run = write_fake_run(tmp_path_factory.mktemp("verl") / "run", steps=(0, 1), n_groups=2, group_size=3,
                         debris=False)
    root = run.parent / "verl"
    for step in (0, 1):
        src = run / "checkpoints" / f"step_{step:06d}"
        actor = root / f"global_step_{step}" / "actor"
        (actor / "huggingface").mkdir(parents=True)
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(src / f, actor / "huggingface" / f)
        sd = load_checkpoint(src, tokenizer=False).model.state_dict()
        for r in range(2):
            torch.save(sd, actor / f"model_world_size_2_rank_{r}.pt")
        (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 2}))
    return run, root


def test_raw_shards_are_discovered_and_loaded_weights_only(verl_run, tmp_path):
    run, root = verl_run
    info = discover_run(root)
    assert info.kind == "verl" and [s for s, _ in info.checkpoints] == [0, 1]
    assert info.checkpoints[1][1] == root / "global_step_1" / "actor" / "huggingface"
    raw = load_checkpoint(info.checkpoints[1][1], tokenizer=False).model.state_dict()
    ref = load_checkpoint(run / "checkpoints" / "step_000001", tokenizer=False).model.state_dict()
    assert all(torch.equal(raw[k], ref[k]) for k in ref)
    dump = str(run / "rollouts" / "step_000000.jsonl")
    assert main([str(root), "--probe-set", dump, "--probes", "lld", "--out", str(tmp_path / "p"), "--quiet",
                 "--no-progress"]) == 0


def test_a_missing_rank_or_a_foreign_object_is_one_line_naming_the_merger(verl_run, tmp_path):
    _, root = verl_run
    step = tmp_path / "global_step_3"
    shutil.copytree(root / "global_step_1", step)
    actor = step / "actor"
    torch.save({"model.norm.weight": argparse.Namespace(a=1)}, actor / "model_world_size_2_rank_1.pt")
    with pytest.raises(ProbeError, match=r"rank_1\.pt: holds argparse\.Namespace, which weights-only .* "
                                         r"python -m verl\.model_merger merge --backend fsdp --local_dir .*actor"):
        load_verl_state_dict(actor)
    (actor / "model_world_size_2_rank_1.pt").unlink()
    with pytest.raises(ProbeError, match=r"world size 2 but no model shard for rank\(s\) \[1\]"):
        verl_shard_files(actor)
    with pytest.raises(ProbeError, match="no model shard"):  # before any model is built
        load_checkpoint(actor / "huggingface")
    # No shards and no merged weights: discovery names the merger.
    for f in actor.glob("model_world_size_*"):
        f.unlink()
    with pytest.raises(ProbeError, match="no merged Hugging Face weights nor raw model shards; run: python -m verl"):
        discover_run(tmp_path)
