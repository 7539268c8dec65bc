"""The one-process pieces of a multi-process probe pass: the round-robin share, the canonical row order, the
diversity probe's pooling across shares, the flags handed to the ranks, and the refusals (the two-process runs
themselves are in tests/test_probes_distributed.py)."""

from __future__ import annotations

import argparse
from dataclasses import replace

import pytest

from resrl_analysis.probes.config import ProbeConfig, add_probe_arguments, config_from_args, config_to_argv
from resrl_analysis.probes.diversity import merge_diversity_results
from resrl_analysis.probes.engine import ProbePass
from resrl_analysis.probes.parallel import Parallel, group_order, in_group_order
from resrl_analysis.probes.registry import REGISTRY
from resrl_analysis.probes.runner import main
from resrl_analysis.probes.synthetic import random_probe_set, tiny_model

pytestmark = pytest.mark.unit


class _Ranks:
    """Parallel.share for a rank of a world without a process group (only rank and world size are read)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    share = Parallel.share


def test_groups_are_dealt_round_robin_and_never_split():
    ps = random_probe_set([[1, 0]] * 5)
    shares = [[g.group_id for g in _Ranks(r, 2).share(ps).groups] for r in range(2)]
    assert shares == [[0, 2, 4], [1, 3]]
    assert sorted(sum(shares, [])) == [g.group_id for g in ps.groups]


def test_group_order_undoes_the_deal_and_is_the_identity_on_one_process(one_thread):
    """The parts of two shares, stacked rank by rank and put in group order, are the one-process result row for
    row (the diversity probe's pass@k pooled again over all prompts)."""
    ps = random_probe_set([[1, 0, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1]], seed=3)
    cfg = ProbeConfig(probes=["entropy", "subspace", "diversity"], samples=3, max_new_tokens=3)
    model = tiny_model(seed=0)

    def results(probe_set):
        pp = ProbePass(cfg, probe_set, steps=[0])
        pp.run_model(model, 0, tokenizer=_Tok())
        return pp.parts

    whole = results(ps)
    order = group_order(ps)
    halves = [results(_Ranks(r, 2).share(ps)) for r in range(2)]
    for name, probe in ProbePass(cfg, ps).probes.items():
        if probe.scope == "pairs":
            continue
        ref = whole[name][0]
        assert in_group_order(ref, order).frames().keys() == ref.frames().keys()
        for t, df in in_group_order(ref, order).frames().items():
            assert df.equals(ref.frames()[t]), (name, t)  # one process: already in group order
        merged = probe.merge_ranks([h[name][0] for h in halves], order)
        for t, df in merged.frames().items():
            assert df.equals(ref.frames()[t]), (name, t)
        assert merged.skipped == ref.skipped
    div = [h["diversity"][0] for h in halves]
    assert merge_diversity_results(div, order).pass_at_k.equals(whole["diversity"][0].pass_at_k)


class _Tok:
    eos_token_id, pad_token_id = 2, 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_every_setting_and_option_reaches_the_ranks():
    p = add_probe_arguments(argparse.ArgumentParser())
    argv = ["runs/a", "--probes", "first_order,diversity", "--every", "2", "--group-batch", "4", "--dtype", "float64",
            "--parallel", "shard", "--algorithms", "grpo,nsr", "--lr", "0.01", "--rank", "8",
            "--diversity-steps", "all", "--full-model-steps", "none", "--no-progress"]
    cfg = config_from_args(p.parse_args(argv))
    assert config_from_args(p.parse_args(config_to_argv(cfg))) == cfg
    assert config_from_args(p.parse_args(config_to_argv(replace(cfg, nproc=1)))).nproc == 1


def test_one_process_refuses_shard_and_bad_nproc(tmp_path, capsys):
    from resrl_analysis.probes.synthetic import write_fake_run

    run = write_fake_run(tmp_path / "run", steps=(0, 1), n_groups=2, group_size=3)
    assert main([str(run), "--parallel", "shard", "--probes", "lld"]) == 2
    assert "--parallel shard needs several processes" in capsys.readouterr().err
    assert main([str(run), "--nproc", "0"]) == 2
    assert "--nproc must be >= 1" in capsys.readouterr().err
    assert set(REGISTRY) >= {"lld", "entropy", "first_order", "interference", "subspace", "diversity"}
