"""``resrl train``: the command line of the trainer (a subcommand of the ``resrl`` dispatcher, trainer/cli.py).

    resrl train --preset tiny|qwen3-1.7b-math|qwen3-4b-math [--config FILE.yaml]
                [--algorithm grpo|psr|nsr|w-reinforce|nthr|resrl] [--steps N] [--micro-batch-size M]
                [--seed S] [--output-dir DIR] [--save-every K] [--resume] [--set KEY=VALUE ...]
                [--<any TrainConfig field> VALUE ...]

Every :class:`~trainer.config.TrainConfig` field is a flag (``--lr 1e-4``, ``--n 4``, ``--micro-batch-size 8``;
``--field_name`` works too), generated from the dataclass with its help text; booleans take ``--flag``,
``--flag false`` or ``--no-flag``; lists take several values or one comma-separated value. The TRL and verl
names of :data:`~trainer.config.ALIASES` are accepted as well (``--learning_rate``, ``--num_generations``,
``--actor_rollout_ref.rollout.n``), also as ``--set`` and YAML keys. Precedence: preset < ``--config`` file
< flags < ``--set``; a flag not given leaves the file's value alone. ``--resume`` without
``--preset``/``--config`` continues with the run directory's own ``config.yaml``. Errors (bad settings,
bad data, a run that diverged) print one line and exit with a non-zero code; nothing is written when the
input is bad.

>>> import argparse
>>> p = argparse.ArgumentParser(prog="resrl train")
>>> add_train_arguments(p)
>>> args = p.parse_args(["--preset", "tiny", "--steps", "4", "--set", "lr=1e-3"])
>>> resolve_config(args).lr, resolve_config(args).steps
(0.001, 4)
>>> cfg = resolve_config(p.parse_args(["--learning_rate", "1e-4", "--n", "4", "--no-dump-rollouts"]))
>>> cfg.lr, cfg.n, cfg.dump_rollouts
(0.0001, 4, False)
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import typing
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resrl_analysis.rundir import CONFIG
from trainer.cli_args import parse_args
from trainer.config import (
    ALGORITHM_NAMES,
    ALIASES,
    PRESETS,
    ConfigError,
    TrainConfig,
    canonical_keys,
    config_from_sources,
)

if TYPE_CHECKING:
    from trainer.tasks import Task

__all__ = ["add_train_arguments", "main", "resolve_config", "run_train"]

#: Fields set by the hand-written flags below, not by a generated one.
_HAND_WRITTEN_FIELDS = ("preset", "resume", "resume_from")


def _default(f: Field) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


def _type_name(typ: Any) -> str:
    return getattr(typ, "__name__", str(typ)).replace("typing.", "")


def _aliases_of(name: str) -> list[str]:
    return [a for a, target in ALIASES.items() if target == name]


def _settings_epilog() -> str:
    hints = typing.get_type_hints(TrainConfig)
    lines = ["every setting, as a key of --set KEY=VALUE or of a --config YAML file (each is also a flag above; "
             "defaults are the tiny preset's):", ""]
    for f in fields(TrainConfig):
        other = _aliases_of(f.name)
        also = f"; also {', '.join(other)}" if other else ""
        lines.extend(textwrap.wrap(f"{f.name} ({_type_name(hints[f.name])}, default {_default(f)!r}{also})",
                                   width=100, initial_indent="  ", subsequent_indent="      "))
    overridden = {name: sorted(p) for name, p in PRESETS.items() if p}
    lines += ["", "presets (overrides of the defaults above):"]
    for name, keys in overridden.items():
        vals = ", ".join(f"{k}={PRESETS[name][k]!r}" for k in keys)
        lines.extend(textwrap.wrap(f"{name}: {vals}", width=100, initial_indent="  ", subsequent_indent="      "))
    return "\n".join(lines)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``resrl train`` options to ``parser`` (its ``--help`` then documents every setting)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = "Train a policy with a GRPO-family algorithm (GRPO, PSR, NSR, W-REINFORCE, NTHR, ResRL)."
    parser.epilog = _settings_epilog()
    parser.usage = ("%(prog)s [--preset NAME] [--config FILE.yaml] [--resume | --resume-from STEP] "
                    "[--set KEY=VALUE ...] [--<setting> VALUE ...]")
    parser.allow_abbrev = False  # `--lr` must never silently mean `--lr-schedule`
    # ---------------------------------------------------------------- hand-written flags
    # Flags that are not a TrainConfig field, or behave differently from the generated ones. Add new ones
    # here: a generated flag is skipped when one of its option strings is already taken.
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="starting settings (default: tiny; with --resume: the run's own config.yaml)")
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="YAML mapping of settings (any subset; a run's config.yaml gives every one)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output-dir from its latest complete checkpoint up to --steps")
    parser.add_argument("--resume-from", dest="resume_from", type=int, default=None, metavar="STEP",
                        action=_ResumeFrom,
                        help="continue the run in --output-dir from its checkpoint step_STEP (implies --resume); later "
                             "checkpoints, rollouts and metrics lines are moved into RUN_DIR/superseded/<UTC time>/")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="set any setting listed below (repeatable), e.g. --set lr=1e-4; applied last")
    # ---------------------------------------------------------------- one flag per TrainConfig field
    _add_field_flags(parser.add_argument_group(
        "settings (one flag per setting; a flag not given keeps the preset's or the --config file's value)"))


class _ResumeFrom(argparse.Action):
    """``--resume-from STEP`` is a ``--resume`` too (so the run's own config.yaml is used, as with --resume)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.resume = True


class _BoolFlag(argparse.Action):
    """``--flag`` (true), ``--flag VALUE`` (true/false/yes/no/1/0, as HfArgumentParser) and ``--no-flag``."""

    def __init__(self, option_strings: list[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", **kw)
        self.negative = {o for o in option_strings if o == f"--no-{dest.replace('_', '-')}"}

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if option_string in self.negative:
            if values is not None:
                parser.error(f"{option_string} takes no value")
            values = False
        setattr(namespace, self.dest, True if values is None else values)


class _ListFlag(argparse.Action):
    """Several values, or one comma-separated (or ``[a, b]``) value, handed to the config's list parsing."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values[0] if len(values) == 1 else list(values))


def _add_field_flags(group: Any) -> None:
    taken = set(group._option_string_actions)  # shared with the parser: the hand-written flags are in it
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name in _HAND_WRITTEN_FIELDS:
            continue
        typ = hints[f.name]
        origin, args = typing.get_origin(typ), typing.get_args(typ)
        if origin is typing.Union and type(None) in args:  # Optional[X]: the config parses "null"/"none"
            typ = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(typ), typing.get_args(typ)
        dashed = f"--{f.name.replace('_', '-')}"
        names = [n for n in dict.fromkeys([dashed, f"--{f.name}"]) if n not in taken]
        if dashed not in names:
            continue  # a hand-written flag owns this setting
        other = _aliases_of(f.name)
        also = f" Also {', '.join('--' + a for a in other)}." if other else ""
        help_ = f"{f.metadata['help'].rstrip('.')} (default {_default(f)!r}).{also}".replace("%", "%%")
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS)  # absent unless given
        if typ is bool:
            kw.update(action=_BoolFlag, metavar="BOOL")
            names.append(f"--no-{f.name.replace('_', '-')}")
        elif origin is list:
            kw.update(action=_ListFlag, nargs="*", metavar=_type_name(args[0] if args else str).upper())
        elif origin is typing.Literal:
            kw.update(choices=[str(a) for a in args])
        elif f.name == "algorithm":
            kw.update(choices=ALGORITHM_NAMES)
        else:
            kw.update(metavar=_type_name(typ).upper())
        # Values stay strings here: TrainConfig converts them (one place, errors name the setting).
        group.add_argument(*names, help=help_, **kw)
        taken.update(names)
        hidden = dict(kw, help=argparse.SUPPRESS)
        for alias in other:
            spellings = [f"--{alias}"] + ([] if "." in alias else [f"--{alias.replace('_', '-')}"])
            spellings = [n for n in dict.fromkeys(spellings) if n not in taken]
            if spellings:
                group.add_argument(*spellings, **hidden)
                taken.update(spellings)


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` the parsed arguments describe (raises :class:`ConfigError`)."""
    given = vars(args)
    overrides: dict[str, Any] = {}
    for f in fields(TrainConfig):
        # Generated flags leave their setting out of the namespace unless given (argparse.SUPPRESS).
        if f.name not in _HAND_WRITTEN_FIELDS and given.get(f.name) is not None:
            overrides[f.name] = given[f.name]
    if args.resume:
        overrides["resume"] = True
    if args.resume_from is not None:
        overrides["resume_from"] = args.resume_from
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        # one item at a time, to our names first: a later --set (any spelling) wins over flags and earlier ones
        overrides.update(canonical_keys({key.strip().replace("-", "_"): value}, "--set"))
    yaml_path = args.config
    out_dir = overrides.get("output_dir")
    if args.resume and yaml_path is None and args.preset is None and out_dir:
        saved = Path(out_dir) / CONFIG
        if saved.is_file():
            yaml_path = str(saved)
    return config_from_sources(args.preset, yaml_path, overrides)


def run_train(args: argparse.Namespace, *, task: Task | None = None) -> int:
    """Run ``resrl train`` for parsed arguments; returns the exit code (0 ok, 2 bad input, 1 failed run: diverged,
    or a write to the run directory failed). ``task``: as :func:`trainer.loop.train`'s (a task of your own)."""
    from trainer.checkpointing import CheckpointError
    from trainer.loggers import check_available
    from trainer.metrics_log import RunWriteError
    from trainer.tasks import DataError

    try:
        cfg = resolve_config(args)
        check_available(cfg.report_to)  # a missing tracker package stops the run before anything is written
    except ConfigError as exc:
        print(f"resrl train: error: {exc}", file=sys.stderr)
        return 2
    from resrl_analysis.distributed import exit_if_launched
    from trainer.loop import SetupError, TrainingDiverged, train

    try:
        run_dir = train(cfg, task=task)
    except (ConfigError, DataError, SetupError) as exc:
        print(f"resrl train: error: {_one_line(exc)}", file=sys.stderr)
        return exit_if_launched(2)
    except (TrainingDiverged, CheckpointError, RunWriteError) as exc:
        print(f"resrl train: error: {_one_line(exc)}", file=sys.stderr)
        return exit_if_launched(1)
    print(f"run directory: {run_dir}")
    return exit_if_launched(0)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def main(argv: list[str] | None = None, *, task: Task | None = None) -> int:
    """``python -m trainer.train_cli [train options]`` (the same as ``resrl train [train options]``).

    ``task``: train on this task instead of the one the settings name (a script of your own that takes the
    ``resrl train`` options; see :func:`trainer.loop.train`)."""
    parser = argparse.ArgumentParser(prog="resrl train")
    add_train_arguments(parser)
    return run_train(parse_args(parser, sys.argv[1:] if argv is None else argv), task=task)


if __name__ == "__main__":
    raise SystemExit(main())
