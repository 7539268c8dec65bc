"""``resrl train``: the command line of the trainer (wired into ``resrl`` by ``resrl_analysis.cli``).

    resrl train --preset tiny|qwen3-1.7b-math|qwen3-4b-math [--config FILE.yaml]
                [--algorithm grpo|psr|nsr|w-reinforce|nthr|resrl] [--steps N] [--micro-batch-size M]
                [--seed S] [--output-dir DIR] [--save-every K] [--resume] [--model PATH] [--set KEY=VALUE ...]

Precedence: preset < ``--config`` file < flags < ``--set``. ``--resume`` without ``--preset``/``--config``
continues with the run directory's own ``config.yaml``. Errors (bad settings, bad data, a run that
diverged) print one line and exit with a non-zero code; nothing is written when the input is bad.

>>> import argparse
>>> p = argparse.ArgumentParser(prog="resrl train")
>>> add_train_arguments(p)
>>> args = p.parse_args(["--preset", "tiny", "--steps", "4", "--set", "lr=1e-3"])
>>> resolve_config(args).lr, resolve_config(args).steps
(0.001, 4)
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from trainer.config import ALGORITHM_NAMES, PRESETS, ConfigError, TrainConfig, config_from_sources

__all__ = ["add_train_arguments", "main", "resolve_config", "run_train"]

# Flag -> config field, for the flags of the contract (DESIGN §4) plus --model.
_FLAGS = {
    "algorithm": "algorithm", "steps": "steps", "micro_batch_size": "micro_batch_size", "seed": "seed",
    "output_dir": "output_dir", "save_every": "save_every", "model": "model", "resume_from": "resume_from",
}


def _settings_epilog() -> str:
    hints = typing.get_type_hints(TrainConfig)
    lines = ["every setting (give any with --set KEY=VALUE, or in a --config YAML file; defaults are the tiny "
             "preset's):", ""]
    for f in fields(TrainConfig):
        typ = hints[f.name]
        tname = getattr(typ, "__name__", str(typ)).replace("typing.", "")
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {f.name} ({tname}, default {default!r})")
        lines.extend(textwrap.wrap(f.metadata["help"], width=96, initial_indent="      ",
                                   subsequent_indent="      "))
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
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="starting settings (default: tiny; with --resume: the run's own config.yaml)")
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="YAML mapping of settings (any subset; a run's config.yaml gives every one)")
    parser.add_argument("--algorithm", choices=ALGORITHM_NAMES, default=None, help="advantage estimator")
    parser.add_argument("--steps", type=int, default=None, help="total optimizer steps of the run")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="responses per forward/backward on one rank (does not change the update)")
    parser.add_argument("--seed", type=int, default=None, help="seed of data order, sampling and ResRL draws")
    parser.add_argument("--output-dir", default=None, help="run directory (default runs/<preset>-<algorithm>-seed<S>)")
    parser.add_argument("--save-every", type=int, default=None, help="checkpoint every K optimizer steps")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output-dir from its latest complete checkpoint up to --steps")
    parser.add_argument("--resume-from", type=int, default=None, metavar="STEP", action=_ResumeFrom,
                        help="continue the run in --output-dir from its checkpoint step_STEP (implies --resume); later "
                             "checkpoints, rollouts and metrics lines are moved into RUN_DIR/superseded/<UTC time>/")
    parser.add_argument("--model", default=None, help="policy: a local HF model directory or tiny-warmstart")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="set any setting listed below (repeatable), e.g. --set lr=1e-4")


class _ResumeFrom(argparse.Action):
    """``--resume-from STEP`` is a ``--resume`` too (so the run's own config.yaml is used, as with --resume)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.resume = True


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` the parsed arguments describe (raises :class:`ConfigError`)."""
    overrides: dict[str, Any] = {}
    for flag, name in _FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[name] = value
    if args.resume:
        overrides["resume"] = True
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip().replace("-", "_")] = value
    yaml_path = args.config
    if args.resume and yaml_path is None and args.preset is None and args.output_dir:
        saved = Path(args.output_dir) / "config.yaml"
        if saved.is_file():
            yaml_path = str(saved)
    return config_from_sources(args.preset, yaml_path, overrides)


def run_train(args: argparse.Namespace) -> int:
    """Run ``resrl train`` for parsed arguments; returns the exit code (0 ok, 2 bad input, 1 failed run: diverged,
    or a write to the run directory failed)."""
    from trainer.checkpointing import CheckpointError
    from trainer.metrics_log import RunWriteError
    from trainer.tasks import DataError

    try:
        cfg = resolve_config(args)
    except ConfigError as exc:
        print(f"resrl train: error: {exc}", file=sys.stderr)
        return 2
    from trainer.loop import SetupError, TrainingDiverged, train

    try:
        run_dir = train(cfg)
    except (ConfigError, DataError, SetupError) as exc:
        print(f"resrl train: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (TrainingDiverged, CheckpointError, RunWriteError) as exc:
        print(f"resrl train: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    print(f"run directory: {run_dir}")
    return 0


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def main(argv: list[str] | None = None) -> int:
    """``python -m trainer.cli [train options]``."""
    parser = argparse.ArgumentParser(prog="resrl train")
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
