"""Token flips between checkpoints: which response tokens' log-probs rose or fell, by polarity, by confidence before,
by shared/unique, and the coupling of identical low-confidence tokens (docs/MATH.md § Token flips).

Every checkpoint scores the probe set's response tokens teacher-forced (the shared forward's log-probs); the pass's
finish compares each pair of steps (consecutive ones, ``step_to_step``, and each against the first,
``vs_initial``) with the core's counts (:func:`resrl_analysis.flips.flip_counts`,
:func:`resrl_analysis.flips.coupling_counts`), the same functions the trainer's live ``flips/*`` metrics use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from ..displacement import token_classes
from ..flips import coupling_counts, coupling_frame, flip_counts, flip_frame
from ..results import FlipsResult, ProbeResult
from .capture import GroupForward
from .registry import CheckpointContext, FinishContext, GroupsContext, Probe, option, register_probe

if TYPE_CHECKING:
    from ..plan import PlanInputs

__all__ = ["FlipsOptions", "FlipsProbe", "flips_along_run", "token_table"]

#: The columns of a per-token table of one checkpoint (those of the scores probe's token table, and the polarity).
TOKEN_COLUMNS = ("step", "group_id", "response_index", "position", "token_id", "logp", "is_positive")


def token_table(forwards: Sequence[GroupForward], step: int) -> pd.DataFrame:
    """Every response token of the forwards: (step, group_id, response_index, position, token_id, logp,
    is_positive), row-major within a group.

    >>> from resrl_analysis.probes.capture import forward_probe_set
    >>> from resrl_analysis.probes.synthetic import random_probe_set, tiny_model
    >>> ps = random_probe_set([[1, 0]], max_len=3, seed=1)
    >>> t = token_table(forward_probe_set(tiny_model(), ps, keep_hidden=False, keep_logits=False), step=2)
    >>> list(t.columns) == list(TOKEN_COLUMNS), bool((t.logp < 0).all())
    (True, True)
    """
    parts = []
    for f in forwards:
        mask = f.mask.cpu().numpy()
        resp, pos = np.nonzero(mask)
        parts.append(pd.DataFrame({"step": step, "group_id": f.group.group_id, "response_index": resp,
                                   "position": pos, "token_id": f.labels.cpu().numpy()[resp, pos],
                                   "logp": f.logp.double().cpu().numpy()[resp, pos],
                                   "is_positive": f.is_positive.cpu().numpy()[resp]}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(TOKEN_COLUMNS))


def _batch(tokens: pd.DataFrame) -> dict[str, torch.Tensor]:
    """One checkpoint's token table as a right-padded batch: one row per (group, response), (B, T) tensors."""
    keys = tokens[["group_id", "response_index"]].drop_duplicates().sort_values(["group_id", "response_index"])
    row_of = {k: i for i, k in enumerate(zip(keys.group_id, keys.response_index))}
    B, T = len(row_of), int(tokens.position.max()) + 1 if len(tokens) else 0
    r = np.array([row_of[k] for k in zip(tokens.group_id, tokens.response_index)], dtype=np.int64)
    p = tokens.position.to_numpy(np.int64)
    ids, logp, mask = np.zeros((B, T), np.int64), np.zeros((B, T)), np.zeros((B, T), bool)
    ids[r, p], logp[r, p], mask[r, p] = tokens.token_id.to_numpy(), tokens.logp.to_numpy(), True
    pos = np.zeros(B, bool)
    pos[r] = tokens.is_positive.to_numpy(bool)
    return {"ids": torch.from_numpy(ids), "logp": torch.from_numpy(logp), "mask": torch.from_numpy(mask),
            "is_positive": torch.from_numpy(pos), "group_ids": torch.tensor(keys.group_id.to_numpy(np.int64))}


def flips_between(before: pd.DataFrame, after: pd.DataFrame, *, low_confidence: float = 0.5
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(counts, coupling) frames of the token flips from one checkpoint's token table to another's (the same probe
    set: the same tokens at the same places, else ValueError)."""
    key = ["group_id", "response_index", "position"]
    a, b = before.sort_values(key).reset_index(drop=True), after.sort_values(key).reset_index(drop=True)
    if len(a) != len(b) or not (a[key].equals(b[key]) and (a.token_id.to_numpy() == b.token_id.to_numpy()).all()):
        raise ValueError("the two checkpoints were not scored on the same probe set (other tokens)")
    x, y = _batch(a), _batch(b)
    rewards = x["is_positive"].double()
    classes = token_classes(x["ids"], x["mask"], rewards, x["group_ids"])
    counts = flip_counts(x["logp"], y["logp"], x["mask"], x["is_positive"], classes)
    coupling = coupling_counts(x["logp"], y["logp"], x["ids"], x["mask"], rewards, x["group_ids"],
                               low_confidence=low_confidence)
    return flip_frame(counts), coupling_frame(coupling)


def flips_along_run(tokens: pd.DataFrame, *, low_confidence: float = 0.5) -> FlipsResult:
    """:func:`flips_between` for consecutive steps (``step_to_step``) and every step against the first
    (``vs_initial``) of a per-token table of several checkpoints (:func:`token_table`)."""
    steps = sorted(int(s) for s in tokens.step.unique()) if len(tokens) else []
    meta = {"low_confidence": low_confidence, "confidence_bins": 10, "skipped": []}
    if len(steps) < 2:
        meta["skipped"] = [{"reason": f"flips need at least two checkpoints, got steps {steps}"}]
        return FlipsResult.empty(meta)
    by = {s: tokens[tokens.step == s] for s in steps}
    pairs = [("step_to_step", a, b) for a, b in zip(steps[:-1], steps[1:])]
    pairs += [("vs_initial", steps[0], s) for s in steps[2:]]  # (the first pair is already step to step)
    cparts, kparts = [], []
    for cmp, a, b in pairs:
        c, k = flips_between(by[a], by[b], low_confidence=low_confidence)
        lab = {"comparison": cmp, "step_from": a, "step_to": b}
        cparts.append(c.assign(**lab))
        kparts.append(k.assign(**lab))
    return FlipsResult(counts=pd.concat(cparts, ignore_index=True), coupling=pd.concat(kparts, ignore_index=True),
                       meta=meta)


# ----------------------------------------------------------------------------- registration


@dataclass(frozen=True)
class FlipsOptions:
    """Options of the ``flips`` probe."""

    low_confidence: float = option(0.5, "flips: p(y) below this is 'low confidence' for the coupling of identical "
                                   "tokens (default 0.5)")

    def __post_init__(self) -> None:
        if not 0.0 < self.low_confidence <= 1.0:
            raise ValueError(f"--low-confidence must lie in (0, 1], got {self.low_confidence}")


@dataclass(frozen=True, eq=False)
class _Tokens(ProbeResult):
    """One checkpoint's token table (the probe's per-checkpoint part; not saved)."""

    KIND = "flips_tokens"
    TABLES = {"tokens": {c: "float" if c == "logp" else "bool" if c == "is_positive" else "int"
                         for c in TOKEN_COLUMNS}}
    tokens: pd.DataFrame = None  # type: ignore[assignment]
    meta: dict = None  # type: ignore[assignment]


@register_probe
class FlipsProbe(Probe):
    """Per-token log-probs at each checkpoint (from the shared forward); the flips of every pair of steps at the
    end of the pass."""

    name = "flips"
    summary = ("token flips between checkpoints: fraction of response tokens whose log-prob rose or fell, by "
               "polarity, confidence before and shared/unique, and the coupling of identical low-confidence tokens")
    result = FlipsResult
    scope = "groups"
    needs = frozenset({"logp"})
    Options = FlipsOptions

    def plan(self, p: PlanInputs) -> dict[str, int]:
        return {"token table": 8 * p.N * 8}  # one checkpoint's tokens, kept until the pass ends

    def on_groups(self, ctx: GroupsContext) -> ProbeResult:
        return _Tokens(tokens=token_table(ctx.forwards, ctx.step), meta={})

    def on_checkpoint(self, ctx: CheckpointContext, parts: Sequence[ProbeResult]) -> ProbeResult | None:
        return _Tokens.concat(parts) if parts else None

    def merge_ranks(self, parts: Sequence[ProbeResult], order: Mapping[int, int]) -> ProbeResult:
        from .parallel import in_group_order

        return in_group_order(_Tokens.concat(parts), order)  # token tables, not yet the flips

    def finish(self, ctx: FinishContext, parts: Sequence[ProbeResult]) -> FlipsResult:
        tables = [p.tokens for p in parts if isinstance(p, _Tokens) and len(p.tokens)]
        tokens = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=list(TOKEN_COLUMNS))
        return flips_along_run(tokens, low_confidence=self.options.low_confidence)
