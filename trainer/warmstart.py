"""The shipped warm-start policy: the tiny model after a short, deterministic SFT on multiplication.

RL from a random model gets no reward at all; from a converged one, no negatives. The recipe stops
SFT where the *sampled* accuracy (temperature 1, no top-k/top-p) on held-out prompts is between
20% and 70%, so about half of the 8-response groups hold both right and wrong answers: the regime
in which the positive/negative interactions that ResRL is about can be seen.

The shipped checkpoint (5000 steps of 64 sequences, one CPU thread: ~16 minutes on a busy 2-core
machine) samples 25% right on held-out prompts, 42% of its 8-response groups mixed; on training
prompts, which RL samples from, 52% and 65% (`warmstart.json` records all of it). Rebuild it with

    python -m trainer.warmstart --out trainer/assets/tiny_warmstart

That checkpoint memorises: its 2-token answers share almost nothing between right and wrong. The
`addition` task writes its carry chain out (`"347+285="` → `"7+5=12;4+8+1=13;3+2+1=6;=632"`, 23-31
tokens), so right and wrong responses share long prefixes, and its pool of ~810k prompts is far
beyond what SFT memorises. Its warm start (`tiny_addition_warmstart/`: 3 layers, 0.47M parameters,
205 steps, ~30 s) samples 60% right on held-out prompts and 63% on training prompts, 86% of its
8-response groups mixed, and 61% of a positive response's tokens shared with a negative of its
group (same token after the same prefix). Rebuild it with

    python -m trainer.warmstart --task addition --out trainer/assets/tiny_addition_warmstart

Use it:

    >>> model, tok = load_tiny_warmstart()
    >>> task = MultiplicationTask()
    >>> stats = evaluate_sampled(model, tok, task.validation_prompts()[:16], task.reward, num_samples=4)
    >>> 0.0 <= stats["accuracy"] <= 1.0
    True
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from resrl_analysis.sampling import SamplingParams, encode_prompts, sample
from trainer.models import build_tiny_model
from trainer.tasks import Prompt, make_task
from trainer.tasks.multiplication import MultiplicationTask  # noqa: F401  (the module doctest uses it)
from trainer.tokenizer import build_char_tokenizer

TINY_WARMSTART_DIR: Path = Path(__file__).resolve().parent / "assets" / "tiny_warmstart"
#: The warm start of the `addition` task (written-out carry chain): `WarmstartRecipe.for_task("addition")`.
TINY_ADDITION_WARMSTART_DIR: Path = Path(__file__).resolve().parent / "assets" / "tiny_addition_warmstart"
RECORD_FILE = "warmstart.json"


@dataclass
class WarmstartRecipe:
    """Supervised warm-start of the tiny model on a task's training split.

    The loss covers the response (`Task.sft_target`: the answer digits, or the worked solution of
    `addition`) and the EOS only, not the prompt. Defaults reproduce the shipped multiplication
    checkpoint; `WarmstartRecipe.for_task(name)` gives each embedded task's shipped recipe.
    """

    steps: int = 5000
    """Optimizer steps: the main knob. Held-out accuracy plateaus near 25-28% from ~4000 steps on
    while training-prompt accuracy keeps rising (memorisation), so more steps widen that gap."""
    batch_size: int = 64
    """Sequences per step, read from the task's seeded training stream."""
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    warmup_steps: int = 100
    """Linear warmup steps before the cosine decay (to lr * min_lr_ratio at the last step)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr`."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    seed: int = 0
    """Seeds the model initialisation and the training-data order."""
    eval_samples: int = 8
    """Responses sampled per held-out prompt for the recorded accuracy and mixed-group fraction."""
    eval_seed: int = 1234
    """Seed of the evaluation sampler."""
    deterministic: bool = True
    """Run under torch.use_deterministic_algorithms (same machine and build → same weights)."""
    num_threads: int = 1
    """Torch CPU threads during the recipe. One thread makes the result independent of the core
    count, and on 2 busy cores it was also the fastest (small matrices, no spin-waiting)."""
    task: str = "multiplication"
    """Embedded task trained on (`make_task(task)` with its defaults)."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """`Qwen3Config` fields changed from the tiny model's (`trainer.models.tiny_model_config`)."""
    eval_max_new_tokens: int = 6
    """Most tokens sampled per response in the evaluations (EOS included)."""

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.eval_samples, self.num_threads, self.eval_max_new_tokens) < 1:
            raise ValueError("steps, batch_size, eval_samples, num_threads and eval_max_new_tokens must be ≥ 1")
        if self.task not in _TASK_RECIPES:
            raise ValueError(f"task={self.task!r} has no warm-start recipe; choose one of {', '.join(_TASK_RECIPES)}")
        if not 0 <= self.warmup_steps:
            raise ValueError(f"warmup_steps must be ≥ 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


    @classmethod
    def for_task(cls, task: str, **overrides: Any) -> WarmstartRecipe:
        """The shipped recipe of an embedded task, with `overrides` applied.

        >>> r = WarmstartRecipe.for_task("addition", steps=10)
        >>> r.task, r.steps, r.eval_max_new_tokens
        ('addition', 10, 40)
        """
        if task not in _TASK_RECIPES:
            raise ValueError(f"task={task!r} has no warm-start recipe; choose one of {', '.join(_TASK_RECIPES)}")
        return cls(**{**_TASK_RECIPES[task], **overrides})


#: Per task: the fields of the shipped recipe that differ from the dataclass defaults.
_TASK_RECIPES: dict[str, dict[str, Any]] = {
    "multiplication": {},
    # Responses of 23-31 tokens. The model is smaller than the tiny default (3 layers, MLP 256: the
    # shipped file stays under 2 MB); SFT sees 13k of the ~810k prompts, so there is nothing to
    # memorise and held-out accuracy tracks training accuracy. Learning is a sharp transition:
    # sampled accuracy is ~0 at step 100 and ~98% by step 300 (cosine over 300); 190 / 205 / 210 / 240
    # steps give 53 / 60 / 75 / 85% held-out. 205 sits inside the 20-70% band. The errors are spread
    # over the prompts (greedy is right 87% of the time), so more groups are mixed (86%) than with
    # multiplication; about half are mixed only at ~85% accuracy (240 steps).
    "addition": dict(
        task="addition",
        steps=205,
        batch_size=64,
        lr=3e-3,
        warmup_steps=100,
        model_overrides=dict(intermediate_size=256, num_hidden_layers=3),
        eval_max_new_tokens=40,
    ),
}


@dataclass
class WarmstartResult:
    """What a recipe run produced: where, the loss curve, and the held-out evaluation."""

    out_dir: Path
    losses: list[float]
    eval: dict[str, float]
    train_eval: dict[str, float]
    seconds: float
    recipe: WarmstartRecipe = field(default_factory=WarmstartRecipe)


# -- data -----------------------------------------------------------------------------------------


def sft_batch(
    prompts: Sequence[Prompt], tokenizer: PreTrainedTokenizerBase, targets: Sequence[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `<bos> prompt answer <eos>` sequences with labels on the answer and EOS only.

    The answer is `targets[i]` if given (a worked solution, say), else the prompt's ground truth.
    Returns (input_ids, attention_mask, labels), each (B, T); labels are -100 where no loss applies.

    >>> ids, mask, labels = sft_batch([Prompt("u", "2*3=", "6", "s")], build_char_tokenizer())
    >>> build_char_tokenizer().decode(labels[labels >= 0])
    '6<eos>'
    """
    if targets is not None and len(targets) != len(prompts):
        raise ValueError(f"got {len(targets)} targets for {len(prompts)} prompts")
    rows: list[list[int]] = []
    n_prompt: list[int] = []
    for i, p in enumerate(prompts):
        prompt_ids = tokenizer(p.text)["input_ids"]
        answer = p.ground_truth if targets is None else targets[i]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        rows.append(prompt_ids + answer_ids + [tokenizer.eos_token_id])
        n_prompt.append(len(prompt_ids))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)  # (B, T)
    for i, (r, k) in enumerate(zip(rows, n_prompt)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, k : len(r)] = ids[i, k : len(r)]
    return ids, mask, labels


# -- sampling and evaluation ---------------------------------------------------------------------


def _sample_rows(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator | None,
) -> list[tuple[list[int], bool]]:
    """(response token ids with the EOS if any, finished) per prompt, as the rollouts sample them."""
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)
    batch = sample(model, encode_prompts(tokenizer, prompts), params, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, generator=generator, return_logprobs=False)
    return list(zip(batch.response_token_lists(), batch.finished.tolist()))


def shared_token_fraction(groups: Sequence[Sequence[tuple[Sequence[int], bool]]]) -> float:
    """Fraction of positive-response tokens that some negative response of their group shares.

    `groups` holds, per prompt, (response token ids, correct) pairs. Only mixed groups count. A token
    of a positive response at position t is *shared* if some negative response of the group has the
    same token at t after the same prefix (tokens 0..t-1), i.e. if t is below the longest common
    prefix with some negative. Token-weighted over all positive responses of mixed groups; NaN if
    no group is mixed.

    >>> shared_token_fraction([[([5, 6, 7, 2], True), ([5, 6, 8, 2], False), ([9, 2], False)]])
    0.5
    """
    shared = total = 0
    for group in groups:
        neg = [r for r, ok in group if not ok]
        pos = [r for r, ok in group if ok]
        if not neg or not pos:
            continue
        for p in pos:
            best = 0
            for q in neg:
                k = 0
                while k < min(len(p), len(q)) and p[k] == q[k]:
                    k += 1
                best = max(best, k)
            shared += best
            total += len(p)
    return shared / total if total else float("nan")


def evaluate_sampled(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    reward_fn: Callable[[str, str], float],
    num_samples: int = 8,
    temperature: float = 1.0,
    max_new_tokens: int = 6,
    seed: int = 0,
    batch_size: int = 2048,
) -> dict[str, float]:
    """Sampled accuracy and group statistics over `prompts`, `num_samples` responses each.

    Returns accuracy (mean reward), mixed_fraction (prompts with some right and some wrong
    responses), all_correct_fraction, all_wrong_fraction, shared_token_fraction (of the positive
    responses' tokens in mixed groups, :func:`shared_token_fraction`), response_tokens_mean / _min /
    _max (sampled response lengths, EOS included), truncated_fraction (no EOS within
    `max_new_tokens`), num_prompts, num_samples.
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    flat = [p for p in prompts for _ in range(num_samples)]
    rewards: list[float] = []
    rows: list[tuple[list[int], bool]] = []
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        got = _sample_rows(model, tokenizer, [p.text for p in chunk], max_new_tokens, temperature, gen)
        texts = tokenizer.batch_decode([r[:-1] if done else r for r, done in got], skip_special_tokens=True)
        rewards.extend(reward_fn(t, p.ground_truth) for t, p in zip(texts, chunk))
        rows.extend(got)
    model.train(was_training)
    r = torch.tensor(rewards).view(len(prompts), num_samples)  # (P, G)
    correct = (r > 0).sum(-1)  # (P,)
    lengths = torch.tensor([len(ids) for ids, _ in rows], dtype=torch.float32)  # (P*G,)
    groups = [[(rows[i * num_samples + j][0], rewards[i * num_samples + j] > 0) for j in range(num_samples)]
              for i in range(len(prompts))]
    return {
        "accuracy": float(r.mean()),
        "mixed_fraction": float(((correct > 0) & (correct < num_samples)).float().mean()),
        "all_correct_fraction": float((correct == num_samples).float().mean()),
        "all_wrong_fraction": float((correct == 0).float().mean()),
        "shared_token_fraction": shared_token_fraction(groups),
        "response_tokens_mean": float(lengths.mean()),
        "response_tokens_min": float(lengths.min()),
        "response_tokens_max": float(lengths.max()),
        "truncated_fraction": float(sum(not done for _, done in rows) / len(rows)),
        "num_prompts": float(len(prompts)),
        "num_samples": float(num_samples),
    }


# -- the recipe -----------------------------------------------------------------------------------


def _lr_at(step: int, recipe: WarmstartRecipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    span = max(1, recipe.steps - recipe.warmup_steps)
    progress = min(1.0, (step - recipe.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return recipe.lr * (recipe.min_lr_ratio + (1.0 - recipe.min_lr_ratio) * cosine)


def run_warmstart(
    out_dir: str | Path,
    recipe: WarmstartRecipe | None = None,
    evaluate: bool = True,
    log_every: int = 100,
    verbose: bool = True,
    probe_every: int = 0,
) -> WarmstartResult:
    """Train the tiny model on the recipe's task and save it (model, tokenizer, `warmstart.json`).

    Args:
        out_dir: created if needed; existing files of the same names are overwritten.
        recipe: hyper-parameters (defaults: the shipped checkpoint's).
        evaluate: measure sampled accuracy on all held-out prompts (and as many training prompts)
            afterwards and record it; turn off for quick tests.
        log_every: print the mean loss every this many steps (if verbose).
        probe_every: if > 0 (and verbose), also print a quick sampled accuracy on 128 held-out
            prompts every this many steps: the trajectory to re-tune `steps` from. It uses its own
            generator, so it does not change the trained weights.

    >>> import tempfile
    >>> res = run_warmstart(tempfile.mkdtemp(), WarmstartRecipe(steps=3, batch_size=8), evaluate=False,
    ...                     verbose=False)
    >>> len(res.losses)
    3
    """
    recipe = recipe or WarmstartRecipe()
    out = Path(out_dir)
    t0 = time.perf_counter()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(recipe.deterministic)
    torch.set_num_threads(recipe.num_threads)
    try:
        tokenizer = build_char_tokenizer()
        task = make_task(recipe.task)
        model = build_tiny_model(seed=recipe.seed, tokenizer=tokenizer, **recipe.model_overrides)
        n_eval = recipe.eval_max_new_tokens
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=recipe.weight_decay)
        losses: list[float] = []
        val_probe = task.validation_prompts()[::4][:128]
        train_probe = [task.train_item(i) for i in range(0, task.num_train, task.num_train // 128)][:128]
        for step in range(recipe.steps):
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, recipe)
            batch = task.train_batch(step * recipe.batch_size, recipe.batch_size, seed=recipe.seed)
            ids, mask, labels = sft_batch(batch, tokenizer, [task.sft_target(p) for p in batch])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            if verbose and (step + 1) % log_every == 0:
                recent = losses[-log_every:]
                print(
                    f"step {step + 1:5d}  loss {sum(recent) / len(recent):.4f}  "
                    f"lr {opt.param_groups[0]['lr']:.2e}  {time.perf_counter() - t0:.0f}s",
                    flush=True,
                )
            if verbose and probe_every > 0 and (step + 1) % probe_every == 0:
                held = evaluate_sampled(model, tokenizer, val_probe, task.reward, max_new_tokens=n_eval)
                seen = evaluate_sampled(model, tokenizer, train_probe, task.reward, max_new_tokens=n_eval)
                print(
                    f"step {step + 1:5d}  sampled accuracy (128 prompts): held-out {held['accuracy']:.3f} "
                    f"(mixed {held['mixed_fraction']:.3f}, shared {held['shared_token_fraction']:.3f}), "
                    f"train {seen['accuracy']:.3f}",
                    flush=True,
                )
        train_seconds = time.perf_counter() - t0
        model.eval()
        ev: dict[str, float] = {}
        train_ev: dict[str, float] = {}
        if evaluate:
            val = task.validation_prompts()
            ev = evaluate_sampled(model, tokenizer, val, task.reward, recipe.eval_samples, max_new_tokens=n_eval,
                                  seed=recipe.eval_seed)
            ev["greedy_accuracy"] = evaluate_sampled(
                model, tokenizer, val, task.reward, 1, temperature=0.0, max_new_tokens=n_eval, seed=recipe.eval_seed
            )["accuracy"]
            # The same number of *training* prompts: a large gap would mean memorisation, and RL
            # samples from the training split.
            seen = [task.train_item(i) for i in range(0, task.num_train, task.num_train // len(val))][: len(val)]
            train_ev = evaluate_sampled(model, tokenizer, seen, task.reward, recipe.eval_samples,
                                        max_new_tokens=n_eval, seed=recipe.eval_seed)
        _save(model, tokenizer, out, recipe, losses, ev, train_ev, train_seconds, task.default_max_new_tokens)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(was_threads)
    seconds = time.perf_counter() - t0
    if verbose and evaluate:
        print(f"held-out: {json.dumps(ev)}\ntrain:    {json.dumps(train_ev)}\n{seconds:.0f}s total", flush=True)
    return WarmstartResult(out, losses, ev, train_ev, seconds, recipe)


def _save(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    recipe: WarmstartRecipe,
    losses: list[float],
    ev: dict[str, float],
    train_ev: dict[str, float],
    train_seconds: float,
    max_new_tokens: int,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # `model.generate(...)` with no sampling arguments then samples like the RL rollouts do
    # (full softmax), instead of transformers' greedy / top_k=50 defaults.
    gen = model.generation_config
    gen.do_sample, gen.temperature, gen.top_k, gen.top_p = True, 1.0, 0, 1.0
    gen.max_new_tokens = max_new_tokens
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    n = len(losses)
    k = max(1, n // 20)
    record: dict[str, Any] = {
        "task": recipe.task,
        "recipe": asdict(recipe),
        "sampling": {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": recipe.eval_max_new_tokens},
        "heldout": ev,
        "train_subset": train_ev,
        "sampled_accuracy": ev.get("accuracy"),
        "mixed_group_fraction": ev.get("mixed_fraction"),
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
        # The first losses exactly (repr round-trips floats): a shortened run reproduces them bit for bit,
        # since the warm-up part of the schedule does not depend on the total step count.
        "loss_head": losses[: min(n, recipe.warmup_steps, 20)],
        "loss_curve": [round(sum(losses[i : i + k]) / len(losses[i : i + k]), 5) for i in range(0, n, k)],
        "train_seconds": round(train_seconds, 1),
        "num_parameters": model.num_parameters(),
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            # The vector instructions torch's CPU kernels dispatch to (AVX2, AVX512, ...): the same build on
            # another instruction set rounds some float32 reductions differently.
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(),
        },
    }
    (out / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")


# -- loading --------------------------------------------------------------------------------------


def load_tiny_warmstart(
    path: str | Path = TINY_WARMSTART_DIR, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the shipped warm-start (or another recipe output) as (model in eval mode, tokenizer).

    >>> model, tok = load_tiny_warmstart()
    >>> model.config.model_type, tok.eos_token
    ('qwen3', '<eos>')
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no warm-start checkpoint at {path}; build it with `python -m trainer.warmstart --out {path}`"
        )
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def read_warmstart_record(path: str | Path = TINY_WARMSTART_DIR) -> dict[str, Any]:
    """The `warmstart.json` written with a checkpoint (recipe, measured accuracy, environment)."""
    return json.loads((Path(path) / RECORD_FILE).read_text())


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m trainer.warmstart [--task NAME] --out DIR [--steps N] [--seed S]`.

    Hyper-parameters not given on the command line are the task's shipped recipe
    (`WarmstartRecipe.for_task`); `--out` defaults to the task's shipped asset directory.
    """
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="multiplication", choices=sorted(_TASK_RECIPES),
                    help="embedded task (its shipped recipe gives the defaults below)")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: the task's shipped asset)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate")
    ap.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay")
    ap.add_argument("--seed", type=int, default=None, help="init and data-order seed")
    ap.add_argument("--no-eval", action="store_true", help="skip the sampled evaluation")
    ap.add_argument("--probe-every", type=int, default=0, help="quick held-out accuracy every N steps")
    args = ap.parse_args(argv)
    given = {k: v for k, v in dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                   weight_decay=args.weight_decay, seed=args.seed).items() if v is not None}
    recipe = WarmstartRecipe.for_task(args.task, **given)
    out = args.out or (TINY_ADDITION_WARMSTART_DIR if args.task == "addition" else TINY_WARMSTART_DIR)
    run_warmstart(out, recipe, evaluate=not args.no_eval, probe_every=args.probe_every)


if __name__ == "__main__":
    main()
