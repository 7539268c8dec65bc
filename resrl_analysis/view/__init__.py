"""``resrl view``: one self-contained web page of a run's tokens (docs/VIEW.md).

Every response token of the rollout groups, coloured by a quantity the reader picks (log-prob, Δ log-prob
between two probed checkpoints, token advantage, ResRL ω and residual, NTHR weight, entropy, shared
prefix), with the numbers on hover and keyboard focus, filters, and two runs side by side on the same
prompts. Data and code are inline and the page never reaches the network: open it from disk, show it in
a notebook (:func:`show`) or log it with ``wandb.Html(build_view(run), inject=False)``.

    >>> import tempfile, pathlib
    >>> from resrl_analysis.probes.synthetic import write_fake_run
    >>> run = write_fake_run(tempfile.mkdtemp(), steps=(0, 1))
    >>> page = build_view([run])
    >>> page.startswith("<!doctype html>") and 'id="resrl-view-data"' in page
    True
    >>> write_view([run], pathlib.Path(tempfile.mkdtemp()) / "view.html").stat().st_size > 10_000
    True
"""

from __future__ import annotations

import html as _html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..rundir import atomic_write
from .data import GroupView, ResponseView, RunView, read_run, shared_prefix_lengths
from .page import DEFAULT_BUDGET_MB, choose, page_data, render_html
from .quantities import QUANTITIES, ProbeColumn, Quantity, get_quantity, register, unregister

__all__ = ["build_view", "write_view", "show", "view_data", "read_run", "RunView", "GroupView", "ResponseView",
           "QUANTITIES", "Quantity", "ProbeColumn", "register", "unregister", "get_quantity", "DEFAULT_BUDGET_MB",
           "shared_prefix_lengths", "choose"]

PathLike = str | Path


def view_data(runs: PathLike | Sequence[PathLike], *, steps: Sequence[int] | None = None,
              max_groups: int | None = None, budget_mb: float | None = DEFAULT_BUDGET_MB,
              names: Sequence[str] | None = None, title: str | None = None) -> dict:
    """The page's data blob (a JSON-able dict) for one or more run directories.

    ``steps``: only these steps (rollout dumps and probed checkpoints); ``max_groups``: groups per step at most;
    ``budget_mb``: size budget of the data (None: none); ``names``: the runs' labels (default: folder names).
    """
    paths = [runs] if isinstance(runs, (str, Path)) else list(runs)
    if names is not None and len(names) != len(paths):
        raise ValueError(f"{len(names)} names for {len(paths)} runs")
    labels = list(names) if names is not None else _labels(paths)
    views = [read_run(p, steps=steps, name=n) for p, n in zip(paths, labels)]
    return page_data(views, max_groups=max_groups, budget_mb=budget_mb, title=title)


def _labels(paths: Sequence[PathLike]) -> list[str]:
    # Folder names (the run's, for a probes folder), made unique with their parent's when two share one.
    def name(p: Path) -> str:
        return p.parent.name if (p / "scores" / "meta.json").is_file() else (p.name or str(p))

    names = [name(Path(p).resolve()) for p in paths]
    return [f"{Path(p).parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]


def build_view(runs: PathLike | Sequence[PathLike], **kwargs: Any) -> str:
    """The page as one HTML string (keywords as :func:`view_data`)."""
    return render_html(view_data(runs, **kwargs))


def write_view(runs: PathLike | Sequence[PathLike], out: PathLike, **kwargs: Any) -> Path:
    """Write the page to ``out`` atomically (nothing half-written on failure); returns its path."""
    return atomic_write(Path(out), build_view(runs, **kwargs))


def show(runs: PathLike | Sequence[PathLike], *, height: int = 720, **kwargs: Any) -> Any:
    """The page inline in Jupyter (or VS Code): an ``IPython.display.HTML`` holding it in a ``srcdoc`` iframe, so
    its styles and scripts stay apart from the notebook's and no file or server is needed. Keywords as
    :func:`view_data`.

    >>> show("runs/resrl")  # doctest: +SKIP
    <IPython.core.display.HTML object>
    """
    from IPython.display import HTML

    page = build_view(runs, **kwargs)
    # Wrapped in a div: IPython warns about HTML that starts with <iframe> (it suggests IFrame, which needs a URL).
    return HTML(f'<div><iframe srcdoc="{_html.escape(page, quote=True)}" style="width:100%;height:{int(height)}px;'
                'border:1px solid #ccc" title="resrl view"></iframe></div>')
