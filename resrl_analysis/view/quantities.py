"""The per-token quantities ``resrl view`` can colour by: one declaration each (docs/VIEW.md).

A :class:`Quantity` says what the number is (label, units, description), how it is coloured (a
diverging scale around 0, a sequential one, or categories) and where its values live: a field of our
rollout dump (``rollouts/step_XXXXXX.jsonl``, one list per response aligned with ``response_ids``)
and/or a column of a saved probe table with one row per token (``step, group_id, response_index,
position``). The page builder loops over :data:`QUANTITIES`; adding a quantity is one
:func:`register` call (or one entry below), nothing in the page changes.

    >>> [q.key for q in QUANTITIES][:3]
    ['logp', 'delta_logp', 'advantage']
    >>> get_quantity("entropy").units
    'nats'
    >>> toy = Quantity("toy", "toy value", "units", "sequential", "a test entry", dump_field="toy_values")
    >>> register(toy) is toy and get_quantity("toy") is toy
    True
    >>> unregister("toy")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["ProbeColumn", "Quantity", "QUANTITIES", "register", "unregister", "get_quantity", "PAPER_REPRESENTATION"]

Scale = Literal["diverging", "sequential", "categorical"]

#: The representation whose ResRL weights and residuals a probe-set view shows (the paper's choice; the subspace
#: probe measures eight, ``resrl_analysis.probes.subspace.PAPER_REPRESENTATION`` names this one).
PAPER_REPRESENTATION = "penultimate/ln/centred"


@dataclass(frozen=True)
class ProbeColumn:
    """A column of a saved probe result's per-token table (``RUN_DIR/probes/<result>/<table>``).

    The table has ``step, group_id, response_index, position`` columns; ``where`` keeps the rows whose
    columns equal the given values (e.g. one representation of the subspace probe).
    """

    result: str
    table: str
    column: str
    where: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Quantity:
    """One per-token quantity of the page.

    ``key`` (identifier in the page data), ``label`` and ``units`` (the colour bar's caption),
    ``scale``: ``diverging`` (symmetric around 0), ``sequential`` or ``categorical``;
    ``description`` (the legend's sentence); ``dump_field``: the rollout-dump field holding it;
    ``probe``: the probe table holding it; ``domain``: a fixed colour range (None: the 2%-98% range
    of the values embedded, symmetric for a diverging scale); ``pairwise``: the value is the
    difference of ``probe`` between two checkpoints the reader picks; ``categories``: (value, label)
    of a categorical quantity; ``builtin``: computed by the page builder itself (``shared``).
    """

    key: str
    label: str
    units: str
    scale: Scale
    description: str
    dump_field: str | None = None
    probe: ProbeColumn | None = None
    domain: tuple[float, float] | None = None
    pairwise: bool = False
    categories: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    builtin: str | None = None

    def __post_init__(self) -> None:
        if self.scale not in ("diverging", "sequential", "categorical"):
            raise ValueError(f"quantity {self.key!r}: scale must be diverging, sequential or categorical")
        if self.pairwise and self.probe is None:
            raise ValueError(f"quantity {self.key!r}: a pairwise quantity needs a probe column")

    def to_json(self) -> dict:
        """What the page needs to colour and describe it."""
        return {"key": self.key, "label": self.label, "units": self.units, "scale": self.scale,
                "description": self.description, "pairwise": self.pairwise,
                "categories": [list(c) for c in self.categories], "builtin": self.builtin}


_SCORES = "scores"
_PAPER = (("representation", PAPER_REPRESENTATION),)

QUANTITIES: list[Quantity] = [
    Quantity("logp", "log-prob", "nats", "sequential",
             "log π(y_t | x, y_<t): in a rollout batch, under the policy that sampled it, at its sampling "
             "temperature (the trainer's no-grad forward); in a probe-set view, under that checkpoint, teacher-forced "
             "at temperature 1",
             dump_field="token_logprobs", probe=ProbeColumn(_SCORES, "tokens", "logp")),
    Quantity("delta_logp", "Δ log-prob", "nats", "diverging",
             "log π_b(y_t) − log π_a(y_t) between the two checkpoints picked, teacher-forced on the probe set "
             "(what lazy likelihood displacement sums over a positive response's tokens); < 0: the token lost "
             "likelihood", probe=ProbeColumn(_SCORES, "tokens", "logp"), pairwise=True),
    Quantity("advantage", "token advantage", "advantage", "diverging",
             "the advantage this token's log-prob gradient was scaled by in the loss (after ResRL / NTHR weights)",
             dump_field="token_advantages"),
    Quantity("resrl_weight", "ResRL weight ω", "× advantage", "sequential",
             "ResRL's weight of a negative token, from its residual outside the positives' subspace (1 on "
             "positives and on groups ResRL leaves alone); low ω: the token's negative gradient is damped",
             dump_field="resrl_weights", probe=ProbeColumn("subspace", "tokens", "resrl_weight", _PAPER),
             domain=(0.0, 1.0)),
    Quantity("resrl_residual", "residual energy e(x)", "‖(I − V_k V_kᵀ) x‖² / d", "sequential",
             "how far a negative token's representation lies outside the subspace of the group's positive tokens "
             "(ResRL's single-forward proxy for its interference; large: little interference)",
             dump_field="resrl_residuals", probe=ProbeColumn("subspace", "tokens", "residual_energy", _PAPER)),
    Quantity("nthr_weight", "NTHR weight", "× advantage", "sequential",
             "NTHR's multiplier of a negative token's advantage (η < 1 where its interference with the positives "
             "exceeds τ, 1 elsewhere)", dump_field="nthr_weights",
             probe=ProbeColumn("interference", "tokens", "nthr_weight"), domain=(0.0, 1.0)),
    Quantity("nthr_score", "NTHR score s⁻", "Σ⟨g⁺, g⁻⟩", "diverging",
             "a negative token's summed head-gradient inner product with the group's positive tokens (> 0: "
             "pushing it down pushes the positives down)", dump_field="nthr_scores",
             probe=ProbeColumn("interference", "tokens", "nthr_score")),
    Quantity("entropy", "entropy", "nats", "sequential",
             "−Σ p log p of the next-token distribution at this position (rollout batch: the trainer's no-grad "
             "forward, at the sampling temperature; probe set: that checkpoint, at temperature 1)",
             dump_field="token_entropies",
             probe=ProbeColumn(_SCORES, "tokens", "entropy")),
    Quantity("shared", "shared / unique", "", "categorical",
             "shared: a response of the other sign in the group has the same tokens up to and including this one "
             "(resrl_analysis.displacement.shared_prefix_mask); unique: the rest",
             categories=(("1", "shared prefix"), ("0", "unique")), builtin="shared"),
]


def get_quantity(key: str) -> Quantity:
    """The registered quantity named ``key`` (KeyError naming the known ones otherwise)."""
    for q in QUANTITIES:
        if q.key == key:
            return q
    raise KeyError(f"unknown quantity {key!r}; known: {', '.join(q.key for q in QUANTITIES)}")


def register(quantity: Quantity) -> Quantity:
    """Add ``quantity`` to the page's list (replacing one with the same key, in place); returns it."""
    for i, q in enumerate(QUANTITIES):
        if q.key == quantity.key:
            QUANTITIES[i] = quantity
            return quantity
    QUANTITIES.append(quantity)
    return quantity


def unregister(key: str) -> None:
    """Remove the quantity named ``key`` (tests register toy ones)."""
    QUANTITIES[:] = [q for q in QUANTITIES if q.key != key]
