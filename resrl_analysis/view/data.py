"""What ``resrl view`` shows, read from run directories into plain objects (no model is built here).

A run gives *entries*: what the step selector offers.

- ``rollouts`` entries (our runs): one per rollout dump ``rollouts/step_XXXXXX.jsonl``, every group
  of the batch with every per-token field the dump holds (docs/RUN_DIRECTORY.md).
- ``probe`` entries (TRL, verl, any run probed on a set that is not one of its dumps, e.g.
  ``--probe-set heldout``): one per probed checkpoint, the probe set scored there by ``resrl probe``
  (``probes/scores`` per-token log-prob and entropy, ``probes/interference`` NTHR, ``probes/subspace``
  ResRL weights and residuals, under the paper's representation).

Δ log-prob between two checkpoints comes from ``probes/scores/tokens`` (logp at the later minus
logp at the earlier checkpoint, the same token of the same response); the pairs offered are those
``resrl probe`` compared (``probes/lld``: every checkpoint against the first and against the one
before), with their per-group Δ and LLD flag. When the probe set *is* one of the run's rollout dumps
(our default, ``rollouts/step_000000.jsonl``), the Δ is attached to that dump's groups (after checking
that the token ids agree) instead of adding probe entries.

Shared prefixes are :func:`resrl_analysis.displacement.shared_prefix_mask`, positives against the
group's negatives and negatives against its positives.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import rundir
from ..errors import ProbeError
from .quantities import QUANTITIES

__all__ = ["ResponseView", "GroupView", "EntryView", "RunView", "read_run", "shared_prefix_lengths", "num",
           "entry_key"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def num(x: Any) -> float | None:
    """A number as the page stores it: 4 significant digits, None when missing or not finite.

    >>> num(0.123456), num(-1234567.0), num(float("nan")), num(None), num(3)
    (0.1235, -1235000.0, None, None, 3.0)
    """
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return float(f"{v:.4g}") if math.isfinite(v) else None


def entry_key(kind: str, step: int) -> str:
    """The step selector's key of an entry.

    >>> entry_key("rollouts", 12)
    'rollouts:12'
    """
    return f"{kind}:{step}"


def pair_key(a: int, b: int) -> str:
    return f"{a}-{b}"


@dataclass
class ResponseView:
    """One response: ``ids`` its tokens, ``values`` quantity key → one number (or None) per token,
    ``deltas`` pairwise quantity key → checkpoint pair key → its change per token, ``shared`` the length of
    its shared prefix."""

    index: int
    reward: float
    ids: list[int]
    advantage: float | None = None
    finished: bool | None = None
    values: dict[str, list[float | None]] = field(default_factory=dict)
    deltas: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)
    shared: int = 0

    @property
    def is_positive(self) -> bool:
        return self.reward > 0

    def to_json(self) -> dict:
        out: dict[str, Any] = {"i": self.index, "reward": num(self.reward), "ids": self.ids, "n": self.shared}
        if self.advantage is not None:
            out["adv"] = num(self.advantage)
        if self.finished is not None:
            out["fin"] = bool(self.finished)
        if self.values:
            out["q"] = {k: [num(v) for v in vals] for k, vals in self.values.items()}
        if self.deltas:
            out["d"] = {k: {pk: [num(v) for v in vals] for pk, vals in by_pair.items()}
                        for k, by_pair in self.deltas.items()}
        return out


@dataclass
class GroupView:
    """One prompt group: its responses, and (when probed) its Δ and LLD flag per checkpoint pair."""

    group_id: int
    prompt_uid: str
    prompt: str
    ground_truth: str | None
    responses: list[ResponseView]
    probed: bool = False
    delta: dict[str, float | None] = field(default_factory=dict)
    lld: dict[str, bool | None] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """``mixed``, ``no_positive`` or ``no_negative`` (as a probe group's)."""
        pos = sum(r.is_positive for r in self.responses)
        if pos == 0:
            return "no_positive"
        return "no_negative" if pos == len(self.responses) else "mixed"

    @property
    def match_key(self) -> str:
        """What identifies the prompt across runs (its text; its uid when the text is unknown)."""
        return self.prompt if self.prompt else f"uid:{self.prompt_uid}"

    @property
    def n_tokens(self) -> int:
        return sum(len(r.ids) for r in self.responses)

    def to_json(self) -> dict:
        out: dict[str, Any] = {"id": self.group_id, "uid": self.prompt_uid, "prompt": self.prompt,
                               "gt": self.ground_truth, "status": self.status, "probed": self.probed,
                               "r": [r.to_json() for r in self.responses]}
        if self.delta:
            out["delta"] = {k: num(v) for k, v in self.delta.items()}
        if self.lld:
            out["lld"] = {k: (None if v is None else bool(v)) for k, v in self.lld.items()}
        return out


@dataclass
class EntryView:
    """What the step selector shows for one run at one step (``kind`` rollouts or probe)."""

    kind: str
    step: int
    source: str
    groups: list[GroupView]

    @property
    def key(self) -> str:
        return entry_key(self.kind, self.step)

    @property
    def label(self) -> str:
        return f"step {self.step} · rollout batch" if self.kind == "rollouts" else f"checkpoint {self.step} · probe set"


@dataclass
class RunView:
    """A run as the page shows it: entries by step, the checkpoint pairs of Δ log-prob, token texts."""

    name: str
    path: Path
    kind: str
    entries: list[EntryView]
    pairs: list[tuple[int, int]] = field(default_factory=list)
    eps: float | None = None
    notes: list[str] = field(default_factory=list)
    tokenizer_path: Path | None = None

    def token_texts(self, ids: Iterable[int]) -> dict[int, str]:
        """Text of each token id (decoded alone, special tokens kept); empty without a tokenizer."""
        if self.tokenizer_path is None:
            return {}
        from ..checkpoints import load_tokenizer

        tok = load_tokenizer(self.tokenizer_path)
        return {i: tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                for i in sorted(set(ids))}


# ----------------------------------------------------------------------------- shared prefixes


def shared_prefix_lengths(ids: Sequence[Sequence[int]], positive: Sequence[bool]) -> list[int]:
    """Per response, how many leading tokens it shares with some response of the other sign in its group
    (:func:`resrl_analysis.displacement.shared_prefix_mask`, which is always a prefix).

    >>> shared_prefix_lengths([[5, 6, 7], [5, 6, 9], [8, 6, 7], [5, 6, 7, 1]], [True, False, False, True])
    [2, 2, 0, 2]
    """
    import torch

    from ..displacement import shared_prefix_mask

    pos = [i for i, p in enumerate(positive) if p]
    neg = [i for i, p in enumerate(positive) if not p]
    out = [0] * len(ids)
    if not pos or not neg:
        return out

    def padded(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        T = max(1, max(len(ids[i]) for i in rows))
        t = torch.zeros(len(rows), T, dtype=torch.long)  # (R, T)
        m = torch.zeros(len(rows), T, dtype=torch.bool)  # (R, T)
        for k, i in enumerate(rows):
            t[k, : len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
            m[k, : len(ids[i])] = True
        return t, m

    (pt, pm), (nt, nm) = padded(pos), padded(neg)
    for rows, mask in ((pos, shared_prefix_mask(pt, pm, nt, nm)), (neg, shared_prefix_mask(nt, nm, pt, pm))):
        for k, i in enumerate(rows):
            out[i] = int(mask[k].sum())  # (T,) a prefix: its count is its length
    return out


# ----------------------------------------------------------------------------- reading a run


def _tokenizer_dir(paths: Iterable[Path]) -> Path | None:
    for p in paths:
        if p is not None and any((Path(p) / f).exists() for f in _TOKENIZER_FILES):
            return Path(p)
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ProbeError(f"{path}: cannot read ({e})") from None


@dataclass
class _Probes:
    """The saved probe results of a run (those the page reads), and where the probe set came from."""

    dir: Path
    summary: dict
    tables: dict[str, Any]  # result name -> loaded result

    @property
    def source(self) -> str | None:
        src = (self.summary.get("probe_set") or {}).get("source")
        if src is None:  # results written without a summary: the scores' own metadata
            scores = self.tables.get("scores")
            src = ((scores.meta if scores is not None else {}).get("probe_set") or {}).get("source")
        return src


def _load_probes(probes_dir: Path | None, notes: list[str]) -> _Probes | None:
    from ..results import load_result

    if probes_dir is None or not (probes_dir / "scores" / "meta.json").is_file():
        return None
    summary = _read_json(probes_dir / "summary.json") if (probes_dir / "summary.json").is_file() else {}
    tables: dict[str, Any] = {}
    wanted = {"scores", "lld"} | {q.probe.result for q in QUANTITIES if q.probe is not None}
    for name in sorted(wanted):
        if (probes_dir / name / "meta.json").is_file():
            tables[name] = load_result(probes_dir / name)
    scores = tables["scores"]
    if scores.tokens.empty:
        notes.append(f"{probes_dir / 'scores'}: no per-token table (written before `resrl probe` kept one): "
                     "no Δ log-prob; run `resrl probe` again for it")
    return _Probes(probes_dir, summary, tables)


class _TokenTable:
    """Fast lookup of a per-token probe column: (step, group_id, response_index) -> (positions, values)."""

    def __init__(self, df, column: str, where: Sequence[tuple[str, str]] = ()):
        for c, v in where:
            df = df[df[c] == v]
        self.index = {tuple(int(x) for x in k): idx
                      for k, idx in df.groupby(["step", "group_id", "response_index"], sort=False).indices.items()}
        self.pos = df["position"].to_numpy()
        self.val = df[column].to_numpy(dtype=float, na_value=np.nan)
        self.ids = df["token_id"].to_numpy() if "token_id" in df else None

    def get(self, step: int, gid: int, ri: int, n: int) -> list[float | None] | None:
        idx = self.index.get((step, gid, ri))
        if idx is None:
            return None
        out = np.full(n, np.nan)
        p = self.pos[idx]
        ok = p < n
        out[p[ok]] = self.val[idx][ok]
        return [None if math.isnan(x) else float(x) for x in out]

    def token_ids(self, step: int, gid: int, ri: int) -> list[int] | None:
        idx = self.index.get((step, gid, ri))
        if idx is None or self.ids is None:
            return None
        order = np.argsort(self.pos[idx], kind="stable")
        return [int(x) for x in self.ids[idx][order]]


def _pairs_and_flags(probes: _Probes, token_steps: list[int]) -> tuple[list[tuple[int, int]], dict, float | None]:
    """Checkpoint pairs (those `resrl probe` compared), and {(a, b, group_id): (delta_pos_sum, lld_sum)}."""
    lld = probes.tables.get("lld")
    flags: dict[tuple[int, int, int], tuple[float | None, bool | None]] = {}
    have = set(token_steps)
    if lld is not None and len(lld.deltas):
        d = lld.deltas[lld.deltas.comparison != "in_batch"]
        pairs = sorted({(int(a), int(b)) for a, b in zip(d.step_from, d.step_to) if a in have and b in have})
        for row in d.itertuples(index=False):
            key = (int(row.step_from), int(row.step_to), int(row.group_id))
            if key not in flags:
                flag = row.lld_sum
                flags[key] = (num(row.delta_pos_sum), None if pd.isna(flag) else bool(flag))
        return pairs, flags, lld.meta.get("eps")
    steps = sorted(have)  # no lld table: the pairs it would have compared, without flags
    pairs = sorted({(steps[0], s) for s in steps[1:]} | set(zip(steps[:-1], steps[1:])))
    return pairs, flags, None


def _check_lengths(obj: dict, n: int, where: str, fields: Iterable[str]) -> None:
    for f in fields:
        v = obj.get(f)
        if v is not None and (not isinstance(v, list) or len(v) != n):
            got = f"{len(v)} entries" if isinstance(v, list) else type(v).__name__
            raise ProbeError(f"{where}: field {f!r} has {got}, expected a list of {n} (one per response token)")


def _dump_entry(path: Path, step: int) -> EntryView:
    """One rollout dump as an entry: every group, every per-token field a quantity declares."""
    fields = [q for q in QUANTITIES if q.dump_field and not q.pairwise and q.builtin is None]
    by_group: dict[int, list[tuple[int, dict]]] = {}
    try:
        lines = rundir.read_jsonl(path, nonempty=True)
    except rundir.JsonlError as e:
        raise ProbeError(str(e)) from None
    for i, obj in lines:
        gid = obj.get("group_id")
        if isinstance(gid, bool) or not isinstance(gid, int):
            raise ProbeError(f"{path}:{i}: field 'group_id' must be an integer")
        by_group.setdefault(gid, []).append((i, obj))
    groups = []
    for gid, rows in by_group.items():
        first = rows[0][1]
        responses = []
        for k, (i, obj) in enumerate(rows):
            where = f"{path}:{i}"
            ids = obj.get("response_ids")
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ProbeError(f"{where}: field 'response_ids' must be a list of token ids")
            reward = obj.get("reward")
            if isinstance(reward, bool) or not isinstance(reward, (int, float)):
                raise ProbeError(f"{where}: field 'reward' must be a number")
            _check_lengths(obj, len(ids), where, [q.dump_field for q in fields])  # type: ignore[misc]
            values = {q.key: [None if x is None else float(x) for x in obj[q.dump_field]]
                      for q in fields if isinstance(obj.get(q.dump_field), list)}
            adv = obj.get("advantage")
            responses.append(ResponseView(k, float(reward), list(ids), advantage=None if adv is None else float(adv),
                                          finished=obj.get("finished"), values=values))
        gt = first.get("ground_truth")
        groups.append(GroupView(gid, str(first.get("prompt_uid", gid)), str(first.get("prompt", "")),
                                None if gt is None else str(gt), responses))
    return EntryView("rollouts", step, str(path), groups)


def _same_file(a: str | Path, b: Path) -> bool:
    """Whether the probe set's recorded source is this dump: the same file, or (a relative path recorded from
    another working directory) the same ``rollouts/step_XXXXXX.jsonl``; the token ids are checked afterwards."""
    try:
        if Path(a).resolve() == b.resolve():
            return True
    except OSError:
        return False
    return not Path(a).is_absolute() and Path(a).parts[-2:] == b.parts[-2:]


def _pairwise_tables(probes: _Probes) -> dict[str, _TokenTable]:
    """The probe column of every pairwise quantity (Δ between two checkpoints), by quantity key."""
    out = {}
    for q in QUANTITIES:
        if not q.pairwise or q.probe is None:
            continue
        res = probes.tables.get(q.probe.result)
        df = getattr(res, q.probe.table, None) if res is not None else None
        if df is not None and len(df) and q.probe.column in df:
            out[q.key] = _TokenTable(df, q.probe.column, q.probe.where)
    return out


def _add_deltas(g: GroupView, rows: Sequence[tuple[int, ResponseView]], tables: dict[str, _TokenTable],
                pairs: list[tuple[int, int]], flags: dict) -> None:
    """Each pairwise quantity's change between the checkpoints of every pair (later minus earlier), per token;
    the group's Δ and LLD flag from `resrl probe`'s lld table. ``rows``: (probe-set response index, response)."""
    for a, b in pairs:
        pk = pair_key(a, b)
        for qk, t in tables.items():
            for ri, r in rows:
                va, vb = t.get(a, g.group_id, ri, len(r.ids)), t.get(b, g.group_id, ri, len(r.ids))
                if va is not None and vb is not None:
                    r.deltas.setdefault(qk, {})[pk] = [None if x is None or y is None else y - x
                                                      for x, y in zip(va, vb)]
        if (a, b, g.group_id) in flags:
            g.delta[pk], g.lld[pk] = flags[(a, b, g.group_id)]


def _attach_probe_set(entry: EntryView, probes: _Probes, pairs: list[tuple[int, int]], flags: dict,
                      notes: list[str]) -> None:
    """Give the dump's groups that are in the probe set their Δ per pair (token ids checked first)."""
    scores = probes.tables["scores"]
    logp = _TokenTable(scores.tokens, "logp")
    steps = sorted({int(s) for s in scores.tokens.step.unique()})
    if not steps:
        return
    tables = _pairwise_tables(probes)
    first = steps[0]
    mismatched = 0
    for g in entry.groups:
        # The probe set drops responses without tokens: its response_index counts the others, in order.
        kept = [r for r in g.responses if r.ids]
        if logp.token_ids(first, g.group_id, 0) is None:
            continue  # not in the probe set
        if any(logp.token_ids(first, g.group_id, k) != r.ids for k, r in enumerate(kept)) or \
                logp.token_ids(first, g.group_id, len(kept)) is not None:
            mismatched += 1
            continue
        g.probed = True
        _add_deltas(g, list(enumerate(kept)), tables, pairs, flags)
    if mismatched:
        notes.append(f"{mismatched} probe-set group(s) of {entry.source} hold other tokens than the dump now does: "
                     "shown without Δ log-prob")


def _probe_entries(probes: _Probes, pairs: list[tuple[int, int]], flags: dict) -> list[EntryView]:
    """One entry per probed checkpoint: the probe set, with the per-token numbers `resrl probe` computed there."""
    scores = probes.tables["scores"]
    tok, resp, prompts = scores.tokens, scores.responses, scores.prompts
    if tok.empty:
        return []
    logp = _TokenTable(tok, "logp")
    pairwise = _pairwise_tables(probes)
    tables: dict[str, _TokenTable] = {}
    for q in QUANTITIES:
        if q.probe is None or q.pairwise:
            continue
        res = probes.tables.get(q.probe.result)
        if res is None:
            continue
        df = getattr(res, q.probe.table, None)
        if df is not None and len(df) and q.probe.column in df:
            tables[q.key] = _TokenTable(df, q.probe.column, q.probe.where)
    prompt_of = {(int(r.step), int(r.group_id)): r for r in prompts.itertuples(index=False)} if len(prompts) else {}
    entries = []
    for step in sorted(int(s) for s in tok.step.unique()):
        groups = []
        rs = resp[resp.step == step]
        for gid, d in rs.groupby("group_id", sort=False):
            gid = int(gid)
            responses = []
            for row in d.sort_values("response_index").itertuples(index=False):
                ri = int(row.response_index)
                ids = logp.token_ids(step, gid, ri) or []
                values = {}
                for key, t in tables.items():
                    v = t.get(step, gid, ri, len(ids))
                    if v is not None:
                        values[key] = v
                responses.append(ResponseView(ri, float(row.reward), ids, values=values))
            pr = prompt_of.get((step, gid))
            gt = None if pr is None or not isinstance(pr.ground_truth, str) else pr.ground_truth
            g = GroupView(gid, str(d.prompt_uid.iloc[0]), "" if pr is None else str(pr.prompt), gt, responses,
                          probed=True)
            _add_deltas(g, [(r.index, r) for r in responses], pairwise, pairs, flags)
            groups.append(g)
        entries.append(EntryView("probe", step, str(probes.dir / "scores"), groups))
    return entries


def _add_shared(entries: Iterable[EntryView]) -> None:
    for e in entries:
        for g in e.groups:
            lens = shared_prefix_lengths([r.ids for r in g.responses], [r.is_positive for r in g.responses])
            for r, n in zip(g.responses, lens):
                r.shared = n


def read_run(path: str | Path, *, steps: Sequence[int] | None = None, name: str | None = None) -> RunView:
    """Read everything the page can show of one run.

    ``path``: our run directory, a TRL or verl run (:func:`resrl_analysis.runs.discover_run`), or a
    ``resrl probe`` output directory (``scores/`` inside). ``steps``: keep only these steps (rollout dumps
    and probed checkpoints). Raises :class:`ProbeError` (one line) on a path that is none of these, or
    when it holds nothing to show.

    >>> import tempfile
    >>> from resrl_analysis.probes.synthetic import write_fake_run
    >>> run = read_run(write_fake_run(tempfile.mkdtemp(), steps=(0, 1)))
    >>> [e.key for e in run.entries], len(run.entries[0].groups), run.entries[0].groups[0].status
    (['rollouts:0'], 4, 'mixed')
    """
    path = Path(path)
    notes: list[str] = []
    if (path / "scores" / "meta.json").is_file():  # a `resrl probe` output directory
        probes_dir = path
        summary = _read_json(path / "summary.json") if (path / "summary.json").is_file() else {}
        root = Path(summary["run_dir"]) if summary.get("run_dir") else None
        root = root if root is not None and root.is_dir() else None
        kind = "probes"
        ckpt_dirs = [Path(c["path"]) for c in summary.get("checkpoints", []) if c.get("path")]
    elif rundir.list_rollouts(path):  # ours; its checkpoints may be gone (only the dumps are read)
        probes_dir, root, kind = path / rundir.PROBES, path, "resrl"
        ckpt_dirs = [p for _, p in rundir.list_checkpoints(path)]
    else:
        from ..runs import discover_run

        info = discover_run(path)
        probes_dir, root, kind = info.probes_dir, info.path, info.kind
        ckpt_dirs = [p for _, p in info.checkpoints]
        notes += list(info.notes)
    probes = _load_probes(probes_dir, notes)
    want = None if steps is None else set(steps)
    dumps = [(s, p) for s, p in (rundir.list_rollouts(root) if root is not None else []) if want is None or s in want]
    entries = [_dump_entry(p, s) for s, p in dumps]
    pairs: list[tuple[int, int]] = []
    eps = None
    if probes is not None:
        tok = probes.tables["scores"].tokens
        token_steps = sorted(int(s) for s in tok.step.unique()) if len(tok) else []
        pairs, flags, eps = _pairs_and_flags(probes, token_steps)
        src = probes.source
        attach = [e for e, (_, p) in zip(entries, dumps) if src is not None and _same_file(src, p)]
        if attach:
            _attach_probe_set(attach[0], probes, pairs, flags, notes)
        elif src is None or not any(_same_file(src, p) for _, p in rundir.list_rollouts(root or path)):
            entries += [e for e in _probe_entries(probes, pairs, flags) if want is None or e.step in want]
    if not entries:
        what = "no rollout dump (rollouts/step_XXXXXX.jsonl)"
        what += " and no per-token probe scores (run `resrl probe` first)" if probes is None or probes.tables[
            "scores"].tokens.empty else ""
        sel = f" at steps {sorted(want)}" if want is not None else ""
        raise ProbeError(f"{path}: nothing to show{sel}: {what}")
    _add_shared(entries)
    entries.sort(key=lambda e: (e.step, e.kind))
    tok_dir = _tokenizer_dir([*(ckpt_dirs or []), *([root] if root is not None else [])])
    if tok_dir is None:
        notes.append("no tokenizer found in the run's checkpoints: tokens are shown by id")
    label = name or (path.parent.name if kind == "probes" else path.name)
    return RunView(label, path, kind, entries, pairs, eps, notes, tok_dir)
