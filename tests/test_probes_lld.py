"""Teacher-forced capture and LLD against log-likelihoods computed directly from the model."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from resrl_analysis.probes.capture import capture_head_input, forward_group
from resrl_analysis.probes.lld import lld_along_run, lld_between, lld_between_models, score_responses
from resrl_analysis.probes.synthetic import random_probe_set, tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]


def _model(arch: str, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if arch == "qwen3":
        return tiny_model(seed=seed, dtype=torch.float64)
    torch.manual_seed(seed)
    if arch == "llama":
        m = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    else:
        m = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=64))
    return m.double().eval()


def _direct(model, prompt, resp):
    """Slow reference: one unpadded sequence, a plain forward, log_softmax, gather."""
    ids = torch.tensor([list(prompt) + list(resp)])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    P, T = len(prompt), len(resp)
    logits = out.logits[0, P - 1 : P - 1 + T].double()  # (T, V)
    logq = torch.log_softmax(logits, -1)
    lp = logq.gather(-1, torch.tensor(resp)[:, None]).squeeze(-1)
    ent = -(logq.exp() * logq).sum(-1)
    return lp, ent, out.hidden_states[-1][0, P - 1 : P - 1 + T], out.hidden_states[-2][0, P - 1 : P - 1 + T], logits


@pytest.mark.parametrize("arch", ["qwen3", "llama", "gpt2"])
def test_forward_group_matches_direct_forward(arch):
    model = _model(arch)
    group = random_probe_set([[1, 0, 0, 1, 0]], max_len=6, seed=1).groups[0]
    f = forward_group(model, group)
    for i, resp in enumerate(group.response_ids):
        lp, ent, h_last, h_pen, logits = _direct(model, group.prompt_ids, resp)
        T = len(resp)
        torch.testing.assert_close(f.logp[i, :T].double(), lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(f.entropy[i, :T].double(), ent, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(f.logits[i, :T], logits, atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(f.head_input[i, :T], h_last, atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(f.penultimate[i, :T], h_pen, atol=1e-8, rtol=1e-8)
        # The captured head input is exactly what the head multiplies.
        torch.testing.assert_close(model.get_output_embeddings()(f.head_input[i, :T]), logits)
        assert (f.logp[i, T:] == 0).all() and not f.mask[i, T:].any()


def test_capture_hook_removed_on_error():
    model = _model("qwen3")
    head = model.get_output_embeddings()
    with pytest.raises(RuntimeError, match="inside"), capture_head_input(model):
        assert len(head._forward_pre_hooks) == 1
        raise RuntimeError("inside")
    assert len(head._forward_pre_hooks) == 0


def _perturbed(seed: int, scale: float = 0.05):
    m = _model("qwen3")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return m


def test_lld_between_models_matches_direct():
    ps = random_probe_set([[1, 0, 1, 0], [0, 0, 1], [0, 0]], seed=2)
    a, b = _model("qwen3"), _perturbed(5)
    r = lld_between_models(a, b, ps, step_a=0, step_b=7)
    df = r.to_frame().set_index("group_id")
    for g in ps.groups:
        la = [_direct(a, g.prompt_ids, y)[0] for y in g.response_ids]
        lb = [_direct(b, g.prompt_ids, y)[0] for y in g.response_ids]
        d_sum = [float(y.sum() - x.sum()) for x, y in zip(la, lb)]
        d_mean = [float(y.mean() - x.mean()) for x, y in zip(la, lb)]
        pos = [i for i, p in enumerate(g.is_positive) if p]
        neg = [i for i, p in enumerate(g.is_positive) if not p]
        row = df.loc[g.group_id]
        assert (row.step_from, row.step_to, row.comparison) == (0, 7, "pair")
        assert row.delta_neg_sum == pytest.approx(sum(d_sum[i] for i in neg) / len(neg), abs=1e-5)
        if pos:
            want = sum(d_sum[i] for i in pos) / len(pos)
            assert row.delta_pos_sum == pytest.approx(want, abs=1e-5)
            assert row.delta_pos_mean == pytest.approx(sum(d_mean[i] for i in pos) / len(pos), abs=1e-5)
            assert bool(row.lld_sum) == (want <= 0.0)
        else:
            assert pd.isna(row.delta_pos_sum) and pd.isna(row.lld_sum)
    frac = r.fraction()
    n_pos_groups = sum(g.n_positive > 0 for g in ps.groups)
    assert set(frac.n_prompts) == {n_pos_groups}


def test_lld_along_run_and_eps():
    ps = random_probe_set([[1, 0, 1], [1, 1, 0, 0]], seed=3)
    scores = pd.concat([score_responses(m, ps, step=s).responses
                        for s, m in ((0, _model("qwen3")), (10, _perturbed(1)), (20, _perturbed(2)))])
    from resrl_analysis.results import ScoresResult

    sr = ScoresResult(responses=scores)
    r = lld_along_run(sr, eps=0.0)
    d = r.deltas
    assert sorted(set(zip(d.comparison, d.step_from, d.step_to))) == [
        ("step_to_step", 0, 10), ("step_to_step", 10, 20), ("vs_initial", 0, 10), ("vs_initial", 0, 20)]
    key = ["group_id"]
    v = d[d.comparison == "vs_initial"].set_index(["step_to", *key]).delta_pos_sum
    s = d[d.comparison == "step_to_step"].set_index(["step_to", *key]).delta_pos_sum
    # Δ(0→20) = Δ(0→10) + Δ(10→20): every variant averages over the same positive responses.
    for gid in (0, 1):
        assert v[(20, gid)] == pytest.approx(s[(10, gid)] + s[(20, gid)], abs=1e-9)
    big = lld_along_run(sr, eps=1e9)
    assert big.fraction().frac_lld.eq(1.0).all()
    pair = lld_between(sr, sr, step_from=0, step_to=20)
    assert pair.deltas.delta_pos_sum.tolist() == pytest.approx(v.loc[20].tolist())


def test_lld_needs_two_steps():
    ps = random_probe_set([[1, 0]], seed=4)
    r = lld_along_run(score_responses(_model("qwen3"), ps, step=0))
    assert len(r.deltas) == 0 and "two checkpoints" in r.skipped[0]["reason"]


def test_entropy_by_step():
    ps = random_probe_set([[1, 0, 0]], seed=5)
    r = score_responses(_model("qwen3"), ps, step=3)
    e = r.entropy_by_step().set_index("split")
    df = r.responses
    want = (df.entropy_mean * df.n_tokens).sum() / df.n_tokens.sum()
    assert e.loc["all", "entropy"] == pytest.approx(want) and e.loc["all", "n_tokens"] == df.n_tokens.sum()
