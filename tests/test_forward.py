"""The one forward (resrl_analysis.forward) and the one sampler's batching guarantees.

The trainer's rows and the probes' groups go through the same forward; both must give the vectors HF's
``output_hidden_states`` gives at the documented indices, and the vector the LM head multiplies.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from resrl_analysis.forward import (
    capture,
    hidden_state_index,
    pack_rows,
    position_ids,
    representation_site,
    response_forward,
)
from resrl_analysis.probe_sets import ProbeGroup
from resrl_analysis.probes.capture import forward_group
from resrl_analysis.probes.diversity import diversity_probe
from resrl_analysis.probes.synthetic import char_tokenizer, random_probe_set, tiny_model
from resrl_analysis.sampling import SamplingParams, encode_prompts, sample, sample_prompts, sample_responses
from resrl_analysis.weighting import select_representation

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


def _model(arch: str, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    if arch == "qwen3":
        return tiny_model(layers=3, seed=1, dtype=dtype)
    torch.manual_seed(0)
    if arch == "llama":
        m = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=1))
    else:
        m = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=3, n_head=2, n_positions=64))
    return m.to(dtype).eval()


def _left_padded_rows():
    """Three rows: prompts of lengths 2, 3, 1 (left-padded), responses of lengths 2, 3, 1 (right-padded)."""
    prompts = [[5, 6], [7, 8, 9], [10]]
    responses = [[11, 12], [13, 14, 15], [16]]
    tp, tr = 3, 3
    p_ids = torch.tensor([[0] * (tp - len(p)) + p for p in prompts])  # (B, Tp)
    p_mask = torch.tensor([[False] * (tp - len(p)) + [True] * len(p) for p in prompts])  # (B, Tp)
    r_ids = torch.tensor([r + [0] * (tr - len(r)) for r in responses])  # (B, Tr)
    r_mask = torch.tensor([[True] * len(r) + [False] * (tr - len(r)) for r in responses])  # (B, Tr)
    return prompts, responses, pack_rows(p_ids, p_mask, r_ids, r_mask)


def test_position_ids_of_left_padded_rows():
    _, _, rows = _left_padded_rows()
    assert rows.input_ids.tolist() == [[0, 5, 6, 11, 12, 0], [7, 8, 9, 13, 14, 15], [0, 0, 10, 16, 0, 0]]
    assert rows.position_ids.tolist() == [[0, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 0, 0]]
    # Independent reference: count the real tokens before each real token.
    for m, pos in zip(rows.attention_mask.tolist(), rows.position_ids.tolist()):
        want = [sum(m[:j]) if m[j] else 0 for j in range(len(m))]
        assert pos == want
    assert torch.equal(position_ids(rows.attention_mask.bool()), rows.position_ids)


@pytest.mark.parametrize("arch", ["qwen3", "llama", "gpt2"])
def test_left_padded_rows_equal_each_row_alone(arch):
    # Positions count real tokens only, so padding and neighbours do not change a row's results.
    model = _model(arch)
    prompts, responses, rows = _left_padded_rows()
    with torch.no_grad():
        fo = response_forward(model, rows, entropy=True, capture={"h": "head_input", "pen": "penultimate"})
        for i, (p, r) in enumerate(zip(prompts, responses)):
            one = pack_rows(torch.tensor([p]), torch.ones(1, len(p), dtype=torch.bool), torch.tensor([r]),
                            torch.ones(1, len(r), dtype=torch.bool))
            alone = response_forward(model, one, entropy=True, capture={"h": "head_input", "pen": "penultimate"})
            T = len(r)
            torch.testing.assert_close(fo.logp[i, :T], alone.logp[0], atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(fo.entropy[i, :T], alone.entropy[0], atol=1e-10, rtol=1e-10)
            for k in ("h", "pen"):
                torch.testing.assert_close(fo.captured[k][i, :T], alone.captured[k][0], atol=1e-10, rtol=1e-10)
            assert (fo.logp[i, T:] == 0).all()


@pytest.mark.parametrize("arch", ["qwen3", "llama", "gpt2"])
def test_captures_equal_hf_hidden_states(arch):
    model = _model(arch)
    _, _, rows = _left_padded_rows()
    n = model.config.num_hidden_layers
    names = {"head": "head_input", "pen": "penultimate", "last": -1, "emb": 0, "one": 1, "two": "2"}
    def hooks() -> list[int]:
        return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]

    before = hooks()
    with torch.no_grad():
        fo = response_forward(model, rows, capture=names, return_logits=True)
        assert hooks() == before  # no hook of ours is left behind
        out = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, position_ids=rows.position_ids,
                    output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == n + 1
    L, tr = rows.input_ids.shape[1], rows.response_len
    sl = slice(L - tr - 1, L - 1)  # the positions that predict the response tokens
    for key, name in names.items():
        torch.testing.assert_close(fo.captured[key], hs[hidden_state_index(name)][:, sl], atol=0, rtol=0)
        torch.testing.assert_close(fo.captured[key], select_representation(hs, name)[:, sl], atol=0, rtol=0)
    torch.testing.assert_close(fo.logits, out.logits[:, sl], atol=1e-12, rtol=1e-12)
    # "head_input" is exactly what the head multiplies.
    head = model.get_output_embeddings()
    with torch.no_grad():
        torch.testing.assert_close(head(fo.captured["head"]), fo.logits, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("arch", ["qwen3", "llama", "gpt2"])
def test_trainer_rows_and_probe_groups_capture_the_same(arch):
    # A group as the trainer packs it (prompt repeated per row) and as the probes lay it out.
    model = _model(arch)
    group = ProbeGroup(0, (4, 5, 6), ((7, 8, 9), (10,), (11, 12)), (1.0, 0.0, 1.0))
    G, P = group.n_responses, len(group.prompt_ids)
    T = max(len(r) for r in group.response_ids)
    r_ids = torch.tensor([list(r) + [0] * (T - len(r)) for r in group.response_ids])  # (G, T)
    r_mask = torch.tensor([[True] * len(r) + [False] * (T - len(r)) for r in group.response_ids])  # (G, T)
    rows = pack_rows(torch.tensor([group.prompt_ids] * G), torch.ones(G, P, dtype=torch.bool), r_ids, r_mask)
    with torch.no_grad():
        tr = response_forward(model, rows, entropy=True, capture={"h": "head_input", "pen": "penultimate"},
                              return_logits=True)
    pr = forward_group(model, group)
    assert torch.equal(tr.captured["h"], pr.head_input) and torch.equal(tr.captured["pen"], pr.penultimate)
    assert torch.equal(tr.logp, pr.logp) and torch.equal(tr.entropy, pr.entropy)
    assert torch.equal(tr.logits, pr.logits)


def test_resolver_sites_and_errors():
    model = _model("qwen3")
    layers = model.model.layers
    assert representation_site(model, "penultimate").module is layers[-2]
    assert representation_site(model, 1).module is layers[0]
    assert representation_site(model, 0).module is layers[0] and representation_site(model, 0).where == "input"
    assert representation_site(model, -1).module is model.model.norm
    assert representation_site(model, "head_input").module is model.lm_head
    with pytest.raises(ValueError, match="out of range for a 3-layer model"):
        representation_site(model, 4)
    with pytest.raises(ValueError, match="'head_input', 'penultimate' or an int"):
        representation_site(model, "middle")
    with pytest.raises(ValueError, match="decoder layers not found"):
        representation_site(torch.nn.Linear(2, 2), "penultimate")


def test_hooks_removed_when_the_forward_fails():
    model = _model("qwen3")
    with pytest.raises(RuntimeError, match="boom"), capture(model, {"a": "penultimate", "b": "head_input"}):
        assert model.model.layers[1]._forward_hooks and model.lm_head._forward_pre_hooks
        raise RuntimeError("boom")
    assert not model.model.layers[1]._forward_hooks and not model.lm_head._forward_pre_hooks


# ------------------------------------------------------------------------------------------------ sampling


PROMPTS = [[1, 5, 6], [1, 7], [1, 8, 9, 10, 11], [1, 12]]


def test_per_prompt_generators_sample_like_each_prompt_alone():
    model = tiny_model(seed=2)
    params = SamplingParams(temperature=1.0, max_new_tokens=6, n=3)
    kw = dict(eos_token_id=2, pad_token_id=0, backend="dynamic")
    together = sample(model, PROMPTS, params, generator=[torch.Generator().manual_seed(10 + i) for i in range(4)],
                      **kw)
    rows = together.response_token_lists()
    for i, p in enumerate(PROMPTS):
        alone = sample(model, [p], params, generator=torch.Generator().manual_seed(10 + i), **kw)
        assert rows[3 * i : 3 * i + 3] == alone.response_token_lists()
    with pytest.raises(ValueError, match="one per prompt"):
        sample(model, PROMPTS, params, generator=[torch.Generator()], **kw)


def test_diversity_batched_sampling_equals_each_prompt_alone():
    # What is guaranteed: prompt i's uniforms come from its own generator, so the responses are those of
    # sampling it alone with the same seed, whatever the batch size (floating-point effects of padding
    # could in principle move a draw within rounding of a token boundary; not at these sizes).
    model = tiny_model(seed=4)
    seeds = [3, 1_000_006, 7, 11]
    alone = [sample_responses(model, p, 4, max_new_tokens=5, seed=s, eos_token_id=2) for p, s in zip(PROMPTS, seeds)]
    for rows in (4, 8, 256):
        assert sample_prompts(model, PROMPTS, 4, seeds, max_new_tokens=5, eos_token_id=2,
                              max_batch_rows=rows) == alone
    # The probe: prompt i seeded with seed * 1_000_003 + group id, batched across prompts.
    ps = random_probe_set([[1, 0], [0, 1], [1, 1]], seed=5)
    tok = char_tokenizer()
    res = diversity_probe(model, tok, ps, n_samples=4, max_new_tokens=5, seed=2, max_batch_rows=8)
    for g in ps.groups:
        want = sample_responses(model, g.prompt_ids, 4, max_new_tokens=5, seed=2 * 1_000_003 + g.group_id,
                                eos_token_id=2)
        got = res.samples[res.samples.group_id == g.group_id]
        assert got.n_tokens.tolist() == [len(r) for r in want]
        assert got.response.tolist() == [tok.decode([t for t in r if t != 2], skip_special_tokens=True) for r in want]


def test_encode_prompts_never_doubles_bos():
    tok = char_tokenizer()
    plain, templated = encode_prompts(tok, ["12*3=", "<bos>12*3="])
    assert plain == templated == [1, 5, 6, 14, 7, 15]
    assert plain.count(tok.bos_token_id) == 1
