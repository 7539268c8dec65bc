"""``resrl view RUN_DIR [RUN_DIR ...] --out FILE.html``: the token-level page of one or more runs.

>>> p = add_view_arguments(argparse.ArgumentParser(prog="resrl view"))
>>> a = p.parse_args(["runs/a", "runs/b", "--steps", "0,4", "--max-groups", "8"])
>>> a.runs, a.steps, a.max_groups, a.max_mb
([PosixPath('runs/a'), PosixPath('runs/b')], [0, 4], 8, 4.0)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import ProbeError
from .page import DEFAULT_BUDGET_MB

__all__ = ["add_view_arguments", "run_view", "main"]


def _steps(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated steps, e.g. 0,4,8; got {text!r}") from None
    if not out or any(s < 0 for s in out):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative steps, got {text!r}")
    return out


def add_view_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``resrl view`` arguments to ``parser`` and return it."""
    parser.description = ("Write one self-contained HTML page (no network access, no server) showing every token of "
                          "the runs' rollout groups, coloured by a quantity you pick, with the numbers on hover.")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  resrl view runs/resrl --out runs/resrl/view.html\n"
        "  resrl view runs/nsr runs/resrl --out view.html     two runs side by side on the same prompts\n"
        "  resrl view out/trl-run                             a TRL or verl run: what `resrl probe` computed\n"
        "What each colour means: docs/VIEW.md.\n"
    )
    a = parser.add_argument
    a("runs", metavar="RUN_DIR", type=Path, nargs="+",
      help="our run directory, a TRL or verl run that `resrl probe` has probed, or a `resrl probe` output directory")
    a("--out", type=Path, default=None, metavar="FILE.html",
      help="where to write the page (default: the first run's view.html)")
    a("--steps", type=_steps, default=None, metavar="0,4,8",
      help="only these steps (rollout dumps and probed checkpoints); default: all of them, within the size budget")
    a("--max-groups", type=int, default=0, metavar="N",
      help="prompt groups per step at most (probe-set groups first, then mixed ones); default 0: no cap but the "
           "size budget")
    a("--max-mb", type=float, default=DEFAULT_BUDGET_MB, metavar="MB",
      help=f"size budget of the embedded data in MB (default {DEFAULT_BUDGET_MB:g}; 0: none): past it the page keeps "
           "fewer groups per step (down to 4), then fewer steps, evenly spaced, and says what it left out")
    a("--title", default=None, help="the page's title (default: the run names)")
    return parser


def run_view(args: argparse.Namespace) -> int:
    """Run ``resrl view`` with parsed arguments: 0, or 2 with a one-line error on bad input."""
    from ..rundir import atomic_write
    from . import view_data
    from .page import describe_values, render_html

    out: Path = args.out or Path(args.runs[0]) / "view.html"
    try:
        if args.max_groups < 0:
            raise ProbeError(f"--max-groups must be >= 0, got {args.max_groups}")
        if args.max_mb < 0:
            raise ProbeError(f"--max-mb must be >= 0, got {args.max_mb}")
        if out.exists() and out.is_dir():
            raise ProbeError(f"{out}: is a directory; --out takes a file name")
        for p in args.runs:
            if not Path(p).exists():
                raise ProbeError(f"{p}: no such run directory")
        data = view_data(args.runs, steps=args.steps, max_groups=args.max_groups or None,
                         budget_mb=args.max_mb or None, title=args.title)
        page = render_html(data)
        atomic_write(out, page)
    except ProbeError as e:
        print(f"resrl view: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"resrl view: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    left = f"; left out: {len(data['meta']['omitted'])} note(s) on the page" if data["meta"]["omitted"] else ""
    print(f"resrl view: wrote {out} ({len(page.encode()) / 1e6:.2f} MB: {describe_values(data)}{left})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m resrl_analysis.view.cli RUN_DIR ...`` (the same as ``resrl view``)."""
    return run_view(add_view_arguments(argparse.ArgumentParser(prog="resrl view")).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
