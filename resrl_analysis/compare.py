"""`resrl compare RUN_DIR ...`: runs grouped by algorithm and seed, summarised with intervals and verdicts.

One summary for every caller: `resrl compare` on any run directories (ours, and foreign TRL/verl runs with
probe results), `resrl demo` and `resrl study`. What it reports is **declarative**, so a new metric or question
is one entry, not a new code path:

- :data:`METRICS`: one :class:`Metric` per headline number (``key``, the table's ``label``, and ``read``: how one
  run's value is read from its loaded run directory, :class:`resrl_analysis.figures.RunData`);
  :func:`register_metric` adds one.
- :data:`QUESTIONS`: one :class:`Question` per claim a summary judges (a metric, algorithms a and b, the expected
  sign of a − b, the claim's wording); :func:`register_question` adds one.
- :class:`SummarySpec`: which metrics, comparison pairs and questions one summary reports, its title and notes
  (:data:`DEMO_SPEC` is the demo's; the study has its own).

Per algorithm and metric the summary gives the mean over seeds with its 95% t interval
(:func:`resrl_analysis.stats.mean_interval`); per comparison pair a − b, Welch's interval of the difference; per
question a verdict generated from that interval ("shown", "not shown", "the opposite is shown"); and how many of
the differences exclude 0 against how many would by chance alone. Nothing in it is written in advance.

>>> rows = [{"algorithm": a, "seed": s, "lld/batch_frac": v} for a, s, v in
...         [("nsr", 0, 0.30), ("nsr", 1, 0.31), ("nsr", 2, 0.32), ("psr", 0, 0.20), ("psr", 1, 0.21),
...          ("psr", 2, 0.22)]]
>>> agg = aggregate(rows, ("psr", "nsr"), DEMO_SPEC)
>>> verdicts(agg, DEMO_SPEC, 3)[0].split(": ", 1)[1]
'shown, NSR − PSR = 0.100 [0.077, 0.123].'
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

__all__ = ["DEMO_SPEC", "DEMO_SPREAD_NOTE", "METRICS", "NAMES", "QUESTIONS", "Metric", "Question", "SummarySpec",
           "add_compare_arguments", "aggregate", "compare", "live_mean", "name_of", "register_metric",
           "register_stratum_metrics", "UPDATE_METRICS",
           "register_question", "run_compare", "summarize_run", "summary_from_payload", "summary_markdown", "verdict",
           "verdicts"]

#: How the summaries name algorithms (anything else is printed as it is).
NAMES: dict[str, str] = {"grpo": "GRPO", "psr": "PSR", "nsr": "NSR", "w-reinforce": "W-REINFORCE", "resrl": "ResRL",
                         "nthr": "NTHR", "resrl-shuffled": "ResRL-shuffled", "resrl-uniform": "ResRL-uniform",
                         "resrl-own-state": "ResRL-own-state", "shared-mask": "shared-mask"}


def name_of(algo: str) -> str:
    """The printed name of an algorithm.

    >>> name_of("w-reinforce"), name_of("my-run")
    ('W-REINFORCE', 'my-run')
    """
    return NAMES.get(algo, algo)


def _finite(x: Any) -> float | None:
    return float(x) if x is not None and isinstance(x, (int, float)) and not isinstance(x, bool) \
        and math.isfinite(float(x)) else None


# =========================================================================================== the catalogue


@dataclass(frozen=True)
class Metric:
    """A headline number of a run: ``key`` (in summary.json), ``label`` (in the tables; ``pass@n`` is written
    ``pass@<k>`` once the number of samples is known), ``read(run) -> float | None`` (None: the run did not
    measure it), and whether algorithms are compared on it (step-0 numbers are the shared starting policy's,
    equal across algorithms by construction: ``compare=False``)."""

    key: str
    label: str
    read: Callable[[Any], float | None]
    compare: bool = True


#: Every metric a summary can report, by key, in the order tables list them.
METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    """Add ``metric`` to :data:`METRICS` (a key already there is replaced)."""
    METRICS[metric.key] = metric
    return metric


@dataclass(frozen=True)
class Question:
    """A claim a summary judges: ``metric``'s a − b is expected ``> 0`` (``sign`` +1) or ``< 0`` (−1); with ``b``
    None, a's own mean is (a sign question about one algorithm, judged by its interval over seeds).

    ``claim`` is its wording; the verdict (shown / not shown / the opposite is shown) comes from the interval.
    """

    a: str
    b: str | None
    metric: str
    sign: int
    claim: str


#: Every question, in the order summaries judge them.
QUESTIONS: list[Question] = []


def register_question(q: Question) -> Question:
    """Add ``q`` to :data:`QUESTIONS`."""
    if q.sign not in (1, -1):
        raise ValueError(f"question {q.claim!r}: sign must be +1 or -1, got {q.sign}")
    QUESTIONS.append(q)
    return q


def live_mean(key: str) -> Callable[[Any], float | None]:
    """A reader: the run's live metric ``key`` averaged over the steps that logged it (NaN/None skipped)."""

    def read(r: Any) -> float | None:
        m = r.metrics
        if m.empty or key not in m:
            return None
        return _finite(m[key].astype(float).mean())

    read.__doc__ = f"mean over steps of live {key}"
    return read


def _reward(r: Any, tail: bool) -> float | None:
    m = r.metrics
    if m.empty or "reward/mean" not in m:
        return None
    rew = m.sort_values("step")["reward/mean"].astype(float)
    k = min(5, len(rew))
    return _finite((rew.iloc[-k:] if tail else rew.iloc[:k]).mean())


def _pass(which: str, tag: str) -> Callable[[Any], float | None]:
    def read(r: Any) -> float | None:
        div = r.probes.get("diversity")
        if div is None or not len(div.pass_at_k):
            return None
        pk = div.pass_at_k
        if "stratum" in pk:  # the summary's pass@k is the whole probe set's
            pk = pk[pk.stratum.isna()] if pk.stratum.isna().any() else pk.iloc[:0]
        if not len(pk):
            return None
        if tag == "start" and not (pk.step == 0).any():  # "step 0" is step 0: a run probed later has no cell
            return None
        s = 0 if tag == "start" else int(pk.step.max())
        d = pk[pk.step == s].sort_values("k")
        return _finite(d.pass_at_k.iloc[0] if which == "1" else d.pass_at_k.iloc[-1])

    return read


def _heldout_last(r: Any) -> Any:
    lld = r.probes.get("lld")
    if lld is None or not len(lld.deltas):
        return None
    d = lld.deltas[lld.deltas.comparison == "vs_initial"]
    return d[d.step_to == d.step_to.max()] if len(d) else None


def _heldout_delta(r: Any) -> float | None:
    last = _heldout_last(r)
    return None if last is None else _finite(last.delta_pos_sum.astype(float).mean())


def _heldout_frac(r: Any) -> float | None:
    last = _heldout_last(r)
    if last is None:
        return None
    flags = last.lld_sum.dropna()
    return _finite(flags.astype(float).mean()) if len(flags) else None


def _cos_end(r: Any) -> float | None:
    inter = r.probes.get("interference")
    if inter is None or not len(inter.groups):
        return None
    g = inter.groups[inter.groups.status == "ok"] if "status" in inter.groups else inter.groups
    g = g[g.step == g.step.max()] if len(g) else g
    return _finite(g.cos_mean.mean()) if len(g) else None


for _m in (
    Metric("lld/batch_frac", "in-batch LLD fraction (live, mean over steps)", live_mean("lld/batch_frac")),
    Metric("lld/batch_delta_mean", "in-batch Δ log π(y⁺) (live, mean over steps)", live_mean("lld/batch_delta_mean")),
    Metric("lld/shared_token_delta_mean", "in-batch Δ on shared tokens (live)",
           live_mean("lld/shared_token_delta_mean")),
    Metric("lld/unique_token_delta_mean", "in-batch Δ on unique tokens (live)",
           live_mean("lld/unique_token_delta_mean")),
    Metric("heldout_lld_frac_end", "held-out LLD fraction (last vs step 0)", _heldout_frac),
    Metric("heldout_delta_end", "held-out Δ log π(y⁺) (last vs step 0)", _heldout_delta),
    Metric("pass@1_start", "held-out pass@1 (step 0)", _pass("1", "start"), compare=False),
    Metric("pass@1_end", "held-out pass@1 (last)", _pass("1", "end")),
    Metric("pass@n_start", "held-out pass@n (step 0)", _pass("n", "start"), compare=False),
    Metric("pass@n_end", "held-out pass@n (last)", _pass("n", "end")),
    Metric("reward_last", "training reward (last 5 steps)", lambda r: _reward(r, True)),
    Metric("cos_mean_end", "mean pos×neg head cos (last)", _cos_end),
):
    register_metric(_m)

#: The live step-size-free metrics of each update (``collateral_in_batch``;
#: docs/MATH.md § Collateral per unit of push-down), each run's mean over its rollout batches.
UPDATE_METRICS = {
    "update/kl_k3": "update size: KL(π_before‖π_after), k3 (live)",
    "update/pos_delta_per_kl": "Δ log π(y⁺) per unit KL (live)",
    "update/neg_delta_per_kl": "Δ log π(y⁻) per unit KL (live)",
    "update/selectivity_ratio": "collateral per unit push-down (live)",
    "update/collateral_mean": "collateral on shared positive tokens (live)",
    "update/push_down_mean": "push-down of the negatives (live)",
    "update/push_down_first_divergent": "push-down on the first divergent token (live)",
    "resrl/weight_shared": "mean ω, shared tokens (live)",
    "resrl/weight_first_divergent": "mean ω, first divergent token (live)",
    "resrl/weight_after": "mean ω, tokens after it (live)",
}
for _k, _label in UPDATE_METRICS.items():
    register_metric(Metric(_k, _label, live_mean(_k)))
def _pass_stratum(k: int, tag: str, stratum: str) -> Callable[[Any], float | None]:
    def read(r: Any) -> float | None:
        from .ops import pass_at_k_by_stratum

        div = r.probes.get("diversity")
        if div is None or div.prompts is None or not len(div.prompts):
            return None
        p = div.prompts.dropna(subset=["n_correct"])
        if not len(p):
            return None
        if tag == "start" and not (p.step == 0).any():  # "step 0" is step 0: a run probed later has no cell
            return None
        s = 0 if tag == "start" else int(p.step.max())
        d = p[p.step == s]
        n = int(d.n_samples.min())
        if k > n or (d.n_samples != n).any():
            return None
        curves = pass_at_k_by_stratum(n, d.prompt_uid.tolist(), d.n_correct.astype(int).tolist())
        return _finite(curves[stratum][k - 1]) if stratum in curves else None

    read.__doc__ = f"pass@{k} over the {stratum} stratum's held-out prompts ({tag})"
    return read


def register_stratum_metrics(strata: Sequence[str], ks: Sequence[int] = (1, 8, 64),
                             tags: Sequence[str] = ("start", "end")) -> list[str]:
    """Register ``pass@<k>_<tag>/<stratum>`` for each held-out stratum (a prompt uid's part before ``/``), k and
    tag; returns their keys. ``start`` (step 0) metrics are not compared between algorithms.

    >>> register_stratum_metrics(["hard"], ks=(1,), tags=("end",))
    ['pass@1_end/hard']
    """
    keys = []
    for stratum in strata:
        for tag in tags:
            for k in ks:
                key = f"pass@{k}_{tag}/{stratum}"
                when = "step 0" if tag == "start" else "last"
                register_metric(Metric(key, f"held-out pass@{k} ({when}), {stratum}", _pass_stratum(k, tag, stratum),
                                       compare=tag != "start"))
                keys.append(key)
    return keys


for _a, _b, _sign, _claim in (
        ("nsr", "psr", +1, "The negative gradient displaces positives (NSR above the control PSR)"),
        ("resrl", "nsr", -1, "ResRL displaces positives less than NSR"),
        ("resrl", "grpo", -1, "ResRL displaces positives less than GRPO")):
    for _key in ("lld/batch_frac", "heldout_lld_frac_end"):
        register_question(Question(_a, _b, _key, _sign, _claim))


# Entropy dynamics (issue 24; docs/MATH.md § Entropy dynamics): which samples raise or lower entropy.
def _abs_live_mean(key: str) -> Callable[[Any], float | None]:
    def read(r: Any) -> float | None:
        m = r.metrics
        return None if m.empty or key not in m else _finite(m[key].astype(float).abs().mean())

    return read


def _entropy_rho(r: Any) -> float | None:
    """Spearman over the run's probe tokens of the first-order ΔH with a real head-only step's, for the run's own
    algorithm (the entropy_dynamics probe's correlation table)."""
    ed = r.probes.get("entropy_dynamics")
    if ed is None or not len(ed.correlation):
        return None
    c = ed.correlation
    c = c[(c.scope == "run") & (c.level == "token") & (c.predictor == "predicted") & (c.target == "actual_head")
          & (c.algorithm == str(r.config.get("algorithm")))]
    return _finite(c.spearman.iloc[0]) if len(c) else None


for _m in (
    Metric("entropy/pred_from_pos", "first-order ΔH from positive samples (live, per unit step)",
           live_mean("entropy/pred_from_pos")),
    Metric("entropy/pred_from_neg", "first-order ΔH from negative samples (live, per unit step)",
           live_mean("entropy/pred_from_neg")),
    Metric("entropy_pred_from_neg_abs", "|first-order ΔH from negative samples| (live, per unit step)",
           _abs_live_mean("entropy/pred_from_neg")),
    Metric("entropy/delta_mean", "realised ΔH across each update (live)", live_mean("entropy/delta_mean")),
    Metric("entropy_pred_rho", "Spearman(first-order, real head-step ΔH), probe tokens", _entropy_rho,
           compare=False),
):
    register_metric(_m)

for _a in ("grpo", "nsr", "w-reinforce", "nthr", "resrl"):  # PSR's negative part is 0 by construction
    register_question(Question(_a, None, "entropy/pred_from_neg", +1,
                               f"Negative samples raise entropy under {NAMES[_a]}"))
for _a in ("grpo", "psr", "w-reinforce", "nthr", "resrl"):  # NSR's positive part is 0 by construction
    register_question(Question(_a, None, "entropy/pred_from_pos", -1,
                               f"Positive samples lower entropy under {NAMES[_a]}"))
for _b in ("nsr", "w-reinforce"):
    register_question(Question("resrl", _b, "entropy_pred_from_neg_abs", -1,
                               f"ResRL's negative samples move entropy less than {NAMES[_b]}'s"))


@dataclass(frozen=True)
class SummarySpec:
    """What one summary reports: ``metrics`` (keys of :data:`METRICS`, table order), ``pairs`` (a, b): a − b on
    every compared metric, ``questions`` judged, its ``title``, ``notes`` (paragraphs after the differences) and
    ``definitions`` (the closing paragraph; ``{samples}`` and ``{first_seed}`` are filled in)."""

    title: str = "resrl compare"
    metrics: tuple[str, ...] = ()
    pairs: tuple[tuple[str, str], ...] = ()
    questions: tuple[Question, ...] = tuple(QUESTIONS)
    notes: tuple[str, ...] = ()
    definitions: str = ""

    def metric(self, key: str) -> Metric:
        return METRICS[key]


_DEMO_DEFINITIONS = (
    "Definitions. Live in-batch LLD (trainer, `lld_in_batch`): for each mixed group of a rollout batch, "
    "Δ log π(y⁺) of its own positive responses across that batch's update; the fraction of groups with "
    "summed Δ ≤ 0, the mean Δ per positive response, and that Δ split into tokens a negative response "
    "shares (same token after the same prefix) and the rest; each averaged over the run's steps. "
    "Held-out probe set (`resrl probe --probe-set heldout`): held-out prompts with the reference answer "
    "as a positive plus responses of the starting policy; Δ compares the last checkpoint with step 0; "
    "pass@k from {samples} samples per prompt. Training reward: batch mean at the training "
    "temperature. Interference: cosine of the head gradients of positive and negative tokens, averaged "
    "over mixed groups at the last checkpoint. Figures: all seeds (means with 95% t bands; one-run "
    "figures: seed {first_seed}).")

#: Said under every demo summary: its 3 seeds are too few for the claims, which the study tests.
DEMO_SPREAD_NOTE = (
    "Three seeds can understate the spread. When an earlier version of this demo (2026-12-01) was run with two "
    "more seeds (3 and 4), NSR − PSR in-batch LLD fraction was +0.049 and +0.035, both below that run's 3-seed "
    "interval [0.067, 0.081] (the 5-seed interval still excluded 0). Take the verdicts above as what 3 seeds "
    "show; the claims, with 5 seeds, the "
    "controls that separate ResRL's projection from its smaller step, a step-size-free measure of collateral "
    "damage and a held-out set where pass@k has room, are tested by `resrl study`.")

#: The demo's summary (the metrics and questions registered above, at import).
# Every metric registered above (the entropy ones too), but of update/* only the two the demo's summary reports.
_DEMO_METRICS = (*(k for k in METRICS if k not in UPDATE_METRICS), "update/pos_delta_per_kl",
                 "update/selectivity_ratio")
DEMO_SPEC = SummarySpec(
    title="resrl demo", metrics=_DEMO_METRICS,
    pairs=(("resrl", "nsr"), ("resrl", "grpo"), ("nsr", "psr")), questions=tuple(QUESTIONS),
    notes=(DEMO_SPREAD_NOTE,), definitions=_DEMO_DEFINITIONS)


# =========================================================================================== runs → numbers


def summarize_run(run_dir: str | Path, metrics: Sequence[str] | None = None, *, label: str | None = None
                  ) -> dict[str, Any]:
    """The headline numbers of one run directory (each None when the run did not measure it).

    ``algorithm`` is the config's (a foreign run's: ``label`` or its kind), ``seed`` the config's (None for a
    run without one). Besides the metrics (all of :data:`METRICS` unless ``metrics`` says which): ``reward_first``,
    ``pass_k`` (the largest k of the diversity probe), ``lld_steps`` (the held-out LLD's first and last step),
    ``tight_violations`` and ``pairs_checked`` (the subspace probe's bound check) where measured.
    """
    from .figures import load_run

    r = load_run(run_dir, label)
    out: dict[str, Any] = {"algorithm": str(r.config.get("algorithm", r.label)) if label is None else label,
                           "seed": r.config.get("seed")}
    first = _reward(r, False)
    if first is not None or (not r.metrics.empty and "reward/mean" in r.metrics):
        out["reward_first"] = first
    for key in (metrics if metrics is not None else METRICS):
        out[key] = METRICS[key].read(r)
    div = r.probes.get("diversity")
    if div is not None and len(div.pass_at_k):
        out["pass_k"] = int(div.pass_at_k.k.max())
    last = _heldout_last(r)
    if last is not None and len(last):
        d = r.probes["lld"].deltas
        d = d[d.comparison == "vs_initial"]
        out["lld_steps"] = [int(d.step_from.min()), int(last.step_to.iloc[0])]
    sub = r.probes.get("subspace")
    if sub is not None and len(sub.groups):
        g = sub.groups[sub.groups.status == "ok"]
        out["tight_violations"] = int(g.tight_violations.sum())
        out["pairs_checked"] = int(g.n_pairs.sum())
    return out


def _seed_key(r: dict[str, Any]) -> tuple:
    s = r.get("seed")
    return (0, s) if isinstance(s, int) and not isinstance(s, bool) else (1, str(s))


def aggregate(rows: list[dict[str, Any]], algorithms: Sequence[str], spec: SummarySpec = DEMO_SPEC
              ) -> dict[str, Any]:
    """Per algorithm and metric the mean with its 95% t interval across seeds, and the comparisons of ``spec``.

    >>> rows = [{"algorithm": a, "seed": s, "lld/batch_frac": v} for a, s, v in
    ...         [("resrl", 0, 0.1), ("resrl", 1, 0.2), ("resrl", 2, 0.15), ("nsr", 0, 0.4), ("nsr", 1, 0.5),
    ...          ("nsr", 2, 0.45)]]
    >>> agg = aggregate(rows, ("nsr", "resrl"))
    >>> agg["algorithms"]["resrl"]["lld/batch_frac"]["seeds"]
    [0.1, 0.2, 0.15]
    >>> c = agg["comparisons"][0]
    >>> c["a"], c["b"], round(c["diff"], 3), c["excludes_zero"]
    ('resrl', 'nsr', -0.3, True)
    """
    from .stats import describe_difference, mean_interval, welch_difference

    per: dict[str, dict[str, Any]] = {}
    for algo in algorithms:
        mine = sorted((r for r in rows if r["algorithm"] == algo), key=_seed_key)
        per[algo] = {}
        for key in spec.metrics:
            vals = [_finite(r.get(key)) for r in mine]
            if any(v is not None for v in vals):
                # "seeds": the per-seed values; "seed_ids": which seed each came from.
                per[algo][key] = {**mean_interval(vals).to_dict(),
                                  "seed_ids": [r.get("seed") for r, v in zip(mine, vals) if v is not None]}
    comps = []
    for a, b in spec.pairs:
        if a not in per or b not in per:
            continue
        for key in spec.metrics:
            m = spec.metric(key)
            if not m.compare or key not in per[a] or key not in per[b]:
                continue
            iv = welch_difference(per[a][key]["seeds"], per[b][key]["seeds"])
            comps.append({"a": a, "b": b, "metric": key, "diff": iv.mean,
                          "lo": iv.lo if math.isfinite(iv.lo) else None, "hi": iv.hi if math.isfinite(iv.hi) else None,
                          "excludes_zero": iv.excludes_zero, "n_seeds": iv.n,
                          "sentence": describe_difference(f"{name_of(a)} − {name_of(b)} {m.label}", iv,
                                                          names=(name_of(a), name_of(b)))})
    return {"algorithms": per, "comparisons": comps}


# =========================================================================================== numbers → words


def _cell(d: dict | None) -> str:
    from .stats import Interval, describe_interval, fmt_number

    if not d or d.get("mean") is None:
        return "–"
    if d["lo"] is None or d["hi"] is None:  # one seed: the table's caption says there is no interval
        return fmt_number(d["mean"])
    return describe_interval(Interval.from_dict(d))


def _with_k(text: str, pass_k: int | None) -> str:
    """``pass@n`` in a label or sentence written as ``pass@<k>`` once the number of samples is known."""
    return text.replace("pass@n", f"pass@{pass_k}") if pass_k else text


def verdict(c: dict[str, Any] | None, sign: int) -> str:
    """The verdict on a claim that a − b has ``sign`` from its comparison ``c`` (None: not compared).

    >>> verdict({"lo": 0.1, "hi": 0.2, "excludes_zero": True}, -1), verdict({"lo": -0.1, "hi": 0.2,
    ...     "excludes_zero": False}, 1), verdict({"lo": None, "hi": None}, 1)
    ('the opposite is shown', 'not shown (the interval includes 0)', 'cannot be judged (no interval)')
    """
    if c is None:
        return "not measured"
    if c["lo"] is None or c["hi"] is None:
        return "cannot be judged (no interval)"
    if not c["excludes_zero"]:
        return "not shown (the interval includes 0)"
    return "shown" if (c["lo"] > 0) == (sign > 0) else "the opposite is shown"


def verdicts(agg: dict[str, Any], spec: SummarySpec, n_seeds: int) -> list[str]:
    """One generated line per question of ``spec`` whose metric both sides measured: the claim, the metric, the
    verdict, a − b (or a alone, for a question about one algorithm)."""
    from .stats import Interval, describe_interval, welch_difference

    found = {(c["a"], c["b"], c["metric"]): c for c in agg["comparisons"]}
    out = []
    for q in spec.questions:
        what = METRICS[q.metric].label.split(" (")[0]
        if q.b is None:  # one algorithm's own mean against 0
            d = agg["algorithms"].get(q.a, {}).get(q.metric)
            if d is None or d.get("mean") is None:
                continue
            iv = Interval.from_dict(d, n=n_seeds)
            c = {"lo": d["lo"], "hi": d["hi"], "excludes_zero": iv.excludes_zero}
            out.append(f"- {q.claim}, {what}: {verdict(c, q.sign)}, {name_of(q.a)} = {describe_interval(iv)}.")
            continue
        c = found.get((q.a, q.b, q.metric))
        if c is None:  # a question about a pair the summary does not list: its own Welch interval
            da, db = (agg["algorithms"].get(x, {}).get(q.metric) for x in (q.a, q.b))
            if da is None or db is None:
                continue
            w = welch_difference(da["seeds"], db["seeds"])
            c = {"diff": w.mean, "lo": w.lo if math.isfinite(w.lo) else None,
                 "hi": w.hi if math.isfinite(w.hi) else None, "excludes_zero": w.excludes_zero}
        iv = Interval.from_dict({"mean": c["diff"], "lo": c["lo"], "hi": c["hi"]}, n=n_seeds)
        out.append(f"- {q.claim}, {what}: {verdict(c, q.sign)}, {name_of(q.a)} − {name_of(q.b)} = "
                   f"{describe_interval(iv)}.")
    return out


def _ceiling_notes(agg: dict[str, Any], pass_k: int | None) -> list[str]:
    """Sentences for pass@k metrics at their ceiling for every algorithm (they cannot show a difference there).

    >>> agg = {"algorithms": {"a": {"pass@n_start": {"mean": 1.0}}, "b": {"pass@n_start": {"mean": 0.995}}}}
    >>> _ceiling_notes(agg, 64)[1]
    '- pass@64 (step 0) is at least 0.99 for every algorithm: at its ceiling, it cannot show a difference here.'
    """
    out = []
    for key, what in (("pass@n_start", "step 0"), ("pass@n_end", "last"), ("pass@1_end", "last")):
        means = [d[key]["mean"] for d in agg["algorithms"].values() if d.get(key, {}).get("mean") is not None]
        if means and min(means) >= 0.99:
            name = _with_k(key.split("_")[0], pass_k)
            out.append(f"- {name} ({what}) is at least 0.99 for every algorithm: at its ceiling, it cannot show a "
                       "difference here.")
    # Per held-out stratum (pass@<k>_<start|end>/<stratum>): the strata where pass@k cannot move either way.
    parsed = []
    for key in {k for d in agg["algorithms"].values() for k in d}:
        m = re.fullmatch(r"pass@(\d+)_(start|end)/(.+)", key)
        if m:
            parsed.append((m.group(3), m.group(2) == "end", int(m.group(1)), key))
    ceil, floor = [], []
    for stratum, end, k, key in sorted(parsed):
        means = [d[key]["mean"] for d in agg["algorithms"].values() if d.get(key, {}).get("mean") is not None]
        label = f"pass@{k} ({'last' if end else 'step 0'}) on {stratum}"
        if means and min(means) >= 0.99:
            ceil.append(label)
        elif means and max(means) <= 0.01:
            floor.append(label)
    if ceil:
        out.append(f"- At least 0.99 for every algorithm measured, at the ceiling where no difference can show: "
                   f"{', '.join(ceil)}.")
    if floor:
        out.append(f"- At most 0.01 for every algorithm measured (almost no sample of the stratum is correct), at the "
                   f"floor where no difference can show: {', '.join(floor)}.")
    return ["", *out] if out else []


def _preamble(settings: dict[str, Any], seconds: float, algos: Sequence[str]) -> list[str]:
    if "preset" in settings:  # a run of the demo or the study: how it was run
        return [f"Preset `{settings['preset']}` (task {settings['task']}), {settings['steps']} optimizer steps per "
                f"run, seeds {', '.join(map(str, settings['seeds']))} for each of "
                f"{', '.join(name_of(a) for a in algos)}; checkpoints every {settings['save_every']} steps; wall time "
                f"{seconds / 60:.1f} min with {settings['jobs']} parallel job(s)"
                + (f" ({settings['machine']})" if settings.get("machine") else "") + ".", ""]
    return [f"{settings.get('n_runs', '?')} run directories, grouped by algorithm: "
            f"{', '.join(name_of(a) for a in algos)}; seeds {', '.join(map(str, settings['seeds']))}.", ""]


def summary_markdown(agg: dict[str, Any], *, seconds: float, settings: dict[str, Any],
                     spec: SummarySpec = DEMO_SPEC) -> str:
    """The summary as markdown: a table of means with intervals, the verdicts, one sentence per difference."""
    algos = list(agg["algorithms"])
    keys = [k for k in spec.metrics if any(k in agg["algorithms"][a] for a in algos)]
    seeds = settings["seeds"]
    pk = settings.get("pass_k")
    lines = [f"# {spec.title}", "", *_preamble(settings, seconds, algos),
             f"Each cell: mean over {len(seeds)} seed(s) [95% t interval]"
             + (" (one seed: no interval)." if len(seeds) < 2 else "."), ""]
    lines += ["| metric | " + " | ".join(name_of(a) for a in algos) + " |", "|" + "---|" * (len(algos) + 1)]
    for k in keys:
        label = _with_k(METRICS[k].label, pk)
        lines.append(f"| {label} | " + " | ".join(_cell(agg["algorithms"][a].get(k)) for a in algos) + " |")
    judged_q = verdicts(agg, spec, len(seeds))
    if judged_q:
        lines += ["", "## What the numbers show", "", *judged_q]
    lines += ["", "## Differences (Welch 95% interval)", ""]
    if not agg["comparisons"]:
        lines.append("No comparison: " + ("; ".join(f"{name_of(a)} and {name_of(b)}" for a, b in spec.pairs)
                                          or "no pair of algorithms") + " did not both run.")
    listed = agg["comparisons"] if len(seeds) > 1 else []
    if agg["comparisons"] and not listed:
        lines.append(f"No difference has an interval at {len(seeds)} seed, so none can be judged; the "
                     "differences of the means are in summary.json (`comparisons`).")
    for c in listed:  # a difference without an interval (no spread at all) says so in its sentence
        lines.append(f"- {_with_k(c['sentence'], pk)}")
    judged = [c for c in listed if c["lo"] is not None]
    if judged:
        shown = [c for c in judged if c["excludes_zero"]]
        lines += ["", f"{len(shown)} of {len(judged)} differences exclude 0 at {len(seeds)} seeds (of {len(judged)} "
                  f"independent 95% intervals about {0.05 * len(judged):.1f} would exclude 0 by chance alone)."]
    lines += _ceiling_notes(agg, pk)
    for note in spec.notes:
        lines += ["", note]
    if spec.definitions:
        lines += ["", spec.definitions.format(samples=settings.get("samples", "?"),
                                              first_seed=seeds[0] if seeds else "?")]
    lines.append("")
    return "\n".join(lines)


# =========================================================================================== the command


def compare(run_dirs: Sequence[str | Path], *, spec: SummarySpec | None = None, out: str | Path | None = None,
            settings: dict[str, Any] | None = None, seconds: float = 0.0, labels: Sequence[str | None] | None = None,
            pairs: Sequence[tuple[str, str]] | None = None) -> tuple[str, dict[str, Any]]:
    """Summarise runs: (markdown, payload); with ``out`` also ``out/summary.md`` and ``out/summary.json``.

    Runs are grouped by algorithm (a foreign run: its ``labels`` entry, else its kind) and seed. ``pairs``
    (default: ``spec``'s pairs whose algorithms both ran, else every algorithm against the first) are compared.
    The payload is ``{"settings", "seconds", "algorithms", "comparisons", "runs"}``: the markdown regenerates
    from it (:func:`summary_from_payload`).
    """
    spec = spec or replace(DEMO_SPEC, title="resrl compare", definitions="")
    labels = list(labels) if labels is not None else [None] * len(run_dirs)
    rows = [summarize_run(d, spec.metrics, label=lab) for d, lab in zip(run_dirs, labels)]
    algos = list(dict.fromkeys(r["algorithm"] for r in rows))
    if pairs is None:
        pairs = [p for p in spec.pairs if p[0] in algos and p[1] in algos]
        if not pairs and len(algos) > 1:
            pairs = [(a, algos[0]) for a in algos[1:]]
    spec = replace(spec, pairs=tuple(pairs))
    seeds = sorted({r["seed"] for r in rows}, key=lambda s: _seed_key({"seed": s}))
    per_algo = max(sum(r["algorithm"] == a for r in rows) for a in algos) if algos else 0
    settings = dict(settings or {})
    settings.setdefault("seeds", seeds if len(seeds) >= per_algo else list(range(per_algo)))
    settings.setdefault("n_runs", len(rows))
    settings.setdefault("pass_k", next((r["pass_k"] for r in rows if r.get("pass_k")), None))
    settings.setdefault("algorithms", algos)
    settings.setdefault("pairs", [list(p) for p in pairs])
    agg = aggregate(rows, algos, spec)
    md = summary_markdown(agg, seconds=seconds, settings=settings, spec=spec)
    payload = {"settings": settings, "seconds": seconds, **agg, "runs": rows}
    if out is not None:
        o = Path(out)
        o.mkdir(parents=True, exist_ok=True)
        (o / "summary.md").write_text(md, encoding="utf-8")
        (o / "summary.json").write_text(json.dumps(payload, indent=1, allow_nan=False), encoding="utf-8")
    return md, payload


def summary_from_payload(payload: dict[str, Any], spec: SummarySpec) -> str:
    """The markdown a summary.json's numbers give (its ``runs`` re-aggregated): the check that a committed
    summary regenerates from its committed numbers."""
    settings = payload["settings"]
    pairs = settings.get("pairs")
    if pairs is not None:
        spec = replace(spec, pairs=tuple(tuple(p) for p in pairs))
    agg = aggregate(payload["runs"], settings["algorithms"], spec)
    return summary_markdown(agg, seconds=payload["seconds"], settings=settings, spec=spec)


def _pair_list(text: str) -> list[tuple[str, str]]:
    out = []
    for part in (p for p in text.split(",") if p.strip()):
        a, sep, b = part.partition(":")
        if not sep or not a.strip() or not b.strip():
            raise argparse.ArgumentTypeError(f"expected A:B pairs separated by commas, got {part!r}")
        out.append((a.strip(), b.strip()))
    return out


def add_compare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `resrl compare`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("run_dirs", nargs="+", help="run directories (ours, or TRL/verl runs with probe results)")
    parser.add_argument("--out", default=None, help="also write OUT/summary.md and OUT/summary.json")
    parser.add_argument("--pairs", type=_pair_list, default=None,
                        help="comma-separated A:B algorithm pairs to compare as A − B (default: ResRL:NSR, "
                             "ResRL:GRPO, NSR:PSR where both ran, else every algorithm against the first)")
    parser.add_argument("--labels", default=None,
                        help="comma-separated algorithm names for the runs, in order (foreign runs have none; "
                             "empty entries keep the run's own)")
    return parser


def run_compare(args: argparse.Namespace) -> int:
    """Run `resrl compare`; prints the summary; a one-line error and exit status 2 on bad input (as every command),
    1 when the output cannot be written."""
    labels = None
    if args.labels is not None:
        labels = [x.strip() or None for x in args.labels.split(",")]
        if len(labels) != len(args.run_dirs):
            print(f"resrl compare: error: --labels has {len(labels)} entries for {len(args.run_dirs)} run directories",
                  file=sys.stderr)
            return 2
    try:
        md, _ = compare(args.run_dirs, out=args.out, labels=labels, pairs=args.pairs)
    except (FileNotFoundError, ValueError) as e:
        print(f"resrl compare: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"resrl compare: error: {e}", file=sys.stderr)
        return 1
    print(md)
    return 0

