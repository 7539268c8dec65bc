"""Probe results: frozen dataclasses of tidy tables with ``to_frame()``, ``save()`` and ``load()``.

Every result holds one or more pandas tables (one row per item, declared columns and dtypes, the
first table is the one ``to_frame()`` returns) and a JSON-able ``meta`` dict (options, the probe
set, and ``skipped``: what was not computed and why). Probes build them; plotting reads them and
never needs a model.

On disk a result is a directory: one file per table (parquet by default, or CSV) and
``meta.json`` (kind, format, column dtypes, meta). ``save`` writes into a temporary sibling and
renames it into place, so a failure never leaves a partial result behind; ``load_result`` reads
any kind back.

    >>> import tempfile, pathlib
    >>> r = ScoresResult(responses=pd.DataFrame([dict(step=0, group_id=3, prompt_uid="p", response_index=0,
    ...     is_positive=True, reward=1.0, n_tokens=4, logp_sum=-2.0, logp_mean=-0.5, entropy_mean=1.0)]))
    >>> d = r.save(pathlib.Path(tempfile.mkdtemp()) / "scores")
    >>> load_result(d).to_frame().equals(r.to_frame())
    True
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from .errors import ProbeError
from .rundir import TMP_PREFIX, atomic_write

__all__ = [
    "ProbeResult",
    "ScoresResult",
    "LLDResult",
    "FirstOrderResult",
    "InterferenceResult",
    "SubspaceResult",
    "DiversityResult",
    "EntropyDynamicsResult",
    "FlipsResult",
    "FidelityResult",
    "RESULT_TYPES",
    "register_result",
    "load_result",
    "load_results",
    "atomic_write_text",
    "to_jsonable",
]

SCHEMA_VERSION = 1
_CAST = {"int": "int64", "float": "float64", "bool": "bool", "boolean": "boolean"}


def to_jsonable(x: Any) -> Any:
    """Plain JSON types from numpy/pandas scalars, tuples and Paths; NaN/inf become None.

    >>> to_jsonable({"a": np.float32(0.5), "b": (np.int64(2), float("nan")), "c": Path("x")})
    {'a': 0.5, 'b': [2, None], 'c': 'x'}
    """
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, Path):
        return str(x)
    if x is None or isinstance(x, str):
        return x
    if x is pd.NA:
        return None
    return str(x)


#: The run directory's one atomic writer (text or bytes; temporary sibling, fsync, ``os.replace``), under the
#: name results have always used.
atomic_write_text = atomic_write


def _replace_dir(tmp: Path, path: Path) -> None:
    # Directories cannot be swapped atomically with os.replace when the target exists, so move
    # the old result aside first and put it back if the rename fails.
    if not path.exists():
        os.rename(tmp, path)
        return
    if not path.is_dir() or not ((path / "meta.json").is_file() or not any(path.iterdir())):
        raise ProbeError(f"{path}: exists and is not a saved result; refusing to overwrite it")
    old = path.parent / f".old-{path.name}-{uuid.uuid4().hex[:8]}"
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


class ProbeResult:
    """Base of the result dataclasses: a dataclass field per table in ``TABLES`` plus ``meta``.

    ``TABLES`` maps table name → {column: dtype}, dtype one of ``int``, ``float``, ``bool``,
    ``boolean`` (nullable), ``str``. Columns are checked and cast on construction; extra columns
    are kept after the declared ones.
    """

    KIND: ClassVar[str] = ""
    TABLES: ClassVar[dict[str, dict[str, str]]] = {}
    #: Tables added after results were first saved: a saved result without one loads with it empty.
    OPTIONAL_TABLES: ClassVar[frozenset[str]] = frozenset()

    meta: dict

    def __post_init__(self) -> None:
        for name, schema in self.TABLES.items():
            df = getattr(self, name)
            if df is None:
                df = pd.DataFrame()
            if not isinstance(df, pd.DataFrame):
                df = pd.DataFrame(df)
            df = df.copy()
            # A missing column reads as "not measured" (NaN / NA / None); an int column cannot be
            # missing in a non-empty table, and the cast below says so.
            for c in schema:
                if c not in df.columns:
                    df[c] = pd.Series([None] * len(df), dtype="object", index=df.index)
            extra = [c for c in df.columns if c not in schema]
            df = df[list(schema) + extra].reset_index(drop=True)
            for c, kind in schema.items():
                if kind in _CAST and df[c].dtype != _CAST[kind]:
                    try:
                        df[c] = df[c].astype(_CAST[kind])
                    except (TypeError, ValueError) as e:
                        raise ValueError(f"{type(self).__name__}.{name}.{c}: cannot hold {kind} ({e})") from None
            object.__setattr__(self, name, df)
        object.__setattr__(self, "meta", dict(self.meta or {}))

    # -- access ------------------------------------------------------------------------------------

    def to_frame(self) -> pd.DataFrame:
        """The main table (a copy), one row per item; see ``TABLES`` for its columns."""
        return getattr(self, next(iter(self.TABLES))).copy()

    def frames(self) -> dict[str, pd.DataFrame]:
        """Every table by name (copies)."""
        return {name: getattr(self, name).copy() for name in self.TABLES}

    @property
    def skipped(self) -> list[dict]:
        """What was not computed and why: dicts with ``reason`` (and ``step``/``group_id`` when known)."""
        return list(self.meta.get("skipped", []))

    def summary(self) -> dict:
        """A small JSON-able digest for ``summary.json`` (subclasses add their headline numbers)."""
        return {"rows": {name: len(getattr(self, name)) for name in self.TABLES}, "skipped": self.skipped}

    @classmethod
    def empty(cls, meta: dict | None = None):
        """A result with every table empty (columns declared) and ``meta``."""
        return cls(**{name: None for name in cls.TABLES}, meta=meta or {})

    @classmethod
    def concat(cls, results: Sequence[ProbeResult]):
        """Stack results (e.g. one per checkpoint): tables concatenated, ``skipped`` lists joined,
        the rest of ``meta`` taken from the first."""
        results = list(results)
        if not results:
            return cls.empty()
        tables = {}
        for name in cls.TABLES:
            parts = [getattr(r, name) for r in results if len(getattr(r, name))]
            tables[name] = pd.concat(parts, ignore_index=True) if parts else None
        meta = dict(results[0].meta)
        meta["skipped"] = [s for r in results for s in r.skipped]
        return cls(**tables, meta=meta)

    def with_meta(self, **updates: Any):
        """A copy with ``meta`` updated."""
        return replace(self, meta={**self.meta, **updates})

    # -- disk --------------------------------------------------------------------------------------

    def save(self, path: str | Path, *, format: str = "parquet") -> Path:
        """Write the result as a directory ``path`` (one file per table + ``meta.json``).

        Written into a temporary sibling and renamed into place: after a failure neither a partial
        directory nor a partial file is left, and a previous result at ``path`` is kept.
        """
        if format not in ("parquet", "csv"):
            raise ValueError(f"format must be 'parquet' or 'csv', got {format!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{TMP_PREFIX}-{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            for name in self.TABLES:
                df = getattr(self, name)
                if format == "parquet":
                    df.to_parquet(tmp / f"{name}.parquet", index=False)
                else:
                    df.to_csv(tmp / f"{name}.csv", index=False)
            info = {
                "kind": self.KIND,
                "schema_version": SCHEMA_VERSION,
                "format": format,
                "tables": {name: {c: str(getattr(self, name)[c].dtype) for c in getattr(self, name).columns}
                           for name in self.TABLES},
                "meta": to_jsonable(self.meta),
            }
            (tmp / "meta.json").write_text(json.dumps(info, indent=1, allow_nan=False), encoding="utf-8")
            _replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path):
        """Read a result written by :meth:`save` (any subclass: the kind is checked)."""
        path = Path(path)
        info = _read_meta(path)
        if info.get("kind") != cls.KIND:
            raise ProbeError(f"{path}: holds a {info.get('kind')!r} result, not {cls.KIND!r}")
        fmt = info.get("format", "parquet")
        tables = {}
        for name in cls.TABLES:
            f = path / f"{name}.{fmt}"
            if not f.is_file() and name in cls.OPTIONAL_TABLES:
                tables[name] = None
                continue
            if not f.is_file():
                raise ProbeError(f"{f}: missing table")
            dtypes = info.get("tables", {}).get(name, {})
            if fmt == "parquet":
                df = pd.read_parquet(f)
            else:
                df = pd.read_csv(f, dtype={c: d for c, d in dtypes.items() if d in ("boolean", "bool", "int64")}
                                 if os.path.getsize(f) > 1 else None)
            tables[name] = df
        return cls(**tables, meta=info.get("meta") or {})


def _read_meta(path: Path) -> dict:
    f = path / "meta.json"
    if not f.is_file():
        raise ProbeError(f"{f}: missing (not a saved result?)")
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ProbeError(f"{f}: not valid JSON ({e})") from None


# ----------------------------------------------------------------------------- the results

_S, _I, _F, _B, _NB = "str", "int", "float", "bool", "boolean"


def _nanmean(x: pd.Series) -> float | None:
    x = pd.to_numeric(x, errors="coerce").dropna()
    return float(x.mean()) if len(x) else None


@dataclass(frozen=True, eq=False)
class ScoresResult(ProbeResult):
    """Teacher-forced log-likelihood and entropy of every probe response at each checkpoint.

    ``responses``: one row per (step, response): ``logp_sum`` = log π(y|x), ``logp_mean`` = its
    per-token mean, ``entropy_mean`` = mean token entropy −Σ p log p over the response.
    ``tokens`` (per-token detail, what ``resrl view`` colours): one row per (step, response, token):
    ``position`` (0-based in the response), ``token_id``, ``logp`` = log p_t[y_t], ``entropy`` =
    −Σ p_t log p_t; Δ log-prob between two checkpoints is the difference of ``logp`` at the same
    (group_id, response_index, position). ``prompts``: one row per (step, group): the prompt text and
    ground truth the token ids came from. Both are empty when the detail was not asked for
    (``scores_from_forwards(..., tokens=False)``) and in results saved before they existed.
    """

    KIND: ClassVar[str] = "scores"
    TABLES: ClassVar[dict[str, dict[str, str]]] = {
        "responses": {"step": _I, "group_id": _I, "prompt_uid": _S, "response_index": _I, "is_positive": _B,
                      "reward": _F, "n_tokens": _I, "logp_sum": _F, "logp_mean": _F, "entropy_mean": _F},
        "tokens": {"step": _I, "group_id": _I, "response_index": _I, "position": _I, "token_id": _I, "logp": _F,
                   "entropy": _F},
        "prompts": {"step": _I, "group_id": _I, "prompt_uid": _S, "data_source": _S, "prompt": _S,
                    "ground_truth": _S},
    }
    OPTIONAL_TABLES: ClassVar[frozenset[str]] = frozenset({"tokens", "prompts"})
    responses: pd.DataFrame = None  # type: ignore[assignment]
    tokens: pd.DataFrame = None  # type: ignore[assignment]
    prompts: pd.DataFrame = None  # type: ignore[assignment]
    meta: dict = field(default_factory=dict)

    def entropy_by_step(self) -> pd.DataFrame:
        """Token-weighted mean entropy per step, for all / positive / negative responses.

        Columns: step, split, n_tokens, entropy.
        """
        df = self.responses.assign(ent_tok=self.responses.entropy_mean * self.responses.n_tokens)
        rows = []
        for step, d in df.groupby("step", sort=True):
            for split, part in (("all", d), ("positive", d[d.is_positive]), ("negative", d[~d.is_positive])):
                n = int(part.n_tokens.sum())
                rows.append({"step": int(step), "split": split, "n_tokens": n,
                             "entropy": float(part.ent_tok.sum() / n) if n else float("nan")})
        return pd.DataFrame(rows, columns=["step", "split", "n_tokens", "entropy"])

    def summary(self) -> dict:
        e = self.entropy_by_step()
        return {**super().summary(), "entropy": to_jsonable(e.to_dict(orient="records"))}


@dataclass(frozen=True, eq=False)
class LLDResult(ProbeResult):
    """Lazy likelihood displacement Δ(x) per prompt between pairs of checkpoints
    (docs/MATH.md § Lazy likelihood displacement).

    ``deltas``: one row per (comparison, step_from, step_to, group). ``comparison`` is
    ``vs_initial`` (against the first step), ``step_to_step`` (consecutive steps) or ``pair``.
    ``delta_pos_sum`` = mean over positive responses of log π′(y) − log π(y); ``delta_pos_mean``
    the same with per-token-mean log-likelihoods; ``delta_neg_*`` the same over negative
    responses. ``lld_sum`` / ``lld_mean``: Δ ≤ ε (``meta["eps"]``), NA without positive responses.
    """

    KIND: ClassVar[str] = "lld"
    TABLES: ClassVar[dict[str, dict[str, str]]] = {
        "deltas": {"comparison": _S, "step_from": _I, "step_to": _I, "group_id": _I, "prompt_uid": _S,
                   "n_pos": _I, "n_neg": _I, "delta_pos_sum": _F, "delta_pos_mean": _F, "delta_neg_sum": _F,
                   "delta_neg_mean": _F, "lld_sum": _NB, "lld_mean": _NB},
    }
    deltas: pd.DataFrame = None  # type: ignore[assignment]
    meta: dict = field(default_factory=dict)

    def fraction(self) -> pd.DataFrame:
        """Fraction of prompts (with at least one positive response) in LLD, per comparison.

        Columns: comparison, step_from, step_to, variant (``sum``/``mean``), n_prompts, n_lld, frac_lld.
        """
        rows = []
        for (comp, a, b), d in self.deltas.groupby(["comparison", "step_from", "step_to"], sort=True):
            for variant in ("sum", "mean"):
                flags = d[f"lld_{variant}"].dropna()
                n = len(flags)
                rows.append({"comparison": comp, "step_from": int(a), "step_to": int(b), "variant": variant,
                             "n_prompts": n, "n_lld": int(flags.sum()),
                             "frac_lld": float(flags.mean()) if n else float("nan")})
        return pd.DataFrame(rows, columns=["comparison", "step_from", "step_to", "variant", "n_prompts", "n_lld",
                                           "frac_lld"])

    def summary(self) -> dict:
        return {**super().summary(), "eps": self.meta.get("eps"),
                "fraction": to_jsonable(self.fraction().to_dict(orient="records"))}


@dataclass(frozen=True, eq=False)
class FirstOrderResult(ProbeResult):
    """First-order (head-only) prediction of Δ log π(y) for one SGD step, per response and algorithm.

    ``predictions``: one row per (step, group, algorithm, response). ``predicted`` =
    (η/Z) Σ_t Σ_{j,s} A_{j,s} <g_{i,t}, g_{j,s}> (Z = the group's response tokens, ``lr`` = η),
    split into ``predicted_from_pos`` + ``predicted_from_neg`` (the terms with j positive / negative).
    ``actual_head``: the real change after one SGD step of the head matrix alone (NaN when not run);
    ``actual_full``: after one SGD step of the whole model (NaN when not run).
    ``groups``: one row per (step, group, algorithm) with ``status`` and the loss normaliser.
    """

    KIND: ClassVar[str] = "first_order"
    TABLES: ClassVar[dict[str, dict[str, str]]] = {
        "predictions": {"step": _I, "group_id": _I, "prompt_uid": _S, "algorithm": _S, "response_index": _I,
                        "is_positive": _B, "n_tokens": _I, "lr": _F, "predicted": _F, "predicted_from_pos": _F,
                        "predicted_from_neg": _F, "actual_head": _F, "actual_full": _F},
        "groups": {"step": _I, "group_id": _I, "prompt_uid": _S, "algorithm": _S, "status": _S, "n_pos": _I,
                   "n_neg": _I, "loss_tokens": _I},
    }
    predictions: pd.DataFrame = None  # type: ignore[assignment]
    groups: pd.DataFrame = None  # type: ignore[assignment]
    meta: dict = field(default_factory=dict)

    def summary(self) -> dict:
        rows = []
        p = self.predictions
        for (step, alg), d in p[p.is_positive].groupby(["step", "algorithm"], sort=True):
            row = {"step": int(step), "algorithm": alg, "predicted": _nanmean(d.predicted),
                   "predicted_from_pos": _nanmean(d.predicted_from_pos),
                   "predicted_from_neg": _nanmean(d.predicted_from_neg),
                   "actual_head": _nanmean(d.actual_head), "actual_full": _nanmean(d.actual_full)}
            rows.append(row)
        return {**super().summary(), "lr": self.meta.get("lr"), "positive_responses": to_jsonable(rows)}


@dataclass(frozen=True, eq=False)
class InterferenceResult(ProbeResult):
    """Head-gradient interference between positive and negative tokens, per group
    (docs/MATH.md § Factorised head gradient).

    ``groups``: one row per (step, group). ``cos_*`` summarise the exact token-level cosines
    cos(g⁺, g⁻) over all positive×negative token pairs (> 0: lowering the negative token also
    lowers the positive one). ``head_update_inner`` / ``head_update_cosine``: between the
    advantage-weighted summed head gradients of the positive and of the negative responses,
    Σ_P A g and Σ_N A g, i.e. the two parts of the update (< 0: the negative part works against
    the positive part). ``full_update_cosine``: the same between the whole model's gradients of
    the positive and the negative parts of the loss (autograd; NaN when not run);
    ``full_head_cosine``: that autograd gradient restricted to the head matrix (equals
    ``head_update_cosine`` for an untied head). ``nthr_*``: NTHR threshold τ, factor η and the
    fraction of negative tokens flagged.
    ``tokens``: one row per negative token: mean / max / fraction > 0 of its cosines with the
    positive tokens, its NTHR score s⁻ = Σ <g⁺, g⁻>, flag and multiplier.
    ``cosine_samples``: a bounded uniform sample of raw token-pair cosines per group (histograms).
    """

    KIND: ClassVar[str] = "interference"
    TABLES: ClassVar[dict[str, dict[str, str]]] = {
        "groups": {"step": _I, "group_id": _I, "prompt_uid": _S, "status": _S, "n_pos": _I, "n_neg": _I,
                   "n_pos_tokens": _I, "n_neg_tokens": _I, "cos_mean": _F, "cos_std": _F, "cos_min": _F,
                   "cos_q05": _F, "cos_q25": _F, "cos_q50": _F, "cos_q75": _F, "cos_q95": _F, "cos_max": _F,
                   "cos_frac_positive": _F, "head_update_inner": _F, "head_update_cosine": _F, "nthr_tau": _F,
                   "nthr_eta": _F, "nthr_flagged_frac": _F, "full_update_cosine": _F, "full_head_cosine": _F},
        "tokens": {"step": _I, "group_id": _I, "response_index": _I, "position": _I, "token_id": _I,
                   "cos_mean": _F, "cos_max": _F, "cos_frac_positive": _F, "nthr_score": _F, "nthr_flagged": _B,
                   "nthr_weight": _F},
        "cosine_samples": {"step": _I, "group_id": _I, "cosine": _F},
    }
    groups: pd.DataFrame = None  # type: ignore[assignment]
    tokens: pd.DataFrame = None  # type: ignore[assignment]
    cosine_samples: pd.DataFrame = None  # type: ignore[assignment]
    meta: dict = field(default_factory=dict)

    def summary(self) -> dict:
        g = self.groups[self.groups.status == "ok"]
        rows = []
        for step, d in g.groupby("step", sort=True):
            rows.append({"step": int(step), "n_groups": len(d), "cos_mean": _nanmean(d.cos_mean),
                         "cos_frac_positive": _nanmean(d.cos_frac_positive),
                         "head_update_cosine": _nanmean(d.head_update_cosine),
                         "full_update_cosine": _nanmean(d.full_update_cosine),
                         "nthr_flagged_frac": _nanmean(d.nthr_flagged_frac)})
        return {**super().summary(), "by_step": to_jsonable(rows)}


@dataclass(frozen=True, eq=False)
class SubspaceResult(ProbeResult):
    """The ResRL subspace, residual energies and the alignment bound, per representation
    (docs/MATH.md § Alignment bound).

    A representation is (``layer``: ``penultimate`` = HF ``hidden_states[-2]`` or ``head_input``;
    ``layer_norm``: LayerNorm without affine applied; ``center``: centred on the group's positive
    mean); ``representation`` names it, e.g. ``penultimate/ln/centred`` (the paper's choice).
    ``groups``: one row per (step, group, representation): subspace ``rank``; residual energy
    mean/median of the negative tokens; over all positive×negative pairs, the violation counts of
    the tight and the paper-form bound on |<x⁻, x⁺>| (``tight_violations``, ``paper_violations``:
    zero up to float tolerance) and of the same bounds read as bounds on the true head-gradient
    interference, |<g⁺, g⁻>| ≤ ||e⁺−p⁺||·||e⁻−p⁻||·bound (``head_tight_violations``,
    ``head_paper_violations``: only guaranteed zero for the raw head input); the tightness
    ratios |<x⁻, x⁺>| / bound; and the Spearman correlation (with p-value) between a negative
    token's residual energy and its true head interference with the positives, Σ or max over
    positive tokens of |<g⁺, g⁻>| (the paper predicts a negative correlation).
    ``tokens``: one row per (negative token, representation): residual energy, ResRL weight ω,
    and the two interference measures. ``explained_variance``: cumulative explained variance of
    the positive tokens' matrix against rank. ``pairs``: a uniform sample of positive×negative
    pairs per group and representation with |<x⁻, x⁺>|, both bounds, |<g⁺, g⁻>| and the tight bound
    read for the head gradient (for scatter plots). ``correlation``: per (step, representation), the
    Spearman correlations pooled over groups and the mean of the per-group ones.
    """

    KIND: ClassVar[str] = "subspace"
    _REP: ClassVar[dict[str, str]] = {"representation": _S, "layer": _S, "layer_norm": _B, "center": _B}
    TABLES: ClassVar[dict[str, dict[str, str]]] = {
        "groups": {"step": _I, "group_id": _I, "prompt_uid": _S, **_REP, "status": _S, "rank": _I,
                   "n_pos_tokens": _I, "n_neg_tokens": _I, "n_pairs": _I, "residual_mean": _F,
                   "residual_median": _F, "tight_violations": _I, "paper_violations": _I,
                   "head_tight_violations": _I, "head_paper_violations": _I, "tight_ratio_mean": _F,
                   "tight_ratio_median": _F, "tight_ratio_max": _F, "paper_ratio_mean": _F, "paper_ratio_median": _F,
                   "spearman_sum": _F, "spearman_sum_p": _F, "spearman_max": _F, "spearman_max_p": _F},
        "tokens": {"step": _I, "group_id": _I, **_REP, "response_index": _I, "position": _I, "token_id": _I,
                   "residual_energy": _F, "resrl_weight": _F, "interference_sum_abs": _F,
                   "interference_max_abs": _F},
        "explained_variance": {"step": _I, "group_id": _I, **_REP, "rank": _I, "explained_variance": _F},
        "pairs": {"step": _I, "group_id": _I, "prompt_uid": _S, **_REP, "true_abs": _F, "tight_bound": _F,
                  "paper_bound": _F, "head_abs": _F, "head_tight_bound": _F},
        "correlation": {"step": _I, **_REP, "n_groups": _I, "n_tokens": _I, "spearman_sum": _F,
                        "spearman_sum_p": _F, "spearman_max": _F, "spearman_max_p": _F,
                        "spearman_sum_group_mean": _F, "spearman_max_group_mean": _F},
    }
    groups: pd.DataFrame = None  # type: ignore[assignment]
    tokens: pd.DataFrame = None  # type: ignore[assignment]
    explained_variance: pd.DataFrame = None  # type: ignore[assignment]
    pairs: pd.DataFrame = None  # type: ignore[assignment]
    correlation: pd.DataFrame = None  # type: ignore[assignment]
    meta: dict = field(default_factory=dict)

    def summary(self) -> dict:
        g = self.groups[self.groups.status == "ok"]
        viol = {c: int(g[c].sum()) for c in ("tight_violations", "paper_violations", "head_tight_violations",
                                             "head_paper_violations")}
        by_rep = {}
        for rep, d in g.groupby("representation", sort=True):
            by_rep[rep] = {"head_tight_violations": int(d.head_tight_violations.sum()),
                           "n_pairs": int(d.n_pairs.sum()), "tight_ratio_mean": _nanmean(d.tight_ratio_mean)}
        corr = self.correlation[["step", "representation", "spearman_sum", "spearman_max"]]
        return {**super().summary(), "violations": viol, "by_representation": to_jsonable(by_rep),
                "correlation": to_jsonable(corr.to_dict(orient="records"))}


@dataclass(frozen=True, eq=False)
class DiversityResult(ProbeResult):
    """Sampling-based accuracy and diversity: pass@k, Avg@n, distinct-n, self-BLEU, distinct answers.

    ``prompts``: one row per (step, prompt): ``n_samples`` responses sampled at
    ``meta["temperature"]`` (seeded), ``n_correct`` (reward > 0), ``accuracy`` (n_correct / n),
    distinct-1/2/3 (unique / total n-grams over the prompt's samples, in model tokens), mean
    pairwise ``self_bleu`` (BLEU-4 of each sample against the others), ``distinct_answer_frac``
    (unique final answers / n), ``mean_length`` (tokens). Correctness columns are NaN when the
    probe set has no ground truth. ``pass_at_k``: one row per (step, k ≤ n): the unbiased pass@k
    averaged over prompts (and ``avg_at_n`` repeated for convenience). ``samples``: the sampled
    responses themselves.
    """

    KIND: ClassVar[str] = "diversity"
    TABLES: ClassVar[dict[str, dict[str, str]]] = {
        "prompts": {"step": _I, "group_id": _I, "prompt_uid": _S, "n_samples": _I, "n_correct": _F,
                    "accuracy": _F, "distinct_1": _F, "distinct_2": _F, "distinct_3": _F, "self_bleu": _F,
                    "distinct_answer_frac": _F, "mean_length": _F},
        "pass_at_k": {"step": _I, "k": _I, "pass_at_k": _F, "avg_at_n": _F, "n_prompts": _I},
        "samples": {"step": _I, "group_id": _I, "sample_index": _I, "response": _S, "answer": _S, "reward": _F,
                    "n_tokens": _I},
    }
    prompts: pd.DataFrame = None  # type: ignore[assignment]
    pass_at_k: pd.DataFrame = None  # type: ignore[assignment]
    samples: pd.DataFrame = None  # type: ignore[assignment]
    meta: dict = field(default_factory=dict)

    def summary(self) -> dict:
        rows = []
        for step, d in self.prompts.groupby("step", sort=True):
            pk = self.pass_at_k[self.pass_at_k.step == step].sort_values("k")
            rows.append({"step": int(step), "avg_at_n": _nanmean(d.accuracy),
                         "pass_at_1": float(pk.pass_at_k.iloc[0]) if len(pk) else None,
                         "pass_at_n": float(pk.pass_at_k.iloc[-1]) if len(pk) else None,
                         "distinct_1": _nanmean(d.distinct_1), "distinct_2": _nanmean(d.distinct_2),
                         "distinct_3": _nanmean(d.distinct_3), "self_bleu": _nanmean(d.self_bleu),
                         "distinct_answer_frac": _nanmean(d.distinct_answer_frac)})
        return {**super().summary(), "by_step": to_jsonable(rows)}


@dataclass(frozen=True, eq=False)
class EntropyDynamicsResult(ProbeResult):
    """First-order entropy change of one SGD step of the head, split by the polarity of its cause, beside real steps
    and the covariance proxy (docs/MATH.md § Entropy dynamics).

    ``groups``: one row per (step, group, algorithm): token means over the group of the entropy before
    (``entropy_mean``), of the predicted ΔH (``predicted`` = ``predicted_from_pos`` + ``predicted_from_neg``, the
    parts caused by the samples of positive and of negative responses), of the realised ΔH after one SGD step of the
    head alone (``actual_head``) and of the whole model (``actual_full``; NaN where not run), and ``covariance``: Cui
    et al.'s covariance of token log-prob and advantage over the group's tokens (one step lowers the entropy by about
    η·covariance). ``responses``: the same token means per response. ``tokens`` (the groups that took the real steps, by
    default): per token its entropy, the prediction and its parts, the realised ΔH, ``source_effect`` (the change of
    the group's mean entropy caused by this token's own gradient) and ``cov_centred`` (its centred product
    (A − Ā)(log π − mean log π), the proxy's per-token term: −cov_centred stands for raising the entropy).
    ``correlation``: Spearman rank correlations of a predictor with a target, per step (``scope`` "step") and over
    every step of the pass (``scope`` "run"), at the token and the group level.
    """

    KIND: ClassVar[str] = "entropy_dynamics"
    TABLES: ClassVar[dict[str, dict[str, str]]] = {
        "groups": {"step": _I, "group_id": _I, "prompt_uid": _S, "algorithm": _S, "status": _S, "n_pos": _I,
                   "n_neg": _I, "n_tokens": _I, "lr": _F, "entropy_mean": _F, "predicted": _F,
                   "predicted_from_pos": _F, "predicted_from_neg": _F, "actual_head": _F, "actual_full": _F,
                   "covariance": _F},
        "responses": {"step": _I, "group_id": _I, "algorithm": _S, "response_index": _I, "is_positive": _B,
                      "n_tokens": _I, "entropy_mean": _F, "predicted": _F, "predicted_from_pos": _F,
                      "predicted_from_neg": _F, "actual_head": _F, "actual_full": _F},
        "tokens": {"step": _I, "group_id": _I, "algorithm": _S, "response_index": _I, "position": _I,
                   "token_id": _I, "is_positive": _B, "logp": _F, "advantage": _F, "entropy": _F, "predicted": _F,
                   "predicted_from_pos": _F, "predicted_from_neg": _F, "actual_head": _F, "actual_full": _F,
                   "source_effect": _F, "cov_centred": _F},
        "correlation": {"scope": _S, "step": _I, "algorithm": _S, "level": _S, "predictor": _S, "target": _S,
                        "n": _I, "spearman": _F},
    }
    groups: pd.DataFrame = None  # type: ignore[assignment]
    responses: pd.DataFrame = None  # type: ignore[assignment]
    tokens: pd.DataFrame = None  # type: ignore[assignment]
    correlation: pd.DataFrame = None  # type: ignore[assignment]
    meta: dict = field(default_factory=dict)

    def summary(self) -> dict:
        rows = []
        for (step, alg), d in self.groups.groupby(["step", "algorithm"], sort=True):
            rows.append({"step": int(step), "algorithm": alg, "predicted": _nanmean(d.predicted),
                         "predicted_from_pos": _nanmean(d.predicted_from_pos),
                         "predicted_from_neg": _nanmean(d.predicted_from_neg),
                         "actual_head": _nanmean(d.actual_head), "actual_full": _nanmean(d.actual_full),
                         "covariance": _nanmean(d["covariance"])})
        c = self.correlation
        run = c[c.scope == "run"] if len(c) else c
        return {**super().summary(), "lr": self.meta.get("lr"), "by_step": to_jsonable(rows),
                "correlation": to_jsonable(run.drop(columns=["scope", "step"]).to_dict(orient="records"))}


@dataclass(frozen=True, eq=False)
class FidelityResult(ProbeResult):
    """Per (step, response) mismatch between the logged sampler log-probs and the checkpoint's.

    ``responses``: ``n_tokens`` compared, ``origin`` of the token ids (exact / round_trip / unverified),
    ``kl_k1`` and ``kl_k3`` (per-token KL(sampler ‖ checkpoint) estimates, nats), ``max_abs_delta`` and
    ``mean_abs_delta`` (|log p_sampler − log p_ckpt|), ``frac_off`` (tokens with |Δ| above the threshold),
    ``first_abs_delta`` (|Δ| at the first response token), ``frac_sampler_higher`` (of the tokens whose |Δ|
    exceeds 1e-3 nats, the fraction the sampler found more likely; 0.5 when none does). ``meta["verdict"]``: the
    step judged and its numbers; ``meta["warnings"]``: a large mismatch, with its likely cause.
    """

    KIND: ClassVar[str] = "fidelity"
    TABLES: ClassVar[dict[str, dict[str, str]]] = {
        "responses": {"step": _I, "group_id": _I, "response_index": _I, "origin": _S, "n_tokens": _I,
                      "kl_k1": _F, "kl_k3": _F, "max_abs_delta": _F, "mean_abs_delta": _F, "frac_off": _F,
                      "first_abs_delta": _F, "frac_sampler_higher": _F},
    }
    responses: pd.DataFrame = None  # type: ignore[assignment]
    meta: dict = field(default_factory=dict)

    def by_step(self) -> pd.DataFrame:
        """Token-weighted numbers per step: ``kl_k1``, ``kl_k3``, ``mean_abs_delta``, ``frac_off`` (means over
        tokens), ``max_abs_delta`` (max), ``n_responses``, ``n_tokens``."""
        rows = []
        for step, d in self.responses.groupby("step", sort=True):
            w = d.n_tokens.astype(float)
            rows.append({"step": int(step), "n_responses": len(d), "n_tokens": int(w.sum()),
                         **{c: float((d[c] * w).sum() / w.sum()) for c in ("kl_k1", "kl_k3", "mean_abs_delta",
                                                                           "frac_off")},
                         "max_abs_delta": float(d.max_abs_delta.max())})
        return pd.DataFrame(rows)

    def summary(self) -> dict:
        return {**super().summary(), "by_step": to_jsonable(self.by_step().to_dict(orient="records")),
                "verdict": to_jsonable(self.meta.get("verdict")), "warnings": list(self.meta.get("warnings", []))}


@dataclass(frozen=True, eq=False)
class FlipsResult(ProbeResult):
    """Token flips between checkpoints (docs/MATH.md § Token flips).

    ``counts``: one row per (comparison, step pair, polarity, token class, confidence bin): how many response
    tokens' log-probs rose, fell or stayed from ``step_from`` to ``step_to``; polarity of the response, token class
    against the group's responses of the other polarity (shared / first_divergent / after; unmixed: a group without
    both), ``conf_bin`` k: p(y) at ``step_from`` in [k/10, (k+1)/10). ``coupling``: per step pair and pair kind
    (identical_low, identical_high, different_low), the positive×negative token pairs of a group and how many moved
    in the same direction. ``comparison``: ``step_to_step`` (consecutive checkpoints) or ``vs_initial``.
    """

    KIND: ClassVar[str] = "flips"
    TABLES: ClassVar[dict[str, dict[str, str]]] = {
        "counts": {"comparison": _S, "step_from": _I, "step_to": _I, "polarity": _S, "token_class": _S,
                   "conf_bin": _I, "n_tokens": _I, "n_rose": _I, "n_fell": _I, "n_same": _I},
        "coupling": {"comparison": _S, "step_from": _I, "step_to": _I, "kind": _S, "n_pairs": _I, "n_same_dir": _I,
                     "same_dir_frac": _F},
    }
    counts: pd.DataFrame = None  # type: ignore[assignment]
    coupling: pd.DataFrame = None  # type: ignore[assignment]
    meta: dict = field(default_factory=dict)

    def rose_fraction(self, by: Sequence[str] = ("polarity",), comparison: str = "step_to_step") -> pd.DataFrame:
        """The fraction of tokens whose log-prob rose (and fell), pooled over the step pairs, by ``by``."""
        c = self.counts[self.counts.comparison == comparison]
        g = c.groupby(list(by), sort=True)[["n_tokens", "n_rose", "n_fell"]].sum().reset_index()
        return g.assign(rose_frac=g.n_rose / g.n_tokens, fell_frac=g.n_fell / g.n_tokens)

    def summary(self) -> dict:
        out = {**super().summary()}
        if len(self.counts):
            out["rose_frac"] = to_jsonable(self.rose_fraction().to_dict(orient="records"))
        if len(self.coupling):
            c = self.coupling[self.coupling.comparison == "step_to_step"].groupby("kind")[["n_pairs", "n_same_dir"]]
            s = c.sum().reset_index()
            out["coupling"] = to_jsonable(s.assign(same_dir_frac=s.n_same_dir / s.n_pairs.where(s.n_pairs > 0))
                                          .to_dict(orient="records"))
        return out


#: Every result kind ``load_result`` reads, by ``KIND``: the built-in results, and each registered probe's
#: (:func:`resrl_analysis.probes.registry.register_probe` calls :func:`register_result`).
RESULT_TYPES: dict[str, type[ProbeResult]] = {}


def register_result(cls: type[ProbeResult]) -> type[ProbeResult]:
    """Make ``load_result`` read results of ``cls`` (its ``KIND`` must be new, or already ``cls``).

    >>> register_result(ScoresResult) is ScoresResult
    True
    """
    if not cls.KIND:
        raise ValueError(f"{cls.__name__}: a result class needs a KIND")
    other = RESULT_TYPES.get(cls.KIND)
    if other is not None and other is not cls:
        raise ValueError(f"result kind {cls.KIND!r} is already {other.__name__}'s")
    names = {f.name for f in fields(cls)}  # every table named in TABLES is a field (a typo would surface late)
    if not (set(cls.TABLES) <= names and "meta" in names):
        raise ValueError(f"{cls.__name__}: TABLES {sorted(cls.TABLES)} must all be dataclass fields, with meta")
    RESULT_TYPES[cls.KIND] = cls
    return cls


for _cls in (ScoresResult, LLDResult, FirstOrderResult, InterferenceResult, SubspaceResult, DiversityResult,
             EntropyDynamicsResult, FlipsResult, FidelityResult):
    register_result(_cls)


def load_result(path: str | Path) -> ProbeResult:
    """Load any saved result; its class comes from ``meta.json``."""
    path = Path(path)
    kind = _read_meta(path).get("kind")
    if kind not in RESULT_TYPES:
        raise ProbeError(f"{path / 'meta.json'}: unknown result kind {kind!r} (known: {', '.join(RESULT_TYPES)}; a "
                         "probe registered in your own module registers its result when that module is imported)")
    return RESULT_TYPES[kind].load(path)


def load_results(probes_dir: str | Path) -> dict[str, ProbeResult]:
    """Every result saved under a directory (e.g. ``RUN_DIR/probes``), by sub-directory name."""
    root = Path(probes_dir)
    if not root.is_dir():
        raise ProbeError(f"{root}: no such directory")
    return {p.name: load_result(p) for p in sorted(root.iterdir())
            if p.is_dir() and not p.name.startswith(".") and (p / "meta.json").is_file()}

