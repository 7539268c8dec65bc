"""One self-contained HTML page from :class:`~resrl_analysis.view.data.RunView` objects.

The page is ``page.html`` with ``view.css`` and ``view.js`` inlined and the data as one JSON blob
(``<script type="application/json">``); a Content-Security-Policy forbids every network request, so
it works from disk, in a notebook (``srcdoc`` iframe) and as ``wandb.Html`` alike. The browser only
colours and filters: every number is computed here.

What it embeds is capped (:func:`choose`): ``max_groups`` groups per step at most, then a size budget
for the data (default :data:`DEFAULT_BUDGET_MB`): first fewer groups per step (down to 4), then fewer
steps (evenly spaced, the first and the last kept), and the page lists what it left out. Groups are
taken in this order: those in the probe set (they have Δ log-prob), then mixed ones, then the rest,
each in the run's order; with several runs a prompt is kept or left out in all of them together.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import resources
from typing import Any

import numpy as np

from .data import GroupView, RunView
from .quantities import QUANTITIES, Quantity

__all__ = ["DEFAULT_BUDGET_MB", "MIN_GROUPS", "choose", "evenly", "page_data", "render_html", "describe_values"]

#: Default size budget of the embedded data, in MB (10⁶ bytes).
DEFAULT_BUDGET_MB = 4.0
#: The budget takes groups away down to this many per step before it takes steps away.
MIN_GROUPS = 4


def evenly(items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items spread evenly over ``items``, the first and (for n ≥ 2) the last included.

    >>> evenly(list(range(10)), 4), evenly("abc", 1), evenly("ab", 5)
    ([0, 3, 6, 9], ['a'], ['a', 'b'])
    """
    items = list(items)
    if n >= len(items):
        return items
    if n <= 1:
        return items[:1]
    idx = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in idx]


def choose(sizes: dict[str, list[int]], budget: int | None, max_groups: int | None = None,
           min_groups: int = MIN_GROUPS) -> tuple[list[str], int, bool]:
    """Which steps and how many groups per step fit ``budget`` bytes.

    ``sizes``: step key → the size of each group of that step, in the order groups are kept.
    Returns (kept step keys, groups per step, over_budget). Groups per step go down first (to
    ``min_groups``), then steps (:func:`evenly`), then groups again down to 1; ``over_budget`` when
    even one group of one step does not fit (it is kept all the same).

    >>> s = {"a": [10, 10, 10], "b": [10, 10, 10], "c": [10, 10, 10]}
    >>> choose(s, None), choose(s, 60, min_groups=2), choose(s, 60), choose(s, 5)
    ((['a', 'b', 'c'], 3, False), (['a', 'b', 'c'], 2, False), (['a', 'c'], 3, False), (['a'], 1, True))
    """
    keys = list(sizes)
    most = max((len(v) for v in sizes.values()), default=0)
    cap = most if max_groups is None or max_groups <= 0 else min(max_groups, most)
    cums = {k: np.concatenate([[0], np.cumsum(v)]) for k, v in sizes.items()}

    def total(ks: Sequence[str], g: int) -> int:
        return int(sum(cums[k][min(g, len(cums[k]) - 1)] for k in ks))

    if budget is None or total(keys, cap) <= budget:
        return keys, cap, False
    floor = min(min_groups, cap)
    fits = [g for g in range(floor, cap + 1) if total(keys, g) <= budget]
    if fits:
        return keys, max(fits), False
    for n in range(len(keys) - 1, 0, -1):
        ks = evenly(keys, n)
        if total(ks, floor) <= budget:
            return ks, floor, False
    ks = evenly(keys, 1)
    for g in range(floor - 1, 0, -1):
        if total(ks, g) <= budget:
            return ks, g, False
    return ks, 1, True


def _keyed(groups: Sequence[GroupView]) -> dict[str, GroupView]:
    """Groups by the prompt they show (their match key; a prompt met again in the same step gets ``#n``)."""
    out: dict[str, GroupView] = {}
    seen: dict[str, int] = {}
    for g in groups:
        k = g.match_key
        n = seen.get(k, 0)
        seen[k] = n + 1
        out[k if n == 0 else f"{k}#{n}"] = g
    return out


def _rank(by_match: Sequence[dict[str, dict[str, GroupView]]], key: str) -> list[str]:
    """The prompts (match keys) of a step across runs, in the order they are kept."""
    seen: dict[str, tuple[int, int, int]] = {}
    order = 0
    for m in by_match:
        for k, g in m.get(key, {}).items():
            r = (0 if g.probed else 1, 0 if g.status == "mixed" else 1, order)
            order += 1
            seen[k] = min(seen[k], r) if k in seen else r
    return sorted(seen, key=lambda k: seen[k])


def _domain(q: Quantity, values: list[float]) -> list[float] | None:
    if q.domain is not None:
        return [float(q.domain[0]), float(q.domain[1])]
    if not values:
        return None
    v = np.asarray(values, dtype=float)
    if q.scale == "diverging":
        m = float(np.quantile(np.abs(v), 0.98)) or float(np.abs(v).max())
        return [-m, m] if m > 0 else [-1.0, 1.0]
    lo, hi = (float(x) for x in np.quantile(v, [0.02, 0.98]))
    if hi <= lo:
        lo, hi = float(v.min()), float(v.max())
    return [lo, hi] if hi > lo else [lo - 0.5, lo + 0.5]


def page_data(runs: Sequence[RunView], *, max_groups: int | None = None, budget_mb: float | None = DEFAULT_BUDGET_MB,
              title: str | None = None) -> dict:
    """The page's JSON blob: quantities with colour domains, steps, per run its entries, pairs, token texts,
    and what was left out (``meta.omitted``).

    ``max_groups``: groups per step at most (None or 0: no cap); ``budget_mb``: size budget of the data
    (None or 0: no budget).
    """
    if not runs:
        raise ValueError("no run to show")
    keys = sorted({e.key for r in runs for e in r.entries},
                  key=lambda k: (int(k.split(":")[1]), k.split(":")[0] != "rollouts"))
    by_match = [{e.key: _keyed(e.groups) for e in r.entries} for r in runs]
    ranked = {k: _rank(by_match, k) for k in keys}
    cache: dict[int, dict] = {}

    def js(g: GroupView, key: str) -> dict:
        if id(g) not in cache:
            cache[id(g)] = {**g.to_json(), "k": key}
        return cache[id(g)]

    def size(m: dict[str, dict[str, GroupView]], k: str, p: str) -> int:
        g = m.get(k, {}).get(p)
        return len(json.dumps(js(g, p), separators=(",", ":"), ensure_ascii=False)) if g is not None else 0

    sizes = {k: [sum(size(m, k, p) for m in by_match) for p in ranked[k]] for k in keys}
    budget = int(budget_mb * 1e6) if budget_mb else None
    kept, per_step, over = choose(sizes, budget, max_groups)
    omitted: list[str] = []
    most = max(len(v) for v in ranked.values())
    if len(kept) < len(keys):
        gone = [k for k in keys if k not in kept]
        omitted.append(f"{len(gone)} of {len(keys)} steps left out (steps kept evenly spaced, the first and the last "
                       f"among them): {', '.join(k.replace(':', ' ') for k in gone[:40])}"
                       + (" …" if len(gone) > 40 else ""))
    if per_step < most:
        cut = sum(max(0, len(ranked[k]) - per_step) for k in kept)
        why = f"--max-groups {max_groups}" if max_groups and per_step == max_groups else "the size budget"
        omitted.append(f"at most {per_step} prompt groups per step ({why}): {cut} group(s) left out of the steps "
                       "shown; kept first: groups in the probe set, then mixed groups, then the rest in run order")
    if over:
        omitted.append(f"even one group of one step exceeds the budget of {budget_mb} MB; it is shown all the same")
    steps_json, runs_json = [], []
    for k in kept:
        kind, step = k.split(":")
        label = f"step {step} · rollout batch" if kind == "rollouts" else f"checkpoint {step} · probe set"
        steps_json.append({"key": k, "kind": kind, "step": int(step), "label": label})
    values: dict[str, list[float]] = {q.key: [] for q in QUANTITIES}
    for run, m in zip(runs, by_match):
        entries: dict[str, dict] = {}
        ids: set[int] = set()
        shown = total = 0
        for e in run.entries:
            total += len(e.groups)
            if e.key not in kept:
                continue
            chosen = [(p, m[e.key][p]) for p in ranked[e.key][:per_step] if p in m[e.key]]
            shown += len(chosen)
            entries[e.key] = {"source": e.source, "total": len(e.groups), "groups": [js(g, p) for p, g in chosen]}
            for _, g in chosen:
                for r in g.responses:
                    ids.update(r.ids)
                    for qk, vals in r.values.items():
                        if qk in values:
                            values[qk] += [v for v in vals if v is not None]
                    for qk, by_pair in r.deltas.items():
                        if qk in values:
                            values[qk] += [v for vals in by_pair.values() for v in vals if v is not None]
        texts = run.token_texts(ids)
        runs_json.append({
            "name": run.name, "path": str(run.path), "kind": run.kind, "notes": run.notes, "eps": run.eps,
            "pairs": [{"key": f"{a}-{b}", "from": a, "to": b} for a, b in run.pairs],
            "vocab": {str(i): t for i, t in texts.items()}, "groups_shown": shown, "groups_total": total,
            "entries": entries})
        if shown < total:
            omitted.append(f"{run.name}: {shown} of {total} groups embedded")
    quantities = []
    for q in QUANTITIES:
        d = q.to_json()
        d["domain"] = _domain(q, values.get(q.key, [])) if q.scale != "categorical" else None
        quantities.append(d)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {"meta": {"title": title or "resrl view: " + " | ".join(r.name for r in runs), "created": created,
                     "budget_mb": budget_mb, "max_groups": max_groups, "omitted": omitted,
                     "digits": 4},
            "quantities": quantities, "steps": steps_json, "runs": runs_json}


def _asset(name: str) -> str:
    return resources.files("resrl_analysis.view").joinpath(name).read_text(encoding="utf-8")


def render_html(data: dict) -> str:
    """The page: template + CSS + JS + data, in one string (no external reference at all).

    >>> page = render_html({"meta": {"title": "t </script>"}, "quantities": [], "steps": [], "runs": []})
    >>> page.startswith("<!doctype html>") and page.count("</script>") == 2 and "://" not in page
    True
    """
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    blob = blob.replace("<", "\\u003c")  # no "</script>" (nor "<!--") can end the data block early
    js, css = _asset("view.js"), _asset("view.css")
    if "</script" in js.lower() or "</style" in css.lower():
        raise ValueError("view.js / view.css must not contain a closing </script> / </style> tag")
    parts = {"TITLE": html.escape(str(data.get("meta", {}).get("title", "resrl view"))), "CSS": css, "JS": js,
             "DATA": blob}
    return re.sub(r"\{\{(TITLE|CSS|JS|DATA)\}\}", lambda m: parts[m.group(1)], _asset("page.html"))


def describe_values(data: dict) -> str:
    """A one-line summary of a page's content (for the command's closing line)."""
    n_groups = sum(len(e["groups"]) for r in data["runs"] for e in r["entries"].values())
    n_tokens = sum(len(resp["ids"]) for r in data["runs"] for e in r["entries"].values() for g in e["groups"]
                   for resp in g["r"])
    return f"{len(data['runs'])} run(s), {len(data['steps'])} step(s), {n_groups} groups, {n_tokens} tokens"

