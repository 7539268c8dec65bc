"""Experiment trackers that mirror ``metrics.jsonl``: TensorBoard, Weights & Biases, Trackio, MLflow.

``report_to`` (a :class:`trainer.config.TrainConfig` field, named as in TRL) lists the trackers; each one's
package is imported only when it is named, and a missing package is a :class:`LoggerUnavailable` (a
``ConfigError``: exit code 2 on the command line) raised before the first step, never a silent skip.
``metrics.jsonl`` is always written; the trackers are mirrors of it.

Every tracker gets the same scalars (finite numbers; ``None``, strings and booleans are left out) under the
names of docs/METRICS.md, at the optimizer step.

- ``tensorboard``: events in ``RUN_DIR/tb`` (on resume, events after the checkpoint are purged).
- ``wandb``: project ``$WANDB_PROJECT`` (default ``resrl``), run name = the run directory's name, files in
  ``$WANDB_DIR`` or else the run directory; ``WANDB_MODE=offline`` works without a network.
- ``trackio``: project ``$TRACKIO_PROJECT`` (default ``resrl``), run name = the run directory's name.
- ``mlflow``: the tracking URI of ``$MLFLOW_TRACKING_URI`` (MLflow's default: ``./mlruns``), experiment
  ``$MLFLOW_EXPERIMENT_NAME`` (default ``resrl``); the run's settings are logged as parameters.

>>> import tempfile
>>> run = Path(tempfile.mkdtemp())
>>> [type(x).__name__ for x in make_loggers(["tensorboard"], run)]
['TensorBoardLogger']
>>> try:
...     check_available(["no-such-tracker"])
... except LoggerUnavailable as e:
...     print(e)
report_to: unknown logger 'no-such-tracker'; choose from tensorboard, wandb, trackio, mlflow, none
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from resrl_analysis.rundir import TENSORBOARD
from trainer.config import REPORT_TO, ConfigError

__all__ = ["Logger", "LoggerUnavailable", "check_available", "make_loggers", "scalars"]

#: report_to name -> (module that must import, pip package to install)
_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
    "mlflow": ("mlflow", "mlflow"),
}


class LoggerUnavailable(ConfigError):
    """A tracker named in ``report_to`` cannot be used (its package is missing); the message says what to install."""


class Logger(Protocol):
    """What :class:`trainer.metrics_log.MetricsLog` calls: ``log`` once per step, ``close`` once."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numeric entries of one metrics line, without ``step`` (what the trackers receive).

    >>> scalars({"step": 3, "reward/mean": 0.5, "resrl/weight_mean": None, "x": float("nan"), "ok": True})
    {'reward/mean': 0.5}
    """
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def check_available(report_to: Sequence[str]) -> None:
    """Raise :class:`LoggerUnavailable` naming the package to install if a named tracker cannot be imported.

    >>> check_available(["none"])
    """
    for name in report_to:
        if name not in REPORT_TO:
            raise LoggerUnavailable(f"report_to: unknown logger {name!r}; choose from {', '.join(REPORT_TO)}")
        if name == "none":
            continue
        module, package = _PACKAGES[name]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken install
            found = False
        if not found:
            raise LoggerUnavailable(f"report_to={list(report_to)} needs the {package} package, which is not "
                                    f"installed: pip install {package} (or drop {name!r} from report_to)")


def make_loggers(
    report_to: Sequence[str],
    run_dir: str | Path,
    *,
    config: dict[str, Any] | None = None,
    start_step: int = 0,
) -> list[Logger]:
    """One started tracker per name in ``report_to`` (``none`` gives none).

    Args:
        report_to: tracker names (:data:`trainer.config.REPORT_TO`).
        run_dir: the run directory (TensorBoard writes ``tb/`` in it; it names the run elsewhere).
        config: the run's settings, recorded by wandb, trackio (as the run config) and MLflow (as parameters).
        start_step: steps already done (resume).
    """
    check_available(report_to)
    run = Path(run_dir)
    makers = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger, "trackio": TrackioLogger,
              "mlflow": MlflowLogger}
    out: list[Logger] = []
    try:
        for name in dict.fromkeys(report_to):
            if name != "none":
                out.append(makers[name](run, config=config or {}, start_step=start_step))
    except Exception:
        for lg in out:  # do not leave half the trackers open
            lg.close()
        raise
    return out


class TensorBoardLogger:
    """Scalars to ``RUN_DIR/tb`` through ``torch.utils.tensorboard``."""

    def __init__(self, run: Path, *, config: dict[str, Any], start_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run re-does the steps after its checkpoint; drop their old events.
        self._w = SummaryWriter(str(run / TENSORBOARD), purge_step=start_step + 1 if start_step else None)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self._w.add_scalar(k, v, step)

    def close(self) -> None:
        self._w.close()


class WandbLogger:
    """A Weights & Biases run (``WANDB_MODE=offline`` writes it locally)."""

    def __init__(self, run: Path, *, config: dict[str, Any], start_step: int = 0) -> None:
        import wandb

        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "resrl"), name=run.name, config=config,
            # explicit every time: wandb reads its environment once per process, at the first init
            dir=os.environ.get("WANDB_DIR") or str(run),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        import wandb

        self._run.finish()
        # finish() can return before wandb's service process has written the run file (offline runs read right
        # after a run ended came back empty about one time in three); teardown waits for the service to exit.
        wandb.teardown()


class TrackioLogger:
    """A Trackio run (wandb-like API, local by default)."""

    def __init__(self, run: Path, *, config: dict[str, Any], start_step: int = 0) -> None:
        import trackio

        self._trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "resrl"), name=run.name, config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._trackio.log(metrics, step=step)

    def close(self) -> None:
        self._trackio.finish()


class MlflowLogger:
    """An MLflow run; the settings become its parameters."""

    def __init__(self, run: Path, *, config: dict[str, Any], start_step: int = 0) -> None:
        import mlflow

        self._mlflow = mlflow
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "resrl"))
        self._run = mlflow.start_run(run_name=run.name)
        if config:
            mlflow.log_params({k: str(v)[:500] for k, v in config.items()})  # MLflow caps parameter length

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self._mlflow.end_run()
