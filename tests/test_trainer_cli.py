"""End to end: ``resrl train`` in a subprocess (the CLI of README.md § The loop), bad input, and a SIGKILL + resume;
every setting a flag (with TRL/verl names), the precedence of the sources, and the dispatcher's start-up."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from trainer_runner import FAST, EasyTask, fast_args

import trainer.loop as loop
from trainer.checkpointing import list_checkpoints
from trainer.config import ConfigError, TrainConfig
from trainer.metrics_log import read_metrics

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]


def resrl(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "trainer.cli", "train", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_trains_two_steps(tmp_path):
    out = tmp_path / "run"
    proc = resrl("--preset", "tiny", "--algorithm", "grpo", "--steps", "2", "--save-every", "2",
                 "--micro-batch-size", "8", "--seed", "3", "--output-dir", str(out), *fast_args())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run directory: {out}" in proc.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000000", "step_000002"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    cfg = (out / "config.yaml").read_text()
    assert "algorithm: grpo" in cfg and "seed: 3" in cfg and "micro_batch_size: 8" in cfg


def test_cli_bad_data_fails_with_one_line(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"prompt": "1+1", "reward_model": {"ground_truth": "2"}}\n{"prompt": "2+2", oops}\n')
    out = tmp_path / "run"
    proc = resrl("--output-dir", str(out), "--set", "task=math", "--set", f"train_files=[{bad}]", *fast_args())
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("resrl train: error: ") and f"{bad}:2: invalid JSON" in err[0]
    assert not out.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "resrl_q_low=0.9", "--set", "resrl_q_high=0.5"], "resrl_q_low=0.9 must be below resrl_q_high=0.5"),
    (["--set", "learnin_rate=1"], "unknown key 'learnin_rate' (did you mean 'learning_rate', i.e. 'lr'?)"),
    (["--steps", "0"], "steps=0 must be >= 1"),
    (["--model", "/no/such/model"], "model=/no/such/model: not a Hugging Face model directory"),
])
def test_cli_bad_settings_fail_with_one_line(tmp_path, capsys, args, message):
    from trainer.cli import main

    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume_equals_uninterrupted(tmp_path):
    settings = dict(FAST, algorithm="resrl", steps=16, save_every=2)
    killed = tmp_path / "killed"
    args = ["--output-dir", str(killed), *fast_args(), "--set", "algorithm=resrl", "--steps", "16",
            "--save-every", "2"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "trainer_runner.py"), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step_000002").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(0).uniform(0.0, 0.5))  # some steps later, possibly inside a checkpoint write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list_checkpoints(killed)[-1][0] < 16, "the run finished before it could be killed"

    loop.train(TrainConfig(**settings, output_dir=str(killed), resume=True), task=EasyTask())
    reference = loop.train(TrainConfig(**settings, output_dir=str(tmp_path / "reference")), task=EasyTask())

    assert not [p for p in (killed / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 17))  # no torn or duplicated line
    a = load_file(str(reference / "checkpoints" / "step_000016" / "model.safetensors"))
    b = load_file(str(killed / "checkpoints" / "step_000016" / "model.safetensors"))
    for k in a:
        assert float((a[k] - b[k]).abs().max()) <= 1e-6 * max(float(a[k].abs().max()), 1e-3) + 1e-7, k


# ------------------------------------------------------------------------ every setting a flag

def _parse(*argv: str):
    import argparse

    from trainer.train_cli import add_train_arguments

    p = argparse.ArgumentParser(prog="resrl train")
    add_train_arguments(p)
    return p.parse_args(list(argv))


def _cfg(*argv: str) -> TrainConfig:
    from trainer.train_cli import resolve_config

    return resolve_config(_parse(*argv))


def test_every_setting_is_a_flag_of_its_own():
    from dataclasses import fields

    for f in fields(TrainConfig):
        if f.name in ("preset", "resume", "resume_from"):  # hand-written flags (--preset, --resume, --resume-from)
            continue
        for flag in {f"--{f.name.replace('_', '-')}", f"--{f.name}"}:
            value = "grpo" if f.name == "algorithm" else "7"
            got = vars(_parse(flag, value))
            assert got[f.name] == value, flag  # still a string: TrainConfig converts it
            others = {k for k in got if k not in ("config", "preset", "resume", "resume_from", "overrides")} - {f.name}
            assert not others, (flag, others)  # a flag not given leaves no trace


def test_flags_set_the_settings():
    cfg = _cfg("--lr", "1e-4", "--n", "4", "--top-k", "3", "--length-scale", "--length-start", "4",
               "--max-response-length", "8", "--report-to", "none", "--train-files", "a.jsonl", "b.jsonl",
               "--algorithm", "nsr", "--no-dump-rollouts", "--use-chat-template", "false", "--resrl_rank", "5")
    assert (cfg.lr, cfg.n, cfg.top_k, cfg.length_scale, cfg.length_start, cfg.max_response_length) == (
        1e-4, 4, 3, True, 4, 8)
    assert (cfg.report_to, cfg.train_files, cfg.algorithm, cfg.dump_rollouts, cfg.use_chat_template) == (
        [], ["a.jsonl", "b.jsonl"], "nsr", False, False)
    assert cfg.resrl_rank == 5
    assert _cfg("--val-files", "x.jsonl,y.jsonl").val_files == ["x.jsonl", "y.jsonl"]
    assert _cfg("--report-to", "wandb", "tensorboard").report_to == ["wandb", "tensorboard"]
    assert _cfg("--gradient-checkpointing", "--no-gradient-checkpointing").gradient_checkpointing is False
    with pytest.raises(ConfigError, match="top_k='x' is not a valid int"):
        _cfg("--top-k", "x")


def test_precedence_preset_file_flags_set(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 1.0e-3\nn: 4\ndump_rollouts: false\nreport_to: [none]\nalgorithm: grpo\n")
    cfg = _cfg("--config", str(y), "--steps", "4")
    # flags not given (including booleans and lists) keep the file's values
    assert (cfg.lr, cfg.n, cfg.dump_rollouts, cfg.report_to, cfg.algorithm, cfg.steps) == (
        1e-3, 4, False, [], "grpo", 4)
    assert _cfg("--config", str(y), "--lr", "2e-4").lr == 2e-4  # flag > file
    assert _cfg("--config", str(y), "--lr", "2e-4", "--set", "lr=3e-4").lr == 3e-4  # --set > flag
    assert _cfg("--config", str(y), "--lr", "2e-4", "--set", "learning_rate=3e-4").lr == 3e-4  # any spelling
    assert _cfg("--preset", "qwen3-4b-math", "--model", "/m", "--train-files", "t.parquet").lr == 1e-6  # preset
    assert _cfg("--preset", "qwen3-4b-math", "--model", "/m", "--train-files", "t.parquet", "--lr", "5e-6").lr == 5e-6


@pytest.mark.parametrize(("argv", "field", "value"), [
    (["--learning_rate", "1e-4"], "lr", 1e-4),
    (["--learning-rate", "1e-4"], "lr", 1e-4),
    (["--actor_rollout_ref.actor.optim.lr", "1e-4"], "lr", 1e-4),
    (["--num_generations", "4"], "n", 4),
    (["--actor_rollout_ref.rollout.n", "4"], "n", 4),
    (["--max_completion_length", "6"], "max_response_length", 6),
    (["--data.train_batch_size", "64", "--actor_rollout_ref.actor.ppo_mini_batch_size", "32"], "prompts_per_step", 64),
    (["--actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", "16"], "micro_batch_size", 16),
    (["--beta", "0.04"], "kl_coef", 0.04),
    (["--epsilon_high", "0.28"], "clip_ratio_high", 0.28),
    (["--max_grad_norm", "0.5"], "grad_clip", 0.5),
    (["--actor_rollout_ref.actor.clip_ratio_c", "10"], "dual_clip", 10.0),
    (["--set", "num_generations=4"], "n", 4),
    (["--set", "actor_rollout_ref.rollout.n=4"], "n", 4),
    (["--set", "max-completion-length=6"], "max_response_length", 6),
])
def test_trl_and_verl_names(argv, field, value):
    assert getattr(_cfg(*argv), field) == value


def test_trl_and_verl_names_in_yaml(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("learning_rate: 2.0e-4\nactor_rollout_ref.rollout.n: 4\n")
    nested = tmp_path / "nested.yaml"  # a fragment of a verl config, as written there
    nested.write_text("actor_rollout_ref:\n  rollout:\n    n: 4\n  actor:\n    optim:\n      lr: 2.0e-4\n"
                      "data:\n  max_response_length: 6\n")
    for y in (flat, nested):
        cfg = _cfg("--config", str(y))
        assert (cfg.lr, cfg.n) == (2e-4, 4)
    assert _cfg("--config", str(nested)).max_response_length == 6
    both = tmp_path / "both.yaml"
    both.write_text("lr: 1.0e-4\nlearning_rate: 2.0e-4\n")
    with pytest.raises(ConfigError, match=r"both.yaml: 'lr' and 'learning_rate' both set 'lr'"):
        _cfg("--config", str(both))
    typo = tmp_path / "typo.yaml"
    typo.write_text("actor_rollout_ref:\n  rollout:\n    nn: 4\n")
    with pytest.raises(ConfigError, match=r"unknown key 'actor_rollout_ref.rollout.nn' \(did you mean "
                                          r"'actor_rollout_ref.rollout.n', i.e. 'n'\?\)"):
        _cfg("--config", str(typo))


def test_unknown_names_get_a_suggestion(capsys):
    from trainer.cli import main

    with pytest.raises(ConfigError, match=r"unknown key 'num_generation' \(did you mean 'num_generations', i.e. 'n'"):
        _cfg("--set", "num_generation=4")
    with pytest.raises(ConfigError, match=r"unknown key 'micro_batchsize' \(did you mean 'micro_batch_size'\?\)"):
        _cfg("--set", "micro_batchsize=4")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--num-generation", "4", "--lrr=1e-4"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "did you mean --num-generations?" in err and "--lrr=1e-4 (did you mean --lr?)" in err
    assert len(err.strip().splitlines()) == 2  # usage line + error line, not the whole option list
    with pytest.raises(SystemExit):
        main(["train", "--l", "1e-4"])  # no abbreviations: --l is not --lr (or --lr-schedule)


def test_dispatcher_starts_without_the_heavy_modules():
    # `resrl --help` imports no implementation; `resrl train --help` needs the config, whose algorithm names and
    # defaults come from the core registry (torch), but still no transformers, plotting or training loop.
    for command in (None, "'train'"):
        code = ("import sys\nfrom trainer.cli import build_parser\n"
                f"build_parser({command}).format_help()\n"
                "print(sorted(m for m in ('torch', 'transformers', 'matplotlib', 'trainer.loop', 'resrl_analysis')"
                " if m in sys.modules))")
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        loaded = proc.stdout.strip()
        assert loaded == ("[]" if command is None else "['resrl_analysis', 'torch']"), loaded
    proc = subprocess.run([sys.executable, "-m", "trainer", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "{train,probe,figures,compare,view,study,demo}" in proc.stdout


def test_flags_train_end_to_end_and_every_metric_is_documented(tmp_path):
    # `python -m trainer train` with plain flags; KL and validation on, so that their keys are written too
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "train", "--lr", "1e-4", "--n", "4", "--steps", "2", "--save-every", "2",
         "--output-dir", str(out), "--model", "tiny-random", "--prompts-per-step", "4", "--mini-batch-size", "4",
         "--max-response-length", "5", "--progress-bar", "off", "--log-every", "1000", "--cpu-threads", "1",
         "--kl-coef", "0.01", "--val-every", "2", "--val-prompts", "2", "--val-n", "2", "--no-dump-rollouts"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = (out / "config.yaml").read_text()
    assert "lr: 0.0001\n" in cfg and "\nn: 4\n" in cfg and "kl_coef: 0.01\n" in cfg
    assert not (out / "rollouts").exists()
    assert list((out / "tb").glob("events.out.tfevents.*"))  # report_to's default: TensorBoard
    lines = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2]
    written = {k for r in lines for k in r}
    assert {"actor/kl", "val/reward_mean", "val/pass@2"} <= written
    doc = (ROOT / "docs" / "METRICS.md").read_text(encoding="utf-8")
    documented = {k.replace("<n>", "2") for k in re.findall(r"^\| `([^`]+)` \|", doc, flags=re.M)}
    assert written - documented == set()


def test_every_declared_metric_key_is_documented():
    from trainer.metrics_log import METRIC_KEYS

    doc = (ROOT / "docs" / "METRICS.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([^`]+)` \|", doc, flags=re.M))
    assert set(METRIC_KEYS) - documented == set()


def test_a_hand_written_flag_takes_precedence_over_the_generated_one():
    import argparse

    from trainer.train_cli import add_train_arguments

    p = argparse.ArgumentParser()
    p.add_argument("--steps", dest="my_steps", type=int)  # as a hand-written flag for a setting would be
    add_train_arguments(p)  # no argparse conflict: the generated --steps is skipped
    args = p.parse_args(["--steps", "3", "--lr", "1e-4"])
    assert args.my_steps == 3 and "steps" not in vars(args) and args.lr == "1e-4"
