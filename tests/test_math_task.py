"""MathTask: verl-layout jsonl/parquet loading, chat template, length filter, and one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.tasks import DataError, make_task
from trainer.tasks.math import MathTask
from trainer.tokenizer import build_char_tokenizer

pytestmark = pytest.mark.unit


def record(i: int, prompt=None, gt="72", **extra):
    rec = {
        "data_source": "toy/math",
        "prompt": prompt if prompt is not None else [{"role": "user", "content": f"q{i}: 6*12?"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": gt},
        "extra_info": {"split": "train", "index": i},
    }
    rec.update(extra)
    return rec


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def chat_tokenizer():
    tok = build_char_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tok


def raises_one_line(match: str):
    """pytest.raises for DataError whose message matches and is a single line."""

    class _Ctx:
        def __enter__(self):
            self.ctx = pytest.raises(DataError, match=match)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            assert "\n" not in str(self.info.value)
            return handled

    return _Ctx()


# -- loading ------------------------------------------------------------------------------------------


def test_jsonl_messages_without_template(tmp_path):
    p = write_jsonl(tmp_path / "train.jsonl", [record(0), record(1, gt=3.5), ""])  # blank line ok
    task = MathTask(p)
    assert task.num_train == 2
    first = task.train_item(0)
    assert first.uid == "train-0" and first.text == "q0: 6*12?" and first.ground_truth == "72"
    assert first.data_source == "toy/math"
    assert task.train_item(1).ground_truth == "3.5"
    assert task.validation_prompts() == []


def test_chat_template_applied_to_messages_and_strings(tmp_path):
    multi = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "6*12?"}]
    p = write_jsonl(tmp_path / "d.jsonl", [record(0, prompt=multi), record(1, prompt="plain")])
    task = MathTask(p, tokenizer=chat_tokenizer())
    assert task.train_item(0).text == "<system>be brief\n<user>6*12?\n<assistant>"
    assert task.train_item(1).text == "<user>plain\n<assistant>"
    raw = MathTask(p, tokenizer=chat_tokenizer(), use_chat_template=False)
    assert raw.train_item(0).text == "be brief\n\n6*12?" and raw.train_item(1).text == "plain"


def test_uid_fallbacks_and_validation_files(tmp_path):
    no_index = record(5)
    del no_index["extra_info"]
    train = write_jsonl(tmp_path / "tr.jsonl", [record(0, uid="custom"), record(7), no_index])
    val = write_jsonl(tmp_path / "va.jsonl", [record(0), record(1)])
    task = MathTask(train, val_files=[val])
    assert [task.train_item(i).uid for i in range(3)] == ["custom", "tr-7", "tr-2"]
    assert [p.uid for p in task.validation_prompts()] == ["va-0", "va-1"]


def test_parquet_and_multiple_files(tmp_path):
    rows = [record(i) for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    write_jsonl(tmp_path / "b.jsonl", [record(0)])
    task = MathTask([tmp_path / "a.parquet", str(tmp_path / "b.jsonl")])
    assert task.num_train == 5
    assert task.train_item(3).text == "q3: 6*12?" and task.train_item(4).uid == "b-0"


def test_stream_is_seeded_and_reward_is_math_verify(tmp_path):
    task = make_task("math", train_files=write_jsonl(tmp_path / "t.jsonl", [record(i) for i in range(10)]))
    a, b = task.train_batch(0, 10, seed=1), task.train_batch(0, 10, seed=2)
    assert sorted(p.uid for p in a) == sorted(p.uid for p in b) and a != b
    assert task.reward("so it's \\boxed{72}", "72") == 1.0
    assert task.reward("so it's \\boxed{73}", "72") == 0.0


# -- prompt length --------------------------------------------------------------------------------


def test_long_prompts_skipped_and_counted(tmp_path):
    recs = [record(0, prompt="x" * 5), record(1, prompt="x" * 50), record(2, prompt="y" * 9)]
    p = write_jsonl(tmp_path / "t.jsonl", recs)
    tok = build_char_tokenizer()  # <bos> + one token per character
    task = MathTask(p, tokenizer=tok, max_prompt_tokens=10)
    assert task.num_train == 2 and task.num_skipped_long == 1
    assert [task.train_item(i).uid for i in range(2)] == ["t-0", "t-2"]
    with raises_one_line(r"t\.jsonl:2: prompt has 51 tokens, more than max_prompt_tokens=10"):
        MathTask(p, tokenizer=tok, max_prompt_tokens=10, on_long_prompt="error")
    with raises_one_line("no training prompts left"):
        MathTask(p, tokenizer=tok, max_prompt_tokens=3)
    with pytest.raises(ValueError, match="tokenizer"):
        MathTask(p, max_prompt_tokens=3)


# -- bad input -----------------------------------------------------------------------------------


def test_empty_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with raises_one_line(r"e\.jsonl: empty file"):
        MathTask(tmp_path / "e.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with raises_one_line("empty file"):
        MathTask(tmp_path / "blank.jsonl")
    pq.write_table(pa.Table.from_pylist([record(0)]).slice(0, 0), tmp_path / "e.parquet")
    with raises_one_line(r"e\.parquet: empty file"):
        MathTask(tmp_path / "e.parquet")


def test_bad_json_names_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [record(0), record(1), '{"prompt": "x", oops}'])
    with raises_one_line(r"bad\.jsonl:3: invalid JSON"):
        MathTask(p)
    p2 = write_jsonl(tmp_path / "arr.jsonl", [record(0), "[1, 2]"])
    with raises_one_line(r"arr\.jsonl:2: record must be a JSON object, got list"):
        MathTask(p2)


def test_non_utf8_names_line_and_byte(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(json.dumps(record(0)).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    with raises_one_line(r"latin\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 16\)"):
        MathTask(p)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.pop("prompt"), "missing field 'prompt'"),
        (lambda r: r.pop("reward_model"), "missing field 'reward_model.ground_truth'"),
        (lambda r: r["reward_model"].pop("ground_truth"), "missing field 'reward_model.ground_truth'"),
        (
            lambda r: r["reward_model"].update(ground_truth=["72"]),
            "field 'reward_model.ground_truth' must be str",
        ),
        (
            lambda r: r["reward_model"].update(ground_truth=True),
            "field 'reward_model.ground_truth' must be str or int or float, got bool",
        ),
        (lambda r: r.update(prompt=7), "field 'prompt' must be str or list, got int"),
        (lambda r: r.update(prompt=[]), "field 'prompt' is an empty list"),
        (lambda r: r.update(prompt=[{"role": "user"}]), r"field 'prompt\[0\]' must be an object"),
        (lambda r: r.update(data_source=3), "field 'data_source' must be str"),
        (lambda r: r.update(uid=1.5), "field 'uid' must be str or int"),
    ],
)
def test_missing_or_ill_typed_fields_jsonl(tmp_path, mutate, message):
    bad = record(1)
    mutate(bad)
    p = write_jsonl(tmp_path / "f.jsonl", [record(0), bad])
    with raises_one_line(r"f\.jsonl:2: " + message):
        MathTask(p)


def test_parquet_errors_name_row_and_field(tmp_path):
    rows = [record(0), record(1)]
    table = pa.Table.from_pylist(rows).drop_columns(["reward_model"])
    pq.write_table(table, tmp_path / "nogt.parquet")
    with raises_one_line(r"nogt\.parquet: row 0: missing field 'reward_model.ground_truth'"):
        MathTask(tmp_path / "nogt.parquet")
    rows[1]["reward_model"]["ground_truth"] = None
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "null.parquet")
    with raises_one_line(r"null\.parquet: row 1: missing field 'reward_model.ground_truth'"):
        MathTask(tmp_path / "null.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not a parquet file at all")
    with raises_one_line(r"junk\.parquet: cannot read parquet"):
        MathTask(tmp_path / "junk.parquet")


def test_file_level_errors(tmp_path):
    with raises_one_line("no such file"):
        MathTask(tmp_path / "missing.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with raises_one_line(r"unsupported file type '\.csv'"):
        MathTask(tmp_path / "d.csv")
    p = write_jsonl(tmp_path / "dup.jsonl", [record(3), record(3)])
    with raises_one_line(re.escape("dup.jsonl:2: duplicate uid 'dup-3' (first seen at ") + ".*dup.jsonl:1"):
        MathTask(p)
