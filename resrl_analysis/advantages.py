"""The one registry of advantage estimators (GRPO, PSR, NSR, W-REINFORCE, NTHR, ResRL).

Each algorithm is a short registered function from :class:`AlgoInputs` (rewards, prompt-group ids, response
tokens and mask, and, for the algorithms that need them, the no-grad forward's hidden states / head inputs /
logits) to an :class:`AlgoOutput`: sequence advantages (B,), per-token advantages (B, T) and a dictionary of
per-token *extras* (ResRL's weights and residuals, NTHR's weights and scores). The docstring of each says how
it differs from GRPO. The trainer (after its no-grad forward) and the first-order probe (after a probe
forward) call the same functions with the same typed :class:`AdvantageParams`; the arithmetic lives in
:func:`~resrl_analysis.ops.group_advantages`, :func:`~resrl_analysis.weighting.resrl_weight_details` and
:func:`~resrl_analysis.interference.nthr_token_weights`.

Every hyper-parameter default is declared once, in :class:`AdvantageParams` (and the nested
:class:`~resrl_analysis.weighting.ResRLWeightConfig`); the trainer's flat config fields (``resrl_rank``,
``resrl_q_low``, ...) take their defaults from :func:`config_defaults` and are read back by
:func:`params_from_config`.

Callers pass **whole prompt groups** (the trainer: chunks of the rollout batch cut at group boundaries,
before any micro-batching), so ResRL's subspace and NTHR's threshold always see all G responses of a prompt.

>>> inp = AlgoInputs(rewards=torch.tensor([1.0, 0.0]), group_ids=torch.tensor([0, 0]),
...                  response_ids=torch.zeros(2, 3, dtype=torch.long),
...                  response_mask=torch.tensor([[1, 1, 0], [1, 0, 0]]).bool())
>>> out = ALGORITHMS["w-reinforce"].fn(inp)
>>> out.token_advantages.tolist(), out.extras
([[0.10000000149011612, 0.10000000149011612, 0.0], [-1.0, 0.0, 0.0]], {})
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .displacement import shared_prefix_mask
from .interference import GroupGrams, nthr_token_weights
from .ops import group_advantages
from .settings import SettingError
from .weighting import ResRLWeightConfig, resrl_weight_details

__all__ = [
    "ALGORITHMS",
    "ALGORITHM_NAMES",
    "CONFIG_FIELDS",
    "MAIN_ALGORITHMS",
    "EXTRAS",
    "AdvantageParams",
    "AlgoInputs",
    "AlgoOutput",
    "Algorithm",
    "Extra",
    "MetricsHook",
    "config_defaults",
    "get_algorithm",
    "params_from_config",
    "register",
]


# =========================================================================================== parameters


@dataclass(frozen=True)
class AdvantageParams:
    """The hyper-parameters of every algorithm; each default is declared here and nowhere else.

    >>> AdvantageParams().resrl.rank, AdvantageParams(pos_weight=0.25).pos_weight
    (64, 0.25)
    """

    adv_eps: float = 1e-6
    """GRPO: epsilon added to the group's reward std."""
    w_reinforce_lambda: float = 0.1
    """W-REINFORCE: weight λ of correct responses."""
    nthr_beta: float = 1.0
    """NTHR: threshold factor β."""
    temperature: float = 1.0
    """Sampling temperature the logits are divided by (NTHR's probabilities use it)."""
    pos_weight: float = 0.1
    """ResRL: multiplier of positive responses' advantages."""
    resrl_layer: str = "penultimate"
    """ResRL representation: ``penultimate`` (``hidden_states[-2]``, the paper's), ``head_input`` or an index."""
    resrl: ResRLWeightConfig = field(default_factory=ResRLWeightConfig)
    """ResRL token-weight hyper-parameters (rank, quantiles, min weight, SVD)."""

    def __post_init__(self) -> None:
        """Every check of these fields (the trainer's settings reuse it): :class:`SettingError`."""
        if not self.adv_eps > 0:
            raise SettingError(["adv_eps"], [self.adv_eps], "must be > 0")
        for name in ("w_reinforce_lambda", "nthr_beta"):
            if not getattr(self, name) >= 0:
                raise SettingError([name], [getattr(self, name)], "must be >= 0")
        if not self.temperature > 0:
            raise SettingError(["temperature"], [self.temperature], "must be > 0")
        if not 0.0 <= self.pos_weight <= 1.0:
            raise SettingError(["pos_weight"], [self.pos_weight], "must lie in [0, 1]", what="a weight")
        if self.resrl_layer not in ("penultimate", "head_input"):
            try:
                int(self.resrl_layer)
            except ValueError:
                raise SettingError(["resrl_layer"], [self.resrl_layer],
                                   choices="'penultimate', 'head_input' or an integer index into hidden_states"
                                   ) from None


#: Flat config field name (``TrainConfig``, ``config.yaml``, ``--set``) -> its place in :class:`AdvantageParams`
#: (``resrl.x`` = the nested :class:`ResRLWeightConfig` field ``x``).
CONFIG_FIELDS: dict[str, str] = {
    "adv_eps": "adv_eps",
    "w_reinforce_lambda": "w_reinforce_lambda",
    "nthr_beta": "nthr_beta",
    "temperature": "temperature",
    "resrl_rank": "resrl.rank",
    "resrl_max_pos_tokens": "resrl.max_pos_tokens",
    "resrl_q_low": "resrl.q_low",
    "resrl_q_high": "resrl.q_high",
    "resrl_min_weight": "resrl.min_weight",
    "resrl_pos_weight": "pos_weight",
    "resrl_niter": "resrl.niter",
    "resrl_svd": "resrl.svd",
    "resrl_layer": "resrl_layer",
}
#: Place in :class:`AdvantageParams` -> flat config field name (the inverse of :data:`CONFIG_FIELDS`).
_FLAT_NAME = {path: flat for flat, path in CONFIG_FIELDS.items()}


def config_defaults() -> dict[str, Any]:
    """The default of every flat config field of :data:`CONFIG_FIELDS`, read off :class:`AdvantageParams`.

    >>> d = config_defaults()
    >>> d["resrl_rank"], d["resrl_pos_weight"], d["resrl_svd"]
    (64, 0.1, 'lowrank')
    """
    p = AdvantageParams()
    out = {}
    for flat, path in CONFIG_FIELDS.items():
        obj: Any = p
        for part in path.split("."):
            obj = getattr(obj, part)
        out[flat] = obj
    return out


def params_from_config(cfg: Mapping[str, Any] | Any) -> AdvantageParams:
    """:class:`AdvantageParams` from a TrainConfig-like object or mapping of flat field names.

    Fields it does not hold keep their defaults; other keys are ignored. An impossible value raises the
    :class:`~resrl_analysis.settings.SettingError` of the dataclass that checks it, naming the flat field
    (this is the only check of these settings; ``TrainConfig`` relies on it).

    >>> params_from_config({"resrl_rank": 8, "nthr_beta": 2.0, "lr": 1.0}).resrl.rank
    8
    >>> try:
    ...     params_from_config({"resrl_q_low": 0.9, "resrl_q_high": 0.5})
    ... except SettingError as exc:
    ...     print(exc.as_setting())
    resrl_q_low=0.9 must be below resrl_q_high=0.5, both in [0, 1]
    """
    get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d: getattr(cfg, k, d))
    top: dict[str, Any] = {}
    nested: dict[str, Any] = {}
    missing = object()
    for flat, path in CONFIG_FIELDS.items():
        v = get(flat, missing)
        if v is missing:
            continue
        if path.startswith("resrl."):
            nested[path.split(".", 1)[1]] = v
        else:
            top[path] = v
    try:
        resrl = ResRLWeightConfig(**nested)
    except SettingError as exc:  # its fields are AdvantageParams' resrl.<name>
        raise exc.renamed({n: _FLAT_NAME.get(f"resrl.{n}", n) for n in exc.names}) from None
    try:
        return AdvantageParams(**top, resrl=resrl)
    except SettingError as exc:
        raise exc.renamed({n: _FLAT_NAME.get(n, n) for n in exc.names}) from None



# =========================================================================================== registry types


@dataclass
class AlgoInputs:
    """What an advantage estimator may read, for a set of whole prompt groups.

    ``hidden`` is the ResRL representation (the configured layer, raw, (B, T, d)); ``head_input`` the vector
    entering the LM head and ``logits`` the head's raw output (before the temperature), both at the positions
    that predict each response token. ``generator`` seeds ResRL's sub-sampling and randomized SVD. ``grams``: the
    head-gradient Gram of a one-group batch at temperature 1 when the caller has it already (the probes): NTHR
    reads it instead of computing it again. ``hidden_own`` is the same layer at each response token's *own*
    position (the state after the token is read; ``resrl-own-state`` reads it).
    ``weight_group_ids``, if given, are the row sets ResRL computes its subspaces and residual quantiles in
    instead of the prompt groups (the advantages stay per prompt group): the trainer's
    ``resrl_grouping: micro_batch`` passes (prompt group, reference micro-batch) pairs
    (:func:`resrl_analysis.balancing.micro_batch_groups`).
    """

    rewards: Tensor  # (B,)
    group_ids: Tensor  # (B,)
    response_ids: Tensor  # (B, T)
    response_mask: Tensor  # (B, T) bool
    params: AdvantageParams = field(default_factory=AdvantageParams)
    hidden: Tensor | None = None  # (B, T, d)
    head_input: Tensor | None = None  # (B, T, d)
    logits: Tensor | None = None  # (B, T, V)
    generator: torch.Generator | None = None
    weight_group_ids: Tensor | None = None  # (B,) ResRL's weight sets; None = group_ids
    grams: GroupGrams | None = None  # (N, N) Gram of a one-group batch's tokens (interference.group_grams)
    hidden_own: Tensor | None = None  # (B, T, d) the layer at each response token's own position


@dataclass
class AlgoOutput:
    """``advantages`` (B,): the sequence-level advantage before token weights; ``token_advantages`` (B, T):
    what the loss uses (0 on padding); ``extras``: the algorithm's registered per-token outputs (B, T)
    (see :data:`EXTRAS`)."""

    advantages: Tensor  # (B,)
    token_advantages: Tensor  # (B, T)
    extras: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Extra:
    """A per-token output (B, T) of some algorithm: ``fill`` is its value on padding columns when chunks of
    different widths are stitched (1 for weights, NaN where a value is undefined)."""

    name: str
    fill: float
    help: str


#: Every registered extra, in the order the rollout dumps list them; an algorithm without it dumps None.
EXTRAS: dict[str, Extra] = {}


def _extra(name: str, fill: float, help: str) -> str:
    EXTRAS[name] = Extra(name, fill, help)
    return name


RESRL_WEIGHTS = _extra("resrl_weights", 1.0, "ResRL ω of each token (1 on positives and unweighted groups)")
RESRL_RESIDUALS = _extra("resrl_residuals", math.nan, "residual energy of each weighted negative token")
NTHR_WEIGHTS = _extra("nthr_weights", 1.0, "NTHR multiplier of each token (η on flagged negative tokens)")
NTHR_SCORES = _extra("nthr_scores", math.nan, "NTHR score s⁻ of each valid negative token")


@dataclass(frozen=True)
class MetricsHook:
    """Per-algorithm rollout metrics in two steps, so a multi-process caller can gather in between:
    ``local(extras, negative_token_mask, mixed_negative_token_mask)`` summarises one rank's rows into something
    picklable (the second mask keeps the negative tokens of mixed groups only);
    ``reduce(summaries of every rank)`` returns the metrics (``namespace/name`` -> float)."""

    local: Callable[[dict[str, Tensor], Tensor, Tensor], Any]
    reduce: Callable[[list[Any]], dict[str, float]]


@dataclass(frozen=True)
class Algorithm:
    """A registered estimator: ``fn``; what it ``needs`` from the forward (a subset of {"hidden",
    "head_input", "logits"}); the ``extras`` it returns; whether it compares responses within a group
    (``group``: needs >= 2 responses per prompt); an optional :class:`MetricsHook`; ``control_of``: the algorithm
    it is a control variant of (the first-order probe's default list leaves controls out)."""

    name: str
    fn: Callable[[AlgoInputs], AlgoOutput]
    needs: frozenset[str]
    extras: tuple[str, ...] = ()
    group: bool = False
    metrics: MetricsHook | None = None
    control_of: str | None = None

    @property
    def summary(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0]


ALGORITHMS: dict[str, Algorithm] = {}


def register(
    name: str, *, needs: tuple[str, ...] = (), extras: tuple[str, ...] = (), group: bool = False,
    metrics: MetricsHook | None = None, control_of: str | None = None,
) -> Callable[[Callable[[AlgoInputs], AlgoOutput]], Callable[[AlgoInputs], AlgoOutput]]:
    """Decorator adding an estimator to :data:`ALGORITHMS` (its extras must be declared in :data:`EXTRAS`)."""
    unknown = [e for e in extras if e not in EXTRAS]
    if unknown:
        raise ValueError(f"algorithm {name!r}: undeclared extras {unknown}; declare them in EXTRAS first")

    def deco(fn: Callable[[AlgoInputs], AlgoOutput]) -> Callable[[AlgoInputs], AlgoOutput]:
        ALGORITHMS[name] = Algorithm(name, fn, frozenset(needs), tuple(extras), group, metrics, control_of)
        return fn

    return deco


def get_algorithm(name: str) -> Algorithm:
    """The registered estimator ``name`` (ValueError listing the known ones otherwise).

    >>> get_algorithm("resrl").needs
    frozenset({'hidden'})
    """
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


# =========================================================================================== algorithms


def _per_token(adv: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
    tok = adv[:, None].float().expand(mask.shape)  # (B, T): the sequence advantage on every token
    if weights is not None:
        tok = tok * weights
    return torch.where(mask.bool(), tok, torch.zeros((), dtype=tok.dtype, device=tok.device))  # 0 on padding


def _baseline(b: AlgoInputs, estimator: str) -> AlgoOutput:
    p = b.params
    adv = group_advantages(b.rewards, b.group_ids, estimator, eps=p.adv_eps, w_lambda=p.w_reinforce_lambda)  # (B,)
    return AlgoOutput(advantages=adv, token_advantages=_per_token(adv, b.response_mask))


@register("grpo", group=True)
def grpo(b: AlgoInputs) -> AlgoOutput:
    """GRPO: A = (r − mean_group) / (std_group + ε), the same for every token of a response."""
    return _baseline(b, "grpo")


@register("psr")
def psr(b: AlgoInputs) -> AlgoOutput:
    """PSR: positive samples only, A = r on correct responses (+1 for binary rewards), 0 on wrong; no baseline."""
    return _baseline(b, "psr")


@register("nsr")
def nsr(b: AlgoInputs) -> AlgoOutput:
    """NSR: negative samples only, A = −1 on wrong responses, 0 on correct; no baseline."""
    return _baseline(b, "nsr")


@register("w-reinforce")
def w_reinforce(b: AlgoInputs) -> AlgoOutput:
    """W-REINFORCE: A = λ·r on correct (λ = 0.1), −1 on wrong; no group normalisation."""
    return _baseline(b, "w-reinforce")


def _nthr_local(extras: dict[str, Tensor], neg_tok: Tensor, mixed_neg_tok: Tensor) -> tuple[int, int]:
    return int((extras[NTHR_WEIGHTS][neg_tok] < 1).sum()), int(neg_tok.sum())


def _nthr_reduce(parts: list[tuple[int, int]]) -> dict[str, float]:
    flagged, total = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return {"nthr/downweighted_frac": flagged / total if total else 0.0}  # of negative responses' tokens


@register("nthr", needs=("head_input", "logits"), extras=(NTHR_WEIGHTS, NTHR_SCORES), group=True,
          metrics=MetricsHook(_nthr_local, _nthr_reduce))
def nthr(b: AlgoInputs) -> AlgoOutput:
    """NTHR: GRPO advantages, but negative tokens whose head-gradient interference with the group's positive
    tokens exceeds τ = β·(smallest mean positive-on-positive score) are scaled by η = 2|0.5 − p̂|."""
    base = _baseline(b, "grpo")
    if b.head_input is None or b.logits is None:
        raise ValueError("nthr needs the head inputs and logits of the forward (AlgoInputs.head_input, .logits)")
    w = nthr_token_weights(
        b.head_input, b.logits, b.response_ids, b.response_mask, b.rewards > 0, b.group_ids,
        beta=b.params.nthr_beta, temperature=b.params.temperature, grams=b.grams,
    )
    return AlgoOutput(advantages=base.advantages, token_advantages=base.token_advantages * w.weights,
                      extras={NTHR_WEIGHTS: w.weights, NTHR_SCORES: w.scores})


_QUANTILE_SAMPLE = 65536  # quantiles from an evenly spaced subsample: bounded gather size


def _resrl_local(extras: dict[str, Tensor], neg_tok: Tensor, mixed_neg_tok: Tensor) -> tuple[list[float], int, int]:
    assessed = torch.isfinite(extras[RESRL_RESIDUALS])  # (B, T) tokens a positive subspace weighed
    w = extras[RESRL_WEIGHTS][neg_tok & assessed].float().cpu()  # weighted tokens
    if w.numel() > _QUANTILE_SAMPLE:
        w = w[torch.linspace(0, w.numel() - 1, _QUANTILE_SAMPLE).long()]
    return w.tolist(), int((mixed_neg_tok & assessed).sum()), int(mixed_neg_tok.sum())


def _resrl_reduce(parts: list[tuple[list[float], int, int]]) -> dict[str, float]:
    weighted, total = sum(p[1] for p in parts), sum(p[2] for p in parts)
    # Of the negative tokens of mixed groups, the fraction a subspace weighed (ω from the residual; ω can be
    # exactly 1 above the group's q_high quantile). 1 with per-group weights by construction; the reference's
    # per-micro-batch weighting (weight_group_ids) leaves most of them unweighted
    # (docs/MATH.md § Departures from the reference implementation).
    out = {"resrl/weighted_token_frac": weighted / total} if total else {}
    w = torch.tensor([x for p in parts for x in p[0]], dtype=torch.float64)
    if not w.numel():
        return out
    q = torch.quantile(w, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {**out, "resrl/weight_mean": float(w.mean()), "resrl/weight_q10": float(q[0]),
            "resrl/weight_q50": float(q[1]), "resrl/weight_q90": float(q[2])}


@register("resrl", needs=("hidden",), extras=(RESRL_WEIGHTS, RESRL_RESIDUALS), group=True,
          metrics=MetricsHook(_resrl_local, _resrl_reduce))
def resrl(b: AlgoInputs) -> AlgoOutput:
    """ResRL: GRPO advantages; positive responses × pos_weight, and each negative token × ω ∈ [min_w, 1], its
    residual energy outside the group's positive subspace mapped between the group's residual quantiles."""
    if b.hidden is None:
        raise ValueError("resrl needs the representation of the forward (AlgoInputs.hidden)")
    p = b.params
    is_pos = b.rewards > 0
    adv = group_advantages(b.rewards, b.group_ids, "grpo", eps=p.adv_eps)
    adv = torch.where(is_pos, adv * p.pos_weight, adv)  # (B,)
    sets = b.group_ids if b.weight_group_ids is None else b.weight_group_ids  # (B,)
    det = resrl_weight_details(
        b.hidden, b.response_mask, is_pos, sets, generator=b.generator, **dataclasses.asdict(p.resrl),
    )
    w = det.weights.to(adv.device)  # (B, T)
    return AlgoOutput(advantages=adv, token_advantages=_per_token(adv, b.response_mask, w),
                      extras={RESRL_WEIGHTS: w, RESRL_RESIDUALS: det.residuals.to(adv.device)})


# ------------------------------------------------- controls of ResRL (docs/MATH.md § Controls of ResRL)


def _negative_tokens(b: AlgoInputs, out: AlgoOutput) -> Tensor:
    """(B, T) bool: the negative tokens ResRL weighed (a finite residual: groups with a positive subspace)."""
    return torch.isfinite(out.extras[RESRL_RESIDUALS]) & b.response_mask.bool()


def _reweighted(b: AlgoInputs, out: AlgoOutput, w: Tensor) -> AlgoOutput:
    return AlgoOutput(advantages=out.advantages, token_advantages=_per_token(out.advantages, b.response_mask, w),
                      extras={RESRL_WEIGHTS: w, RESRL_RESIDUALS: out.extras[RESRL_RESIDUALS]})


@register("resrl-shuffled", needs=("hidden",), extras=(RESRL_WEIGHTS, RESRL_RESIDUALS), group=True,
          metrics=MetricsHook(_resrl_local, _resrl_reduce), control_of="resrl")
def resrl_shuffled(b: AlgoInputs) -> AlgoOutput:
    """ResRL (GRPO advantages, positives × pos_weight) with its ω permuted at random among the negative tokens of
    each group: the same step size and the same weights, the selectivity destroyed (residuals stay the tokens')."""
    out = resrl(b)
    w = out.extras[RESRL_WEIGHTS].clone()  # (B, T)
    neg = _negative_tokens(b, out)
    # One draw of the step's generator after ResRL's own: seeded like every other draw (seed, step), so a resumed
    # run draws the same; then one generator per group, so a group's permutation depends on (that draw, its id).
    seed = int(torch.randint(0, 2**62, (1,), generator=b.generator).item())
    for g in torch.unique(b.group_ids).tolist():
        sel = neg & (b.group_ids == g)[:, None]  # (B, T)
        n = int(sel.sum())
        if n > 1:
            gen = torch.Generator().manual_seed((seed * 1_000_003 + int(g) * 7919 + 29) % (2**63 - 1))
            perm = torch.randperm(n, generator=gen).to(w.device)  # (n,)
            w[sel] = w[sel][perm]
    return _reweighted(b, out, w)


@register("resrl-uniform", needs=("hidden",), extras=(RESRL_WEIGHTS, RESRL_RESIDUALS), group=True,
          metrics=MetricsHook(_resrl_local, _resrl_reduce), control_of="resrl")
def resrl_uniform(b: AlgoInputs) -> AlgoOutput:
    """ResRL (GRPO advantages, positives × pos_weight) with every negative token of a group weighted by the
    group's mean ω: the same total push-down, no token chosen over another."""
    out = resrl(b)
    w = out.extras[RESRL_WEIGHTS].clone()  # (B, T)
    neg = _negative_tokens(b, out)
    for g in torch.unique(b.group_ids).tolist():
        sel = neg & (b.group_ids == g)[:, None]  # (B, T)
        if sel.any():
            w[sel] = w[sel].double().mean().to(w.dtype)
    return _reweighted(b, out, w)


@register("resrl-own-state", needs=("hidden_own",), extras=(RESRL_WEIGHTS, RESRL_RESIDUALS), group=True,
          metrics=MetricsHook(_resrl_local, _resrl_reduce), control_of="resrl")
def resrl_own_state(b: AlgoInputs) -> AlgoOutput:
    """ResRL (GRPO advantages, positives × pos_weight) with ω from the state at each token's own position (after
    the token is read) instead of the state that predicts it: a shared token still sits in the positive subspace,
    the first divergent token no longer does."""
    if b.hidden_own is None:
        raise ValueError("resrl-own-state needs the representation at the tokens' own positions "
                         "(AlgoInputs.hidden_own)")
    return resrl(dataclasses.replace(b, hidden=b.hidden_own))


def _shared_local(extras: dict[str, Tensor], neg_tok: Tensor, mixed_neg_tok: Tensor) -> tuple[list[float], int, int]:
    w = extras[RESRL_WEIGHTS][mixed_neg_tok].float().cpu()
    if w.numel() > _QUANTILE_SAMPLE:
        w = w[torch.linspace(0, w.numel() - 1, _QUANTILE_SAMPLE).long()]
    return w.tolist(), int(mixed_neg_tok.sum()), int(mixed_neg_tok.sum())


@register("shared-mask", extras=(RESRL_WEIGHTS,), group=True, metrics=MetricsHook(_shared_local, _resrl_reduce),
          control_of="resrl")
def shared_mask(b: AlgoInputs) -> AlgoOutput:
    """GRPO advantages with ResRL's positive weight, and on negatives the exact version of what the projection
    approximates: ω at the
    floor (``resrl_min_weight``) on tokens that share their prefix and token with a positive of the group, 1
    elsewhere (the prefix mask of ``lld/*``)."""
    p = b.params
    is_pos = b.rewards > 0
    adv = group_advantages(b.rewards, b.group_ids, "grpo", eps=p.adv_eps)
    adv = torch.where(is_pos, adv * p.pos_weight, adv)  # (B,)
    w = torch.ones(b.response_mask.shape, dtype=torch.float32, device=adv.device)  # (B, T)
    mask = b.response_mask.bool()
    for g in torch.unique(b.group_ids).tolist():
        rows = b.group_ids == g
        pos, neg = rows & is_pos, rows & ~is_pos
        if not pos.any() or not neg.any():
            continue
        shared = shared_prefix_mask(b.response_ids[neg], mask[neg], b.response_ids[pos], mask[pos])  # (N, T)
        w[neg] = torch.where(shared, torch.full_like(w[neg], p.resrl.min_weight), w[neg])
    return AlgoOutput(advantages=adv, token_advantages=_per_token(adv, b.response_mask, w), extras={RESRL_WEIGHTS: w})


#: The registered algorithms' names, in registration order (the config's, CLI's and probes' choices).
ALGORITHM_NAMES: tuple[str, ...] = tuple(ALGORITHMS)
#: The algorithms that are not controls of another (the first-order probe's default list).
MAIN_ALGORITHMS: tuple[str, ...] = tuple(n for n, a in ALGORITHMS.items() if a.control_of is None)
