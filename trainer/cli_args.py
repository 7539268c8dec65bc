"""Command-line parsing shared by the ``resrl`` dispatcher (trainer/cli.py) and ``resrl train`` (trainer/train_cli.py).

A leaf (standard library only), so that neither command line imports the other: an unknown option is an
error that names the closest known one, as argparse's own errors exit with status 2.

>>> import argparse
>>> p = argparse.ArgumentParser(prog="demo")
>>> _ = p.add_argument("--num-generations")
>>> parse_args(p, ["--num-generations", "4"]).num_generations
'4'
"""

from __future__ import annotations

import argparse
import difflib

__all__ = ["parse_args"]


def _subparser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    if command is not None and parser._subparsers is not None:
        for action in parser._subparsers._group_actions:
            choices = getattr(action, "choices", None) or {}
            if command in choices:
                return choices[command]
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str], command: str | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, but an unrecognised option names the closest known one
    (``--num-generation 4`` → "did you mean --num-generations?"); exits with status 2 as argparse does.

    ``command``: the subcommand whose options an unknown one is compared with (a parser with subparsers).
    """
    args, extra = parser.parse_known_args(argv)
    if extra:
        target = _subparser(parser, command)
        known = list(target._option_string_actions)
        parts = []
        for item in extra:
            flag = item.split("=", 1)[0]
            close = difflib.get_close_matches(flag, known, n=1) if flag.startswith("-") else []
            parts.append(f"{item} (did you mean {close[0]}?)" if close else item)
        target.error(f"unrecognized arguments: {' '.join(parts)}")
    return args
