"""Smoke test of the benchmark code (bench/): imports, and the comparisons at tiny sizes checking equality.

Benchmarks are not unit tests: nothing here times anything. This only keeps the bench code from rotting:
the naive and factorised interference paths must agree, the chunked and full log-prob paths must agree,
and the worker protocol and RESULTS.md rewriting must work.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration  # each benchmark once, at its smallest size

BENCH_MODULES = [
    "bench.common",
    "bench.interference_bench",
    "bench.logprob_bench",
    "bench.train_bench",
    "bench.trl_compare",
    "bench.run_cpu",
    "bench.gpu_bench",
    "bench.probe_bench",
    "bench.reference_weighting",
    "bench.lld_in_batch_cost",
    "bench.rollout_token_cost",
    "bench.diversity_bench",
    "bench.view_bench",
    "bench.entropy_bench",
    "bench.live_diagnostics_cost",
    "bench.probe_dist_bench",
]


@pytest.mark.parametrize("name", BENCH_MODULES)
def test_bench_modules_import(name: str) -> None:
    importlib.import_module(name)


def test_interference_naive_equals_factorised() -> None:
    from bench.interference_bench import (
        factorised_given_p,
        factorised_head_inner,
        make_head_problem,
        naive_head_inner,
        reference_head_inner,
        rel_err,
    )

    pb = make_head_problem(50, 16, 7, 5, seed=3)
    pb64 = pb.to(torch.float64)
    assert rel_err(naive_head_inner(pb64, chunk=3), factorised_head_inner(pb64)) < 1e-12
    ref = reference_head_inner(pb)
    assert rel_err(factorised_head_inner(pb), ref) < 1e-5
    assert rel_err(naive_head_inner(pb), ref) < 1e-5
    assert rel_err(factorised_given_p(pb)(), factorised_head_inner(pb)) == 0.0


def test_logprob_chunked_equals_full() -> None:
    from bench.logprob_bench import make_logits, run_side

    out = {}
    for side in ("full", "chunked"):
        z, y, a = make_logits(24, 500, torch.float32, seed=1)
        logp, ent = run_side(side, z, y, a, budget_mb=0.01)  # a few tokens per chunk
        assert z.grad is not None
        out[side] = (logp, ent, z.grad)
    for f, c in zip(out["full"], out["chunked"]):
        torch.testing.assert_close(c, f, rtol=1e-5, atol=1e-5)


def test_worker_protocol_and_results_file(tmp_path: Path) -> None:
    from bench.common import Row, markdown_table, run_worker, update_results_section

    res = run_worker(
        "bench.interference_bench",
        ["--side", "factorised", "--vocab", "40", "--dim", "8", "--ta", "4", "--tb", "3", "--measure", "memory",
         "--out", str(tmp_path / "K.pt")],
        timeout=120,
    )
    assert res["peak_mb"] >= 0 and res["time_s"] > 0
    assert torch.load(tmp_path / "K.pt").shape == (4, 3)

    path = tmp_path / "RESULTS.md"
    update_results_section("CPU", "## CPU\n\nfirst", path)
    update_results_section("CPU", "## CPU\n\n" + markdown_table([Row("b", "s", status="met")]), path)
    text = path.read_text()
    assert "first" not in text and "| b | s |" in text
    assert "not measured yet" in text.lower()  # the GPU section of the skeleton is kept


@pytest.mark.parametrize("name", BENCH_MODULES)
def test_bench_doctests(name: str) -> None:
    import doctest

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_diversity_bench_tiny() -> None:
    from bench.diversity_bench import _model, _prompts, hf_per_prompt, ours, row, run

    model, ps = _model(60, 16, 1), _prompts(3, 60)
    for side in (ours, hf_per_prompt):
        out = side(model, ps, 2, 5)
        assert len(out) == 3 and all(len(rows) == 2 for rows in out)
        assert all(1 <= len(r) <= 5 and (2 not in r[:-1]) for rows in out for r in rows)  # cut after EOS
    res = run(prompts=2, n=2, max_new_tokens=3, rounds=2, vocab=60, hidden=16, layers=1)
    assert len(res["ratios"]) == 2 and all(r > 0 for r in res["ratios"])
    assert res["tokens"]["ours"][0] <= 2 * 2 * 3
    assert "Diversity sampler" in row(res).benchmark


def test_view_bench_run_has_the_shape_it_says(tmp_path) -> None:
    from bench.view_bench import write_synthetic_run
    from resrl_analysis.view import read_run

    run = write_synthetic_run(tmp_path, steps=3, groups=2, group_size=4, tokens=6, vocab_size=64)
    rv = read_run(run)
    assert [e.key for e in rv.entries] == ["rollouts:0", "rollouts:1", "rollouts:2"]
    assert all(len(e.groups) == 2 and all(len(r.ids) == 6 for g in e.groups for r in g.responses) for e in rv.entries)
    assert {"logp", "entropy", "advantage", "resrl_weight"} <= set(rv.entries[0].groups[0].responses[-1].values)


def test_entropy_bench_worker_tiny(capsys) -> None:
    from bench.entropy_bench import plan_mb, worker

    worker("interference+entropy_dynamics", 2, 4, 1)
    out = capsys.readouterr().out
    assert "entropy_dynamics" in out and plan_mb("interference+entropy_dynamics", 2, 4) > 0
