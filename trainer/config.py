"""The trainer's configuration: one typed dataclass, its presets, YAML in and out.

Every hyper-parameter of a run is one field of :class:`TrainConfig`, with its help text in the field's
metadata (``resrl train --help`` prints it) and its checks in ``__post_init__``; nothing is kept as a
second constant elsewhere. The dataclass defaults *are* the ``tiny`` preset (CPU, minutes); the other
presets are overrides of it. Precedence when resolving a run's config: preset < YAML file < command-line
flags < ``--set key=value``.

>>> cfg = TrainConfig(algorithm="grpo", steps=5)
>>> cfg.updates_per_rollout, cfg.rows_per_step
(1, 256)
>>> try:
...     TrainConfig(prompts_per_step=6, mini_batch_size=4)
... except ConfigError as e:
...     print(str(e)[:57])
prompts_per_step=6 is not divisible by mini_batch_size=4:
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

import resrl_analysis.advantages as _advantages
from resrl_analysis.rundir import atomic_write
from resrl_analysis.settings import SettingError

__all__ = [
    "ALGORITHM_NAMES",
    "ALIASES",
    "ConfigError",
    "PRESETS",
    "REPORT_TO",
    "TrainConfig",
    "canonical_keys",
    "config_from_sources",
    "config_to_dict",
    "field_help",
    "load_yaml_overrides",
    "preset_config",
    "save_config_yaml",
]

#: The algorithms of the registry (:mod:`resrl_analysis.advantages`), in its order.
ALGORITHM_NAMES = _advantages.ALGORITHM_NAMES
#: Those that compare responses within a prompt group: they need >= 2 responses per prompt.
GROUP_ALGORITHMS = tuple(name for name, a in _advantages.ALGORITHMS.items() if a.group)
#: Defaults of the algorithms' hyper-parameters, declared once in ``resrl_analysis.advantages.AdvantageParams``
#: (which also checks their values: ``TrainConfig`` turns its :class:`SettingError` into a :class:`ConfigError`).
_ALGO = _advantages.config_defaults()
#: What the trainer adds to the core's message about one of those settings.
_SETTING_HINTS = {"temperature": " for training rollouts (0 would be greedy: every response of a group identical)"}
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")

#: Fields that may change when a run is resumed: most do not change the trajectory (``micro_batch_*``
#: and ``logprob_micro_batch_size`` change it only by float round-off); ``lr``, ``grad_clip`` and
#: ``max_consecutive_skips`` may, on purpose: lowering them is how a diverged run is continued.
RESUMABLE_CHANGES = frozenset({
    "steps", "save_every", "resume", "output_dir", "micro_batch_size", "micro_batch_tokens",
    "logprob_micro_batch_size", "progress_bar", "log_every", "tensorboard", "dump_rollouts", "device",
    "gradient_checkpointing", "logprob_memory_mb", "rollout_backend", "val_every", "preset", "cpu_threads",
    "rollout_compile", "lr", "grad_clip", "max_consecutive_skips", "report_to", "lld_in_batch",
    "collateral_in_batch",
    "resume_from", "blowup_param_ratio", "blowup_update_norm", "max_blowup_steps", "sane_weight_max",
    "entropy_in_batch", "entropy_predict_in_batch", "flips_in_batch", "flips_low_confidence", "drift_watch",
    "drift_jump_factor", "drift_window",
})

#: Experiment trackers of ``report_to`` (trainer/loggers.py); ``none`` = only metrics.jsonl.
REPORT_TO = ("tensorboard", "wandb", "trackio", "mlflow", "none")


class ConfigError(ValueError):
    """An impossible or unknown setting; the message says what to do instead."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its help text (``metadata['help']``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every setting of a training run. The defaults are the ``tiny`` preset.

    >>> TrainConfig().algorithm
    'resrl'
    >>> field_help("clip_ratio_low")
    'PPO clip: the ratio is clipped below at 1 - clip_ratio_low.'
    """

    # ---------------------------------------------------------------- run
    preset: str = _f("tiny", "Preset these settings started from (informational; set by --preset).")
    algorithm: str = _f("resrl", f"Advantage estimator: one of {', '.join(ALGORITHM_NAMES)}.")
    steps: int = _f(20, "Total optimizer steps of the run (with --resume: the total to reach, not more steps).")
    seed: int = _f(0, "Seeds the data order, the sampling and the ResRL subspace draws.")
    output_dir: str = _f("", "Run directory; empty = runs/<preset>-<algorithm>-seed<seed>.")
    save_every: int = _f(10, "Save a checkpoint (and dump the rollouts) every this many optimizer steps; "
                              "step 0 and the last step are always saved.")
    resume: bool = _f(False, "Continue the run in output_dir from its latest complete checkpoint.")
    resume_from: int = _f(-1, "Continue the run in output_dir from the complete checkpoint of this step (implies "
                              "resume; -1 = the latest). Later checkpoints, rollout dumps and metrics lines are "
                              "moved into RUN_DIR/superseded/<UTC time>/, never deleted.")

    # ---------------------------------------------------------------- model
    model: str = _f("tiny-warmstart", "Policy to train: a local Hugging Face model directory, 'tiny-warmstart' "
                                      "(the shipped tiny multiplication checkpoint), 'tiny-addition-warmstart' (the "
                                      "shipped tiny addition checkpoint) or 'tiny-random' (a fresh tiny model).")
    tokenizer: str = _f("", "Tokenizer directory; empty = the model's.")
    attn_implementation: str = _f("sdpa", "Attention kernel passed to from_pretrained ('sdpa', 'eager', ...).")

    # ---------------------------------------------------------------- data and reward
    task: str = _f("multiplication", "Task: 'multiplication' or 'addition' (embedded, synthetic) or 'math' "
                                     "(train_files).")
    train_files: list[str] = _f([], "Training files (.jsonl/.parquet, verl RLVR layout) for task=math.")
    val_files: list[str] = _f([], "Validation files for task=math (optional).")
    max_prompt_length: int = _f(64, "Prompts longer than this many tokens are handled by on_long_prompt.")
    on_long_prompt: str = _f("skip", "'skip' (drop and count) or 'error' for prompts over max_prompt_length.")
    train_prompts: int = _f(64, "Train on only this many of the task's training prompts, evenly spread over its "
                                "fixed order (0 = all). The tiny preset uses 64: a 1M-parameter policy does not "
                                "generalise from 20 RL steps, but it measurably learns prompts it meets again.")
    use_chat_template: bool = _f(True, "Apply the tokenizer's chat template to math prompts when it has one.")
    length_scale: bool = _f(False, "Scale positive rewards down linearly from length_start response tokens "
                                   "to length_end_scale at max_response_length (ResRL paper).")
    length_start: int = _f(3500, "Response length up to which a positive reward is kept whole.")
    length_end_scale: float = _f(0.7, "Factor of a positive reward at max_response_length.")

    # ---------------------------------------------------------------- rollout
    prompts_per_step: int = _f(32, "Prompts sampled per rollout batch (all ranks together).")
    n: int = _f(8, "Responses sampled per prompt (the group size G).")
    max_response_length: int = _f(8, "Most tokens generated per response (EOS included).")
    temperature: float = _f(_ALGO["temperature"], "Training sampling temperature; the old/new log-probs use the "
                                                  "same one.")
    top_p: float = _f(1.0, "Nucleus sampling threshold (1 = off).")
    top_k: int = _f(0, "Top-k sampling (0 = off; transformers would otherwise default to 50).")
    rollout_backend: str = _f("auto", "Sampler of resrl_analysis.sampling: auto | dynamic | static | hf.")
    rollout_compile: str = _f("auto", "Compile the static-cache decode step with CUDA graphs: 'auto' (only on CUDA "
                                      "without FSDP: FSDP2 re-allocates the gathered weights at every rollout, "
                                      "and graphs are recorded against fixed addresses), 'on' or 'off'.")
    val_every: int = _f(0, "Validate every this many optimizer steps (0 = never).")
    val_prompts: int = _f(64, "Validation prompts used (the first ones of the task's held-out list).")
    val_n: int = _f(4, "Responses per validation prompt.")
    probe_prompts: int = _f(64, "Prompts written to RUN_DIR/prompts/heldout.jsonl (the first of the task's held-out "
                                "list) and at most this many of the training pool to prompts/train.jsonl, for "
                                "`resrl probe --probe-set heldout|train` (0 = write neither).")
    val_temperature: float = _f(0.6, "Validation sampling temperature.")

    # ---------------------------------------------------------------- update
    mini_batch_size: int = _f(32, "Prompts per optimizer step (all ranks together); prompts_per_step / "
                                 "mini_batch_size * ppo_epochs optimizer steps per rollout batch.")
    ppo_epochs: int = _f(1, "Passes over each rollout batch.")
    micro_batch_size: int = _f(256, "Responses per forward/backward on one rank (gradient accumulation); "
                                   "the update does not depend on it.")
    micro_batch_tokens: int = _f(0, "If > 0: micro-batches by padded-token budget per rank instead of "
                                    "micro_batch_size rows.")
    logprob_micro_batch_size: int = _f(0, "Responses per no-grad forward (old log-probs, ResRL/NTHR inputs), "
                                          "rounded up to whole prompt groups; 0 = micro_batch_size.")
    lr: float = _f(3e-5, "Peak learning rate (AdamW).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_eps: float = _f(1e-8, "AdamW epsilon.")
    warmup_steps: int = _f(0, "Linear learning-rate warm-up, in optimizer steps.")
    lr_schedule: str = _f("constant", "'constant' after warm-up, or 'cosine' down to min_lr_ratio * lr.")
    lr_decay_steps: int = _f(0, "Length of the cosine decay in optimizer steps (0 = steps).")
    min_lr_ratio: float = _f(0.0, "Final learning rate of the cosine schedule, as a fraction of lr.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0 = no clipping).")
    clip_ratio_low: float = _f(0.2, "PPO clip: the ratio is clipped below at 1 - clip_ratio_low.")
    clip_ratio_high: float = _f(0.2, "PPO clip: the ratio is clipped above at 1 + clip_ratio_high.")
    dual_clip: float = _f(3.0, "Dual-clip constant c (> 1) bounding the loss of negative-advantage tokens "
                               "by c * |A|; 0 = off.")
    loss_agg_mode: str = _f("token-mean", f"Loss aggregation over the mini-batch: {', '.join(LOSS_AGG_MODES)}.")
    kl_coef: float = _f(0.0, "Coefficient of the k3 KL penalty to the initial policy (0 = off, and no "
                             "reference model is loaded).")
    entropy_coef: float = _f(0.0, "Entropy bonus coefficient (0 = off).")

    # ---------------------------------------------------------------- algorithms
    adv_eps: float = _f(_ALGO["adv_eps"], "GRPO: epsilon added to the group's reward std.")
    w_reinforce_lambda: float = _f(_ALGO["w_reinforce_lambda"], "W-REINFORCE: weight lambda of correct responses.")
    nthr_beta: float = _f(_ALGO["nthr_beta"], "NTHR: threshold factor beta.")
    resrl_rank: int = _f(_ALGO["resrl_rank"], "ResRL: rank k of the positive subspace.")
    resrl_max_pos_tokens: int = _f(_ALGO["resrl_max_pos_tokens"], "ResRL: at most this many positive tokens "
                                                                  "(sampled) per group.")
    resrl_q_low: float = _f(_ALGO["resrl_q_low"], "ResRL: residual quantile mapped to min weight.")
    resrl_q_high: float = _f(_ALGO["resrl_q_high"], "ResRL: residual quantile mapped to weight 1.")
    resrl_min_weight: float = _f(_ALGO["resrl_min_weight"], "ResRL: smallest weight of a negative token.")
    resrl_pos_weight: float = _f(_ALGO["resrl_pos_weight"], "ResRL: multiplier of positive responses' advantages.")
    resrl_niter: int = _f(_ALGO["resrl_niter"], "ResRL: power iterations of the randomized SVD.")
    resrl_svd: str = _f(_ALGO["resrl_svd"], "ResRL: 'lowrank' (randomized, as torch.pca_lowrank) or 'exact'.")
    resrl_layer: str = _f(_ALGO["resrl_layer"], "ResRL representation: 'penultimate' (hidden_states[-2], the paper's), "
                                         "'head_input' (hidden_states[-1]) or an integer index into "
                                         "hidden_states.")
    resrl_grouping: str = _f("group", "ResRL: the rows a subspace and its residual quantiles are computed in. "
                                      "'group': each whole prompt group. 'micro_batch': as the published "
                                      "reference code does, within each update micro-batch after verl's length "
                                      "balancing over the run's ranks (micro_batch_size rows, whatever "
                                      "micro_batch_tokens says), so a group split over micro-batches is weighted "
                                      "only where its positives landed; to measure that flaw "
                                      "(resrl/weighted_token_frac). Cannot change on resume.")

    # ---------------------------------------------------------------- system
    device: str = _f("auto", "'auto' (cuda when available), 'cpu' or 'cuda'.")
    param_dtype: str = _f("auto", "Compute dtype of the weights: 'auto' (bfloat16 on CUDA, float32 on CPU), "
                                  "'bfloat16' or 'float32'. Master weights and optimizer state stay float32.")
    fsdp: str = _f("auto", "'auto' (FSDP2 when distributed or on CUDA), 'on' or 'off' (single process only).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass (saves memory).")
    logprob_memory_mb: float = _f(256.0, "Memory bound of the chunked log-prob/entropy temporaries.")
    cpu_threads: int = _f(1, "torch CPU threads during the run (0 = leave torch's setting). The tiny model's "
                             "matrices are too small to gain from more; thread synchronisation would dominate.")

    # ---------------------------------------------------------------- logging
    log_every: int = _f(1, "Print a summary line every this many steps when no progress bar is shown.")
    progress_bar: str = _f("auto", "'auto' (when stderr is a terminal), 'on' or 'off'.")
    report_to: list[str] = _f(["tensorboard"], "Experiment trackers to mirror metrics.jsonl to: any of "
                                               f"{', '.join(REPORT_TO[:-1])}, or none (as TRL's report_to). "
                                               "tensorboard writes RUN_DIR/tb; a tracker whose package is "
                                               "missing is an error before the run starts.")
    tensorboard: bool = _f(True, "Deprecated (use report_to): false removes 'tensorboard' from report_to; kept "
                                 "equal to 'tensorboard' in report_to.")
    dump_rollouts: bool = _f(True, "Write rollouts/step_XXXXXX.jsonl at step 0 and every saved step.")
    lld_in_batch: bool = _f(True, "Measure lazy likelihood displacement live: after each rollout batch's last update, "
                                  "one no-grad forward re-scores the positives of its mixed groups (lld/* metrics; "
                                  "shared vs unique tokens). Off in the paper presets.")
    entropy_in_batch: bool = _f(True, "Measure entropy dynamics live: the after-update forward re-scores every row of "
                                      "each rollout batch with its token entropies (entropy/*: the realised change of "
                                      "token entropy on positive and on negative responses, Cui et al.'s covariance of "
                                      "token log-prob and advantage, and how well each predictor ranks the realised "
                                      "change). Off in the paper presets.")
    entropy_predict_in_batch: bool = _f(True, "With entropy_in_batch: also the exact first-order entropy change of a "
                                              "head-only SGD step from each group's own samples, split into the parts "
                                              "their positive and negative responses cause (entropy/pred_*). The "
                                              "rollout's no-grad forward then keeps its logits and head inputs (one "
                                              "chunk of rows at a time) and builds each group's Gram with its entropy "
                                              "part. Off in the paper presets.")
    flips_in_batch: bool = _f(True, "Count token flips live: after each rollout batch's update, the fraction of its "
                                    "response tokens whose log-prob rose or fell, by polarity, confidence before and "
                                    "shared/unique, and the coupling of identical low-confidence tokens (flips/*; the "
                                    "after-update forward re-scores every row). Off in the paper presets.")
    flips_low_confidence: float = _f(0.5, "flips_in_batch: p(y) below this counts as low confidence for the coupling "
                                          "of identical tokens (flips/coupled_*).")
    drift_watch: bool = _f(True, "Head versus body drift: per optimizer step the relative update norm of the LM head "
                                 "and of the other parameters (drift/*), and a warning in the log when the head's "
                                 "relative update per unit learning rate exceeds drift_jump_factor times its median "
                                 "over the previous drift_window steps. Costs a copy of the parameters per step. Off "
                                 "in the paper presets.")
    drift_jump_factor: float = _f(5.0, "drift_watch: how many times its running median the head's relative update "
                                       "(per unit learning rate) must be to be reported as a jump (> 1).")
    drift_window: int = _f(20, "drift_watch: the previous optimizer steps whose median is the head's running level; "
                               "no jump is reported before 5 of them.")
    collateral_in_batch: bool = _f(False, "Measure each update's collateral per unit of push-down live: after each "
                                          "rollout batch's last update, re-score every row (update/*: the KL of the "
                                          "update (k3), Δ log π of positives and negatives per unit of it, the "
                                          "selectivity ratio; resrl/weight_* for ResRL-family runs). The demo and "
                                          "the study turn it on.")
    max_consecutive_skips: int = _f(5, "Stop the run after this many non-finite steps in a row.")
    blowup_param_ratio: float = _f(1.5, "Report a step as a blow-up when it grows the parameter norm by more than "
                                        "this factor (||θ_after|| / ||θ_before||; 0 = off).")
    blowup_update_norm: float = _f(0.0, "Report a step as a blow-up when its update norm ||θ_after - θ_before|| "
                                        "exceeds this (0 = off: it costs a copy of the parameters per step).")
    max_blowup_steps: int = _f(3, "Stop the run as diverged after this many blow-up steps (see blowup_*; also a "
                                  "step with entropy and grad norm both 0, a collapsed policy) since the (re)start; "
                                  "0 = only report them.")
    sane_weight_max: float = _f(1e4, "After a divergence, a checkpoint is offered for --resume-from only if its "
                                     "weights are finite with max |w| below this.")

    # ---------------------------------------------------------------- derived and checks
    def _resolve_report_to(self) -> None:
        """Validate ``report_to`` (deduplicated, 'none' dropped) and fold the deprecated ``tensorboard`` in."""
        unknown = [x for x in self.report_to if x not in REPORT_TO]
        if unknown:
            raise ConfigError(f"report_to={self.report_to}: unknown logger {unknown[0]!r}; choose from "
                              f"{', '.join(REPORT_TO)}")
        if "none" in self.report_to and len(set(self.report_to)) > 1:
            raise ConfigError(f"report_to={self.report_to}: 'none' cannot be combined with other loggers")
        wanted = list(dict.fromkeys(x for x in self.report_to if x != "none"))
        if not self.tensorboard:
            wanted = [x for x in wanted if x != "tensorboard"]
        self.report_to = wanted
        self.tensorboard = "tensorboard" in wanted

    @property
    def updates_per_rollout(self) -> int:
        """Optimizer steps made from one rollout batch."""
        return self.prompts_per_step // self.mini_batch_size * self.ppo_epochs

    @property
    def rows_per_step(self) -> int:
        """Responses sampled per rollout batch (all ranks)."""
        return self.prompts_per_step * self.n

    def resolved_output_dir(self) -> Path:
        """The run directory (``output_dir`` or the default name)."""
        return Path(self.output_dir or f"runs/{self.preset}-{self.algorithm}-seed{self.seed}")

    def __post_init__(self) -> None:
        _coerce_all(self)
        e = ConfigError
        self._resolve_report_to()
        if self.algorithm not in ALGORITHM_NAMES:
            raise e(f"algorithm={self.algorithm!r} is unknown: choose one of {', '.join(ALGORITHM_NAMES)}")
        for name in ("steps", "prompts_per_step", "n", "max_response_length", "mini_batch_size",
                     "ppo_epochs", "micro_batch_size", "save_every", "max_prompt_length", "log_every",
                     "max_consecutive_skips", "val_prompts", "val_n"):
            if getattr(self, name) < 1:
                raise e(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("micro_batch_tokens", "logprob_micro_batch_size", "warmup_steps", "lr_decay_steps",
                     "val_every", "length_start", "cpu_threads", "train_prompts",
                     "probe_prompts"):
            if getattr(self, name) < 0:
                raise e(f"{name}={getattr(self, name)} must be >= 0")
        if self.resume_from < -1:
            raise e(f"resume_from={self.resume_from} must be a checkpoint step >= 0 (or -1: the latest)")
        if self.resume_from >= 0:
            self.resume = True  # resuming from a chosen checkpoint is a resume
        if self.max_blowup_steps < 0 or self.blowup_update_norm < 0 or self.sane_weight_max <= 0:
            raise e("max_blowup_steps and blowup_update_norm must be >= 0, sane_weight_max > 0")
        if self.blowup_param_ratio != 0 and self.blowup_param_ratio <= 1:
            raise e(f"blowup_param_ratio={self.blowup_param_ratio} must be > 1 (a growth factor), or 0 (off)")
        if self.n < 2 and self.algorithm in GROUP_ALGORITHMS:
            raise e(f"n={self.n}: {self.algorithm} compares responses within a prompt group and needs n >= 2 "
                    "responses per prompt; raise n or use psr/nsr/w-reinforce")
        if self.prompts_per_step % self.mini_batch_size:
            divisors = [d for d in range(1, self.prompts_per_step + 1) if self.prompts_per_step % d == 0]
            near = min(divisors, key=lambda d: abs(d - self.mini_batch_size))
            raise e(f"prompts_per_step={self.prompts_per_step} is not divisible by mini_batch_size="
                    f"{self.mini_batch_size}: choose a mini_batch_size that divides prompts_per_step (e.g. {near})")
        k = self.updates_per_rollout
        if self.steps % k:
            raise e(f"steps={self.steps} is not a multiple of the {k} optimizer steps made per rollout batch "
                    f"(prompts_per_step / mini_batch_size * ppo_epochs): use steps={self.steps // k * k or k}")
        if self.save_every % k:
            raise e(f"save_every={self.save_every} is not a multiple of the {k} optimizer steps made per rollout "
                    f"batch: checkpoints are taken between rollout batches; use save_every="
                    f"{max(k, self.save_every // k * k)}")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise e(f"lr={self.lr} must be a finite number >= 0")
        for name, typ in _field_types().items():
            # NaN slips through every comparison below (nan < 0 is False): reject it, and ±inf, up front.
            if typ is float and not math.isfinite(getattr(self, name)):
                raise e(f"{name}={getattr(self, name)} must be a finite number")
        if self.weight_decay < 0 or self.adam_eps <= 0:
            raise e("weight_decay must be >= 0 and adam_eps > 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise e(f"{name}={getattr(self, name)} must lie in [0, 1)")
        if self.val_temperature < 0:
            raise e(f"val_temperature={self.val_temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise e(f"top_p={self.top_p} must lie in (0, 1]")
        if self.top_k < 0:
            raise e(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0.0 <= self.clip_ratio_low < 1.0:
            raise e(f"clip_ratio_low={self.clip_ratio_low} must lie in [0, 1)")
        if self.clip_ratio_high < 0:
            raise e(f"clip_ratio_high={self.clip_ratio_high} must be >= 0")
        if self.dual_clip != 0 and self.dual_clip <= 1.0:
            raise e(f"dual_clip={self.dual_clip} must be > 1 (or 0 to turn the dual clip off)")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise e(f"loss_agg_mode={self.loss_agg_mode!r}: choose one of {', '.join(LOSS_AGG_MODES)}")
        if self.kl_coef < 0 or self.entropy_coef < 0 or self.grad_clip < 0:
            raise e("kl_coef, entropy_coef and grad_clip must be >= 0")
        for name in ("length_end_scale", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise e(f"{name}={getattr(self, name)} is a weight and must lie in [0, 1]")
        try:  # the algorithms' settings: checked where they are declared (AdvantageParams, ResRLWeightConfig)
            _advantages.params_from_config(self)
        except SettingError as exc:
            raise e(exc.as_setting() + _SETTING_HINTS.get(exc.names[0], "")) from None
        if self.resrl_grouping not in ("group", "micro_batch"):
            raise e(f"resrl_grouping={self.resrl_grouping!r}: choose 'group' (whole prompt groups) or 'micro_batch' "
                    "(the reference implementation's per-micro-batch weights)")
        if self.length_scale and self.length_start >= self.max_response_length:
            raise e(f"length_scale needs length_start={self.length_start} < max_response_length="
                    f"{self.max_response_length}")
        choices = {"task": ("multiplication", "addition", "math"), "on_long_prompt": ("skip", "error"),
                   "lr_schedule": ("constant", "cosine"), "device": ("auto", "cpu", "cuda"),
                   "param_dtype": ("auto", "bfloat16", "float32"), "fsdp": ("auto", "on", "off"),
                   "progress_bar": ("auto", "on", "off"),
                   "rollout_backend": ("auto", "dynamic", "static", "hf"),
                   "rollout_compile": ("auto", "on", "off")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise e(f"{name}={getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if self.task == "math" and not self.train_files:
            raise e("task=math needs train_files (a list of .jsonl/.parquet files in verl's RLVR layout), "
                    "e.g. --set train_files=[data/train.parquet]")
        if not self.model:
            raise e(f"model is empty: preset {self.preset!r} needs the path of a local Hugging Face model "
                    "directory, e.g. --model /models/Qwen3-4B-Base")
        if self.logprob_memory_mb <= 0:
            raise e("logprob_memory_mb must be > 0")
        if not self.drift_jump_factor > 1:
            raise e(f"drift_jump_factor={self.drift_jump_factor} must be > 1 (a multiple of the running level)")
        if self.drift_window < 1:
            raise e(f"drift_window={self.drift_window} must be >= 1")
        if not 0.0 < self.flips_low_confidence <= 1.0:
            raise e(f"flips_low_confidence={self.flips_low_confidence} must lie in (0, 1] (a probability)")


# ---------------------------------------------------------------------------------- coercion


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _coerce(name: str, value: Any, typ: Any) -> Any:
    """Convert YAML / command-line values to the field's type; ConfigError naming the field if impossible."""
    if value is None:  # no field is optional: None would otherwise become the string 'None'
        raise ConfigError(f"{name}=None is not a valid {getattr(typ, '__name__', typ)}: leave {name} out for its "
                          "default")
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                return value.strip().lower() in _TRUE
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if typ is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return int(value) if isinstance(value, (int, str)) else _raise()
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if origin is list:
            if isinstance(value, str):
                parsed = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
                value = parsed if isinstance(parsed, list) else [parsed]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [str(v).strip() for v in value if str(v).strip()]
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"{name}={value!r} is not a valid {getattr(typ, '__name__', typ)}")


def _raise() -> Any:
    raise ValueError


def _coerce_all(cfg: TrainConfig) -> None:
    for name, typ in _field_types().items():
        setattr(cfg, name, _coerce(name, getattr(cfg, name), typ))


# ---------------------------------------------------------------------------------- presets

_PAPER_MATH: dict[str, Any] = dict(
    model="",  # the user's local model directory: required
    task="math",
    train_prompts=0,
    prompts_per_step=256,
    mini_batch_size=64,
    n=4,
    max_prompt_length=2048,
    max_response_length=4096,
    # The reference implementation's docs say 0.6, but its training rollouts ran at 1.0
    # (docs/MATH.md § Departures from the reference implementation): we train at 1.0 and validate at 0.6.
    temperature=1.0,
    val_temperature=0.6,
    val_every=20,
    val_prompts=512,
    val_n=4,
    lr=1e-6,
    # The reference warms up over 10 rollout batches: 10 x (256 prompts / 64 per update) = 40 optimizer steps.
    warmup_steps=40,
    weight_decay=0.1,
    adam_beta2=0.999,
    kl_coef=0.0,
    entropy_coef=0.0,
    length_scale=True,
    length_start=3500,
    length_end_scale=0.7,
    steps=400,
    save_every=40,
    micro_batch_size=4,
    micro_batch_tokens=32768,
    logprob_micro_batch_size=16,
    gradient_checkpointing=True,
    logprob_memory_mb=1024.0,
    cpu_threads=0,
    lld_in_batch=False,  # one more forward of the batch's positives per rollout batch: opt in
    # The other live diagnostics likewise: a forward of the whole batch, the rollout's logits kept for the entropy
    # prediction, a parameter copy per step for the drift watch.
    entropy_in_batch=False,
    entropy_predict_in_batch=False,
    flips_in_batch=False,
    drift_watch=False,
)

#: name -> overrides of the dataclass defaults (which are the ``tiny`` preset).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    # 3-digit addition with the carry chain written out (responses of 23-31 tokens that right and wrong
    # answers largely share), from its shipped warm start, on the whole pool of ~810k prompts.
    "tiny-addition": dict(task="addition", train_prompts=0, max_response_length=40, model="tiny-addition-warmstart"),
    "qwen3-1.7b-math": dict(_PAPER_MATH),
    "qwen3-4b-math": dict(_PAPER_MATH),
}


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """All fields as plain Python values, in declaration order.

    >>> config_to_dict(TrainConfig())["n"]
    8
    """
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


def field_help(name: str) -> str:
    """The help text of a :class:`TrainConfig` field."""
    for f in fields(TrainConfig):
        if f.name == name:
            return f.metadata["help"]
    raise KeyError(name)


#: Names other trainers give our settings, where the meaning is the same: TRL's ``GRPOConfig`` (and the HF
#: ``TrainingArguments`` it extends) and verl's ``ppo_trainer.yaml`` (dotted, as on verl's command line).
#: Accepted as ``resrl train`` flags, ``--set`` keys and YAML keys; the saved config.yaml uses our names.
#: Left out on purpose: TRL's per_device_train_batch_size (it sets the update size, our micro_batch_size
#: does not), verl's trainer.total_training_steps / save_freq / test_freq (counted in rollout batches, ours
#: in optimizer steps) and rollout.top_k (-1 = off there, 0 here).
ALIASES: dict[str, str] = {
    # TRL GRPOConfig / HF TrainingArguments
    "learning_rate": "lr",
    "num_generations": "n",
    "max_completion_length": "max_response_length",
    "num_iterations": "ppo_epochs",
    "beta": "kl_coef",
    "epsilon": "clip_ratio_low",
    "epsilon_high": "clip_ratio_high",
    "max_grad_norm": "grad_clip",
    "adam_epsilon": "adam_eps",
    "max_steps": "steps",
    "save_steps": "save_every",
    "eval_steps": "val_every",
    "model_name_or_path": "model",
    # verl ppo_trainer.yaml
    "data.train_files": "train_files",
    "data.val_files": "val_files",
    "data.train_batch_size": "prompts_per_step",
    "data.max_prompt_length": "max_prompt_length",
    "data.max_response_length": "max_response_length",
    "actor_rollout_ref.model.path": "model",
    "actor_rollout_ref.model.enable_gradient_checkpointing": "gradient_checkpointing",
    "actor_rollout_ref.rollout.n": "n",
    "actor_rollout_ref.rollout.temperature": "temperature",
    "actor_rollout_ref.rollout.top_p": "top_p",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": "logprob_micro_batch_size",
    "actor_rollout_ref.rollout.val_kwargs.n": "val_n",
    "actor_rollout_ref.rollout.val_kwargs.temperature": "val_temperature",
    "actor_rollout_ref.actor.optim.lr": "lr",
    "actor_rollout_ref.actor.optim.weight_decay": "weight_decay",
    "actor_rollout_ref.actor.optim.lr_warmup_steps": "warmup_steps",
    "actor_rollout_ref.actor.optim.warmup_style": "lr_schedule",
    "actor_rollout_ref.actor.optim.min_lr_ratio": "min_lr_ratio",
    "actor_rollout_ref.actor.ppo_mini_batch_size": "mini_batch_size",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": "micro_batch_size",
    "actor_rollout_ref.actor.ppo_epochs": "ppo_epochs",
    "actor_rollout_ref.actor.grad_clip": "grad_clip",
    "actor_rollout_ref.actor.clip_ratio_low": "clip_ratio_low",
    "actor_rollout_ref.actor.clip_ratio_high": "clip_ratio_high",
    "actor_rollout_ref.actor.clip_ratio_c": "dual_clip",
    "actor_rollout_ref.actor.loss_agg_mode": "loss_agg_mode",
    "actor_rollout_ref.actor.kl_loss_coef": "kl_coef",
    "actor_rollout_ref.actor.entropy_coeff": "entropy_coef",
    "trainer.default_local_dir": "output_dir",
}


def _unknown_key(k: Any, where: str) -> ConfigError:
    import difflib

    names = [f.name for f in fields(TrainConfig)]
    close = difflib.get_close_matches(str(k), [*names, *ALIASES], n=1)
    hint = ""
    if close:
        hint = f" (did you mean {close[0]!r}" + (f", i.e. {ALIASES[close[0]]!r}" if close[0] in ALIASES else "") + "?)"
    return ConfigError(f"{where}: unknown key {k!r}{hint}; `resrl train --help` lists every setting")


def _check_keys(keys: Any, where: str) -> None:
    known = {f.name for f in fields(TrainConfig)}
    for k in keys:
        if k not in known:
            raise _unknown_key(k, where)


def canonical_keys(settings: dict[str, Any], where: str) -> dict[str, Any]:
    """``settings`` with TRL/verl names (:data:`ALIASES`) renamed to ours; verl-style nested mappings
    (``actor_rollout_ref: {rollout: {n: 8}}``) are read as dotted keys. Unknown keys, and one setting given
    twice under different names, are ConfigErrors naming ``where``.

    >>> canonical_keys({"learning_rate": 1e-4, "actor_rollout_ref": {"rollout": {"n": 4}}}, "x.yaml")
    {'lr': 0.0001, 'n': 4}
    """
    known = {f.name for f in fields(TrainConfig)}
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}

    def visit(prefix: str, mapping: dict[str, Any]) -> None:
        for k, v in mapping.items():
            key = f"{prefix}{k}"
            if key not in known and key not in ALIASES and isinstance(v, dict):
                visit(f"{key}.", v)
                continue
            name = key if key in known else ALIASES.get(key)
            if name is None:
                raise _unknown_key(key, where)
            if name in out and out[name] != v:
                raise ConfigError(f"{where}: {given_as[name]!r} and {key!r} both set {name!r} ({out[name]!r} vs "
                                  f"{v!r}); give it once")
            out[name], given_as[name] = v, key

    visit("", settings)
    return out


def preset_config(name: str = "tiny", **overrides: Any) -> TrainConfig:
    """The config of a preset, with keyword overrides.

    >>> preset_config("tiny", algorithm="grpo").algorithm
    'grpo'
    >>> preset_config("qwen3-4b-math", model="/models/Qwen3-4B", train_files=["t.parquet"]).temperature
    1.0
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    _check_keys(overrides, "override")
    return TrainConfig(**{**PRESETS[name], "preset": name, **overrides})


def load_yaml_overrides(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of config fields; unknown keys and bad YAML are ConfigErrors naming the file.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.yaml"
    >>> _ = p.write_text("algorithm: grpo\\nlr: 1.0e-4\\n")
    >>> load_yaml_overrides(p)
    {'algorithm': 'grpo', 'lr': 0.0001}
    >>> _ = p.write_text("output_dir: null\\nmodel:\\n")  # null: the default
    >>> load_yaml_overrides(p)
    {}
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of setting: value, got {type(data).__name__}")
    # `key: null` (or a bare `key:`) means "the default", as leaving the key out does; kept, it would become
    # the string 'None' (a run directory ./None, a model named None).
    return {k: v for k, v in canonical_keys(data, str(path)).items() if v is not None}


def config_from_sources(
    preset: str | None = None,
    yaml_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """Resolve a config: preset < YAML file < overrides (command-line flags, ``--set``).

    The preset is ``preset`` if given, else the YAML file's ``preset`` key, else ``tiny``.

    >>> config_from_sources("tiny", None, {"steps": 4, "algorithm": "grpo"}).steps
    4
    """
    from_yaml = load_yaml_overrides(yaml_path) if yaml_path is not None else {}
    overrides = canonical_keys(dict(overrides or {}), "override")
    name = preset or from_yaml.get("preset") or "tiny"
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    levels = [dict(PRESETS[name]), from_yaml, overrides]
    for i, level in enumerate(levels):
        if "report_to" in level and "tensorboard" not in level:
            # report_to given here outranks the deprecated tensorboard switch of lower levels
            for lower in levels[:i]:
                lower.pop("tensorboard", None)
    merged = {**levels[0], **levels[1], **levels[2], "preset": name}
    return TrainConfig(**merged)


def save_config_yaml(cfg: TrainConfig, path: str | Path) -> None:
    """Write every field of ``cfg`` as YAML (atomically: temporary file, then rename).

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "config.yaml"
    >>> save_config_yaml(TrainConfig(steps=3), p)
    >>> config_from_sources(None, p).steps
    3
    """
    atomic_write(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def config_differences(a: TrainConfig, b: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Fields whose values differ, ``name -> (a, b)``."""
    da, db = config_to_dict(a), config_to_dict(b)
    return {k: (da[k], db[k]) for k in da if da[k] != db[k]}


def replace(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    """A validated copy of ``cfg`` with ``changes``.

    >>> replace(TrainConfig(), steps=2).steps
    2
    """
    _check_keys(changes, "replace")
    if "report_to" in changes and "tensorboard" not in changes:
        changes["tensorboard"] = True  # the new report_to decides, not the old (synced) tensorboard
    return dataclasses.replace(cfg, **changes)
