"""report_to: TensorBoard and wandb (offline) receive what metrics.jsonl holds; missing packages are clear errors.

The trackers' own files are read back with independent readers: TensorBoard's EventAccumulator, and the
wandb run file decoded from its record format (LevelDB-log blocks of wandb's protobuf ``Record``).
"""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest
from trainer_runner import FAST, EasyTask

import trainer.loop as loop
from trainer.cli import main as resrl_main
from trainer.config import ConfigError, TrainConfig, config_from_sources, replace, save_config_yaml
from trainer.loggers import LoggerUnavailable, TensorBoardLogger, check_available, make_loggers
from trainer.metrics_log import MetricsLog, read_metrics

pytestmark = pytest.mark.integration

STEPS = [{"step": 1, "reward/mean": 0.25, "actor/lr": 1e-3, "resrl/weight_mean": None, "note": "x"},
         {"step": 2, "reward/mean": 0.5, "actor/lr": 5e-4, "resrl/weight_mean": float("nan")}]


def tb_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(run_file: Path) -> list:
    """The protobuf records of a ``run-*.wandb`` file: a 7-byte header, then 32 KiB blocks of
    (crc32 u32, length u16, type u8) chunks, type 1 = whole record, 2/3/4 = first/middle/last piece."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and n == 0:
            break
        buf += data[pos : pos + n]
        pos += n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def wandb_history(run_file: Path) -> list[dict]:
    rows = []
    for r in wandb_records(run_file):
        if r.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rows


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "resrl-test")
    (tmp_path / "wandb_dir").mkdir()
    return tmp_path / "wandb_dir"


def test_tensorboard_gets_every_finite_scalar(tmp_path):
    log = MetricsLog(tmp_path, progress=False, report_to=["tensorboard"], log_every=100)
    for rec in STEPS:
        log.log(rec)
    log.close()
    got = tb_scalars(tmp_path / "tb")
    assert got == {"reward/mean": [(1, 0.25), (2, 0.5)], "actor/lr": [(1, pytest.approx(1e-3)),
                                                                     (2, pytest.approx(5e-4))]}
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]  # the file is still written


def test_tensorboard_resume_purges_the_redone_steps(tmp_path):
    log = MetricsLog(tmp_path, progress=False, report_to=["tensorboard"], log_every=100)
    for s in (1, 2, 3):
        log.log({"step": s, "reward/mean": float(s)})
    log.close()
    log = MetricsLog(tmp_path, progress=False, report_to=["tensorboard"], start_step=1, log_every=100)
    for s in (2, 3):
        log.log({"step": s, "reward/mean": 10.0 * s})
    log.close()
    assert tb_scalars(tmp_path / "tb")["reward/mean"] == [(1, 1.0), (2, 20.0), (3, 30.0)]


def test_wandb_offline_gets_every_finite_scalar_and_the_config(tmp_path, wandb_offline):
    run = tmp_path / "my-run"
    run.mkdir()
    save_config_yaml(TrainConfig(report_to=["wandb"], lr=2e-4), run / "config.yaml")
    log = MetricsLog(run, progress=False, log_every=100)  # report_to from the run's config.yaml, as in train()
    for rec in STEPS:
        log.log(rec)
    log.close()
    assert not (run / "tb").exists()  # only wandb was asked for
    (run_file,) = wandb_offline.glob("wandb/offline-run-*/run-*.wandb")
    rows = [{k: v for k, v in r.items() if not k.startswith("_") or k == "_step"} for r in wandb_history(run_file)]
    assert rows == [{"_step": 1, "reward/mean": 0.25, "actor/lr": 1e-3}, {"_step": 2, "reward/mean": 0.5,
                                                                           "actor/lr": 5e-4}]
    (meta,) = [r.run for r in wandb_records(run_file) if r.WhichOneof("record_type") == "run"]
    assert (meta.display_name, meta.project) == ("my-run", "resrl-test")
    config = {i.key: json.loads(i.value_json) for i in meta.config.update}
    assert config["lr"] == 2e-4 and config["report_to"] == ["wandb"]


def test_training_run_reports_to_tensorboard_and_wandb(tmp_path, wandb_offline, monkeypatch):
    # The real loop, unchanged: MetricsLog finds report_to in the config.yaml the loop writes first.
    run = loop.train(TrainConfig(**FAST, algorithm="grpo", steps=2, save_every=2, output_dir=str(tmp_path / "r"),
                                 report_to=["tensorboard", "wandb"]), task=EasyTask())
    lines = read_metrics(run / "metrics.jsonl")
    tb = tb_scalars(run / "tb")
    assert [s for s, _ in tb["reward/mean"]] == [1, 2]
    assert [v for _, v in tb["reward/mean"]] == pytest.approx([r["reward/mean"] for r in lines])
    (run_file,) = wandb_offline.glob("wandb/offline-run-*/run-*.wandb")
    hist = wandb_history(run_file)
    assert [h["_step"] for h in hist] == [1, 2]
    assert [h["actor/grad_norm"] for h in hist] == pytest.approx([r["actor/grad_norm"] for r in lines])


def test_none_and_the_deprecated_tensorboard_switch(tmp_path):
    assert TrainConfig().report_to == ["tensorboard"] and TrainConfig().tensorboard
    assert TrainConfig(report_to=["none"]).report_to == [] and not TrainConfig(report_to=["none"]).tensorboard
    assert TrainConfig(tensorboard=False).report_to == []  # today's switch keeps meaning "no tb/"
    assert TrainConfig(tensorboard=False, report_to=["wandb", "tensorboard"]).report_to == ["wandb"]
    assert TrainConfig(report_to="wandb,wandb").report_to == ["wandb"]
    with pytest.raises(ConfigError, match="report_to=.*unknown logger 'comet'"):
        TrainConfig(report_to=["comet"])
    with pytest.raises(ConfigError, match="'none' cannot be combined"):
        TrainConfig(report_to=["none", "wandb"])
    # a saved config with tensorboard: false, then report_to given again: the new report_to decides
    save_config_yaml(TrainConfig(tensorboard=False), tmp_path / "config.yaml")
    assert config_from_sources(None, tmp_path / "config.yaml", {"report_to": "tensorboard"}).report_to == [
        "tensorboard"]
    assert config_from_sources(None, tmp_path / "config.yaml").report_to == []
    assert replace(TrainConfig(report_to=[]), report_to=["tensorboard"]).tensorboard
    log = MetricsLog(tmp_path, progress=False, tensorboard=False, log_every=100)  # config.yaml: report_to []
    log.log({"step": 1, "reward/mean": 1.0})
    log.close()
    assert not (tmp_path / "tb").exists()


@pytest.mark.parametrize("name", ["wandb", "tensorboard", "trackio", "mlflow"])
def test_missing_package_is_one_clear_error(name, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, name, None)  # what an uninstalled package looks like to importlib
    with pytest.raises(LoggerUnavailable, match=f"needs the {name} package, which is not installed: "
                                                f"pip install {name}"):
        check_available([name])
    with pytest.raises(LoggerUnavailable, match=f"pip install {name}"):
        make_loggers(["tensorboard", name] if name != "tensorboard" else [name], tmp_path)
    assert issubclass(LoggerUnavailable, ConfigError)  # exit status 2 on the command line


def test_cli_names_the_missing_package_before_anything_is_written(tmp_path, capsys, monkeypatch):
    missing = next((m for m in ("trackio", "mlflow") if importlib.util.find_spec(m) is None), None)
    if missing is None:
        monkeypatch.setitem(sys.modules, "mlflow", None)
        missing = "mlflow"
    out = tmp_path / "run"
    assert resrl_main(["train", "--output-dir", str(out), "--report-to", "tensorboard", missing]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pip install {missing}" in err[0] and err[0].startswith("resrl train: error: ")
    assert not out.exists()


def test_loggers_are_created_only_when_named(tmp_path):
    assert make_loggers([], tmp_path) == [] and make_loggers(["none"], tmp_path) == []
    (tb,) = make_loggers(["tensorboard", "tensorboard"], tmp_path)
    assert isinstance(tb, TensorBoardLogger)
    tb.close()


def test_tracker_packages_are_imported_only_when_named(tmp_path):
    import subprocess

    code = ("import sys, trainer.loggers as L; L.make_loggers(['none'], sys.argv[1]); "
            "print(sorted(m for m in ('wandb', 'mlflow', 'trackio', 'tensorboard') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
