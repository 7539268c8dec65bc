"""A tiny synthetic run directory, written without the trainer: for tests, benchmarks and examples.

:func:`write_fake_run` writes what docs/RUN_DIRECTORY.md describes — ``config.yaml``,
``metrics.jsonl``, ``checkpoints/step_XXXXXX/`` (a tiny random Qwen3 model, perturbed a little at
every step, with a character tokenizer) and ``rollouts/step_000000.jsonl`` (multiplication prompts
with teacher-forced responses: some correct, some not) — so the probes can be exercised on a
"run" in a second, on any machine, offline.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .. import rundir
from ..checkpoints import _quiet_transformers
from ..probe_sets import ProbeGroup, ProbeSet

__all__ = ["CHARS", "char_tokenizer", "tiny_model", "random_probe_set", "write_fake_run"]

CHARS = "0123456789*=+-. "
"""The fake run's alphabet: the tokenizer has ids 0-3 for <pad> <bos> <eos> <unk>, then these."""


def char_tokenizer(chars: str = CHARS):
    """A character-level ``PreTrainedTokenizerFast`` (pad 0, bos 1, eos 2, unk 3, then one id per char).

    >>> tok = char_tokenizer()
    >>> tok("12*3=").input_ids, tok.decode([5, 6, 2], skip_special_tokens=True)
    ([1, 5, 6, 14, 7, 15], '12')
    """
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(chars))}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per char
    core.decoder = decoders.Fuse()
    core.add_special_tokens(specials)
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


def tiny_model(vocab_size: int = 40, *, hidden: int = 32, layers: int = 2, seed: int = 0,
               tie_word_embeddings: bool = False, dtype: torch.dtype = torch.float32):
    """A freshly initialised tiny Qwen3 causal LM (eval mode); the global RNG is left untouched.

    >>> m = tiny_model(seed=1)
    >>> m.config.vocab_size, m.training
    (40, False)
    """
    from transformers import AutoModelForCausalLM, Qwen3Config

    heads = max(2, hidden // 16)
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=3 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      head_dim=hidden // heads, max_position_embeddings=128, tie_word_embeddings=tie_word_embeddings,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    return model.to(dtype).eval()


def random_probe_set(
    rewards: Sequence[Sequence[float]],
    *,
    vocab_size: int = 40,
    prompt_len: int = 3,
    max_len: int = 5,
    seed: int = 0,
    eos_token_id: int | None = 2,
) -> ProbeSet:
    """Random token ids (never 0-3 inside a response) with the given rewards, one group per entry.

    Responses have 1..``max_len`` tokens, ending with ``eos_token_id`` when it is not None.

    >>> ps = random_probe_set([[1, 0, 0], [0, 0]])
    >>> ps.n_groups, ps.n_responses, [g.status for g in ps.groups]
    (2, 5, ['mixed', 'no_positive'])
    """
    rng = np.random.default_rng(seed)
    groups = []
    for gid, rs in enumerate(rewards):
        prompt = (1, *(int(t) for t in rng.integers(4, vocab_size, prompt_len - 1)))
        resp = []
        for _ in rs:
            n = int(rng.integers(1, max_len + 1))
            ids = [int(t) for t in rng.integers(4, vocab_size, n)]
            if eos_token_id is not None:
                ids[-1] = eos_token_id
            resp.append(tuple(ids))
        groups.append(ProbeGroup(group_id=gid, prompt_ids=prompt, response_ids=tuple(resp),
                                 rewards=tuple(float(r) for r in rs), prompt_uid=f"g{gid}", ground_truth="7"))
    return ProbeSet(tuple(groups), source=f"random(seed={seed})")


def _rollout_rows(tok, n_groups: int, group_size: int, rng: np.random.Generator, unmixed: bool) -> list[dict]:
    rows = []
    for gid in range(n_groups):
        a, b = (int(x) for x in rng.integers(10, 100, 2))
        prompt, truth = f"{a}*{b}=", str(a * b)
        prompt_ids = tok(prompt).input_ids
        if unmixed and gid == n_groups - 1:
            n_right = 0  # the last group: every response wrong
        elif unmixed and gid == n_groups - 2:
            n_right = group_size  # the one before: every response right
        else:
            n_right = 1 + gid % max(1, group_size - 1)
        for i in range(group_size):
            if i < n_right:
                text = truth
            else:
                wrong = int(truth) + int(rng.integers(1, 50)) * (1 if rng.random() < 0.5 else -1)
                text = str(abs(wrong)) if str(abs(wrong)) != truth else truth + "1"
            ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
            r = 1.0 if text == truth else 0.0
            rows.append({"step": 0, "group_id": gid, "prompt_uid": f"mul-{a}*{b}", "data_source": "multiplication",
                         "prompt": prompt, "prompt_ids": prompt_ids, "response": text, "response_ids": ids,
                         "ground_truth": truth, "reward": r, "is_positive": r > 0, "finished": True,
                         "advantage": 0.0, "token_advantages": [0.0] * len(ids), "resrl_weights": None,
                         "resrl_residuals": None, "nthr_weights": None, "nthr_scores": None})
    return rows


def write_fake_run(
    run_dir: str | Path,
    steps: Sequence[int] = (0, 1, 2),
    *,
    n_groups: int = 4,
    group_size: int = 6,
    hidden: int = 32,
    layers: int = 2,
    vocab_size: int = 40,
    seed: int = 0,
    noise: float = 0.02,
    unmixed_groups: bool = True,
    debris: bool = True,
) -> Path:
    """Write a fake run directory (checkpoints at ``steps``, a step-0 rollout dump) and return its path.

    Checkpoint k is the step-0 model plus k small Gaussian perturbations (scale ``noise`` × the
    parameter's std), so log-likelihoods move a little from step to step. With ``unmixed_groups``
    the last group is all wrong and the one before all right (the probes must skip them); with
    ``debris`` a ``.tmp-…`` checkpoint directory is left behind, as an interrupted save would.

    >>> import tempfile
    >>> run = write_fake_run(tempfile.mkdtemp(), steps=(0, 1))
    >>> sorted(p.name for p in (run / "checkpoints").iterdir())
    ['.tmp-step_000002-x', 'step_000000', 'step_000001']
    """
    run = Path(run_dir)
    (run / rundir.CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    (run / rundir.ROLLOUTS).mkdir(exist_ok=True)
    tok = char_tokenizer()
    model = tiny_model(vocab_size, hidden=hidden, layers=layers, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    done = 0
    for step in sorted(steps):
        with torch.no_grad():
            for _ in range(step - done):
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * noise * (p.std() if p.numel() > 1 else 1.0))
        done = step
        ck = rundir.step_dir(run, step)
        with _quiet_transformers():
            model.save_pretrained(ck)
        tok.save_pretrained(ck)
        torch.save({"step": step}, ck / rundir.TRAINER_STATE)
    if debris:
        tmp = run / rundir.CHECKPOINTS / f"{rundir.TMP_PREFIX}-{rundir.step_name(max(steps) + 1)}-x"
        tmp.mkdir(exist_ok=True)
        (tmp / "config.json").write_text("{")  # half-written: must be ignored
    rows = _rollout_rows(tok, n_groups, group_size, np.random.default_rng(seed), unmixed_groups)
    rundir.rollout_path(run, 0).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / rundir.CONFIG).write_text(f"algorithm: grpo\nseed: {seed}\nsteps: {max(steps)}\n")
    (run / rundir.METRICS).write_text("".join(json.dumps({"step": s, "reward/mean": 0.5}) + "\n"
                                               for s in range(1, max(steps) + 1)))
    return run
