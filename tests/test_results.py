"""Result objects: schema, save/load round trips (parquet and CSV), atomic writes, concat."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from resrl_analysis.errors import ProbeError
from resrl_analysis.results import (
    RESULT_TYPES,
    DiversityResult,
    LLDResult,
    ProbeResult,
    ScoresResult,
    atomic_write_text,
    load_result,
    load_results,
)

pytestmark = pytest.mark.unit

_VALUES = {"int": [0, 3], "float": [0.5, float("nan")], "bool": [True, False], "boolean": [True, pd.NA],
           "str": ["a", "b c"]}


def _sample(cls: type[ProbeResult]) -> ProbeResult:
    """Two rows per table, every declared column filled with values of its dtype (NaN and NA included)."""
    tables = {name: pd.DataFrame({c: _VALUES[k] for c, k in schema.items()}) for name, schema in cls.TABLES.items()}
    return cls(**tables, meta={"eps": 0.0, "skipped": [{"step": 0, "group_id": 1, "reason": "no_positive"}],
                               "nested": {"x": [1, 2]}})


def _assert_same(a: ProbeResult, b: ProbeResult) -> None:
    assert type(a) is type(b)
    for name in a.TABLES:
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name), check_dtype=True)
    assert b.meta == json.loads(json.dumps(a.meta))


@pytest.mark.parametrize("kind", sorted(RESULT_TYPES))
@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_round_trip_every_result(tmp_path, kind, fmt):
    r = _sample(RESULT_TYPES[kind])
    path = r.save(tmp_path / kind, format=fmt)
    back = load_result(path)
    _assert_same(r, back)
    assert sorted(p.name for p in tmp_path.iterdir()) == [kind]  # no temporary debris


@pytest.mark.parametrize("kind", sorted(RESULT_TYPES))
def test_round_trip_empty(tmp_path, kind):
    cls = RESULT_TYPES[kind]
    r = cls.empty({"skipped": [{"reason": "no mixed groups"}]})
    back = cls.load(r.save(tmp_path / "r"))
    for name, schema in cls.TABLES.items():
        assert list(getattr(back, name).columns) == list(schema) and len(getattr(back, name)) == 0
    assert back.skipped == [{"reason": "no mixed groups"}]


def test_to_frame_is_primary_table_copy():
    r = _sample(LLDResult)
    f = r.to_frame()
    f.loc[0, "delta_pos_sum"] = 99.0
    assert r.deltas.loc[0, "delta_pos_sum"] == 0.5
    assert list(f.columns) == list(LLDResult.TABLES["deltas"])


def test_schema_cast_and_missing_columns():
    r = ScoresResult(responses=pd.DataFrame({"step": [1.0], "group_id": [2], "response_index": [0],
                                             "is_positive": [1], "n_tokens": [3], "extra": ["kept"]}))
    df = r.to_frame()
    assert df.step.dtype == np.int64 and df.is_positive.dtype == bool and np.isnan(df.logp_sum[0])
    assert list(df.columns)[-1] == "extra"
    with pytest.raises(ValueError, match="n_tokens"):
        ScoresResult(responses=pd.DataFrame({"step": [0], "group_id": [0], "response_index": [0],
                                             "is_positive": [True]}))


def test_save_failure_leaves_nothing_and_keeps_previous(tmp_path, monkeypatch):
    good = _sample(DiversityResult)
    good.save(tmp_path / "div")
    calls = {"n": 0}
    real = pd.DataFrame.to_parquet

    def flaky(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] % 2 == 0:  # the second table of every save
            raise OSError("disk full")
        return real(self, *a, **kw)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", flaky)
    bad = DiversityResult.empty()
    with pytest.raises(OSError, match="disk full"):
        bad.save(tmp_path / "div")
    with pytest.raises(OSError):
        bad.save(tmp_path / "fresh")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["div"]
    _assert_same(good, load_result(tmp_path / "div"))


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(ProbeError, match="refusing"):
        _sample(ScoresResult).save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_load_errors(tmp_path):
    with pytest.raises(ProbeError, match="meta.json"):
        load_result(tmp_path)
    p = _sample(ScoresResult).save(tmp_path / "s")
    with pytest.raises(ProbeError, match="not 'lld'"):
        LLDResult.load(p)
    (p / "responses.parquet").unlink()
    with pytest.raises(ProbeError, match="responses.parquet"):
        load_result(p)


def test_concat_and_load_results(tmp_path):
    a, b = _sample(LLDResult), _sample(LLDResult)
    c = LLDResult.concat([a, b])
    assert len(c.deltas) == 4 and len(c.skipped) == 2
    c.save(tmp_path / "probes" / "lld")
    _sample(ScoresResult).save(tmp_path / "probes" / "scores")
    assert sorted(load_results(tmp_path / "probes")) == ["lld", "scores"]


def test_summaries_are_json(tmp_path):
    for cls in RESULT_TYPES.values():
        json.dumps(_sample(cls).summary(), allow_nan=False)


def test_atomic_write_text_failure(tmp_path, monkeypatch):
    atomic_write_text(tmp_path / "s.json", "old")
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "s.json", "new")
    monkeypatch.undo()
    assert (tmp_path / "s.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]
