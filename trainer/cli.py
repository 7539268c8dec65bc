"""The ``resrl`` command line: train, probe, figures, compare, view, study, demo (also ``python -m trainer``).

A leaf: it may import both halves (``resrl_analysis`` never imports ``trainer``). Each subcommand's
implementation is imported only when that subcommand runs, so ``resrl --help`` starts fast and
``resrl probe`` does not load the trainer. An unknown option is an error that suggests the closest one
(:func:`trainer.cli_args.parse_args`, shared with ``resrl train``).

>>> build_parser().prog
'resrl'
>>> try:
...     main(["train", "--num-generation", "4"])
... except SystemExit as e:
...     print("exit", e.code)
exit 2
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from trainer.cli_args import parse_args

__all__ = ["build_parser", "main", "parse_args"]

# subcommand -> (module, add-arguments function, run function, one-line help)
_SUBCOMMANDS: dict[str, tuple[str, str, str, str]] = {
    "train": ("trainer.train_cli", "add_train_arguments", "run_train",
              "train a policy (GRPO, PSR, NSR, W-REINFORCE, NTHR, ResRL)"),
    "probe": ("resrl_analysis.probes.runner", "add_probe_arguments", "run_probe",
              "run the probes over a run's checkpoints"),
    "figures": ("resrl_analysis.figures", "add_figures_arguments", "run_figures",
                "draw the paper-style figures"),
    "compare": ("resrl_analysis.compare", "add_compare_arguments", "run_compare",
                "summarise runs by algorithm and seed: means with 95% intervals, differences, verdicts"),
    "view": ("resrl_analysis.view.cli", "add_view_arguments", "run_view",
             "one self-contained HTML page of the runs' tokens, coloured, with the numbers on hover"),
    "study": ("trainer.study", "add_study_arguments", "run_study",
              "is it the projection? ResRL, its 4 controls, W-REINFORCE, NSR, PSR over 5 seeds (about 60-90 min)"),
    "demo": ("trainer.demo", "add_demo_arguments", "run_demo",
             "the main job: train 5 algorithms (PSR the control) over 3 seeds, probe, summarise with intervals, draw"),
}


def _load(name: str) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
    module, add, run, _ = _SUBCOMMANDS[name]
    mod = importlib.import_module(module)
    return getattr(mod, add), getattr(mod, run)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's implementation is imported.

    >>> sorted(build_parser()._subparsers._group_actions[0].choices)
    ['compare', 'demo', 'figures', 'probe', 'study', 'train', 'view']
    """
    parser = argparse.ArgumentParser(
        prog="resrl",
        description="Gradient-interference diagnostics for LLM RL, and a GRPO-family trainer with ResRL.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(_SUBCOMMANDS) + "}")
    for name, (_, _, _, help_) in _SUBCOMMANDS.items():
        # help= is %-formatted by argparse (the list of subcommands), description= is not: "95%" needs escaping once.
        p = sub.add_parser(name, help=help_.replace("%", "%%"), description=help_,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name == command:
            add, _ = _load(name)
            add(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``resrl`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in _SUBCOMMANDS:
        command = None
    parser = build_parser(command)
    args = parse_args(parser, argv, command)
    if args.command is None:
        parser.print_help()
        return 2
    _, run = _load(args.command)
    # Every subcommand loads models; "Loading weights 0%...100%" in a log file or a pipe is noise.
    from resrl_analysis.checkpoints import quiet_progress_bars_unless_tty

    quiet_progress_bars_unless_tty()
    return int(run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
