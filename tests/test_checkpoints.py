"""Checkpoint loading, run directories and probe sets: the happy path and every bad input of issue 4/7."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from resrl_analysis.checkpoints import check_compatible, check_safetensors, load_checkpoint, validate_checkpoint_files
from resrl_analysis.errors import ProbeError
from resrl_analysis.probe_sets import ProbeGroup, ProbeSet
from resrl_analysis.probes.synthetic import char_tokenizer, tiny_model, write_fake_run
from resrl_analysis.rundir import read_jsonl
from resrl_analysis.runs import run_checkpoints

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return write_fake_run(tmp_path_factory.mktemp("run"), steps=(0, 1, 2))


@pytest.fixture()
def ckpt(run, tmp_path) -> Path:
    """A private copy of step 0 that a test may damage."""
    return Path(shutil.copytree(run / "checkpoints" / "step_000000", tmp_path / "step_000000"))


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_list_checkpoints_ignores_debris(run):
    assert [s for s, _ in run_checkpoints(run)] == [0, 1, 2]
    assert any(p.name.startswith(".tmp") for p in (run / "checkpoints").iterdir())


def test_list_checkpoints_not_a_run(tmp_path):
    with pytest.raises(ProbeError) as e:
        run_checkpoints(tmp_path)
    assert str(tmp_path) in _one_line(e)


def test_load_checkpoint_eval_and_dtype(run):
    ck = load_checkpoint(run / "checkpoints" / "step_000001")
    assert ck.step == 1 and not ck.model.training and ck.model.dtype == torch.float32
    assert ck.tokenizer.eos_token_id == 2
    ck64 = load_checkpoint(run / "checkpoints" / "step_000001", dtype="float64", tokenizer=False)
    assert ck64.model.dtype == torch.float64 and ck64.tokenizer is None


def test_plain_save_pretrained_folder(tmp_path):
    """A folder our trainer did not write: no step in its name, no trainer_state.pt."""
    m, tok = tiny_model(seed=3), char_tokenizer()
    m.save_pretrained(tmp_path / "my-model")
    tok.save_pretrained(tmp_path / "my-model")
    ck = load_checkpoint(tmp_path / "my-model")
    assert ck.step is None and torch.equal(ck.model.lm_head.weight, m.lm_head.weight)


def test_missing_directory(tmp_path):
    with pytest.raises(ProbeError) as e:
        load_checkpoint(tmp_path / "nope")
    assert "nope" in _one_line(e)


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(ProbeError) as e:
        load_checkpoint(ckpt)
    assert str(ckpt / "config.json") in _one_line(e)


def test_bad_config_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ProbeError) as e:
        validate_checkpoint_files(ckpt)
    assert "config.json" in _one_line(e)


def test_missing_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ProbeError) as e:
        load_checkpoint(ckpt)
    assert str(ckpt) in _one_line(e) and "weights" in str(e.value)


@pytest.mark.parametrize("keep", [0.5, 0.999, 4])
def test_truncated_safetensors(ckpt, keep):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    n = int(len(data) * keep) if keep < 1 else keep
    f.write_bytes(data[:n])
    with pytest.raises(ProbeError) as e:
        load_checkpoint(ckpt)
    assert str(f) in _one_line(e) and "truncated" in str(e.value)


def test_corrupt_safetensors_header(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes((10).to_bytes(8, "little") + b"not json!!" + b"\0" * 10)
    with pytest.raises(ProbeError, match="corrupt"):
        check_safetensors(f)


def test_missing_tokenizer(ckpt):
    for p in ckpt.iterdir():
        if p.name.startswith(("tokenizer", "special_tokens")):
            p.unlink()
    with pytest.raises(ProbeError) as e:
        load_checkpoint(ckpt)
    assert "tokenizer" in _one_line(e)
    assert load_checkpoint(ckpt, tokenizer=False).tokenizer is None


def test_compatible_run(run):
    check_compatible([p for _, p in run_checkpoints(run)])


def test_mismatched_vocab_size(run, tmp_path):
    other = tmp_path / "big"
    tiny_model(vocab_size=48).save_pretrained(other)
    char_tokenizer().save_pretrained(other)
    with pytest.raises(ProbeError) as e:
        check_compatible([run / "checkpoints" / "step_000000", other])
    assert str(other) in _one_line(e) and "vocabulary" in str(e.value)


def test_mismatched_tokenizer_same_size(run, tmp_path):
    """Same number of tokens, different token→id map: caught from the tokenizer files alone."""
    other = tmp_path / "other"
    tiny_model().save_pretrained(other)
    char_tokenizer("9876543210*=+-. ").save_pretrained(other)
    with pytest.raises(ProbeError) as e:
        check_compatible([run / "checkpoints" / "step_000000", other])
    assert str(other) in _one_line(e) and "tokenizer" in str(e.value)


# ----------------------------------------------------------------------------- probe sets


def test_probe_set_from_run(run):
    ps = ProbeSet.from_run(run)
    assert ps.step == 0 and ps.n_groups == 4 and ps.n_responses == 24
    statuses = [g.status for g in ps.groups]
    assert statuses[-2:] == ["no_negative", "no_positive"] and ps.n_mixed == 2
    rows = [o for _, o in read_jsonl(run / "rollouts" / "step_000000.jsonl")]
    g0 = ps.groups[0]
    assert list(g0.prompt_ids) == rows[0]["prompt_ids"] and list(g0.response_ids[0]) == rows[0]["response_ids"]
    assert g0.ground_truth == rows[0]["ground_truth"]


def test_probe_set_select_prefers_mixed(run):
    ps = ProbeSet.from_run(run)
    assert [g.is_mixed for g in ps.select(3).groups] == [True, True, False]
    assert [g.group_id for g in ps.select(None, prefer_mixed=False).groups] == [0, 1, 2, 3]


def test_probe_set_missing_step(run):
    with pytest.raises(ProbeError) as e:
        ProbeSet.from_run(run, step=7)
    assert "step_000007.jsonl" in _one_line(e)


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "empty"),
        (b'{"group_id": 0}\n{bad\n', ":2: bad JSON"),
        (b'{"group_id": 0, "prompt_ids": [1], "reward": 1.0}\n', "missing field 'response_ids'"),
        (b'{"group_id": 0, "prompt_ids": [1], "response_ids": "12", "reward": 1}\n', "'response_ids'"),
        (b'{"group_id": 0, "prompt_ids": [1], "response_ids": [5], "reward": "1"}\n', "'reward'"),
        (b'{"group_id": 0, "prompt_ids": [1], "response_ids": [5], "reward": 1}\n\xff\xfe\n', ":2: not UTF-8"),
        (b"[1, 2]\n", "JSON object"),
    ],
)
def test_bad_rollout_files(tmp_path, content, needle):
    f = tmp_path / "step_000000.jsonl"
    f.write_bytes(content)
    with pytest.raises(ProbeError) as e:
        ProbeSet.from_rollouts(f)
    assert str(f) in _one_line(e) and needle in str(e.value)


def test_user_jsonl_with_tokenizer(tmp_path):
    tok = char_tokenizer()
    f = tmp_path / "probe.jsonl"
    f.write_text(json.dumps({"prompt": "12*3=", "responses": ["36", "35"], "rewards": [1, 0],
                             "ground_truth": "36"}) + "\n")
    ps = ProbeSet.from_jsonl(f, tok)
    g = ps.groups[0]
    assert g.prompt_ids == tuple(tok("12*3=").input_ids)
    assert g.response_ids[0] == tuple(tok("36", add_special_tokens=False).input_ids) + (tok.eos_token_id,)
    assert g.is_positive == (True, False) and g.ground_truth == "36"
    with pytest.raises(ProbeError, match="needs a tokenizer"):
        ProbeSet.from_jsonl(f)


def test_user_jsonl_errors(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "x", "responses": ["a", "b"], "rewards": [1]}) + "\n")
    with pytest.raises(ProbeError, match=r"p.jsonl:1: need as many rewards"):
        ProbeSet.from_jsonl(f, char_tokenizer())


def test_user_jsonl_reads_rollout_dump(run):
    ps = ProbeSet.from_jsonl(run / "rollouts" / "step_000000.jsonl")
    assert ps.n_groups == 4


def test_check_vocab():
    ps = ProbeSet((ProbeGroup(0, (1, 50), ((3,),), (1.0,)),), source="x.jsonl")
    with pytest.raises(ProbeError, match="token id 50"):
        ps.check_vocab(40)


def test_sharded_checkpoint(tmp_path):
    """A sharded save (index + several safetensors files): loads, and a truncated shard is named."""
    m = tiny_model(seed=4)
    d = tmp_path / "sharded"
    m.save_pretrained(d, max_shard_size="20KB")
    char_tokenizer().save_pretrained(d)
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1 and (d / "model.safetensors.index.json").is_file()
    assert torch.equal(load_checkpoint(d).model.lm_head.weight, m.lm_head.weight)
    shards[-1].write_bytes(shards[-1].read_bytes()[:-10])
    with pytest.raises(ProbeError) as e:
        load_checkpoint(d)
    assert str(shards[-1]) in _one_line(e)
    shards[0].unlink()
    with pytest.raises(ProbeError, match="missing"):
        validate_checkpoint_files(d)
