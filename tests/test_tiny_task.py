"""The embedded default: character tokenizer, tiny Qwen3 model, multiplication task."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

from trainer.models import build_tiny_model, qwen3_0p6b_config, tiny_model_config
from trainer.tasks import DataError, Prompt, Task, make_task
from trainer.tasks.multiplication import MultiplicationTask
from trainer.tokenizer import CHARACTERS, build_char_tokenizer

ROUND_TRIP_TEXTS = [
    "23*47=1081",
    "  two  leading spaces, trailing too  ",
    "tabs\tand\nnew\n\nlines\n",
    "a .b ,c ?d !e 'f' don't",  # clean_up_tokenization_spaces would rewrite these
    "".join(CHARACTERS),
]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


# -- tokenizer ----------------------------------------------------------------------------------


@pytest.mark.unit
def test_tokenizer_one_token_per_character_with_bos(tok):
    enc = tok("12*3=")["input_ids"]
    assert enc[0] == tok.bos_token_id
    assert len(enc) == 1 + 5
    assert tok.convert_ids_to_tokens(enc[1:]) == ["1", "2", "*", "3", "="]
    assert tok("12*3=", add_special_tokens=False)["input_ids"] == enc[1:]


@pytest.mark.unit
def test_tokenizer_special_ids_distinct(tok):
    ids = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}
    assert len(ids) == 4 and None not in ids
    assert len(tok) == 4 + len(CHARACTERS)
    assert tok("é")["input_ids"][1] == tok.unk_token_id  # out-of-vocabulary is unk, not an error


@pytest.mark.unit
@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trip_after_save_and_autoload(tok, tmp_path, text):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = loaded(text)["input_ids"]
    assert ids == tok(text)["input_ids"]
    assert loaded.decode(ids, skip_special_tokens=True) == text
    assert loaded.decode(ids) == "<bos>" + text
    assert (loaded.pad_token_id, loaded.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)


@pytest.mark.unit
def test_tokenizer_pads_left_for_generation(tok):
    enc = tok(["1*2=", "12*34="], padding=True)
    assert enc["input_ids"][0][:2] == [tok.pad_token_id] * 2
    assert enc["attention_mask"][0] == [0, 0, 1, 1, 1, 1, 1]


# -- models ---------------------------------------------------------------------------------------


@pytest.mark.integration
def test_tiny_model_size_ids_and_reload(tok, tmp_path):
    model = build_tiny_model(seed=0, tokenizer=tok)
    cfg = model.config
    assert isinstance(cfg, Qwen3Config) and cfg.model_type == "qwen3"
    assert 0.5e6 < model.num_parameters() < 2e6
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )
    assert cfg.vocab_size == len(tok)
    assert cfg._attn_implementation == "sdpa"
    # untied head: a step on the LM head must not move the input embeddings
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([tok("12*34=")["input_ids"]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


@pytest.mark.integration
def test_tiny_model_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_model(seed=5)
    after = torch.rand(3)
    b = build_tiny_model(seed=5)
    c = build_tiny_model(seed=6)
    assert torch.equal(before, after)
    assert torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)


@pytest.mark.unit
def test_config_overrides_and_0p6b_shapes():
    assert tiny_model_config(num_hidden_layers=2, hidden_size=64).num_hidden_layers == 2
    cfg = qwen3_0p6b_config()
    assert isinstance(cfg, Qwen3Config)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (1024, 28, 16)
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (8, 128, 3072)
    assert cfg.vocab_size == 151936 and cfg.tie_word_embeddings
    small = qwen3_0p6b_config(vocab_size=1000)
    assert small.eos_token_id is None and small.vocab_size == 1000
    # parameter count on the meta device (no memory): Qwen3-0.6B has ~596M with tied embeddings
    with torch.device("meta"):
        n = AutoModelForCausalLM.from_config(cfg).num_parameters()
    assert 590e6 < n < 600e6


# -- multiplication task --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task():
    return MultiplicationTask()


@pytest.mark.unit
def test_split_is_disjoint_complete_and_commutation_closed(task):
    train = {task.train_item(i).text for i in range(task.num_train)}
    val = {p.text for p in task.validation_prompts()}
    assert len(train) == task.num_train and not train & val
    assert len(train) + len(val) == 90 * 90
    assert 400 < len(val) < 520
    for text in val:
        a, b = text[:-1].split("*")
        assert f"{b}*{a}=" in val


@pytest.mark.unit
def test_prompts_are_well_formed(task):
    for p in task.validation_prompts()[:50] + task.train_batch(0, 50, seed=1):
        assert isinstance(p, Prompt) and p.data_source == "multiplication"
        a, b = (int(x) for x in p.text.removesuffix("=").split("*"))
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert p.ground_truth == str(a * b)
        assert p.uid == f"mul-{a}*{b}"
    assert MultiplicationTask().validation_prompts() == task.validation_prompts()  # split is fixed


@pytest.mark.unit
def test_stream_deterministic_resumable_and_epoch_complete(task):
    first = task.train_batch(0, 40, seed=7)
    assert first == task.train_batch(0, 40, seed=7)
    assert first != task.train_batch(0, 40, seed=8)
    it = task.iter_train(seed=7, start=25)
    assert [next(it) for _ in range(15)] == first[25:]
    # one epoch visits every training prompt exactly once, the next epoch in another order
    small = MultiplicationTask(low=10, high=19, validation_pairs=5)
    n = small.num_train
    epoch0 = [p.uid for p in small.train_batch(0, n, seed=3)]
    epoch1 = [p.uid for p in small.train_batch(n, n, seed=3)]
    assert sorted(epoch0) == sorted(small.train_item(i).uid for i in range(n))
    assert sorted(epoch1) == sorted(epoch0) and epoch1 != epoch0
    assert small.train_prompt(n + 4, seed=3) == small.train_batch(n, 5, seed=3)[4]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("1081", 1.0),
        (" 1081 ", 1.0),
        ("1081<eos>", 1.0),
        ("1081<eos><pad><pad>", 1.0),
        ("1081<eos>99", 1.0),
        ("10810", 0.0),
        ("1080", 0.0),
        ("01081", 0.0),
        ("", 0.0),
        ("<eos>1081", 0.0),
    ],
)
def test_multiplication_reward(task, response, expected):
    assert task.reward(response, "1081") == expected


@pytest.mark.unit
def test_task_errors():
    with pytest.raises(ValueError, match="unknown task"):
        make_task("nope")
    with pytest.raises(ValueError):
        MultiplicationTask(low=50, high=10)
    with pytest.raises(ValueError, match="position"):
        MultiplicationTask().train_prompt(-1)
    assert issubclass(DataError, ValueError)
    assert isinstance(make_task("multiplication"), Task)
