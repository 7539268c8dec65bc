"""One paper style and one colour per algorithm, fixed across every figure."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib

if os.environ.get("DISPLAY", "") == "" and "MPLBACKEND" not in os.environ:
    matplotlib.use("Agg")  # headless machines (CI, the GPU box) have no display

import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

__all__ = ["ALGORITHM_COLORS", "ALGORITHM_ORDER", "color_for", "line_styles", "paper_style", "save_figure", "new_axes"]

_palette = sns.color_palette("colorblind", 10)
ALGORITHM_ORDER = ["grpo", "psr", "nsr", "w-reinforce", "nthr", "resrl", "resrl-shuffled", "resrl-uniform",
                   "resrl-own-state", "shared-mask", "base"]
ALGORITHM_COLORS: dict[str, tuple[float, float, float]] = {
    "grpo": _palette[0],
    "psr": _palette[2],
    "nsr": _palette[3],
    "w-reinforce": _palette[4],
    "nthr": _palette[8],
    "resrl": _palette[1],
    # ResRL's controls (docs/MATH.md § Controls of ResRL): colours of their own, apart from ResRL's
    "resrl-shuffled": (0.10, 0.55, 0.55),
    "resrl-uniform": (0.50, 0.30, 0.10),
    "resrl-own-state": _palette[9],
    "shared-mask": (0.25, 0.25, 0.25),
    "base": (0.45, 0.45, 0.45),
}
_extra = sns.color_palette("dark", 10)


def color_for(label: str) -> tuple[float, float, float]:
    """The fixed colour of an algorithm (or a stable one for any other label).

    >>> color_for("resrl") == ALGORITHM_COLORS["resrl"]
    True
    >>> color_for("my-run") == color_for("my-run")
    True
    """
    key = str(label).lower()
    if key in ALGORITHM_COLORS:
        return ALGORITHM_COLORS[key]
    if key.startswith("step "):  # a checkpoint of no one algorithm ("step 0: all"): the neutral grey
        return ALGORITHM_COLORS["base"]
    for name in sorted(ALGORITHM_ORDER, key=len, reverse=True):  # "resrl-seed1" keeps ResRL's colour
        if key.startswith(name):
            return ALGORITHM_COLORS[name]
    return _extra[sum(map(ord, key)) % len(_extra)]


def line_styles(labels: Sequence[str]) -> dict[str, dict[str, object]]:
    """Colour, line style and marker per label, distinguishable even where labels share a colour.

    Labels of one colour ("step 0" and "step 40" of one run, "resrl-a" and "resrl-b") keep it and
    differ in line style and marker, in the order given.

    >>> s = line_styles(["step 0", "step 40"])
    >>> s["step 0"]["color"] == s["step 40"]["color"], s["step 0"]["linestyle"] != s["step 40"]["linestyle"]
    (True, True)
    """
    dashes = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    shared: dict[tuple, int] = {}
    out: dict[str, dict[str, object]] = {}
    for lab in dict.fromkeys(labels):
        key = str(lab).lower()
        # checkpoints of one run ("step 0", "step 40") are one curve family: one colour for all
        color = color_for("base") if key.startswith("step ") else color_for(lab)
        i = shared.get(color, 0)
        shared[color] = i + 1
        out[lab] = {"color": color, "linestyle": dashes[i % len(dashes)], "marker": markers[i % len(markers)]}
    return out


def order_labels(labels: Sequence[str]) -> list[str]:
    """Labels in the canonical algorithm order, others after, alphabetically.

    >>> order_labels(["resrl", "zeta", "grpo"])
    ['grpo', 'resrl', 'zeta']
    >>> order_labels(["step 40", "step 0", "step 4"])  # numbers in labels compare as numbers
    ['step 0', 'step 4', 'step 40']
    >>> order_labels(["resrl, seed 0", "grpo, seed 0"])  # an algorithm's name leading a label ranks it
    ['grpo, seed 0', 'resrl, seed 0']
    """
    rank = {n: i for i, n in enumerate(ALGORITHM_ORDER)}
    longest_first = sorted(ALGORITHM_ORDER, key=len, reverse=True)

    def algo_rank(s: str) -> int:  # "resrl, seed 0" and "resrl-b" sort with resrl, as color_for colours them
        key = s.lower()
        if key in rank:
            return rank[key]
        return next((rank[n] for n in longest_first if key.startswith(n)), len(rank))

    def natural(s: str) -> list:
        return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s.replace(" ", "")) if t]

    return sorted(dict.fromkeys(labels), key=lambda s: (algo_rank(str(s)), natural(str(s))))


@contextmanager
def paper_style() -> Iterator[None]:
    """Seaborn paper context with white grid, restored on exit (but not the interactive mode).

    >>> with paper_style():
    ...     pass
    """
    rc = {"figure.dpi": 110, "savefig.bbox": "tight", "axes.spines.top": False, "axes.spines.right": False}
    interactive = matplotlib.is_interactive()
    try:
        with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.2), plt.rc_context(rc):
            try:
                yield
            finally:
                # Jupyter's inline backend turns interactive mode on with the first figure; restoring the
                # rcParams must not switch it off again, or later figures are never shown.
                interactive = matplotlib.is_interactive()
    finally:
        matplotlib.interactive(interactive)


def new_axes(ax=None, figsize: tuple[float, float] = (5.0, 3.6)):
    """Return ``ax`` or a fresh one (and its figure)."""
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax


def save_figure(fig, stem: str | Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write ``fig`` as STEM.png and STEM.pdf, each atomically (temp file, then rename).

    Files get the ordinary mode of new files (0666 less the umask, e.g. 0644), like any other output.

    >>> import matplotlib.pyplot as plt, tempfile, pathlib
    >>> fig, _ = plt.subplots(); d = tempfile.mkdtemp()
    >>> [p.suffix for p in save_figure(fig, pathlib.Path(d) / "x")]
    ['.png', '.pdf']
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        target = stem.with_suffix(f".{fmt}")
        # A unique name opened by savefig itself (not mkstemp, which creates files 0600).
        tmp = stem.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            fig.savefig(tmp, format=fmt, dpi=150)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        out.append(target)
    plt.close(fig)
    return out
