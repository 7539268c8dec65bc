"""The warm-start recipe (shortened) and the shipped checkpoint."""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from resrl_analysis.sampling import sample_texts
from trainer.models import build_tiny_model
from trainer.tasks import Prompt, make_task
from trainer.tasks.multiplication import MultiplicationTask
from trainer.tokenizer import build_char_tokenizer
from trainer.warmstart import (
    TINY_ADDITION_WARMSTART_DIR,
    TINY_WARMSTART_DIR,
    WarmstartRecipe,
    evaluate_sampled,
    load_tiny_warmstart,
    read_warmstart_record,
    run_warmstart,
    sft_batch,
    shared_token_fraction,
)


@pytest.mark.unit
def test_sft_batch_labels_only_answer_and_eos():
    tok = build_char_tokenizer()
    prompts = [Prompt("a", "12*34=", "408", "m"), Prompt("b", "99*99=", "9801", "m")]
    ids, mask, labels = sft_batch(prompts, tok)
    assert ids.shape == mask.shape == labels.shape == (2, 12)
    assert tok.decode(ids[1]) == "<bos>99*99=9801<eos>"
    assert tok.decode(labels[0][labels[0] >= 0]) == "408<eos>"
    assert mask[0].tolist() == [1] * 11 + [0]  # right padding for teacher forcing
    assert ids[0, -1].item() == tok.pad_token_id and labels[0, -1].item() == -100


@pytest.mark.integration
def test_sampler_greedy_matches_unbatched_reference():
    # The KV-cached, left-padded batch sampler must produce what plain one-prompt decoding does.
    tok = build_char_tokenizer()
    model = build_tiny_model(seed=3, tokenizer=tok).eval()
    prompts = ["1*2=", "12*34=", "hello world 5", "7"]
    batched = sample_texts(model, tok, prompts, max_new_tokens=6, temperature=0)
    for prompt, got in zip(prompts, batched):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        out = []
        with torch.no_grad():
            for _ in range(6):
                nxt = model(ids).logits[0, -1].argmax()
                if nxt.item() == tok.eos_token_id:
                    break
                out.append(nxt.item())
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        assert got == tok.decode(out, skip_special_tokens=True)


@pytest.mark.integration
def test_sampler_is_seeded_and_samples_full_softmax():
    tok = build_char_tokenizer()
    model = build_tiny_model(seed=0, tokenizer=tok).eval()
    prompts = ["12*34="] * 64

    def draw(seed: int) -> list[str]:
        return sample_texts(model, tok, prompts, 3, generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(0), draw(0), draw(1)
    assert a == b and a != c
    # An untrained model's softmax is close to uniform over 101 tokens: full-softmax sampling
    # gives many distinct first characters (top_k=50 could give at most 50, greedy just 1).
    assert len({s[:1] for s in a + c}) > 40


@pytest.mark.integration
def test_short_recipe_loss_falls_and_output_loads(tmp_path):
    recipe = WarmstartRecipe(steps=30, batch_size=16, lr=3e-3, warmup_steps=5, eval_samples=2)
    res = run_warmstart(tmp_path, recipe, evaluate=False, verbose=False)
    assert len(res.losses) == 30
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / 5
    assert last < 0.75 * first, (first, last)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.model_type == "qwen3" and tok.eos_token == "<eos>"
    assert (tmp_path / "model.safetensors").is_file()
    rec = json.loads((tmp_path / "warmstart.json").read_text())
    assert rec["recipe"]["steps"] == 30 and rec["loss_last"] < rec["loss_first"]
    # the recipe restores the global torch settings it changes
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.integration
def test_recipe_is_deterministic(tmp_path):
    recipe = WarmstartRecipe(steps=4, batch_size=16)
    a = run_warmstart(tmp_path / "a", recipe, evaluate=False, verbose=False)
    b = run_warmstart(tmp_path / "b", recipe, evaluate=False, verbose=False)
    assert a.losses == b.losses
    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "a").lm_head.weight
    wb = AutoModelForCausalLM.from_pretrained(tmp_path / "b").lm_head.weight
    assert torch.equal(wa, wb)


@pytest.mark.unit
def test_recipe_validation():
    with pytest.raises(ValueError):
        WarmstartRecipe(steps=0)
    with pytest.raises(ValueError):
        WarmstartRecipe(min_lr_ratio=2.0)


# -- the shipped asset --------------------------------------------------------------------------------


@pytest.mark.integration
def test_shipped_record_in_band():
    rec = read_warmstart_record()
    assert 0.2 <= rec["sampled_accuracy"] <= 0.7
    assert 0.3 <= rec["mixed_group_fraction"] <= 0.8
    assert rec["heldout"]["num_samples"] == 8 and rec["heldout"]["num_prompts"] >= 400
    assert rec["sampling"] == {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": 6}
    # a few MB, not a large binary in the repository
    size = (TINY_WARMSTART_DIR / "model.safetensors").stat().st_size
    assert size < 8 * 2**20


@pytest.mark.integration
def test_shipped_checkpoint_quick_sampled_eval():
    model, tok = load_tiny_warmstart()
    assert model.config.model_type == "qwen3" and not model.training
    rec = read_warmstart_record()
    task = MultiplicationTask()
    prompts = task.validation_prompts()[::8]  # 64 held-out prompts spread over the split
    assert len(prompts) == 64
    stats = evaluate_sampled(model, tok, prompts, task.reward, num_samples=4, seed=7)
    # 64 prompts x 4 samples: with prompt-level variation the standard error of the accuracy is at
    # most sqrt(0.25 / 64) ≈ 0.063, so ±0.2 around the recorded value is > 3 standard errors.
    assert abs(stats["accuracy"] - rec["sampled_accuracy"]) < 0.2, (stats, rec["sampled_accuracy"])
    assert 0.05 < stats["accuracy"] < 0.9
    # temperature 1 is noisier than greedy, and greedy is clearly better than chance
    greedy = evaluate_sampled(model, tok, prompts, task.reward, num_samples=1, temperature=0.0)
    assert greedy["accuracy"] > 0.1


# -- the addition task's recipe and shipped asset -------------------------------------------------------


@pytest.mark.unit
def test_sft_batch_trains_on_the_worked_solution():
    tok = build_char_tokenizer()
    task = make_task("addition")
    p = Prompt("a", "347+285=", "632", "addition")
    ids, mask, labels = sft_batch([p], tok, [task.sft_target(p)])
    assert tok.decode(labels[0][labels[0] >= 0]) == "7+5=12;4+8+1=13;3+2+1=6;=632<eos>"
    assert tok.decode(ids[0]) == "<bos>347+285=7+5=12;4+8+1=13;3+2+1=6;=632<eos>"
    with pytest.raises(ValueError, match="targets for"):
        sft_batch([p], tok, [])


@pytest.mark.unit
def test_shared_token_fraction_against_a_brute_force_reference():
    gen = torch.Generator().manual_seed(0)
    groups = []
    for _ in range(30):
        base = torch.randint(0, 3, (6,), generator=gen).tolist()
        group = []
        for _ in range(5):
            cut = int(torch.randint(0, 7, (1,), generator=gen))
            tail = torch.randint(0, 3, (int(torch.randint(0, 4, (1,), generator=gen)),), generator=gen).tolist()
            group.append((base[:cut] + tail, bool(torch.rand(1, generator=gen) < 0.5)))
        groups.append(group)

    def shared_at(pos: list[int], t: int, negs: list[list[int]]) -> bool:  # the definition, position by position
        return any(len(q) > t and q[: t + 1] == pos[: t + 1] for q in negs)

    num = den = 0
    for g in groups:
        negs = [r for r, ok in g if not ok]
        if negs and len(negs) < len(g):
            for r, ok in g:
                if ok:
                    num += sum(shared_at(r, t, negs) for t in range(len(r)))
                    den += len(r)
    assert den > 0 and shared_token_fraction(groups) == pytest.approx(num / den)
    assert math.isnan(shared_token_fraction([[([1, 2], True)]]))


@pytest.mark.integration
def test_addition_recipe_short_run_reproduces_the_shipped_first_losses(tmp_path):
    rec = read_warmstart_record(TINY_ADDITION_WARMSTART_DIR)
    head = rec["loss_head"]
    recipe = WarmstartRecipe.for_task("addition", steps=len(head))
    assert {k: v for k, v in asdict(recipe).items() if k != "steps"} == \
        {k: v for k, v in rec["recipe"].items() if k != "steps"}
    res = run_warmstart(tmp_path, recipe, evaluate=False, verbose=False)
    env = rec["environment"]
    # Bit for bit only on the same build and instruction set (one thread, deterministic algorithms): torch's CPU
    # kernels round some float32 reductions differently under AVX2 and AVX512 (index 8 of the shipped head differs
    # by 5e-7 on an AVX512 machine). Elsewhere the curve must agree to 1e-4; determinism on this machine is
    # test_addition_recipe_is_bit_for_bit_deterministic_here.
    same = (env["torch"], env["machine"], env.get("cpu_capability")) == (
        torch.__version__, platform.machine(), torch.backends.cpu.get_cpu_capability())
    if same:
        assert res.losses == head
    else:
        assert res.losses == pytest.approx(head, rel=1e-4)


@pytest.mark.integration
def test_addition_recipe_is_bit_for_bit_deterministic_here(tmp_path):
    recipe = WarmstartRecipe.for_task("addition", steps=3)
    a = run_warmstart(tmp_path / "a", recipe, evaluate=False, verbose=False)
    b = run_warmstart(tmp_path / "b", recipe, evaluate=False, verbose=False)
    assert a.losses == b.losses and len(a.losses) == 3


@pytest.mark.integration
def test_shipped_addition_record_generalises_and_is_in_band():
    rec = read_warmstart_record(TINY_ADDITION_WARMSTART_DIR)
    held, seen = rec["heldout"], rec["train_subset"]
    assert rec["task"] == "addition" and held["num_samples"] == 8 and held["num_prompts"] >= 1000
    assert 0.2 <= held["accuracy"] <= 0.7 and abs(held["accuracy"] - seen["accuracy"]) <= 0.1
    assert 0.3 <= held["mixed_fraction"] <= 0.9  # errors spread over prompts: more mixed groups than multiplication
    assert held["shared_token_fraction"] > 0.3  # right and wrong answers share long stretches
    assert 15 <= held["response_tokens_mean"] <= 40
    assert (TINY_ADDITION_WARMSTART_DIR / "model.safetensors").stat().st_size < 2.1 * 2**20


@pytest.mark.integration
def test_shipped_addition_checkpoint_quick_sampled_eval():
    model, tok = load_tiny_warmstart(TINY_ADDITION_WARMSTART_DIR)
    rec = read_warmstart_record(TINY_ADDITION_WARMSTART_DIR)
    task = make_task("addition")
    prompts = task.validation_prompts()[::16]  # 64 held-out prompts spread over the split
    assert len(prompts) == 64
    stats = evaluate_sampled(model, tok, prompts, task.reward, num_samples=4, seed=7,
                             max_new_tokens=rec["sampling"]["max_new_tokens"])
    # 64 prompts x 4 samples: the standard error is at most ~0.063, so ±0.2 is > 3 standard errors.
    assert abs(stats["accuracy"] - rec["sampled_accuracy"]) < 0.2, (stats, rec["sampled_accuracy"])
    assert stats["truncated_fraction"] < 0.1 and 15 <= stats["response_tokens_mean"] <= 40


@pytest.mark.integration
def test_tiny_addition_preset_trains_four_steps(tmp_path):
    from trainer.config import preset_config
    from trainer.loop import train
    from trainer.metrics_log import read_metrics
    from trainer.setup import build_task

    cfg = preset_config("tiny-addition", steps=4, save_every=4, output_dir=str(tmp_path / "run"),
                        progress_bar="off", report_to=["none"], dump_rollouts=False)
    assert build_task(cfg, build_char_tokenizer()).name == "addition"
    run = train(cfg)
    rows = read_metrics(run / "metrics.jsonl")
    assert len(rows) == 4 and all(math.isfinite(r["actor/pg_loss"]) for r in rows)
