"""Live entropy dynamics and token flips of each rollout batch's update (``entropy/*``, ``flips/*``).

Two update diagnostics (:data:`trainer.in_batch.UPDATE_DIAGNOSTICS`) on the one after-update forward, which
re-scores every row of the batch with its token entropies; the mathematics is the core's
(:mod:`resrl_analysis.entropy_dynamics`, :mod:`resrl_analysis.flips`; docs/MATH.md § Entropy dynamics,
docs/MATH.md § Token flips):

- ``entropy`` (``entropy_in_batch``): the realised change of every response token's entropy across the batch's
  update(s), on positive and on negative responses; Cui et al.'s covariance of token log-prob and advantage over
  the batch (verl's ``clip_cov``/``kl_cov`` centred products); with ``entropy_predict_in_batch`` the exact
  first-order change of a head-only SGD step from each group's own samples, split into the parts its positive and
  its negative responses cause, computed in the rollout's no-grad forward from each group's Gram (per unit step
  size: dH/dη); and the rank correlation of each predictor with the realised change, token by token.
- ``flips`` (``flips_in_batch``): the fraction of response tokens whose log-prob rose or fell, by polarity, by
  confidence bin before the update and by shared/unique, and how often identical low-confidence tokens of a
  group's positive and negative responses moved together.

>>> sorted(k for k in METRIC_KEYS_ENTROPY)[:3]
['entropy/after_mean', 'entropy/before_mean', 'entropy/cov']
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from resrl_analysis.displacement import token_classes
from resrl_analysis.distributed import DistContext, all_gather_objects
from resrl_analysis.entropy_dynamics import covariance_proxy, predict_entropy_change
from resrl_analysis.flips import coupling_counts, flip_counts
from resrl_analysis.interference import group_grams
from resrl_analysis.ops import group_index
from resrl_analysis.rundir import METRIC_KEYS
from trainer.config import TrainConfig
from trainer.in_batch import AfterUpdate, RolloutChunk, UpdateDiagnostic, register_update_diagnostic

__all__ = ["METRIC_KEYS_ENTROPY", "METRIC_KEYS_FLIPS", "entropy_prediction", "entropy_metrics", "flips_metrics"]

#: The ``entropy/*`` and ``flips/*`` keys (declared with every metric key in resrl_analysis.rundir.METRIC_KEYS).
METRIC_KEYS_ENTROPY = tuple(k for k in METRIC_KEYS if k.startswith("entropy/"))
METRIC_KEYS_FLIPS = tuple(k for k in METRIC_KEYS if k.startswith("flips/"))


@torch.no_grad()
def entropy_prediction(chunk: RolloutChunk) -> dict[str, Tensor]:
    """The first-order ΔH of a head-only SGD step per token of a chunk of whole groups, per unit step size, from each
    group's own samples split by their polarity: ``entropy_pred_pos`` and ``entropy_pred_neg`` (b, t) float32.

    Each group's loss is its token mean (as the ``entropy_dynamics`` probe's); at sampling temperature τ the head's
    gradients carry 1/τ each, hence the factor 1/τ² on the Gram of the tempered probabilities.
    """
    fo, rows = chunk.fo, chunk.rows
    h, z = fo.captured["head_input"], fo.logits  # (b, t, d), (b, t, V)
    assert z is not None
    b, t = rows.response_ids.shape
    out = {k: torch.zeros(b, t, dtype=torch.float32, device=z.device) for k in ("entropy_pred_pos", "entropy_pred_neg")}
    pos = chunk.rewards > 0
    uniq, inv = group_index(chunk.group_ids.to(z.device))
    tau = chunk.cfg.temperature
    adv = chunk.token_advantages.to(z.device)  # (b, t)
    for gi in range(len(uniq)):
        r = (inv == gi).nonzero().flatten()
        if not (adv[r] * rows.response_mask[r]).any():  # no sample moves the head: the prediction is 0
            continue
        gr = group_grams(h, z, rows.response_ids, rows.response_mask, pos, rows=r, temperature=tau, entropy=True,
                         memory_budget_mb=chunk.cfg.logprob_memory_mb)
        a = adv[gr.row, gr.pos]  # (N,)
        split = predict_entropy_change(gr, a, lr=1.0 / tau**2)
        out["entropy_pred_pos"][gr.row, gr.pos] = split.from_pos.float()
        out["entropy_pred_neg"][gr.row, gr.pos] = split.from_neg.float()
    return out


def _spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    from resrl_analysis.probes.subspace import spearman

    r = spearman(x, y)[0]
    return float(r) if np.isfinite(r) else None


def _mean(x: np.ndarray) -> float | None:
    return float(x.mean()) if x.size else None


def entropy_metrics(after: AfterUpdate, cfg: TrainConfig, ctx: DistContext) -> dict[str, Any]:
    """``entropy/*`` of a rollout batch from the after-update forward (a collective; every rank gets the same dict).

    Means are over the batch's response tokens (all ranks); the covariance is Cui et al.'s over the same tokens;
    the rank correlations are Spearman's, token by token, of a predictor with the realised ΔH: −(centred product)
    for the covariance proxy, the first-order prediction (when ``entropy_predict_in_batch``) for ``pred``.
    """
    data = after.data
    out: dict[str, Any] = dict.fromkeys(METRIC_KEYS_ENTROPY)
    if data.entropy is None or after.entropy is None:
        return out
    m = data.response_mask & after.scored[:, None]  # (B, Tr)
    local = {"h0": data.entropy[m].double().cpu().numpy(), "h1": after.entropy[m].double().cpu().numpy(),
             "pos": (data.rewards > 0)[:, None].expand_as(m)[m].cpu().numpy(),
             "logp": data.old_logp[m].double().cpu().numpy(), "adv": data.token_advantages[m].double().cpu().numpy()}
    for k in ("entropy_pred_pos", "entropy_pred_neg"):
        if k in data.live:
            local[k] = data.live[k][m].double().cpu().numpy()
    every = all_gather_objects(local, ctx)
    cat = {k: np.concatenate([e[k] for e in every]) for k in local}
    if not cat["h0"].size:
        return out
    dh, pos = cat["h1"] - cat["h0"], cat["pos"].astype(bool)
    c, cov = covariance_proxy(torch.from_numpy(cat["logp"]), torch.from_numpy(cat["adv"]),
                              torch.ones(dh.size, dtype=torch.bool))
    out.update({"entropy/before_mean": _mean(cat["h0"]), "entropy/after_mean": _mean(cat["h1"]),
                "entropy/delta_mean": _mean(dh), "entropy/delta_pos_mean": _mean(dh[pos]),
                "entropy/delta_neg_mean": _mean(dh[~pos]), "entropy/cov": cov,
                "entropy/cov_rank_corr": _spearman(-c.numpy(), dh)})
    if "entropy_pred_pos" in cat:
        pp, pn = cat["entropy_pred_pos"], cat["entropy_pred_neg"]
        out.update({"entropy/pred_from_pos": _mean(pp), "entropy/pred_from_neg": _mean(pn),
                    "entropy/pred_mean": _mean(pp + pn), "entropy/pred_rank_corr": _spearman(pp + pn, dh)})
    return out


def _frac(num: Tensor, den: Tensor) -> float | None:
    d = int(den)
    return float(num) / d if d else None


def flips_metrics(after: AfterUpdate, cfg: TrainConfig, ctx: DistContext) -> dict[str, Any]:
    """``flips/*`` of a rollout batch from the after-update forward (a collective; every rank gets the same dict)."""
    data = after.data
    m = data.response_mask & after.scored[:, None]  # (B, Tr)
    classes = token_classes(data.response_ids, data.response_mask, data.rewards, data.group_ids)
    counts = flip_counts(data.old_logp, after.logp, m, data.rewards > 0, classes)  # (2, 4, bins, 3)
    coupling = coupling_counts(data.old_logp, after.logp, data.response_ids, m, data.rewards, data.group_ids,
                               low_confidence=cfg.flips_low_confidence)  # (3, 2)
    every = all_gather_objects((counts, coupling), ctx)
    counts = sum((e[0] for e in every), torch.zeros_like(counts))
    coupling = sum((e[1] for e in every), torch.zeros_like(coupling))
    tot = counts.sum((0, 1, 2))  # (3,) rose, fell, same
    pol = counts.sum((1, 2))  # (2, 3)
    cls = counts.sum((0, 2))  # (4, 3)
    unique = cls[2] + cls[3]
    conf = counts.sum((0, 1))  # (bins, 3)
    out: dict[str, Any] = {
        "flips/rose_frac": _frac(tot[0], tot.sum()), "flips/fell_frac": _frac(tot[1], tot.sum()),
        "flips/pos_rose_frac": _frac(pol[0, 0], pol[0].sum()), "flips/pos_fell_frac": _frac(pol[0, 1], pol[0].sum()),
        "flips/neg_rose_frac": _frac(pol[1, 0], pol[1].sum()), "flips/neg_fell_frac": _frac(pol[1, 1], pol[1].sum()),
        "flips/shared_rose_frac": _frac(cls[1, 0], cls[1].sum()), "flips/unique_rose_frac": _frac(unique[0],
                                                                                               unique.sum()),
        **{f"flips/rose_frac_conf{k}": _frac(conf[k, 0], conf[k].sum()) for k in range(conf.shape[0])},
        "flips/coupled_low_same_dir_frac": _frac(coupling[0, 1], coupling[0, 0]),
        "flips/coupled_high_same_dir_frac": _frac(coupling[1, 1], coupling[1, 0]),
        "flips/other_low_same_dir_frac": _frac(coupling[2, 1], coupling[2, 0]),
        "flips/coupled_low_pairs": int(coupling[0, 0]),
    }
    return out


register_update_diagnostic(UpdateDiagnostic(
    "entropy", lambda cfg: cfg.entropy_in_batch, "all", True, entropy_metrics, rollout=entropy_prediction,
    rollout_needs=frozenset({"head_input", "logits"}), rollout_enabled=lambda cfg: cfg.entropy_predict_in_batch))
register_update_diagnostic(UpdateDiagnostic("flips", lambda cfg: cfg.flips_in_batch, "all", False, flips_metrics))
