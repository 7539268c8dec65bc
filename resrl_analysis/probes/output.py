"""Writing one probe pass's results as a set: ``resrl probe`` and the live ``ProbeCallback`` both write this way.

The results are saved into a staging directory beside the old ones, then swapped in: the old ``summary.json``
is removed first and the new one renamed into place last, so a failure never leaves a mix of two passes that
reads as whole (a reader trusts a table only when ``summary.json`` lists it).

    >>> import tempfile, pathlib, pandas as pd
    >>> from resrl_analysis.results import ScoresResult, load_results
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> r = ScoresResult(responses=pd.DataFrame([dict(step=0, group_id=0, prompt_uid="p", response_index=0,
    ...     is_positive=True, reward=1.0, n_tokens=1, logp_sum=-1.0, logp_mean=-1.0, entropy_mean=0.5)]))
    >>> _ = write_results(out, {"scores": r}, {"probes": ["entropy"]})
    >>> sorted(load_results(out)), sorted(p.name for p in out.iterdir())
    (['scores'], ['scores', 'summary.json'])
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..probe_sets import ProbeSet
from ..results import ProbeResult, _replace_dir, atomic_write_text, to_jsonable

__all__ = ["write_results", "results_summary", "probe_set_hash", "saved_tables"]


def probe_set_hash(probe_set: ProbeSet) -> str:
    """A short fingerprint of what a probe set scores (token ids and rewards), to tell tables of two sets apart."""
    content = [[g.group_id, g.prompt_ids, g.response_ids, g.rewards] for g in probe_set.groups]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]


def saved_tables(out: Path) -> dict[str, dict]:
    """``name -> meta`` of every saved result directly under ``out`` (``{}`` meta when unreadable)."""
    found = {}
    for d in sorted(out.iterdir()) if out.is_dir() else []:
        if d.is_dir() and not d.name.startswith(".") and (d / "meta.json").is_file():
            try:
                found[d.name] = json.loads((d / "meta.json").read_text(encoding="utf-8")).get("meta") or {}
            except (OSError, ValueError):
                found[d.name] = {}
    return found


def results_summary(results: Mapping[str, ProbeResult]) -> dict[str, Any]:
    """``results`` and ``skipped`` entries of ``summary.json``: each result's digest and what it did not compute."""
    return {"results": {name: {"path": name, "kind": res.KIND, **res.summary()} for name, res in results.items()},
            "skipped": [{"probe": name, **s} for name, res in results.items() for s in res.skipped]}


def write_results(out: Path, results: Mapping[str, ProbeResult], summary: Mapping[str, Any], *,
                  format: str = "parquet", remove: Sequence[str] = ()) -> Path:
    """Save ``results`` (table name → result) under ``out`` with ``summary`` as ``summary.json``, as one set;
    the tables named in ``remove`` (stale ones of an earlier pass) are deleted once the new set is in place.
    Returns the summary's path; after an ``OSError`` (raised) the old set is still whole."""
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".staging-{uuid.uuid4().hex[:8]}"
    try:
        for name, res in results.items():
            res.save(staging / name, format=format)
        atomic_write_text(staging / "summary.json", json.dumps(to_jsonable(dict(summary)), indent=1,
                                                               allow_nan=False))
        (out / "summary.json").unlink(missing_ok=True)
        for name in results:
            _replace_dir(staging / name, out / name)
        for name in remove:
            shutil.rmtree(out / name, ignore_errors=True)
        os.replace(staging / "summary.json", out / "summary.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / "summary.json"
