"""The memory plan of a probe pass: peak memory per probe from shapes alone, before any work.

``resrl probe`` calls :func:`plan_probes` with the model's ``config.json`` (no weights needed) and the
probe set's shapes, prints the plan, picks the largest group batching that fits the budget, and
refuses with one line naming the probe and the setting to change when nothing fits. The estimate
counts the tensors the probes hold (bytes of each dtype), not allocator slack; each registered probe declares
its own terms (``Probe.plan``, from :class:`PlanInputs`), and this module adds what the pass keeps:

- kept per group until its probes are done: the response logits (G·T·V, model dtype), two hidden
  states (2·G·T·d) and the shared head-gradient Gram (N², float32, N = G·T valid tokens), with its entropy
  part (another N²) when a probe needs it;
- transient, per probe: the forward's activations and log-prob chunks; row blocks of the (Tp, Tn)
  cosine and bound matrices (interference, subspace; streamed, never whole); the head step's saved
  log-softmax (N·V, float32) and the whole-model step's gradients, parameter copy and one
  micro-batch's checkpointed activations.

With several processes (``torchrun``, ``--nproc N``) the plan is per rank: each rank keeps ⌈groups / N⌉ groups and
holds either a whole copy of the model (``replica``) or, sharded with FSDP2, 1/N of it plus the parts kept gathered
(the root: embeddings, final norm, head) and the decoder layers being gathered (``shard``). Sharded, the whole-model
gradients run after the group batches (their terms are named ``whole-model …``: a phase of their own, beside the
weights only), each rank backpropagating ⌈G / N⌉ of a group's responses. ``--parallel auto`` takes the replica
when it fits and else the shard; the plan prints both.

A test checks the estimate against the measured peak RSS on CPU (within 25%).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ProbeError
from .interference import BLOCK_BYTES
from .ops import DEFAULT_MEMORY_BUDGET_MB
from .probes.registry import instantiate

if TYPE_CHECKING:
    from .probes.config import ProbeConfig

__all__ = ["ModelShape", "ProbeShape", "MemoryPlan", "PlanInputs", "parse_memory", "format_bytes", "plan_probes",
           "plan_for_config", "check_plan", "device_memory"]

#: The working chunk of the chunked log-prob/entropy and Gram passes (``ops.DEFAULT_MEMORY_BUDGET_MB``); one row
#: block of a streamed positive×negative matrix is :data:`resrl_analysis.interference.BLOCK_BYTES`.
CHUNK_BYTES = int(DEFAULT_MEMORY_BUDGET_MB * 2**20)

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float64": 8, "double": 8}


def parse_memory(text: str) -> int:
    """Bytes from ``80GB``, ``80 GiB``, ``512MB``, ``1.5TB`` or a plain number of bytes.

    >>> parse_memory("80GB"), parse_memory("1.5 GiB"), parse_memory("4096")
    (80000000000, 1610612736, 4096)
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"memory budget {text!r}: expected a number with a unit such as 80GB, 512MiB or 1.5TB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    """Human-readable bytes (decimal units, as budgets are written).

    >>> format_bytes(80e9), format_bytes(1.5e6)
    ('80.0 GB', '1.5 MB')
    """
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only causal LM that the plan needs, from its HF config.

    >>> s = ModelShape.from_config({"vocab_size": 100, "hidden_size": 8, "num_hidden_layers": 2,
    ...     "num_attention_heads": 2, "intermediate_size": 16, "torch_dtype": "bfloat16"})
    >>> s.n_params, s.dtype_bytes
    (2936, 2)
    """

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    dtype_bytes: int = 4

    @classmethod
    def from_config(cls, cfg: Mapping | object, dtype: str | None = None) -> ModelShape:
        """From a ``config.json`` dict or a ``PretrainedConfig``; ``dtype`` (``auto`` or None: the config's)."""
        get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
        try:
            d, heads = int(get("hidden_size")), int(get("num_attention_heads"))
            shape = dict(vocab=int(get("vocab_size")), hidden=d, layers=int(get("num_hidden_layers")), heads=heads,
                         kv_heads=int(get("num_key_value_heads") or heads),
                         head_dim=int(get("head_dim") or d // heads), intermediate=int(get("intermediate_size")),
                         tied=bool(get("tie_word_embeddings", False)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"config: missing or bad field for the memory plan ({e}); expected vocab_size, "
                             "hidden_size, num_hidden_layers, num_attention_heads, intermediate_size") from None
        name = dtype if dtype not in (None, "auto") else (get("torch_dtype") or get("dtype") or "float32")
        return cls(**shape, dtype_bytes=_DTYPE_BYTES.get(str(name).replace("torch.", ""), 4))

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | None = None) -> ModelShape:
        """From ``path/config.json`` (a checkpoint folder; weights need not be there)."""
        f = Path(path) / "config.json"
        try:
            cfg = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{f}: cannot read the model config ({e})") from None
        return cls.from_config(cfg, dtype)

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (attention with q/k norms, gated MLP, two RMSNorms)."""
        d, hd = self.hidden, self.head_dim
        attn = d * self.heads * hd * 2 + d * self.kv_heads * hd * 2 + 2 * hd
        return attn + 3 * d * self.intermediate + 2 * d

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder layers: embeddings, the head (unless tied) and the final norm (the root
        unit of the FSDP2 wrapping, kept gathered by the sharded probes)."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def n_params(self) -> int:
        """Parameter count of a Llama/Qwen-style decoder (attention, gated MLP, RMSNorms, embeddings)."""
        return self.layers * self.layer_params + self.root_params


@dataclass(frozen=True)
class ProbeShape:
    """The largest group of the probe set: ``responses`` G, ``response_len`` T, ``prompt_len`` P."""

    responses: int
    response_len: int
    prompt_len: int
    n_groups: int = 1

    @classmethod
    def of(cls, groups: Iterable) -> ProbeShape:
        """From :class:`~resrl_analysis.probe_sets.ProbeGroup` objects (the largest of each size).

        >>> from resrl_analysis.probe_sets import ProbeGroup
        >>> ProbeShape.of([ProbeGroup(0, (1, 2), ((3,), (4, 5, 6)), (1.0, 0.0))])
        ProbeShape(responses=2, response_len=3, prompt_len=2, n_groups=1)
        """
        gs = list(groups)
        if not gs:
            return cls(1, 1, 1, 0)
        return cls(max(g.n_responses for g in gs), max(max(len(r) for r in g.response_ids) for g in gs),
                   max(len(g.prompt_ids) for g in gs), len(gs))

    @property
    def tokens(self) -> int:
        """N = G·T: the valid tokens of a full group (the Gram's side)."""
        return self.responses * self.response_len


@dataclass(frozen=True)
class MemoryPlan:
    """Peak bytes per probe at the chosen group batching; ``fits`` when all are within ``budget``."""

    budget: int
    budget_source: str
    group_batch: int
    requested_group_batch: int
    peaks: dict[str, int]
    parts: dict[str, dict[str, int]]
    model: ModelShape
    shape: ProbeShape
    notes: list[str] = field(default_factory=list)
    hints: dict[str, str] = field(default_factory=dict)  # probe -> the setting that shrinks it (the refusal's)
    nproc: int = 1
    parallel: str = "replica"  # how the ranks hold the model: "replica" or "shard" (FSDP2)
    alternatives: dict[str, int] = field(default_factory=dict)  # mode -> its largest peak per rank (both were planned)

    @property
    def peak(self) -> int:
        return max(self.peaks.values()) if self.peaks else 0

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    def describe(self) -> str:
        """The plan as printed by ``resrl probe`` (one line per probe).

        >>> m = ModelShape(100, 8, 2, 2, 2, 4, 16, False)
        >>> print(plan_probes(m, ProbeShape(4, 16, 4), ["lld"], budget=10**9).describe().splitlines()[0][:60])
        memory plan: budget 1.0 GB (--memory-budget), model 2.9k par
        """
        m, s = self.model, self.shape
        n = m.n_params
        ps = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"
        per = "" if self.nproc == 1 else " per rank"
        lines = [f"memory plan{per}: budget {format_bytes(self.budget)} ({self.budget_source}), model {ps} parameters "
                 f"× {m.dtype_bytes} B, groups of {s.responses} × {s.response_len} tokens (prompt {s.prompt_len}), "
                 f"V = {m.vocab}"]
        if self.nproc > 1:
            how = {"replica": "a whole copy of the model on each rank",
                   "shard": f"the model sharded with FSDP2 across the {self.nproc} ranks"}
            lines.append(f"  {self.nproc} ranks, at most {s.n_groups} group(s) each: {self.parallel} "
                         f"({how[self.parallel]})")
            for mode, peak in self.alternatives.items():
                verdict = "fits" if peak <= self.budget else "does not fit"
                lines.append(f"    {mode:<8} largest peak {format_bytes(peak):>9} per rank: {verdict}"
                             + ("  <- chosen" if mode == self.parallel else ""))
        lines.append(f"  group batch {self.group_batch}" + (f" (asked {self.requested_group_batch})"
                                                             if self.group_batch != self.requested_group_batch else ""))
        for name, peak in self.peaks.items():
            top = sorted(self.parts[name].items(), key=lambda kv: -kv[1])[:4]
            what = ", ".join(f"{k} {format_bytes(v)}" for k, v in top)
            flag = "ok" if peak <= self.budget else "DOES NOT FIT"
            lines.append(f"  {name:<13} peak {format_bytes(peak):>9}  {flag}  ({what})")
        lines += [f"  note: {t}" for t in self.notes]
        lines.append(f"  fits: {'yes' if self.fits else 'no'} (largest peak {format_bytes(self.peak)})")
        return "\n".join(lines)

    def refusal(self) -> str:
        """One line naming the probe that does not fit and the setting to change."""
        name = max(self.peaks, key=self.peaks.get)  # type: ignore[arg-type]
        hint = self.hints.get(name) or "a shorter probe set"
        where = "" if self.nproc == 1 else f" per rank ({self.nproc} ranks, {self.parallel})"
        more = "" if self.nproc == 1 else ", more ranks"
        return (f"memory plan: probe {name} needs {format_bytes(self.peaks[name])}{where} at --group-batch 1, over "
                f"the budget {format_bytes(self.budget)}; raise --memory-budget{more}, or use {hint}")


def rank_weights(model: ModelShape, nproc: int, sharded: bool) -> int:
    """Bytes of weights one rank holds: the whole model (a replica), or sharded with FSDP2 its 1/N share of every
    parameter plus the root kept gathered (embeddings, head, final norm) and two decoder layers gathered at a time
    (the one computing and the one prefetched).

    >>> m = ModelShape(100, 8, 2, 2, 2, 4, 16, False)
    >>> rank_weights(m, 1, False) == m.n_params * 4, rank_weights(m, 2, True) < m.n_params * 4
    (True, False)
    """
    b = model.dtype_bytes
    if not sharded:
        return model.n_params * b
    return math.ceil(model.n_params / nproc) * b + model.root_params * b + min(2, model.layers) * model.layer_params * b


def device_memory(device: str) -> tuple[int, str]:
    """(bytes, where from): a CUDA device's total memory, or the host's available memory."""
    if str(device).startswith("cuda"):
        idx = torch.device(device).index or 0
        return int(torch.cuda.get_device_properties(idx).total_memory), f"{device} total memory"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "host MemAvailable"
    except OSError:
        pass
    return 16 * 10**9, "default 16 GB (host memory unknown)"


def _forward(m: ModelShape, rows: int, L: int, T: int, grad: bool, checkpoint: bool, cpu: bool) -> dict[str, int]:
    """Bytes of a forward (and backward when ``grad``) over ``rows`` sequences of L tokens, logits apart."""
    b, d, inter = m.dtype_bytes, m.hidden, m.intermediate
    # One decoder layer's live tensors: residual, norms, q/k/v/o, gated MLP (3 × intermediate).
    layer = rows * L * (8 * d + (m.heads + 2 * m.kv_heads) * m.head_dim + 4 * inter) * b
    # CPU attention with a padding mask takes the math path: a (rows, heads, L, L) float score matrix.
    attn = rows * m.heads * L * L * 4 if cpu else 0
    # float32 log-softmax chunks: the budget is for three (c, V) temporaries, about half of them live at once.
    chunk = min(CHUNK_BYTES, 3 * rows * T * m.vocab * 4) // 2
    out = {"activations": layer + attn, "logprob chunks": chunk}
    if grad:
        saved = m.layers * rows * L * d * b if checkpoint else m.layers * (layer + attn)
        out.update({"saved activations": saved, "logits": _logits(m, rows, T), "logits grad": _logits(m, rows, T)})
    return out


def _logits(m: ModelShape, rows: int, T: int) -> int:
    # The model keeps logits for T + 1 positions (logits_to_keep); the response slice is a view of them.
    return rows * (T + 1) * m.vocab * m.dtype_bytes


@dataclass(frozen=True)
class PlanInputs:
    """What a probe's :meth:`~resrl_analysis.probes.registry.Probe.plan` gets: the shapes, its ``options``,
    whether whole-model steps run (``full_model``), their ``micro_batch``, the device kind, and ``forward``: the
    terms of the pass's shared no-grad forward of one group (with its logits when no probe keeps them).

    >>> m = ModelShape(100, 8, 2, 2, 2, 4, 16, False)
    >>> p = PlanInputs(m, ProbeShape(4, 16, 4), None, full_model=False, micro_batch=4, cpu=True, forward={})
    >>> p.N, p.logits(4)
    (64, 27200)
    """

    model: ModelShape
    shape: ProbeShape
    options: Any
    full_model: bool
    micro_batch: int
    cpu: bool
    forward: dict[str, int]
    world: int = 1  # ranks of the pass (``shape.n_groups`` is then one rank's share)
    sharded: bool = False  # the model sharded with FSDP2 across the ranks
    samples: int = 0  # responses sampled per prompt (the diversity probe); 0: G

    @property
    def G(self) -> int:
        return self.shape.responses

    @property
    def T(self) -> int:
        return self.shape.response_len

    @property
    def L(self) -> int:
        return self.shape.prompt_len + self.shape.response_len

    @property
    def N(self) -> int:
        return self.shape.tokens

    def logits(self, rows: int) -> int:
        """Bytes of the logits of ``rows`` responses (model dtype)."""
        return _logits(self.model, rows, self.T)

    def forward_terms(self, rows: int, *, grad: bool, checkpoint: bool) -> dict[str, int]:
        """Bytes of a forward (and backward when ``grad``) over ``rows`` responses, by part."""
        return _forward(self.model, rows, self.L, self.T, grad, checkpoint, self.cpu)

    def full_step(self, rows: int, grads: int) -> dict[str, int]:
        """A whole-model step over ``rows`` responses with ``grads`` gradient copies and a parameter copy.

        Sharded, each rank backpropagates at most ⌈G / N⌉ of the group's responses through the whole model (logits
        and their gradient included: autograd from the loss) and holds 1/N of each gradient and of the copy, plus a
        gathered layer's gradient before it is reduced."""
        m = self.model
        if not self.sharded:
            f = self.forward_terms(rows, grad=True, checkpoint=True)
            return {**f, "gradients": grads * m.n_params * m.dtype_bytes,
                    "parameter copy": m.n_params * m.dtype_bytes}
        rows = max(1, min(rows, math.ceil(self.G / self.world)))
        f = self.forward_terms(rows, grad=True, checkpoint=True)
        shard = math.ceil(m.n_params / self.world) * m.dtype_bytes
        return {**f, "gradients": grads * shard, "parameter copy": shard,
                "gathered layer gradient": m.layer_params * (m.dtype_bytes + 4)}

    @property
    def sampling_rows(self) -> int:
        """Rows of one sampling call of the diversity probe: whole prompts of ``samples`` rows, at most 256 rows,
        at most the groups of this rank."""
        s = self.samples or self.G
        return max(1, min(self.shape.n_groups or 1, max(1, 256 // s))) * s

    @property
    def tp_tn_block(self) -> int:
        """One row block of a (Tp, Tn) float32 matrix (streamed, :func:`resrl_analysis.interference.row_blocks`)."""
        N = self.N
        return min((N // 2) * (N - N // 2) * 4, BLOCK_BYTES)

    @property
    def gram_build(self) -> int:
        """The Gram build's vocabulary chunks (or row blocks) and its (N,) vectors."""
        N = self.N
        return min(CHUNK_BYTES, 3 * N * self.model.vocab * 4) + 4 * N * 4


def plan_probes(
    model: ModelShape,
    shape: ProbeShape,
    probes: Iterable[str],
    *,
    budget: int,
    budget_source: str = "--memory-budget",
    group_batch: int = 8,
    full_model: bool = True,
    options: Mapping[str, Any] | None = None,
    micro_batch: int = 4,
    device: str = "cpu",
    weights: bool = True,
    nproc: int = 1,
    parallel: str = "auto",
    samples: int = 0,
) -> MemoryPlan:
    """Peak memory of each probe at ``shape`` and the largest group batching ≤ ``group_batch`` that fits.

    Each registered probe declares its own working memory (``Probe.plan``); this adds what the pass keeps
    per group (logits, hidden states, the shared Gram, for the probes that need them) and the weights.
    ``full_model``: whether whole-model gradients run (interference cosine, first-order step);
    ``options``: probe name → its options (default: each probe's defaults); ``weights``: count the model's
    weights (False for the working memory alone); ``nproc``: ranks (the plan is then per rank, for ⌈groups / nproc⌉
    groups each); ``parallel``: ``replica``, ``shard`` or ``auto`` (the replica when it fits, else the shard);
    ``samples``: responses the diversity probe samples per prompt (default: the group size).

    >>> m = ModelShape(151936, 2560, 36, 32, 8, 128, 9728, True, 2)  # Qwen3-4B, bfloat16
    >>> p = plan_probes(m, ProbeShape(8, 4096, 512, n_groups=8), ["lld", "first_order", "interference", "subspace"],
    ...                 budget=80 * 10**9, device="cuda")
    >>> p.fits, p.group_batch
    (True, 2)
    >>> p8 = plan_probes(m, ProbeShape(8, 4096, 512, n_groups=8), ["lld", "first_order"], budget=80 * 10**9,
    ...                  device="cuda", nproc=8)
    >>> p8.parallel, p8.shape.n_groups, sorted(p8.alternatives)
    ('replica', 1, ['replica', 'shard'])
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if parallel not in ("auto", "replica", "shard"):
        raise ValueError(f"parallel must be auto, replica or shard, got {parallel!r}")
    rank_shape = replace(shape, n_groups=math.ceil(shape.n_groups / nproc)) if nproc > 1 else shape
    modes = ["replica"] if nproc == 1 else (["replica", "shard"] if parallel == "auto" else [parallel])
    kw = dict(budget=budget, budget_source=budget_source, group_batch=group_batch, full_model=full_model,
              options=options, micro_batch=micro_batch, device=device, weights=weights, nproc=nproc, samples=samples)
    plans = {m: _plan_mode(model, rank_shape, list(probes), sharded=m == "shard", **kw) for m in modes}  # type: ignore[arg-type]
    fitting = [m for m in modes if plans[m].fits]
    chosen = fitting[0] if fitting else min(modes, key=lambda m: plans[m].peak)
    plan = plans[chosen]
    if nproc > 1:
        plan = replace(plan, parallel=chosen, alternatives={m: plans[m].peak for m in modes})
        if parallel == "auto" and chosen == "shard":
            plan.notes.insert(0, f"a whole copy needs {format_bytes(plans['replica'].peak)} per rank, over the budget: "
                                 f"the model is sharded with FSDP2 across the {nproc} ranks")
    return plan


def _plan_mode(model: ModelShape, shape: ProbeShape, probes: list[str], *, budget: int, budget_source: str,
               group_batch: int, full_model: bool, options: Mapping[str, Any] | None, micro_batch: int, device: str,
               weights: bool, nproc: int, sharded: bool, samples: int) -> MemoryPlan:
    """The plan of one way of holding the model (one rank's share of the groups in ``shape``)."""
    probes_ = {n: p for n, p in instantiate(list(probes), options).items() if p.scope != "pairs"}
    cpu = not str(device).startswith("cuda")
    G, T, d, N = shape.responses, shape.response_len, model.hidden, shape.tokens
    W = rank_weights(model, nproc, sharded) if weights else 0
    needs = set().union(*(p.needs for p in probes_.values() if p.scope == "groups"))
    # Kept per group until its probes are done: logits, two hidden states, and the shared Gram.
    per_group = (_logits(model, G, T) if "logits" in needs else 0) + (2 * G * T * d * model.dtype_bytes
                                                                     if "hidden" in needs else 0)
    gram = N * N * 4 * ((1 if "gram" in needs else 0) + (1 if "entropy_gram" in needs else 0))
    fwd = _forward(model, G, shape.prompt_len + T, T, grad=False, checkpoint=False, cpu=cpu)
    if "logits" not in needs:  # nobody keeps them: the forward's own logits are its transient
        fwd["logits"] = _logits(model, G, T)
    fwd_peak = sum(fwd.values())
    transient: dict[str, dict[str, int]] = {}
    phased: set[str] = set()
    after = {n for n, p in probes_.items() if p.scope == "checkpoint"}
    for name, probe in probes_.items():
        inputs = PlanInputs(model, shape, probe.options, full_model, micro_batch, cpu, dict(fwd), world=nproc,
                            sharded=sharded, samples=samples)
        transient[name] = dict(probe.plan(inputs))
        if "gram" in probe.needs:
            phased.add(name)
    gram_build = PlanInputs(model, shape, None, full_model, micro_batch, cpu, fwd).gram_build
    if "entropy_gram" in needs:  # the entropy part's row blocks hold one more (rows, N) temporary
        gram_build += min(CHUNK_BYTES, 4 * N * N * 4) // 4

    def peaks_at(gb: int) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        kept = gb * (per_group + gram)
        peaks, parts = {}, {}
        for name, t in transient.items():
            # Sharded, the whole-model gradients run after the group batches, beside the weights alone.
            later = {k: v for k, v in t.items() if sharded and k.startswith("whole-model ")}
            now = {k: v for k, v in t.items() if k not in later}
            # Phases run one after the other: the forwards of the batch's groups (before any Gram exists), then
            # the Grams and the probe's own work beside the kept groups. The peak is the largest phase.
            if name in phased:
                work = max(gb * per_group + fwd_peak, kept + max(sum(now.values()), gram_build))
            elif name in after:  # sampling runs once the batches are done: no group is kept then
                work = sum(now.values())
            else:
                work = kept + sum(now.values())
            peaks[name] = W + max(work, sum(later.values()))
            parts[name] = {"weights": W, **({} if name in after else {"kept groups": kept}), **t}
        return peaks, parts

    notes = []
    group_batch = max(1, min(group_batch, shape.n_groups or 1))
    gb = group_batch
    peaks, parts = peaks_at(gb)
    while gb > 1 and max(peaks.values(), default=0) > budget:
        gb = max(1, gb // 2)
        peaks, parts = peaks_at(gb)
    if gb != group_batch:
        notes.append(f"--group-batch {group_batch} would need {format_bytes(max(peaks_at(group_batch)[0].values()))};"
                     f" using {gb}")
    if gram:
        what = "Gram and its entropy part" if "entropy_gram" in needs else "Gram"
        notes.append(f"{what} {format_bytes(gram)} per group (N = {N} tokens), vocabulary chunks of "
                     f"{format_bytes(CHUNK_BYTES)}")
    hints = {name: p.plan_hint for name, p in probes_.items()}
    return MemoryPlan(budget=budget, budget_source=budget_source, group_batch=gb, requested_group_batch=group_batch,
                      peaks=peaks, parts=parts, model=model, shape=shape, notes=notes, hints=hints, nproc=nproc,
                      parallel="shard" if sharded else "replica")


# ----------------------------------------------------------------------------- ``resrl probe`` wiring

#: The prompt length assumed when the probe set has not been sampled yet (``--plan-only`` on a dataset).
ASSUMED_PROMPT_LEN = 512


def _plan_device(spec: str) -> str:
    if spec != "auto":
        return spec
    return "cuda" if torch.cuda.is_available() else "cpu"


def plan_for_config(config: ProbeConfig, checkpoint: Path, probe_shape: ProbeShape | None, *,
                    device: str | None = None, notes: Iterable[str] = (), nproc: int | None = None) -> MemoryPlan:
    """The plan of a probe pass (``config``) for the model at ``checkpoint`` (its ``config.json`` only).

    ``probe_shape`` None: the shapes the sampling settings ask for (``samples`` × ``max_new_tokens``, a prompt
    of :data:`ASSUMED_PROMPT_LEN` tokens, ``groups`` groups). ``nproc``: the ranks (default ``config.nproc``); on
    CPU without ``--memory-budget`` the host's available memory is shared by the ranks of this machine.
    """
    nproc = nproc or config.nproc
    try:
        model = ModelShape.from_pretrained(checkpoint, config.dtype)
    except ValueError as e:
        raise ProbeError(str(e)) from None
    extra = list(notes)
    if probe_shape is None:
        probe_shape = ProbeShape(config.samples, config.max_new_tokens or 256, ASSUMED_PROMPT_LEN, config.groups or 1)
        extra.append(f"shapes from --samples {config.samples} and --max-new-tokens {probe_shape.response_len}; "
                     f"prompt length assumed {ASSUMED_PROMPT_LEN}")
    dev = device or _plan_device(config.device)
    if config.memory_budget:
        try:
            budget, source = parse_memory(config.memory_budget), "--memory-budget"
        except ValueError as e:
            raise ProbeError(f"--memory-budget: {e}") from None
    else:
        budget, source = device_memory(dev)
        if nproc > 1 and not str(dev).startswith("cuda"):
            budget, source = budget // nproc, f"{source} / {nproc} ranks"
    plan = plan_probes(model, probe_shape, config.probes, budget=budget, budget_source=source,
                       group_batch=config.group_batch, full_model=config.full_model_steps != "none",
                       options=config.options, device=dev, nproc=nproc,
                       parallel=config.parallel, samples=config.samples)
    plan.notes.extend(extra)
    return plan


def check_plan(plan: MemoryPlan) -> None:
    """Raise :class:`~resrl_analysis.errors.ProbeError` (one line) when the plan does not fit."""
    if not plan.fits:
        raise ProbeError(plan.refusal())
