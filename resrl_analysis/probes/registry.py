"""The one registry of probes, in the style of the algorithms' (:func:`resrl_analysis.advantages.register`).

A probe is a subclass of :class:`Probe` that declares, once:

- ``name`` and a one-line ``summary`` (the ``--probes`` choice, the CLI help, the docs' probe table);
- ``result``: its result class (:class:`~resrl_analysis.results.ProbeResult`; ``load_results`` reads it back)
  and ``table``, the directory it is saved under (default: ``name``);
- ``scope``: ``"groups"`` (runs on each batch of probe groups, from the shared teacher-forced forward),
  ``"checkpoint"`` (runs once per checkpoint with the model, e.g. sampling) or ``"pairs"`` (runs once per pass,
  across checkpoints, from other probes' results: ``uses``);
- ``needs``: what it reads from the shared forward (a subset of :data:`NEEDS`);
- ``Options``: a dataclass of typed fields with help text (``metadata["help"]``), which become ``resrl probe``
  flags (``rank`` → ``--rank``);
- ``live``: whether it can run inside a training run (``ProbeCallback``), and then ``live_metrics``;
  ``live_default``: whether a ``ProbeCallback`` runs it when not told which probes (False for a costly one);
- ``plan``: its memory-plan terms (bytes) from shapes alone (:class:`resrl_analysis.plan.PlanInputs`).

It implements the hooks of its scope: :meth:`Probe.on_groups`, :meth:`Probe.on_checkpoint`,
:meth:`Probe.finish`; under ``torchrun`` each rank runs them on its share of the groups and rank 0 combines the
shares with :meth:`Probe.merge_ranks` (default: the tables stacked in the probe set's group order) before
``on_checkpoint`` (``groups`` scope) or as the checkpoint's result (``checkpoint`` scope). Registering is one
decorator; the runner (``resrl probe``), the memory plan, the TRL callback,
:func:`~resrl_analysis.results.load_results`, the CLI help and docs/PROBES.md loop over :data:`REGISTRY`.

    >>> from resrl_analysis.probes import REGISTRY
    >>> list(REGISTRY)[:3], REGISTRY["interference"].needs >= {"gram"}
    (['lld', 'entropy', 'first_order'], True)
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ..results import RESULT_TYPES, ProbeResult, register_result

if TYPE_CHECKING:  # annotations only: the plan and the probes do not import each other at run time
    from torch import nn

    from ..plan import PlanInputs
    from ..probe_sets import ProbeSet
    from .capture import GroupForward
    from .config import ProbeConfig
    from .parallel import Parallel, WholeModelJobs

__all__ = [
    "NEEDS",
    "SCOPES",
    "CheckpointContext",
    "FinishContext",
    "GroupsContext",
    "NoOptions",
    "Probe",
    "REGISTRY",
    "get_probe",
    "option",
    "option_fields",
    "probe_table",
    "register_probe",
    "resolve_probes",
    "unregister_probe",
]

Scope = Literal["groups", "checkpoint", "pairs"]

#: The scopes a probe can run at.
SCOPES: dict[str, str] = {
    "groups": "each batch of probe groups, at each checkpoint, from the shared forward",
    "checkpoint": "once per checkpoint, with the model (e.g. sampling)",
    "pairs": "once per pass, across checkpoints (pairs of steps), from other probes' results",
}

#: What a probe may need from the shared teacher-forced forward of a group.
NEEDS: dict[str, str] = {
    "logp": "token log-probs and entropy (always computed)",
    "hidden": "head inputs and penultimate states (G, T, d), kept until the batch's probes are done",
    "logits": "response logits (G, T, V) in the model's dtype, kept likewise",
    "gram": "the group's shared head-gradient Gram (N, N); implies hidden and logits",
    "entropy_gram": "the Gram's entropy part (N, N), built in the Gram's pass over the vocabulary; implies gram",
    "tokenizer": "the checkpoint's tokenizer (decoding samples)",
}


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A field of a probe's ``Options`` dataclass: its default and help text (``metadata`` may add ``metavar``,
    ``choices``, ``csv`` (comma-separated list of this type) or ``positive``/``non_negative`` checks).

    >>> @dataclass(frozen=True)
    ... class Opt:
    ...     eps: float = option(0.0, "threshold")
    >>> dataclasses.fields(Opt)[0].metadata["help"]
    'threshold'
    """
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class NoOptions:
    """The options of a probe that has none."""


# ----------------------------------------------------------------------------- contexts


@dataclass
class GroupsContext:
    """What :meth:`Probe.on_groups` gets: one batch of groups at one checkpoint.

    ``forwards`` are the batch's shared teacher-forced forwards (one per group, kept with what the pass's
    probes ``need``); ``probe_set`` the batch's groups; ``all_groups`` the pass's whole probe set (a choice
    such as "the first 4 groups" is made on it, so it does not depend on the batching); ``full_model`` whether
    the costly whole-model parts run at this step (``--full-model-steps``). ``whole_model``: None, or (a model
    sharded with FSDP2 across ranks) where a probe defers what needs the whole model's gradient of one group
    (:class:`~resrl_analysis.probes.parallel.WholeModelJobs`): it runs after the batches, with every rank.
    """

    model: nn.Module
    probe_set: ProbeSet
    forwards: Sequence[GroupForward]
    step: int
    seed: int
    full_model: bool
    all_groups: ProbeSet
    config: ProbeConfig
    whole_model: WholeModelJobs | None = None


@dataclass
class CheckpointContext:
    """What :meth:`Probe.on_checkpoint` gets: one checkpoint, after all its group batches.

    ``tokenizer`` is None unless some probe of the pass needs one; ``steps`` are every step of the pass. Under
    ``torchrun`` a ``checkpoint``-scope probe runs on every rank with ``probe_set`` this rank's share of the groups
    and ``all_groups`` the pass's whole probe set (a setting read from the groups, such as the longest response,
    is taken from it); ``parallel`` says how the ranks hold the model (a sharded model's forwards are collectives).
    """

    model: nn.Module
    tokenizer: Any
    probe_set: ProbeSet
    step: int
    steps: Sequence[int]
    seed: int
    config: ProbeConfig
    all_groups: ProbeSet | None = None
    parallel: Parallel | None = None

    @property
    def groups(self) -> ProbeSet:
        """The pass's whole probe set (``all_groups``, else ``probe_set``)."""
        return self.all_groups if self.all_groups is not None else self.probe_set


@dataclass
class FinishContext:
    """What :meth:`Probe.finish` gets: the results finished so far (a probe's ``uses`` come first), by table."""

    results: Mapping[str, ProbeResult]
    steps: Sequence[int]
    config: ProbeConfig
    full_model_steps: Sequence[int] = ()


# ----------------------------------------------------------------------------- the base class


class Probe:
    """Base of every probe; subclass it, declare the class attributes, implement the hooks of its scope and
    decorate it with :func:`register_probe`. An instance holds one pass's options (``self.options``)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    result: ClassVar[type[ProbeResult]] = ProbeResult
    table: ClassVar[str] = ""
    scope: ClassVar[Scope] = "groups"
    needs: ClassVar[frozenset[str]] = frozenset()
    uses: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = NoOptions
    live: ClassVar[bool] = False
    live_default: ClassVar[bool] = True
    #: The setting that shrinks this probe's memory, named when the memory plan refuses a pass.
    plan_hint: ClassVar[str] = "a shorter probe set"

    def __init__(self, options: Any = None) -> None:
        self.options = self.Options() if options is None else options
        if not isinstance(self.options, self.Options):
            raise TypeError(f"probe {self.name!r}: options must be {self.Options.__name__}, got "
                            f"{type(self.options).__name__}")

    # -- hooks -------------------------------------------------------------------------------------

    def plan(self, p: PlanInputs) -> dict[str, int]:
        """Working memory (bytes) of this probe beside the kept groups, by part, at the plan's shapes."""
        return {}

    def active_at(self, step: int, steps: Sequence[int]) -> bool:
        """Whether this probe runs at checkpoint ``step`` of a pass over ``steps`` (default: at every one)."""
        return True

    def on_groups(self, ctx: GroupsContext) -> ProbeResult | None:
        """``scope="groups"``: the result of one batch of groups."""
        raise NotImplementedError(f"probe {self.name!r} declares scope 'groups' but has no on_groups")

    def on_checkpoint(self, ctx: CheckpointContext, parts: Sequence[ProbeResult]) -> ProbeResult | None:
        """The checkpoint's result: from its group batches' ``parts`` (default: stacked), or, for
        ``scope="checkpoint"``, computed here with the model."""
        return self.result.concat(parts) if parts else None

    def merge_ranks(self, parts: Sequence[ProbeResult], order: Mapping[int, int]) -> ProbeResult:
        """One checkpoint's results of disjoint shares of the groups (gathered from the ranks under ``torchrun``) as
        the one result one process would have made: by default stacked, rows in the probe set's group order
        (``order``: group id → position, :func:`~resrl_analysis.probes.parallel.in_group_order`). A probe whose
        result pools across groups in a way ``on_checkpoint`` does not redo overrides it (``diversity``: pass@k)."""
        from .parallel import in_group_order

        return in_group_order(self.result.concat(parts), order)

    def finish(self, ctx: FinishContext, parts: Sequence[ProbeResult]) -> ProbeResult:
        """The pass's result from the checkpoints' ``parts`` (default: stacked; empty with a reason when no
        checkpoint ran this probe)."""
        if parts:
            return self.result.concat(parts)
        return self.result.empty({"skipped": [{"reason": f"no checkpoint selected by --{self.name}-steps"}]})

    def live_metrics(self, results: Mapping[str, ProbeResult], step: int) -> dict[str, float]:
        """Headline numbers (``probe/...``) at ``step`` from the pass's results so far, for a live run's logger."""
        return {}


# ----------------------------------------------------------------------------- the registry

#: Every registered probe by name, in registration order (the built-ins first).
REGISTRY: dict[str, type[Probe]] = {}


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of an options dataclass (each becomes a flag)."""
    return list(dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else []


def _field_key(f: dataclasses.Field) -> tuple:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return (str(f.type), repr(default), f.metadata.get("help"))


def register_probe(cls: type[Probe]) -> type[Probe]:
    """Class decorator adding a probe to :data:`REGISTRY` (a toy probe in a test registers the same way).

    Checks the declarations: a known scope and needs, a result class, a dataclass of options whose fields
    have help text and do not clash with another probe's field of the same name (two probes may share an
    option only when both declare it identically, e.g. the subspace ``rank``), and ``uses`` naming
    registered probes.
    """
    name = cls.name
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"probe {cls.__name__}: name must be a non-empty identifier, got {name!r}")
    if name in REGISTRY and REGISTRY[name] is not cls:
        raise ValueError(f"probe {name!r} is already registered ({REGISTRY[name].__name__})")
    if cls.scope not in SCOPES:
        raise ValueError(f"probe {name!r}: scope must be one of {list(SCOPES)}, got {cls.scope!r}")
    unknown = sorted(set(cls.needs) - set(NEEDS))
    if unknown:
        raise ValueError(f"probe {name!r}: unknown needs {unknown}; choose from {list(NEEDS)}")
    if not (isinstance(cls.result, type) and issubclass(cls.result, ProbeResult) and cls.result.KIND):
        raise ValueError(f"probe {name!r}: result must be a ProbeResult subclass with a KIND")
    if not cls.summary:
        raise ValueError(f"probe {name!r}: a one-line summary is required (CLI help, docs)")
    if cls.scope == "pairs" and not cls.uses:
        raise ValueError(f"probe {name!r}: a 'pairs' probe works from other probes' results; declare them in uses")
    if cls.Options is not NoOptions and not dataclasses.is_dataclass(cls.Options):
        raise ValueError(f"probe {name!r}: Options must be a dataclass")
    for f in option_fields(cls.Options):
        if not f.metadata.get("help"):
            raise ValueError(f"probe {name!r}: option {f.name!r} has no help text (use registry.option)")
        for other in REGISTRY.values():
            if other is cls:
                continue
            for g in option_fields(other.Options):
                if g.name == f.name and _field_key(g) != _field_key(f):
                    raise ValueError(f"probe {name!r}: option {f.name!r} clashes with probe {other.name!r}'s "
                                     "(same name, another type, default or help)")
    if not cls.table:
        cls.table = name
    if "entropy_gram" in cls.needs:
        cls.needs = frozenset(cls.needs) | {"gram"}
    cls.needs = frozenset(cls.needs) | ({"hidden", "logits"} if "gram" in cls.needs else frozenset())
    register_result(cls.result)
    REGISTRY[name] = cls
    return cls


def unregister_probe(name: str) -> None:
    """Remove a probe from :data:`REGISTRY` (tests that register a toy one clean up with it)."""
    if any(name in p.uses for n, p in REGISTRY.items() if n != name):
        raise ValueError(f"probe {name!r} is used by another registered probe")
    cls = REGISTRY.pop(name, None)
    if cls is not None and all(p.result is not cls.result for p in REGISTRY.values()):
        RESULT_TYPES.pop(cls.result.KIND, None)


def get_probe(name: str) -> type[Probe]:
    """The registered probe ``name`` (ValueError listing the known ones otherwise).

    >>> get_probe("lld").uses
    ('entropy',)
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown probe {name!r}; choose from {','.join(REGISTRY)}")
    return REGISTRY[name]


def resolve_probes(names: Iterable[str]) -> list[str]:
    """``names`` and every probe they use, each once, a probe after those it uses (registration order
    otherwise).

    >>> resolve_probes(["lld", "interference"])
    ['entropy', 'lld', 'interference']
    """
    want: list[str] = []

    def add(n: str) -> None:
        cls = get_probe(n)
        for u in cls.uses:
            if u not in REGISTRY:
                raise ValueError(f"probe {n!r} uses {u!r}, which is not registered")
            add(u)
        if n not in want:
            want.append(n)

    for n in sorted(set(names), key=list(REGISTRY).index if set(names) <= set(REGISTRY) else str):
        add(n)
    return want


def probe_table() -> str:
    """The Markdown table of the registered probes (docs/PROBES.md holds this table; a test keeps them equal).

    >>> probe_table().splitlines()[0]
    '| probe | runs | needs | result (table) | options | live | what it measures |'
    """
    lines = ["| probe | runs | needs | result (table) | options | live | what it measures |",
             "|---|---|---|---|---|---|---|"]
    for name, cls in REGISTRY.items():
        implied = {"hidden", "logits"} if "gram" in cls.needs else set()  # the Gram is built from them
        implied |= {"gram"} if "entropy_gram" in cls.needs else set()
        needs = ", ".join(sorted(cls.needs - {"logp"} - implied)) or "log-probs"
        if cls.uses:
            needs = f"results of {', '.join(cls.uses)}"
        opts = ", ".join(f"`--{f.name.replace('_', '-')}`" for f in option_fields(cls.Options)) or "-"
        scope = {"groups": "per group batch", "checkpoint": "per checkpoint", "pairs": "per checkpoint pair"}
        lines.append(f"| `{name}` | {scope[cls.scope]} | {needs} | `{cls.result.__name__}` (`{cls.table}/`) | "
                     f"{opts} | {'yes' if cls.live else 'no'} | {cls.summary} |")
    return "\n".join(lines) + "\n"


def instantiate(names: Sequence[str], options: Mapping[str, Any] | None = None) -> dict[str, Probe]:
    """One instance per probe of ``names`` (with their dependencies), with ``options[name]`` or the defaults."""
    options = options or {}
    return {n: get_probe(n)(options.get(n)) for n in resolve_probes(names)}


def probe_options_from(values: Mapping[str, Any], names: Iterable[str] | None = None) -> dict[str, Any]:
    """Each probe's ``Options`` built from a flat mapping of option values (a parsed namespace's ``vars``);
    fields not in ``values`` keep their defaults.

    >>> probe_options_from({"eps": 0.5}, ["lld"])["lld"].eps
    0.5
    """
    out = {}
    for n in (REGISTRY if names is None else resolve_probes(names)):
        cls = get_probe(n)
        kw = {f.name: values[f.name] for f in option_fields(cls.Options) if values.get(f.name) is not None}
        out[n] = cls.Options(**kw)
    return out


# Typing helper used by the options' validation (kept here so every probe validates the same way).
def check_positive(owner: str, **values: int | float) -> None:
    """Raise ValueError naming the flag when a value is not positive."""
    for k, v in values.items():
        if not v > 0:
            raise ValueError(f"--{k.replace('_', '-')} must be positive, got {v} ({owner})")


_ = typing  # (typing is used by subclasses' annotations resolved at run time)
