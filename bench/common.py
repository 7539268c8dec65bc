"""Shared pieces of the benchmarks: machine description, timing, peak memory, the table, RESULTS.md.

Peak memory on CPU. PyTorch's CPU allocator keeps no statistics, so every memory figure is the peak resident
set size of a *fresh subprocess* that runs one side of one comparison. The worker resets the kernel's
high-water mark (``echo 5 > /proc/self/clear_refs``, Linux ≥ 4.0) once its inputs exist and reports
``VmHWM − VmRSS at the reset``: the memory the measured computation added on top of its inputs. Workers run
with ``MALLOC_MMAP_THRESHOLD_=131072`` so that glibc serves every large tensor from ``mmap`` and returns it on
free; without it glibc's adaptive threshold keeps freed chunks of up to 32 MB in its heap and RSS reflects
fragmentation rather than live tensors. Where ``clear_refs`` is not writable, the fallback is
``getrusage(RUSAGE_SELF).ru_maxrss`` minus the RSS before the computation (an upper bound).

On CUDA the figure is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BENCH_DIR",
    "REPO_ROOT",
    "RESULTS_PATH",
    "RESULT_PREFIX",
    "Row",
    "PeakRSS",
    "WorkerError",
    "current_rss_mb",
    "emit_result",
    "fmt_bytes_mb",
    "fmt_ratio",
    "fmt_seconds",
    "machine_info",
    "machine_line",
    "markdown_table",
    "median_time",
    "memory_method",
    "run_worker",
    "update_results_section",
]

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_PATH = BENCH_DIR / "RESULTS.md"
RESULT_PREFIX = "BENCH_RESULT "
"""Workers print one line ``BENCH_RESULT {json}``; :func:`run_worker` parses it."""

WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


# ----------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model, usable cores, memory, Python/torch/transformers versions, UTC date; GPU name if any.

    >>> sorted(machine_info())[:3]
    ['cores', 'cpu', 'date']
    """
    import torch

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a dependency
        tf_version = "absent"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    mem_gib = (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / 2**30
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def machine_line(info: dict[str, Any] | None = None) -> str:
    """One line describing the machine, for RESULTS.md."""
    m = info or machine_info()
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    return (
        f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), {m['memory_gib']} GiB{gpu}; "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}"
    )


# ----------------------------------------------------------------------------- timing


def median_time(
    fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1, sync: Callable[[], None] | None = None
) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls; also all the times.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock read.

    >>> med, ts = median_time(lambda: None, repeats=3)
    >>> len(ts), med >= 0
    (3, True)
    """
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


# ----------------------------------------------------------------------------- memory


def _proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB (``VmRSS``; 0 where /proc is missing)."""
    kb = _proc_status_kb("VmRSS")
    return (kb or 0) / 1024


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux ``clear_refs``); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_method() -> str:
    """How :class:`PeakRSS` measures on this machine (for the report)."""
    if _proc_status_kb("VmHWM") is not None and reset_peak_rss():
        return (
            "peak RSS of a fresh subprocess per side: VmHWM after resetting it (clear_refs) minus VmRSS at the "
            "reset, glibc MALLOC_MMAP_THRESHOLD_=131072"
        )
    return "peak RSS of a fresh subprocess per side: ru_maxrss minus RSS before the computation (upper bound)"


class PeakRSS:
    """Context manager: peak RSS added by the enclosed code, in MiB (``.peak_mb`` after exit).

    >>> import mmap
    >>> with PeakRSS() as m:  # fresh anonymous pages: a heap allocation may reuse pages already resident
    ...     x = mmap.mmap(-1, 64 * 2**20)
    ...     for i in range(0, len(x), 4096):
    ...         x[i] = 1
    >>> m.peak_mb > 32 or not m.exact
    True
    """

    def __init__(self) -> None:
        self.base_mb = 0.0
        self.peak_mb = 0.0
        self.exact = False

    def __enter__(self) -> PeakRSS:
        self.exact = reset_peak_rss() and _proc_status_kb("VmHWM") is not None
        self.base_mb = current_rss_mb()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.exact:
            hwm = (_proc_status_kb("VmHWM") or 0) / 1024
        else:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        self.peak_mb = max(0.0, hwm - self.base_mb)


# ----------------------------------------------------------------------------- subprocess workers


class WorkerError(RuntimeError):
    """A benchmark worker subprocess failed or printed no result."""


def emit_result(payload: dict[str, Any]) -> None:
    """Print the worker's result line (read back by :func:`run_worker`)."""
    print(RESULT_PREFIX + json.dumps(payload), flush=True)


def run_worker(module: str, args: Sequence[str], *, timeout: float = 600.0, env: dict[str, str] | None = None,
               malloc_env: bool = True, python: str | None = None) -> dict[str, Any]:
    """Run ``python -m module *args`` in a fresh process at the repo root; return its result dict.

    ``malloc_env`` applies the memory-measuring glibc settings (``WORKER_ENV``); leave it off for timing
    runs (with it every large temporary is a fresh ``mmap`` whose page faults are slow on small VMs).
    ``python`` is the interpreter (default: this one), e.g. another virtual environment's.
    Raises :class:`WorkerError` with the tail of its output when it fails.
    """
    full_env = {**os.environ, **(WORKER_ENV if malloc_env else {}), **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [python or sys.executable, "-m", module, *args],
        cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stdout + proc.stderr)[-3000:]
    raise WorkerError(f"worker {module} {' '.join(args)} exited {proc.returncode} without a result:\n{tail}")


# ----------------------------------------------------------------------------- formatting and the table


def fmt_seconds(s: float | None) -> str:
    """Human time: ``12.3 ms``, ``4.56 s``; ``-`` for None.

    >>> fmt_seconds(0.01234), fmt_seconds(4.561), fmt_seconds(2e-5)
    ('12.3 ms', '4.56 s', '20.0 µs')
    """
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1.0:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def fmt_bytes_mb(mb: float | None) -> str:
    """``123 MiB`` or ``1.23 GiB``; ``-`` for None.

    >>> fmt_bytes_mb(12.3), fmt_bytes_mb(2048)
    ('12.3 MiB', '2.00 GiB')
    """
    if mb is None:
        return "-"
    if mb >= 1024:
        return f"{mb / 1024:.2f} GiB"
    return f"{mb:.1f} MiB" if mb < 100 else f"{mb:.0f} MiB"


def fmt_ratio(r: float | None) -> str:
    """``123×``, ``1.23×``, ``0.123×``; ``-`` for None.

    >>> fmt_ratio(1234.5), fmt_ratio(1.234), fmt_ratio(0.1234)
    ('1234×', '1.23×', '0.123×')
    """
    if r is None:
        return "-"
    if r >= 100:
        return f"{r:.0f}×"
    if r >= 1:
        return f"{r:.2f}×"
    return f"{r:.3f}×"


@dataclass
class Row:
    """One line of the results table: a measured comparison and its verdict.

    ``status`` is ``met``, ``missed``, ``info`` (no target) or ``not measured``; ``note`` says why.
    """

    benchmark: str
    setting: str
    ours: str = "-"
    reference: str = "-"
    ratio: str = "-"
    target: str = "-"
    status: str = "info"
    note: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable when ``data`` is)."""
        return asdict(self)


_COLUMNS = ("Benchmark", "Setting", "Ours", "Reference", "Ratio", "Target", "Status", "Note")


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a GitHub markdown table.

    >>> print(markdown_table([Row("x", "y", status="met")]).splitlines()[2])
    | x | y | - | - | - | - | met |  |
    """

    def cell(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "|".join("---" for _ in _COLUMNS) + "|"]
    for r in rows:
        vals = (r.benchmark, r.setting, r.ours, r.reference, r.ratio, r.target, r.status, r.note)
        lines.append("| " + " | ".join(cell(v) for v in vals) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- RESULTS.md

_SKELETON = """# Benchmark results

Written by the benchmark scripts: `make bench` (CPU, `bench/run_cpu.py`) rewrites the CPU section (its
"Against TRL" row needs `bench/.venv-trl`, which `bash bench/trl_compare.sh` creates once), and
`bash bench/gpu_bench.sh` (`bench/gpu_bench.py`) the GPU section. Edit outside the marked sections only.
Ratios are measured side by side in one run; a target that is missed says why. Targets (issue 6):
interference ≥ 100× faster than per-sample autograd with equal results; chunked log-prob/entropy peak
memory ≤ 1/8 of full float32 logits; `resrl` step ≤ 1.3× `grpo`; our `grpo` step no slower than TRL's
`GRPOTrainer`; rollout ≥ 3× HF `generate` (GPU).

<!-- BEGIN CPU -->
## CPU

Not measured yet.
<!-- END CPU -->

<!-- BEGIN GPU -->
## GPU

Not measured yet (no GPU in the sessions so far). Run `bash bench/gpu_bench.sh` on a CUDA machine.
<!-- END GPU -->
"""


def update_results_section(section: str, body: str, path: Path = RESULTS_PATH) -> None:
    """Replace the text between ``<!-- BEGIN {section} -->`` and ``<!-- END {section} -->`` in ``path``.

    Creates the file (with both sections) when it is missing; appends the section when the markers are.
    """
    text = path.read_text() if path.exists() else _SKELETON
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
