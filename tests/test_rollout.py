"""Tests for resrl_analysis.sampling: filtering against slow references, backends against HF generate and each
other, teacher-forced log-probs, generator reproducibility, EOS/mask bookkeeping, sampling frequencies."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from scipy import stats
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from resrl_analysis.forward import pack_rows, response_forward
from resrl_analysis.sampling import (
    SampledBatch,
    SamplingParams,
    draw_uniforms,
    filter_logits,
    hf_compat,
    release_static_cache,
    sample,
    sample_from_uniforms,
)
from resrl_analysis.sampling import static as sampling_static

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 40
PAD, EOS = 0, 3
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18]]  # different lengths: left padding


def _tiny(arch: str = "qwen3", seed: int = 0) -> torch.nn.Module:
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        # Larger init than the default 0.02 so next-token distributions are peaked: greedy comparisons
        # between numerically different (but equivalent) computations do not hinge on near-ties.
        initializer_range=0.2,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=1,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        # Absolute position embeddings: unlike RoPE (relative), a per-row position offset changes the output,
        # so this is the model on which wrong positions for left-padded rows are visible.
        model = GPT2LMHeadModel(
            GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2,
                       pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1, attn_implementation="sdpa")
        )
    return model.eval()


@pytest.fixture(scope="module")
def qwen() -> torch.nn.Module:
    return _tiny("qwen3")


@pytest.fixture(scope="module")
def eos_model() -> torch.nn.Module:
    """A model biased towards EOS: most rows stop after a few tokens, but not all at the same step."""
    model = _tiny("llama", seed=1)
    bias = torch.zeros(VOCAB)
    bias[EOS] = 2.5
    model.lm_head.register_forward_hook(lambda _m, _i, out: out + bias)
    return model


def _teacher_forced_logits(model: torch.nn.Module, batch: SampledBatch) -> torch.Tensor:
    rows = pack_rows(batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    with torch.no_grad():
        return response_forward(model, rows, return_logits=True).logits.float()  # (B, Tr, V)


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of (B, V) logits, with one uniform per row from ``generator`` (as the decode loop)."""
    uniforms = None if params.greedy else draw_uniforms((logits.shape[0],), generator, logits.device)
    return sample_from_uniforms(logits, params, uniforms)


# ------------------------------------------------------------------------------------------------------
# SamplingParams
# ------------------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"n": 0}, "n"),
    ],
)
@pytest.mark.unit
def test_sampling_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.unit
def test_sample_rejects_bad_arguments(qwen):
    with pytest.raises(ValueError, match="backend"):
        sample(qwen, PROMPTS, SamplingParams(), eos_token_id=EOS, pad_token_id=PAD, backend="vllm")
    with pytest.raises(ValueError, match="at least one token"):
        sample(qwen, [[1], []], SamplingParams(), eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="non-empty"):
        sample(qwen, [], SamplingParams(), eos_token_id=EOS, pad_token_id=PAD)


# ------------------------------------------------------------------------------------------------------
# filter_logits against an independent slow reference
# ------------------------------------------------------------------------------------------------------


def _reference_filter(row: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """Plain-Python temperature -> top-k -> top-p, written from the definitions (no torch)."""
    x = [v / temperature if temperature > 0 else v for v in row]
    keep = [True] * len(x)
    if 0 < top_k < len(x):
        kth = sorted(x, reverse=True)[top_k - 1]
        keep = [v >= kth for v in x]
    if top_p < 1.0:
        kept = [i for i in range(len(x)) if keep[i]]
        m = max(x[i] for i in kept)
        z = sum(math.exp(x[i] - m) for i in kept)
        prob = {i: math.exp(x[i] - m) / z for i in kept}
        mass_above = 0.0
        for i in sorted(kept, key=lambda j: -x[j]):
            if mass_above >= top_p:
                keep[i] = False
            mass_above += prob[i]
    return [v if k else -math.inf for v, k in zip(x, keep)]


def _near_top_p_boundary(row: list[float], temperature: float, top_k: int, top_p: float) -> bool:
    """True when a token's exclusive cumulative mass is within float noise of top_p (ambiguous case)."""
    x = [v / temperature for v in row]
    if 0 < top_k < len(x):
        kth = sorted(x, reverse=True)[top_k - 1]
        x = [v for v in x if v >= kth]
    m = max(x)
    z = sum(math.exp(v - m) for v in x)
    mass = 0.0
    for v in sorted(x, reverse=True):
        if abs(mass - top_p) < 1e-5:
            return True
        mass += math.exp(v - m) / z
    return False


@pytest.mark.unit
@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.9), (1.3, 8, 0.6), (0.5, 1, 0.5), (1.0, 0, 0.05), (2.0, 39, 0.99)],
)
def test_filter_logits_matches_slow_reference(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(1234)
    logits = torch.randn(64, VOCAB, generator=g) * 3  # (64, V) continuous: no ties
    got = filter_logits(logits, temperature, top_k, top_p)
    assert got.dtype == torch.float32 and got.shape == logits.shape
    checked = 0
    for r in range(logits.shape[0]):
        row = logits[r].tolist()
        if top_p < 1.0 and _near_top_p_boundary(row, temperature, top_k, top_p):
            continue
        ref = torch.tensor(_reference_filter(row, temperature, top_k, top_p), dtype=torch.float32)
        assert torch.equal(torch.isinf(got[r]), torch.isinf(ref)), f"row {r}: kept set differs"
        finite = ~torch.isinf(ref)
        torch.testing.assert_close(got[r][finite], ref[finite], rtol=1e-6, atol=1e-6)
        assert finite.any()
        checked += 1
    assert checked >= 60  # the boundary skip must stay rare
    if top_k:
        assert (~torch.isinf(got)).sum(-1).max() <= top_k


@pytest.mark.unit
def test_filter_logits_edge_cases():
    # top-k keeps every token tied with the k-th largest (HF semantics).
    x = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(x, 1.0, 1, 1.0)).tolist() == [[True, False, False, True]]
    # tiny top_p keeps exactly the argmax; temperature 0 leaves the scale alone; bf16 input -> float32 out.
    y = torch.tensor([[0.5, 3.0, -1.0]], dtype=torch.bfloat16)
    out = filter_logits(y, 0.0, 0, 1e-6)
    assert out.dtype == torch.float32
    assert out[0, 1].item() == 3.0 and torch.isinf(out[0, [0, 2]]).all()


# ------------------------------------------------------------------------------------------------------
# sample_next: distribution, filtering, generator
# ------------------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8)])
def test_sample_next_frequencies_match_filtered_softmax(temperature, top_k, top_p):
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.5])  # (V,) with p(top) ~ 0.5
    n = 40_000
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    tokens, logprobs = sample_next(base.expand(n, -1), params, torch.Generator().manual_seed(7))
    expected = torch.softmax(filter_logits(base, temperature, top_k, top_p).double(), dim=-1)  # (V,)
    counts = torch.bincount(tokens, minlength=base.numel()).double()
    support = expected > 0
    assert counts[~support].sum() == 0, "sampled a filtered-out token"
    chi2 = stats.chisquare(counts[support].numpy(), (expected[support] * n).numpy())
    assert chi2.pvalue > 1e-4, f"frequencies {counts / n} vs {expected}"
    # The returned log-probs are those of the sampling distribution.
    torch.testing.assert_close(logprobs.double(), expected.log()[tokens], rtol=0, atol=1e-5)


@pytest.mark.unit
def test_sample_next_uniform_distribution_is_not_degenerate():
    """A chi-square that also fails for a biased sampler: flat logits must give flat counts."""
    n, v = 30_000, 10
    tokens, _ = sample_next(torch.zeros(n, v), SamplingParams(), torch.Generator().manual_seed(3))
    counts = torch.bincount(tokens, minlength=v).numpy()
    assert stats.chisquare(counts).pvalue > 1e-4
    assert counts.min() > 0


@pytest.mark.unit
def test_sample_next_greedy_and_generator_reproducibility():
    logits = torch.randn(16, VOCAB, generator=torch.Generator().manual_seed(0))
    tok, lp = sample_next(logits, SamplingParams(temperature=0.0))
    assert torch.equal(tok, logits.argmax(-1))
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).max(-1).values)
    p = SamplingParams(temperature=1.0)
    a, _ = sample_next(logits, p, torch.Generator().manual_seed(11))
    b, _ = sample_next(logits, p, torch.Generator().manual_seed(11))
    c, _ = sample_next(logits, p, torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ------------------------------------------------------------------------------------------------------
# Backends: positions/masks against HF generate, static vs dynamic
# ------------------------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("arch", ["qwen3", "llama", "gpt2"])
def test_dynamic_greedy_equals_hf_generate_left_padded(arch):
    model = _tiny(arch, seed=2)
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    ours = sample(model, PROMPTS, params, eos_token_id=None, pad_token_id=PAD, backend="dynamic")
    assert ours.backend == "dynamic"
    assert ours.prompt_ids.shape == (len(PROMPTS), 7)
    assert ours.prompt_mask.sum(-1).tolist() == [len(p) for p in PROMPTS]
    # Reference: HF generate on the same left-padded batch (this is what checks positions and masks).
    # No EOS for HF either (min_new_tokens would instead mask the EOS logit and change the argmax).
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = model.generate(
            input_ids=ours.prompt_ids,
            attention_mask=ours.prompt_mask.long(),
            do_sample=False,
            max_new_tokens=10,
            pad_token_id=PAD,
        )
    assert ref.shape[1] == ours.prompt_length + 10
    assert torch.equal(ours.response_ids, ref[:, ours.prompt_length :])
    # And each prompt alone (no padding at all) gives the same continuation: padding is invisible.
    for i, p in enumerate(PROMPTS):
        alone = sample(model, [p], params, eos_token_id=None, pad_token_id=PAD, backend="dynamic")
        assert torch.equal(alone.response_ids[0], ours.response_ids[i])


@pytest.mark.integration
@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_static_uncompiled_equals_dynamic(arch):
    model = _tiny(arch, seed=4)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12, n=2)
    dyn = sample(model, PROMPTS, greedy, eos_token_id=None, pad_token_id=PAD, backend="dynamic")
    sta = sample(model, PROMPTS, greedy, eos_token_id=None, pad_token_id=PAD, backend="static", compile=False)
    assert sta.backend == "static"
    assert torch.equal(dyn.response_ids, sta.response_ids)
    torch.testing.assert_close(dyn.response_logprobs, sta.response_logprobs, rtol=0, atol=1e-5)
    # Sampling consumes the same uniforms in both loops, so the same seed gives the same tokens.
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=12, n=2)
    dyn = sample(model, PROMPTS, params, eos_token_id=EOS, pad_token_id=PAD,
                 generator=torch.Generator().manual_seed(5), backend="dynamic")
    # The second static call reuses the cache of the first (reset in place), and the reset must be complete.
    sta = sample(model, PROMPTS, params, eos_token_id=EOS, pad_token_id=PAD,
                 generator=torch.Generator().manual_seed(5), backend="static", compile=False)
    assert len(sampling_static._STATIC_RUNNERS[model]) == 1
    assert torch.equal(dyn.response_ids, sta.response_ids)
    assert torch.equal(dyn.response_mask, sta.response_mask)
    # A shorter prompt batch of the same size also reuses it (longer cache, extra slots masked).
    short = [p[-2:] for p in PROMPTS]
    dyn = sample(model, short, greedy, eos_token_id=None, pad_token_id=PAD, backend="dynamic")
    sta = sample(model, short, greedy, eos_token_id=None, pad_token_id=PAD, backend="static", compile=False)
    assert len(sampling_static._STATIC_RUNNERS[model]) == 1
    assert torch.equal(dyn.response_ids, sta.response_ids)


@pytest.mark.integration
def test_hf_backend_greedy_matches_dynamic(qwen):
    params = SamplingParams(temperature=0.0, max_new_tokens=8, n=1)
    dyn = sample(qwen, PROMPTS, params, eos_token_id=None, pad_token_id=PAD, backend="dynamic")
    hf = sample(qwen, PROMPTS, params, eos_token_id=None, pad_token_id=PAD, backend="hf")
    assert hf.backend == "hf"
    assert torch.equal(dyn.response_ids, hf.response_ids)
    torch.testing.assert_close(dyn.response_logprobs, hf.response_logprobs, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# Log-probs, reproducibility, EOS bookkeeping, grouping
# ------------------------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["dynamic", "static"])
def test_teacher_forced_logprobs_equal_sampler_logprobs(eos_model, backend):
    params = SamplingParams(temperature=1.0, max_new_tokens=12, n=3)
    batch = sample(eos_model, PROMPTS, params, eos_token_id=EOS, pad_token_id=PAD,
                   generator=torch.Generator().manual_seed(0), backend=backend, compile=False)
    assert batch.finished.any() and (batch.response_lengths > 1).any()  # the check covers varied lengths
    logits = _teacher_forced_logits(eos_model, batch)  # (B, Tr, V)
    recomputed = torch.log_softmax(logits, -1).gather(-1, batch.response_ids[..., None]).squeeze(-1)
    m = batch.response_mask
    torch.testing.assert_close(batch.response_logprobs[m], recomputed[m], rtol=0, atol=1e-5)
    assert (batch.response_logprobs[~m] == 0).all()


@pytest.mark.integration
def test_logprobs_are_under_the_filtered_distribution(qwen):
    params = SamplingParams(temperature=0.8, top_k=5, max_new_tokens=8, n=2)
    batch = sample(qwen, PROMPTS, params, eos_token_id=EOS, pad_token_id=PAD,
                   generator=torch.Generator().manual_seed(4))
    logits = _teacher_forced_logits(qwen, batch)
    q = torch.log_softmax(filter_logits(logits, 0.8, 5, 1.0), -1)  # (B, Tr, V)
    recomputed = q.gather(-1, batch.response_ids[..., None]).squeeze(-1)
    m = batch.response_mask
    assert torch.isfinite(recomputed[m]).all()  # every sampled token survived top-k
    torch.testing.assert_close(batch.response_logprobs[m], recomputed[m], rtol=0, atol=1e-5)


@pytest.mark.integration
def test_generator_seed_and_state_restore(qwen):
    params = SamplingParams(temperature=1.0, max_new_tokens=10, n=2)
    kw = dict(eos_token_id=EOS, pad_token_id=PAD)
    a = sample(qwen, PROMPTS, params, generator=torch.Generator().manual_seed(42), **kw)
    b = sample(qwen, PROMPTS, params, generator=torch.Generator().manual_seed(42), **kw)
    c = sample(qwen, PROMPTS, params, generator=torch.Generator().manual_seed(43), **kw)
    assert torch.equal(a.response_ids, b.response_ids)
    assert not torch.equal(a.response_ids, c.response_ids)
    # Resume: save the state mid-run, sample, restore, sample again -> the same continuation.
    g = torch.Generator().manual_seed(42)
    sample(qwen, PROMPTS, params, generator=g, **kw)
    state = g.get_state()
    cont = sample(qwen, PROMPTS, params, generator=g, **kw)
    g2 = torch.Generator()
    g2.set_state(state)
    resumed = sample(qwen, PROMPTS, params, generator=g2, **kw)
    assert torch.equal(cont.response_ids, resumed.response_ids)
    assert not torch.equal(cont.response_ids, a.response_ids)  # the state did advance


@pytest.mark.integration
@pytest.mark.parametrize("pad_token_id, eos_token_id", [(PAD, EOS), (EOS, EOS), (PAD, [EOS, 9])])
def test_eos_handling_and_masks(eos_model, pad_token_id, eos_token_id):
    params = SamplingParams(temperature=1.0, max_new_tokens=6, n=4)
    batch = sample(eos_model, PROMPTS, params, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                   generator=torch.Generator().manual_seed(1))
    eos_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
    b, tr = batch.response_ids.shape
    assert b == len(PROMPTS) * 4
    assert batch.finished.any() and (~batch.finished).any()  # both branches below are exercised
    assert tr == params.max_new_tokens == int(batch.response_lengths.max())
    assert torch.equal(batch.response_lengths, batch.response_mask.sum(-1))
    for i in range(b):
        n = int(batch.response_lengths[i])
        assert n >= 1
        assert batch.response_mask[i, :n].all() and not batch.response_mask[i, n:].any()
        assert (batch.response_ids[i, n:] == pad_token_id).all()
        valid = batch.response_ids[i, :n]
        eos_at = torch.isin(valid, eos_ids)
        if batch.finished[i]:
            assert eos_at[-1] and not eos_at[:-1].any(), "finished rows end at their first EOS"
        else:
            assert n == params.max_new_tokens and not eos_at.any()
    assert (batch.response_logprobs[~batch.response_mask] == 0).all()
    assert (batch.response_logprobs[batch.response_mask] < 0).all()


@pytest.mark.integration
def test_early_stop_when_all_rows_finished(eos_model):
    # Forcing EOS everywhere: every row stops at its first token and the loop must not run 50 steps.
    bias = torch.zeros(VOCAB)
    bias[EOS] = 100.0
    handle = eos_model.lm_head.register_forward_hook(lambda _m, _i, out: out + bias)
    try:
        batch = sample(eos_model, PROMPTS, SamplingParams(max_new_tokens=50), eos_token_id=EOS,
                       pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert batch.response_ids.shape == (len(PROMPTS), 1)
    assert batch.finished.all() and batch.stats["decode_steps"] == 1
    assert (batch.response_ids[:, 0] == EOS).all()


@pytest.mark.integration
def test_n_responses_per_prompt_are_contiguous(qwen):
    n = 4
    greedy = sample(qwen, PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=6, n=n),
                    eos_token_id=None, pad_token_id=PAD)
    assert greedy.prompt_index.tolist() == [i for i in range(len(PROMPTS)) for _ in range(n)]
    for i in range(len(PROMPTS)):
        rows = slice(i * n, (i + 1) * n)
        assert (greedy.prompt_ids[rows] == greedy.prompt_ids[i * n]).all()
        assert (greedy.response_ids[rows] == greedy.response_ids[i * n]).all()  # greedy: identical
        assert greedy.prompt_ids[i * n][greedy.prompt_mask[i * n]].tolist() == PROMPTS[i]
    sampled = sample(qwen, PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=6, n=n),
                     eos_token_id=None, pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    first_group = sampled.response_ids[:n]
    assert len({tuple(r) for r in first_group.tolist()}) > 1  # samples within a group differ


@pytest.mark.unit
def test_forward_inputs_and_token_lists():
    batch = SampledBatch(
        prompt_ids=torch.tensor([[0, 0, 5], [6, 7, 8]]),
        prompt_mask=torch.tensor([[False, False, True], [True, True, True]]),
        response_ids=torch.tensor([[9, 3, 0], [9, 9, 9]]),
        response_mask=torch.tensor([[True, True, False], [True, True, True]]),
        response_lengths=torch.tensor([2, 3]),
        finished=torch.tensor([True, False]),
        prompt_index=torch.tensor([0, 1]),
    )
    fi = pack_rows(batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    assert fi.input_ids.tolist() == [[0, 0, 5, 9, 3, 0], [6, 7, 8, 9, 9, 9]]
    assert fi.attention_mask.tolist() == [[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert fi.position_ids.tolist() == [[0, 0, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]
    assert fi.response_len == 3  # columns 2..4 of the full forward's logits predict the response
    assert batch.response_token_lists() == [[9, 3], [9, 9, 9]]


@pytest.mark.integration
def test_compile_failure_falls_back_once(qwen, monkeypatch):
    def broken_compile(fn, **kwargs):
        def raiser(*args, **kw):
            raise RuntimeError("simulated inductor failure")

        return raiser

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(hf_compat, "_WARNED", set())
    release_static_cache(qwen)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=2)
    kw = dict(eos_token_id=EOS, pad_token_id=PAD, backend="static", compile=True)
    with pytest.warns(RuntimeWarning, match="falling back"):
        got = sample(qwen, PROMPTS, params, generator=torch.Generator().manual_seed(9), **kw)
    assert got.backend == "static"
    ref = sample(qwen, PROMPTS, params, generator=torch.Generator().manual_seed(9), eos_token_id=EOS,
                 pad_token_id=PAD, backend="dynamic")
    assert torch.equal(got.response_ids, ref.response_ids)  # the fallback reused the same randomness
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        again = sample(qwen, PROMPTS, params, generator=torch.Generator().manual_seed(9), **kw)
    assert torch.equal(again.response_ids, ref.response_ids)
    release_static_cache(qwen)


# ------------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_static_compiled_equals_dynamic_greedy_on_cuda():
    model = _tiny("qwen3", seed=3).cuda()
    params = SamplingParams(temperature=0.0, max_new_tokens=24, n=2)
    kw = dict(eos_token_id=None, pad_token_id=PAD)
    dyn = sample(model, PROMPTS, params, backend="dynamic", **kw)
    for _ in range(3):  # compile + warm-up + record, then replays from the reused cache
        sta = sample(model, PROMPTS, params, backend="static", compile=True, **kw)
        assert sta.backend == "static+compile"
        assert torch.equal(dyn.response_ids, sta.response_ids)
        torch.testing.assert_close(dyn.response_logprobs, sta.response_logprobs, rtol=0, atol=1e-4)
    # Sampling with a CPU generator driving the CUDA model, EOS on: the masks stay consistent.
    sampled = sample(model, PROMPTS, SamplingParams(max_new_tokens=24, n=4), eos_token_id=EOS,
                     pad_token_id=PAD, generator=torch.Generator().manual_seed(0), backend="static")
    assert torch.equal(sampled.response_lengths, sampled.response_mask.sum(-1))
    logits = _teacher_forced_logits(model, sampled)
    recomputed = torch.log_softmax(logits, -1).gather(-1, sampled.response_ids[..., None]).squeeze(-1)
    m = sampled.response_mask
    torch.testing.assert_close(sampled.response_logprobs[m], recomputed[m], rtol=0, atol=1e-3)
    release_static_cache(model)
