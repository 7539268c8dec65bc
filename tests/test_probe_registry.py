"""The probe registry (issue 20): a toy probe registered from this file alone runs end to end — the memory plan,
`resrl probe` (its flag, its table on disk, `load_results`), the CLI help, the docs table and the live TRL
callback — and the registry's declarations are checked."""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
from test_foreign_runs import grpo_run

from resrl_analysis.plan import ModelShape, ProbeShape, plan_probes
from resrl_analysis.probes import registry
from resrl_analysis.probes.config import add_probe_arguments
from resrl_analysis.probes.registry import Probe, option, probe_table, register_probe, unregister_probe
from resrl_analysis.probes.runner import main
from resrl_analysis.probes.synthetic import write_fake_run
from resrl_analysis.results import ProbeResult, load_results

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, eq=False)
class ToyResult(ProbeResult):
    """Per response: its token count and its summed log-prob times the option ``toy_scale``."""

    KIND: ClassVar[str] = "toy_counts"
    TABLES: ClassVar[dict] = {"responses": {"step": "int", "group_id": "int", "response_index": "int",
                                            "n_tokens": "int", "scaled_logp": "float"}}
    responses: pd.DataFrame = None  # type: ignore[assignment]
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ToyOptions:
    toy_scale: float = option(1.0, "factor on the summed log-prob (default 1)")


class ToyProbe(Probe):
    name = "toy"
    summary = "a test's toy: scaled summed log-prob per response"
    result = ToyResult
    scope = "groups"
    needs = frozenset({"logp"})
    Options = ToyOptions
    live = True

    def plan(self, p):
        return {"toy buffer": p.G * p.T * 8}

    def on_groups(self, ctx):
        rows = [{"step": ctx.step, "group_id": f.group.group_id, "response_index": i, "n_tokens": int(f.mask[i].sum()),
                 "scaled_logp": self.options.toy_scale * float(f.logp[i].sum())}
                for f in ctx.forwards for i in range(f.mask.shape[0])]
        return ToyResult(responses=pd.DataFrame(rows), meta={"toy_scale": self.options.toy_scale})

    def live_metrics(self, results, step):
        r = results["toy"].responses
        return {"probe/toy_scaled_logp_mean": float(r[r.step == step].scaled_logp.mean())}


@pytest.fixture
def toy():
    register_probe(ToyProbe)
    yield ToyProbe
    unregister_probe("toy")


@pytest.mark.unit
def test_plan_counts_the_toys_terms(toy):
    m = ModelShape(100, 8, 2, 2, 2, 4, 16, False)
    plan = plan_probes(m, ProbeShape(4, 16, 4), ["toy"], budget=10**9)
    assert plan.parts["toy"]["toy buffer"] == 4 * 16 * 8
    assert set(plan.peaks) == {"toy"} and "toy" in plan.describe()


@pytest.mark.unit
def test_flag_help_and_docs_table_come_from_the_registry(toy):
    p = add_probe_arguments(argparse.ArgumentParser(prog="resrl probe"))
    text = p.format_help()
    assert "--toy-scale" in text and "a test's toy" in text
    assert p.parse_args(["run", "--toy-scale", "3"]).toy_scale == 3.0
    assert "| `toy` | per group batch |" in probe_table()


@pytest.mark.integration
def test_toy_runs_end_to_end_through_resrl_probe(toy, tmp_path):
    run = write_fake_run(tmp_path / "run", steps=(0, 1))
    out = tmp_path / "out"
    assert main([str(run), "--out", str(out), "--probes", "toy,entropy", "--toy-scale", "2", "--no-progress",
                 "--quiet"]) == 0
    r = load_results(out)
    assert sorted(r) == ["scores", "toy"] and isinstance(r["toy"], ToyResult)
    toy_df, scores = r["toy"].responses, r["scores"].responses
    merged = toy_df.merge(scores, on=["step", "group_id", "response_index"])
    assert len(merged) == len(scores) == len(toy_df) > 0
    # The toy read the same shared forward as the entropy probe: 2 × its summed log-prob, to the bit.
    np.testing.assert_array_equal(merged.scaled_logp.to_numpy(), 2 * merged.logp_sum.to_numpy())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["results"]["toy"]["kind"] == "toy_counts" and summary["options"]["toy_scale"] == 2.0


@pytest.mark.e2e
def test_toy_runs_live_in_a_trl_run(toy, tmp_path, one_thread):
    from resrl_analysis.integrations.trl import ProbeCallback

    cb = ProbeCallback(str(_dataset(tmp_path)), probes=("toy",), every=1, options={"toy": ToyOptions(toy_scale=3.0)},
                       probe_set_options={"n_samples": 4, "max_new_tokens": 6})
    trainer = grpo_run(tmp_path / "live", callbacks=[cb], steps=2)
    logged = [e for e in trainer.state.log_history if "probe/toy_scaled_logp_mean" in e]
    assert [e["step"] for e in logged] == [0, 1, 2]
    r = load_results(tmp_path / "live" / "probes")
    assert sorted(r) == ["toy"] and sorted(r["toy"].responses.step.unique()) == [0, 1, 2]
    means = r["toy"].responses.groupby("step").scaled_logp.mean()
    assert [e["probe/toy_scaled_logp_mean"] for e in logged] == pytest.approx(means.tolist())
    assert r["toy"].meta["toy_scale"] == 3.0


def _dataset(tmp_path: Path) -> Path:
    from test_foreign_runs import PAIRS

    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"{a}*{b}=", "solution": str(a * b)}) + "\n" for a, b in PAIRS))
    return f


@pytest.mark.unit
def test_declarations_are_checked():
    class NoSummary(Probe):
        name, result = "bad_summary", ToyResult

    with pytest.raises(ValueError, match="summary"):
        register_probe(NoSummary)

    class Clash(Probe):
        name, summary, result = "clash", "x", ToyResult

        @dataclass(frozen=True)
        class Options:
            rank: int = option(3, "another rank")  # the subspace probes' rank has another default and help

    with pytest.raises(ValueError, match="clashes"):
        register_probe(Clash)

    class Unknown(Probe):
        name, summary, result, needs = "unknown_needs", "x", ToyResult, frozenset({"telepathy"})

    with pytest.raises(ValueError, match="unknown needs"):
        register_probe(Unknown)
    assert not {"bad_summary", "clash", "unknown_needs"} & set(registry.REGISTRY)


@pytest.mark.unit
def test_docs_probe_table_is_the_registry():
    """docs/PROBES.md holds the table :func:`probe_table` makes from the built-in probes."""
    doc = (ROOT / "docs" / "PROBES.md").read_text()
    table = probe_table()
    assert table in doc, "docs/PROBES.md is out of date: paste resrl_analysis.probes.registry.probe_table()"
    assert re.findall(r"^\| `(\w+)` \|", doc, flags=re.M) == list(registry.REGISTRY)


@pytest.mark.integration
def test_the_docs_example_probe_runs(tmp_path):
    """The example in docs/PROBES.md registers and runs as written."""
    doc = (ROOT / "docs" / "PROBES.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, flags=re.S).group(1)
    module = types.ModuleType("docs_probes_example")  # a real module: dataclasses look their module up
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, "docs/PROBES.md", "exec"), module.__dict__)  # noqa: S102 - our own documentation
        run = write_fake_run(tmp_path / "run", steps=(0, 1))
        out = tmp_path / "out"
        assert main([str(run), "--out", str(out), "--probes", "max_logit", "--top", "3", "--no-progress",
                     "--quiet"]) == 0
        r = load_results(out)["max_logit"]
        assert r.meta["top"] == 3 and len(r.responses) > 0 and r.responses.max_logit.notna().all()
    finally:
        unregister_probe("max_logit")
        sys.modules.pop(module.__name__, None)
