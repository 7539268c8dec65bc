"""The typed configuration of a probe pass (:class:`ProbeConfig`) and the ``resrl probe`` flags made from it.

Every field of :class:`ProbeConfig` and of each registered probe's ``Options`` dataclass is one flag, generated
from the field (its type, default and help text), the way ``resrl train`` makes one flag per ``TrainConfig``
field. The core never sees an ``argparse.Namespace``: :func:`config_from_args` turns one into a
:class:`ProbeConfig` at the command line's edge.

    >>> import argparse
    >>> p = add_probe_arguments(argparse.ArgumentParser(prog="resrl probe"))
    >>> cfg = config_from_args(p.parse_args(["runs/tiny", "--probes", "lld,subspace", "--rank", "8"]))
    >>> cfg.probes, cfg.options["subspace"].rank, cfg.options["lld"].eps
    (['lld', 'subspace'], 8, 0.0)
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ProbeError
from ..probe_sets import PROBE_SET_KEYWORDS
from .registry import REGISTRY, get_probe, option_fields, probe_options_from, resolve_probes

__all__ = ["ProbeConfig", "add_probe_arguments", "config_from_args", "config_to_argv", "probe_set_keyword",
           "steps_spec"]


def _f(default: Any, help: str, **metadata: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class ProbeConfig:
    """Every setting of a probe pass besides the probes' own options (``options``: probe name → its
    ``Options``; missing ones take their defaults). Validated on construction (``ProbeError``, one line).

    >>> ProbeConfig(paths=[Path("runs/a")], probes=["lld"]).groups
    8
    """

    paths: list[Path] = _f([], "a run directory (ours: checkpoints/step_XXXXXX; TRL: checkpoint-N/; verl: "
                           "global_step_N/actor/huggingface/), a single HF checkpoint directory, or several checkpoint "
                           "directories in order", positional="RUN_DIR")
    checkpoints: list[Path] | None = _f(None, "an ordered, comma-separated list of HF checkpoint directories "
                                        "(instead of RUN_DIR)", csv=Path, metavar="A,B,C")
    base_model: Path | None = _f(None, "the starting policy, probed as step 0, for runs that did not save it "
                                 "(TRL, verl, lists)", metavar="PATH")
    out: Path | None = _f(None, "output directory (default: RUN_DIR/probes)")
    probes: list[str] = _f([], "comma-separated probes to run (see below; default: all)", csv=str, default_all=True)
    steps: list[int] | None = _f(None, "checkpoint steps to probe, e.g. 0,10,20 (default: every complete checkpoint)",
                                 csv=int, exclusive="selection")
    every: int | None = _f(None, "probe every K-th checkpoint step (the first and the last always)", metavar="K",
                           exclusive="selection")
    probe_set_step: int = _f(0, "take the probe set from RUN_DIR/rollouts/step_S.jsonl (default 0: what the "
                             "starting policy sampled)", metavar="S")
    probe_set: Path | None = _f(
        None, "a probe set instead: 'heldout' (the run's held-out prompts, RUN_DIR/prompts/heldout.jsonl, each with "
        "its reference response plus --probe-set-samples responses of the step-0 policy), 'train' (the training "
        "pool, likewise), 'batch' (each step's own rollout dump between its checkpoint and the next: in-batch LLD "
        "offline; lld only), or a file: our rollout dump, a JSONL (one prompt per line: prompt, responses, "
        "rewards[, ground_truth]), a TRL completions parquet, a verl rollout JSONL, or an RLVR dataset "
        "(JSONL/parquet, sampled with --base-model); default: the run's first rollout/completion dump",
        metavar="heldout|train|batch|FILE")
    probe_set_samples: int | None = _f(None, "responses sampled per prompt for the heldout/train probe sets "
                                       "(default: the run's group size n)", metavar="N")
    rescore: bool = _f(False, "recompute a logged probe set's rewards with the task's reward wherever it has a ground "
                       "truth (default: the logged reward, what the run optimised)")
    strict_tokens: bool = _f(False, "refuse a probe set with any response scored from unverifiable text (logged text "
                             "whose token ids cannot be known to be the ones the model sampled)")
    max_completion_length: int | None = _f(None, "the run's response length limit, for probe sets logged as text: a "
                                           "response of that many tokens ended by length and gets no EOS (default: "
                                           "TRL's, from its training_args.bin; verl: data.max_response_length)",
                                           metavar="N")
    groups: int = _f(8, "probe the first N prompt groups, mixed ones first (default 8; 0 = all)", metavar="N")
    group_batch: int = _f(8, "groups forwarded and probed together (default 8); peak memory grows with it: each "
                          "group keeps its response logits (G·T·V in the model's dtype) and two hidden states until "
                          "its probes are done", metavar="G")
    full_model_steps: str = _f("ends", "where to run the autograd whole-model gradient cosine and real whole-model "
                               "SGD step: 'ends' (first and last probed checkpoint, default), 'all', 'none', or steps "
                               "'0,10'", metavar="SPEC")
    samples: int = _f(8, "responses sampled per prompt for pass@k (default 8)", metavar="N")
    temperature: float = _f(1.0, "sampling temperature (default 1.0)")
    max_new_tokens: int | None = _f(None, "sampling length limit (default: the longest probe response)", metavar="M")
    seed: int = _f(0, "seed of sampling, sub-sampling and randomized SVD (default 0)")
    device: str = _f("auto", "cpu, cuda, cuda:1, ... or auto (default)")
    dtype: str = _f("auto", "model dtype: auto (the checkpoint's), float32, bfloat16, float16, float64")
    threads: int = _f(0, "CPU threads for torch; 0 = auto (default): 1 for a model under 50M parameters on CPU, "
                      "where threading overhead and contention on a shared machine cost more than they give, else "
                      "torch's default", metavar="N")
    memory_budget: str | None = _f(None, "memory the probes may use on each device (each rank's under torchrun), e.g. "
                                   "80GB or 512MiB (default: the device's total, or the host's available memory on "
                                   "CPU); the plan picks the group batching (and replica or shard) to fit it and "
                                   "refuses when nothing fits", metavar="SIZE")
    plan_only: bool = _f(False, "print the memory plan for the probe set's shapes and exit; needs only config.json "
                         "(and a tokenizer for a text probe set), so a model can be planned for before downloading "
                         "its weights; with --nproc N, per rank for N ranks")
    nproc: int = _f(1, "processes on this machine: N > 1 runs this command under `python -m torch.distributed.run "
                    "--standalone --nproc_per_node=N` (one rank per GPU; on CPU, give each --threads); the groups are "
                    "split across the ranks and rank 0 writes. Under torchrun itself (several machines: its own "
                    "flags) the ranks are torchrun's", metavar="N")
    parallel: str = _f("auto", "how several ranks hold the model: 'replica' (a whole copy each, the groups split "
                       "across the ranks), 'shard' (FSDP2 across the ranks, for a model whose copy does not fit one "
                       "device), or 'auto' (default: replica when the memory plan says it fits, else shard)",
                       choices=("auto", "replica", "shard"))
    format: str = _f("parquet", "table format (default parquet)", choices=("parquet", "csv"))
    no_progress: bool = _f(False, "no progress bar (none either when stderr is not a terminal)")
    quiet: bool = _f(False, "print nothing but errors (no memory plan, no closing line)")
    options: dict[str, Any] = field(default_factory=dict, metadata={"flag": False})

    def __post_init__(self) -> None:
        self.paths = [Path(p) for p in self.paths]
        self.probes = list(self.probes) or list(REGISTRY)
        unknown = sorted(set(self.probes) - set(REGISTRY))
        if unknown:
            raise ProbeError(f"unknown probes {unknown}; choose from {','.join(REGISTRY)}")
        for name in ("groups", "samples", "group_batch"):
            if getattr(self, name) < (0 if name == "groups" else 1):
                raise ProbeError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ProbeError(f"--max-completion-length must be >= 1, got {self.max_completion_length}")
        if self.every is not None and self.every < 1:
            raise ProbeError(f"--every must be >= 1, got {self.every}")
        if self.steps is not None and self.every is not None:
            raise ProbeError("--steps and --every exclude each other")
        if self.nproc < 1:
            raise ProbeError(f"--nproc must be >= 1, got {self.nproc}")
        if self.parallel not in ("auto", "replica", "shard"):
            raise ProbeError(f"--parallel must be auto, replica or shard, got {self.parallel!r}")
        if self.format not in ("parquet", "csv"):
            raise ProbeError(f"--format must be parquet or csv, got {self.format!r}")
        # Every probe of the pass gets its options (the given ones, else the defaults), validated by their class.
        opts = dict(self.options)
        for n in resolve_probes(self.probes):
            cls = get_probe(n)
            if opts.get(n) is None:
                opts[n] = cls.Options()
            elif not isinstance(opts[n], cls.Options):
                raise ProbeError(f"options of probe {n!r} must be {cls.Options.__name__}, got {type(opts[n]).__name__}")
        self.options = opts

    def option(self, probe: str) -> Any:
        """The options of ``probe`` (its defaults when it is not part of this pass)."""
        return self.options.get(probe) or get_probe(probe).Options()

    def to_dict(self) -> dict[str, Any]:
        """Flat, JSON-able: every setting and every option of the pass's probes (``summary.json``'s ``options``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        for o in self.options.values():
            out.update({f.name: getattr(o, f.name) for f in option_fields(type(o))})
        return out


def steps_spec(spec: str, steps: list[int]) -> set[int]:
    """The steps a spec selects: ``ends`` (first and last), ``all``, ``none`` or comma-separated steps.

    >>> sorted(steps_spec("ends", [0, 5, 10])), sorted(steps_spec("5,7", [0, 5, 10]))
    ([0, 10], [5])
    """
    if spec == "all":
        return set(steps)
    if spec == "none":
        return set()
    if spec == "ends":
        return {steps[0], steps[-1]} if steps else set()
    try:
        want = {int(x) for x in spec.split(",") if x.strip()}
    except ValueError:
        raise ProbeError(f"bad step spec {spec!r}: use ends, all, none or comma-separated steps") from None
    return want & set(steps)


# ----------------------------------------------------------------------------- flags from fields


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _base_type(typ: Any) -> Any:
    if typing.get_origin(typ) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return args[0]
    return typ


def _add_field(target: Any, f: dataclasses.Field, typ: Any, groups: dict[str, Any]) -> None:
    md = f.metadata
    help_ = md["help"].replace("%", "%%")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    if md.get("positional"):
        target.add_argument(f.name, metavar=md["positional"], type=Path, nargs="*", help=help_)
        return
    if md.get("exclusive"):
        if md["exclusive"] not in groups:
            groups[md["exclusive"]] = target.add_mutually_exclusive_group()
        target = groups[md["exclusive"]]
    base = _base_type(typ)
    kw: dict[str, Any] = {"dest": f.name, "help": help_}
    if base is bool:
        kw.update(action="store_true", default=default)
    elif md.get("csv"):
        kw.update(type=_csv(md["csv"]), default=None if md.get("default_all") else default)
    else:
        kw.update(type=base if base in (int, float, Path) else str, default=default)
    if "metavar" in md:
        kw["metavar"] = md["metavar"]
    if "choices" in md:
        kw["choices"] = list(md["choices"])
    target.add_argument(f"--{f.name.replace('_', '-')}", **kw)


def add_probe_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``resrl probe`` flags to ``parser`` (a sub-command parser) and return it: one per
    :class:`ProbeConfig` field, then one per option of each registered probe (an option two probes share is
    one flag).

    >>> p = add_probe_arguments(argparse.ArgumentParser(prog="resrl probe"))
    >>> a = p.parse_args(["runs/tiny", "--steps", "0,10", "--probes", "lld,subspace"])
    >>> a.steps, a.probes, a.groups, a.full_model_steps
    ([0, 10], ['lld', 'subspace'], 8, 'ends')
    """
    parser.description = ("Run the probes over a run's checkpoints (or over one Hugging Face checkpoint) and write "
                          "their tables and summary.json under RUN_DIR/probes (or --out).")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _epilog()
    hints = typing.get_type_hints(ProbeConfig)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(ProbeConfig):
        if f.metadata.get("flag", True):
            _add_field(parser, f, hints[f.name], groups)
    seen: set[str] = set()
    for cls in REGISTRY.values():
        fields_ = [f for f in option_fields(cls.Options) if f.name not in seen]
        if not fields_:
            continue
        # An option several probes share is listed once, under all of their names.
        mine = {f.name for f in fields_}
        owners = [n for n, c in REGISTRY.items() if mine & {g.name for g in option_fields(c.Options)}]
        group = parser.add_argument_group(f"{' and '.join(owners)} probe options")
        opt_hints = typing.get_type_hints(cls.Options)
        for f in fields_:
            _add_field(group, f, opt_hints[f.name], groups)
            seen.add(f.name)
    return parser


def _epilog() -> str:
    width = max((len(n) for n in REGISTRY), default=0) + 2
    lines = ["probes (--probes):"]
    for name, cls in REGISTRY.items():
        lines += textwrap.wrap(cls.summary, width=100, initial_indent=f"  {name.ljust(width)}",
                               subsequent_indent=" " * (width + 2))
    return "\n".join(lines) + "\n\n" + _EXAMPLES


_EXAMPLES = (
    "examples:\n"
    "  resrl probe runs/tiny                              all probes, every checkpoint\n"
    "  resrl probe runs/tiny --every 5 --probes lld,interference\n"
    "  resrl probe my-hf-model/ --probe-set probes.jsonl  a checkpoint not written by the trainer;\n"
    "      probes.jsonl: one JSON object per prompt with prompt, responses, rewards (and ground_truth)\n"
    "\n"
    "runs the trainer did not write (docs/FOREIGN_RUNS.md):\n"
    "  resrl probe out/grpo --base-model BASE --probe-set out/grpo/completions/completions_00001.parquet\n"
    "      a TRL output directory (checkpoint-N/ is step N); BASE, the starting policy, is probed as step 0\n"
    "  resrl probe ckpts --base-model BASE --probe-set rollout_data/\n"
    "      a verl checkpoint directory (global_step_N/actor/: merged huggingface/ or raw FSDP shards)\n"
    "  resrl probe out/checkpoint-50 out/checkpoint-100 --base-model BASE\n"
    "      a list of checkpoints, in this order (or --checkpoints A,B,C); outputs in their parent's probes/\n"
    "\n"
    "several GPUs (docs/FOREIGN_RUNS.md):\n"
    "  torchrun --nproc_per_node=8 -m resrl_analysis.probes.runner runs/tiny   (or: resrl probe runs/tiny --nproc 8)\n"
    "      groups split across the ranks, the model copied or sharded with FSDP2 (--parallel); rank 0 writes\n"
)


def config_from_args(args: argparse.Namespace | Mapping[str, Any]) -> ProbeConfig:
    """The :class:`ProbeConfig` (with every probe's options) of parsed ``resrl probe`` arguments.

    Options of a probe are built by its ``Options`` class, whose validation errors become one ``ProbeError``
    line naming the flag.
    """
    values = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    probes = values.get("probes") or list(REGISTRY)
    try:
        options = probe_options_from(values, [p for p in probes if p in REGISTRY])
    except ValueError as e:
        raise ProbeError(str(e)) from None
    kw = {f.name: values[f.name] for f in dataclasses.fields(ProbeConfig)
          if f.name in values and f.name != "options"}
    kw["probes"] = probes
    return ProbeConfig(**kw, options=options)



def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def _flag_value(v: Any) -> str:
    return ",".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)


def config_to_argv(config: ProbeConfig) -> list[str]:
    """The ``resrl probe`` arguments that give ``config`` back (what ``--nproc`` hands to each rank): the paths, then
    every setting and probe option that differs from its default.

    >>> cfg = ProbeConfig(paths=[Path("runs/a")], probes=["lld"], steps=[0, 2], quiet=True,
    ...                   options={"lld": get_probe("lld").Options(eps=0.5)})
    >>> argv = config_to_argv(cfg)
    >>> argv
    ['runs/a', '--probes', 'lld', '--steps', '0,2', '--quiet', '--eps', '0.5']
    >>> p = add_probe_arguments(argparse.ArgumentParser(prog="resrl probe"))
    >>> config_from_args(p.parse_args(argv)) == cfg
    True
    """
    argv = [str(p) for p in config.paths]
    for f in dataclasses.fields(ProbeConfig):
        if not f.metadata.get("flag", True) or f.metadata.get("positional"):
            continue
        v = getattr(config, f.name)
        if f.name != "probes" and v == _default(f):
            continue
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(v, bool):
            argv += [flag] if v else []
        elif v is not None:
            argv += [flag, _flag_value(v)]
    seen: set[str] = set()
    for opts in config.options.values():
        for f in option_fields(type(opts)):
            v = getattr(opts, f.name)
            if f.name in seen or v == _default(f):
                continue
            seen.add(f.name)
            flag = f"--{f.name.replace('_', '-')}"
            argv += ([flag] if v else []) if isinstance(v, bool) else [flag, _flag_value(v)]
    return argv


def probe_set_keyword(config: ProbeConfig) -> str | None:
    """``heldout``/``train``/``batch`` when ``probe_set`` names one (and no file of that name exists), else None.

    >>> probe_set_keyword(ProbeConfig(probe_set=Path("heldout"))), probe_set_keyword(ProbeConfig())
    ('heldout', None)
    """
    ps = config.probe_set
    return str(ps) if ps is not None and str(ps) in PROBE_SET_KEYWORDS and not Path(ps).exists() else None
