"""TrainConfig: validation messages that say what to do, presets, YAML round trip, command-line resolution."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from trainer.config import (
    ConfigError,
    TrainConfig,
    config_from_sources,
    config_to_dict,
    load_yaml_overrides,
    preset_config,
    save_config_yaml,
)
from trainer.train_cli import add_train_arguments, resolve_config

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("kw", "message"), [
    (dict(prompts_per_step=6, mini_batch_size=4), r"not divisible by mini_batch_size=4: choose a mini_batch_size"),
    (dict(algorithm="grpo", n=1), r"n=1: grpo compares responses within a prompt group and needs n >= 2"),
    (dict(algorithm="resrl", n=1), r"needs n >= 2"),
    (dict(resrl_q_low=0.8, resrl_q_high=0.8), r"resrl_q_low=0.8 must be below resrl_q_high=0.8"),
    (dict(resrl_q_low=0.9, resrl_q_high=0.2), r"must be below"),
    (dict(resrl_rank=0), r"resrl_rank=0 must be >= 1"),
    (dict(resrl_rank=-3), r"resrl_rank=-3"),
    (dict(resrl_min_weight=1.5), r"resrl_min_weight=1.5 is a weight and must lie in \[0, 1\]"),
    (dict(resrl_pos_weight=-0.1), r"resrl_pos_weight=-0.1 is a weight"),
    (dict(lr=-1e-4), r"lr=-0.0001 must be a finite number >= 0"),
    (dict(algorithm="ppo"), r"algorithm='ppo' is unknown: choose one of grpo"),
    (dict(prompts_per_step=8, mini_batch_size=2, steps=3), r"steps=3 is not a multiple of the 4 optimizer steps"),
    (dict(prompts_per_step=8, mini_batch_size=4, save_every=3), r"save_every=3 is not a multiple"),
    (dict(temperature=0.0), r"temperature=0.0 must be > 0"),
    (dict(dual_clip=0.5), r"dual_clip=0.5 must be > 1"),
    (dict(loss_agg_mode="sum"), r"loss_agg_mode='sum': choose one of token-mean"),
    (dict(task="math"), r"task=math needs train_files"),
    (dict(micro_batch_size=0), r"micro_batch_size=0 must be >= 1"),
    (dict(resrl_layer="middle"), r"resrl_layer='middle': choose 'penultimate', 'head_input' or an integer"),
    (dict(steps="many"), r"steps='many' is not a valid int"),
])
def test_validation_messages(kw, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kw)


@pytest.mark.parametrize("bad", [
    dict(resrl_rank=0), dict(resrl_max_pos_tokens=1), dict(resrl_niter=-1), dict(resrl_svd="qr"),
    dict(resrl_q_low=0.9, resrl_q_high=0.5), dict(resrl_min_weight=2.0), dict(resrl_pos_weight=-1.0),
    dict(resrl_layer="x"), dict(adv_eps=0.0), dict(w_reinforce_lambda=-1.0), dict(nthr_beta=-1.0),
    dict(temperature=0.0),
])
def test_algorithm_settings_are_checked_once_by_the_core(bad):
    """TrainConfig's message about an algorithm setting is the core's check (AdvantageParams, ResRLWeightConfig)
    in the settings' own words: one declaration, one check."""
    from resrl_analysis.advantages import params_from_config
    from resrl_analysis.settings import SettingError

    with pytest.raises(SettingError) as core:
        params_from_config(bad)
    assert core.value.names[0] in bad
    with pytest.raises(ConfigError) as cfg:
        TrainConfig(**bad)
    assert str(cfg.value).startswith(core.value.as_setting())


@pytest.mark.parametrize("name", ["grad_clip", "temperature", "adam_eps", "kl_coef", "dual_clip", "resrl_q_low"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_floats_are_rejected(name, value):
    # nan passes every "x < 0" comparison: it must be caught explicitly
    with pytest.raises(ConfigError, match=f"{name}=(nan|inf) must be a finite number"):
        TrainConfig(**{name: value})


def test_defaults_are_the_tiny_preset_and_valid():
    cfg = TrainConfig()
    assert cfg == preset_config("tiny")
    assert (cfg.model, cfg.task, cfg.updates_per_rollout) == ("tiny-warmstart", "multiplication", 1)


def test_every_field_has_help():
    for f in fields(TrainConfig):
        assert len(f.metadata.get("help", "")) > 10, f.name


def test_paper_presets_state_their_settings():
    with pytest.raises(ConfigError, match="model is empty: preset 'qwen3-4b-math' needs the path"):
        preset_config("qwen3-4b-math", train_files=["t.parquet"])
    cfg = preset_config("qwen3-1.7b-math", model="/m", train_files=["t.parquet"])
    assert (cfg.prompts_per_step, cfg.mini_batch_size, cfg.n) == (256, 64, 4)
    assert (cfg.max_prompt_length, cfg.max_response_length) == (2048, 4096)
    assert (cfg.lr, cfg.warmup_steps, cfg.weight_decay, cfg.kl_coef) == (1e-6, 40, 0.1, 0.0)
    assert cfg.warmup_steps == 10 * cfg.updates_per_rollout  # the reference: 10 rollout batches of warm-up
    assert (cfg.temperature, cfg.val_temperature) == (1.0, 0.6)  # training temperature stated explicitly
    assert cfg.length_scale and cfg.length_start == 3500 and cfg.length_end_scale == 0.7
    assert cfg.updates_per_rollout == 4


def test_yaml_round_trip_and_unknown_keys(tmp_path):
    cfg = TrainConfig(algorithm="nthr", steps=6, lr=3e-4, train_files=[], resrl_layer="head_input")
    path = tmp_path / "config.yaml"
    save_config_yaml(cfg, path)
    assert set(load_yaml_overrides(path)) == {f.name for f in fields(TrainConfig)}  # every field
    assert config_from_sources(None, path) == cfg
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: grpo\nlearnin_rate: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'learnin_rate'"):
        config_from_sources(None, bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: 3\n  - x: [\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: invalid YAML"):
        config_from_sources(None, broken)
    with pytest.raises(ConfigError, match="cannot read config file"):
        config_from_sources(None, tmp_path / "missing.yaml")


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    return p.parse_args(list(argv))


def test_command_line_precedence(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("algorithm: nsr\nsteps: 8\nlr: 1.0e-3\n")
    cfg = resolve_config(_args("--config", str(y), "--steps", "4", "--set", "lr=5e-4", "--set", "top_k=3",
                               "--micro-batch-size", "2", "--seed", "7", "--save-every", "2"))
    assert (cfg.algorithm, cfg.steps, cfg.lr, cfg.top_k, cfg.micro_batch_size, cfg.seed, cfg.save_every) == (
        "nsr", 4, 5e-4, 3, 2, 7, 2)
    with pytest.raises(ConfigError, match="unknown key 'not_a_field'"):
        resolve_config(_args("--set", "not_a_field=1"))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        resolve_config(_args("--set", "lr"))
    assert resolve_config(_args("--set", "train_files=[a.jsonl, b.jsonl]", "--set", "task=math")).train_files == [
        "a.jsonl", "b.jsonl"]


def test_resume_reuses_the_runs_config(tmp_path):
    save_config_yaml(TrainConfig(algorithm="psr", steps=4), tmp_path / "config.yaml")
    cfg = resolve_config(_args("--resume", "--output-dir", str(tmp_path), "--steps", "10"))
    assert (cfg.algorithm, cfg.steps, cfg.resume) == ("psr", 10, True)


def test_help_documents_every_field():
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    text = p.format_help()
    for name in config_to_dict(TrainConfig()):
        assert f"  {name} (" in text, name
    for flag in ("--preset", "--config", "--algorithm", "--steps", "--micro-batch-size", "--seed",
                 "--output-dir", "--save-every", "--resume"):
        assert flag in text
