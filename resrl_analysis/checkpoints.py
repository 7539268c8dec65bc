"""Load Hugging Face causal-LM checkpoints and run directories; build probe sets (docs/RUN_DIRECTORY.md).

A *checkpoint* is any directory that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` accept: ours (``RUN_DIR/checkpoints/step_XXXXXX``), a TRL one, a
verl checkpoint merged to HF format, a plain ``save_pretrained`` folder. Before any model is built
the files are checked (config, weights, safetensors headers against the file sizes), so a missing or
truncated file gives a one-line :class:`ProbeError` naming the path instead of a deep traceback.

A *probe set* is a fixed list of prompt groups, each holding the prompt's token ids, its responses'
token ids and their rewards: every checkpoint is scored on the same text (teacher forcing). It comes
from a run's rollout dump (``rollouts/step_XXXXXX.jsonl``, docs/RUN_DIRECTORY.md) or from a user
JSONL with one prompt per line (``prompt``, ``responses``, ``rewards``).

Module-level imports are the standard library only: torch and transformers are imported inside
the functions that need them, so :mod:`resrl_analysis.results` (and plotting) can import
:class:`ProbeError` cheaply.

    >>> g = ProbeGroup(group_id=0, prompt_ids=(1, 5), response_ids=((6, 2), (7, 2)), rewards=(1.0, 0.0))
    >>> g.status, g.n_positive, ProbeSet((g,), source="inline").n_responses
    ('mixed', 1, 2)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import struct
import sys
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import rundir
from .rundir import STEP_DIR, JsonlError, parse_step

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ProbeError",
    "Checkpoint",
    "checkpoint_step",
    "list_checkpoints",
    "run_checkpoints",
    "validate_checkpoint_files",
    "check_safetensors",
    "load_checkpoint",
    "load_tokenizer",
    "quiet_progress_bars_unless_tty",
    "check_compatible",
    "read_jsonl",
    "ProbeGroup",
    "ProbeSet",
]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


class ProbeError(ValueError):
    """The input cannot be probed. The message is one line and names the offending path (or file:line)."""


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


# ----------------------------------------------------------------------------- run directories


def checkpoint_step(path: str | Path) -> int | None:
    """The step encoded in a ``step_XXXXXX`` directory name, else None.

    >>> checkpoint_step("runs/a/checkpoints/step_000120"), checkpoint_step("my-model")
    (120, None)
    """
    return parse_step(path) if STEP_DIR.match(Path(path).name) else None


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint of a run, sorted by step (:func:`resrl_analysis.rundir.
    list_checkpoints`), with a one-line :class:`ProbeError` when ``run_dir`` has no ``checkpoints/``.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for n in ("step_000010", "step_000000", ".tmp-step_000020-x", "notes"):
    ...     (d / "checkpoints" / n).mkdir(parents=True)
    >>> [s for s, _ in list_checkpoints(d)]
    [0, 10]
    """
    root = Path(run_dir) / rundir.CHECKPOINTS
    if not root.is_dir():
        raise ProbeError(f"{root}: no checkpoints directory (is {run_dir} a run directory?)")
    return rundir.list_checkpoints(run_dir)


def run_checkpoints(run: str | Path | Sequence[str | Path], *, base_model: str | Path | None = None
                    ) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint of any run: ours, a TRL output directory (``checkpoint-N``),
    a verl one (``global_step_N/actor/huggingface``), one checkpoint or an ordered list of them;
    ``base_model`` adds the starting policy as step 0. See :func:`resrl_analysis.runs.discover_run`.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for n in ("checkpoint-3", "checkpoint-1"):
    ...     (d / n).mkdir(); _ = (d / n / "config.json").write_text("{}")
    >>> [s for s, _ in run_checkpoints(d)]
    [1, 3]
    """
    from .runs import discover_run

    return list(discover_run(run, base_model=base_model).checkpoints)


# ----------------------------------------------------------------------------- file checks


def check_safetensors(path: str | Path) -> None:
    """Raise :class:`ProbeError` unless ``path`` is a complete safetensors file.

    Reads only the header (8-byte length + JSON) and compares the largest tensor end offset with
    the file size, so a truncated download or an interrupted copy is caught before loading.

    >>> import tempfile, pathlib, safetensors.torch
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "model.safetensors"
    >>> safetensors.torch.save_file({"w": torch.zeros(64)}, f); check_safetensors(f)
    >>> _ = f.write_bytes(f.read_bytes()[:-8])
    >>> check_safetensors(f)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    resrl_analysis.checkpoints.ProbeError: .../model.safetensors: truncated safetensors file (...)
    """
    path = Path(path)
    if not path.is_file():
        raise ProbeError(f"{path}: missing weights file")
    size = path.stat().st_size
    if size < 8:
        raise ProbeError(f"{path}: truncated safetensors file ({size} bytes)")
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            raise ProbeError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise ProbeError(f"{path}: corrupt safetensors header ({_one_line(e)})") from None
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    need = 8 + n + max(ends, default=0)
    if size < need:
        raise ProbeError(f"{path}: truncated safetensors file ({size} bytes, its header needs {need})")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ProbeError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ProbeError(f"{path}: not valid JSON ({_one_line(e)})") from None


def validate_checkpoint_files(path: str | Path) -> dict:
    """Check a checkpoint directory's files without building a model; return its ``config.json``.

    Looks for ``config.json`` and the weights (``model.safetensors``, a sharded safetensors index
    and its shards, or ``pytorch_model.bin``); safetensors files are checked for truncation.

    >>> import tempfile
    >>> validate_checkpoint_files(tempfile.mkdtemp())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    resrl_analysis.checkpoints.ProbeError: .../config.json: missing
    """
    path = Path(path)
    if not path.is_dir():
        raise ProbeError(f"{path}: checkpoint directory not found")
    config = _read_json(path / "config.json")
    st, st_index = path / "model.safetensors", path / "model.safetensors.index.json"
    pt, pt_index = path / "pytorch_model.bin", path / "pytorch_model.bin.index.json"
    if st_index.exists() or pt_index.exists():
        index_path = st_index if st_index.exists() else pt_index
        index = _read_json(index_path)
        shards = sorted(set((index.get("weight_map") or {}).values()))
        if not shards:
            raise ProbeError(f"{index_path}: no weight_map")
        for s in shards:
            if s.endswith(".safetensors"):
                check_safetensors(path / s)
            elif not (path / s).is_file():
                raise ProbeError(f"{path / s}: missing weights shard")
    elif st.exists():
        check_safetensors(st)
    elif pt.exists():
        if not zipfile.is_zipfile(pt):
            raise ProbeError(f"{pt}: truncated or corrupt (not a torch zip archive)")
    elif _raw_verl_actor(path) is not None:  # verl's per-rank shards beside: every rank's file must be there
        from .verl_shards import verl_shard_files

        for f in verl_shard_files(path.parent):
            if not zipfile.is_zipfile(f):
                raise ProbeError(f"{f}: truncated or corrupt (not a torch zip archive)")
    else:
        raise ProbeError(f"{path}: no model weights (model.safetensors or pytorch_model.bin)")
    return config


def _raw_verl_actor(path: Path) -> Path | None:
    """The verl actor directory when ``path`` is its ``huggingface/`` folder without weights beside raw model shards
    (``model_world_size_W_rank_R.pt``, :mod:`resrl_analysis.verl_shards`); else None."""
    from .verl_shards import is_raw_verl_actor

    has_weights = any((path / w).exists() for w in ("model.safetensors", "model.safetensors.index.json",
                                                    "pytorch_model.bin", "pytorch_model.bin.index.json"))
    return path.parent if not has_weights and is_raw_verl_actor(path.parent) else None


# ----------------------------------------------------------------------------- loading


def quiet_progress_bars_unless_tty(stream: Any = None) -> bool:
    """Turn transformers' (and the Hub's) progress bars off when ``stream`` (stderr) is not a terminal.

    "Loading weights 0%...100%" written to a log file or a pipe is noise; warnings and errors are
    untouched (only the bars go). Returns whether the bars were turned off. Call it once at the start
    of a command that loads models outside :func:`load_checkpoint` (which is always quiet).

    >>> import io
    >>> quiet_progress_bars_unless_tty(io.StringIO())
    True
    >>> from transformers.utils import logging; logging.enable_progress_bar()  # as it was
    """
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return False
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # also the Hub's download bars
    return True


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    # transformers 5 draws a progress bar per load; 20 of them would drown the probe's own bar.
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(path)``, with a one-line :class:`ProbeError` on failure."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / f).exists() for f in _TOKENIZER_FILES):
        raise ProbeError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one line naming the path
        raise ProbeError(f"{path}: cannot load tokenizer ({_one_line(e)})") from e


def _resolve_dtype(dtype: str | torch.dtype | None, config: dict) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        name = config.get("dtype") or config.get("torch_dtype") or "float32"
    else:
        name = dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ProbeError(f"unknown dtype {name!r}; expected one of {sorted(table)}")
    return table[name]


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``model`` (eval mode), ``tokenizer`` (or None), its ``path`` and ``step``."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    path: Path
    step: int | None = None


def load_checkpoint(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device = "cpu",
    tokenizer: bool | str | Path = True,
    attn_implementation: str | None = None,
) -> Checkpoint:
    """Load any HF causal-LM checkpoint directory as (model in eval mode, tokenizer).

    Args:
        path: the checkpoint directory.
        dtype: ``"auto"`` (the config's dtype, float32 if none), a name (``"bfloat16"``) or a dtype.
        device: where the model goes.
        tokenizer: True to load the checkpoint's tokenizer, False for none, or another directory
            to load it from (a verl checkpoint merged without its tokenizer).
        attn_implementation: passed to ``from_pretrained`` (e.g. ``"eager"``); None lets HF choose.

    Raises:
        ProbeError: a missing or truncated file, or any loader failure (one line, naming the path).

    >>> ck = load_checkpoint("runs/tiny/checkpoints/step_000000")  # doctest: +SKIP
    >>> ck.step, ck.model.training  # doctest: +SKIP
    (0, False)
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = validate_checkpoint_files(path)
    kwargs: dict[str, Any] = {"dtype": _resolve_dtype(dtype, config)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    actor = _raw_verl_actor(path)
    try:
        with _quiet_transformers():
            if actor is not None:  # verl's raw FSDP shards: the config here, the weights merged from the shards
                model = _model_from_verl_shards(path, actor, kwargs)
            else:
                model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except ProbeError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ProbeError(f"{path}: cannot load model ({_one_line(e)})") from e
    model.to(device).eval()
    tok = None
    if tokenizer is True:
        tok = load_tokenizer(path)
    elif tokenizer not in (False, None):
        tok = load_tokenizer(Path(tokenizer))  # type: ignore[arg-type]
    return Checkpoint(model=model, tokenizer=tok, path=path, step=checkpoint_step(path))


def _model_from_verl_shards(hf_dir: Path, actor: Path, kwargs: dict[str, Any]) -> PreTrainedModel:
    """The model of ``hf_dir/config.json`` with the weights of verl's raw shards in ``actor`` (read weights-only)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .verl_shards import load_verl_state_dict

    state = load_verl_state_dict(actor)
    cfg = AutoConfig.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_config(cfg, **kwargs)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if model.get_output_embeddings() is not None and k.startswith("lm_head")
            and getattr(cfg, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ProbeError(f"{actor}: the shards do not match {hf_dir / 'config.json'} (missing "
                         f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    if tied:
        model.tie_weights()
    return model


def _tokenizer_signature(path: Path) -> tuple[str, Any]:
    # Fast path: identical tokenizer.json bytes mean identical vocabularies (the usual case along a
    # run); otherwise the caller loads the tokenizers and compares their vocabularies.
    tj = path / "tokenizer.json"
    if tj.is_file():
        return "sha256", hashlib.sha256(tj.read_bytes()).hexdigest()
    return "none", None


def check_compatible(paths: Sequence[str | Path]) -> None:
    """Raise :class:`ProbeError` unless all checkpoints share one vocabulary and tokenizer.

    Reads config files and tokenizer files only (cheap), so it runs before any model is built:
    the model vocabulary sizes must match, and so must the tokenizers' token→id maps and special
    tokens wherever a checkpoint ships a tokenizer.

    >>> check_compatible([ck for _, ck in list_checkpoints("runs/tiny")])  # doctest: +SKIP
    """
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        for p in paths:
            validate_checkpoint_files(p)
        return
    configs = [validate_checkpoint_files(p) for p in paths]

    def vocab_size(cfg: dict) -> Any:
        return cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))

    ref, ref_v = paths[0], vocab_size(configs[0])
    for p, cfg in zip(paths[1:], configs[1:]):
        if vocab_size(cfg) != ref_v:
            raise ProbeError(
                f"{p}: vocabulary size {vocab_size(cfg)} differs from {ref}'s {ref_v}; "
                "checkpoints with different vocabularies cannot be compared"
            )
    with_tok = [p for p in paths if any((p / f).exists() for f in _TOKENIZER_FILES)]
    if len(with_tok) < 2:
        return
    sigs = [_tokenizer_signature(p) for p in with_tok]
    if all(s[0] == "sha256" for s in sigs) and len({s[1] for s in sigs}) == 1:
        return
    ref_tok = load_tokenizer(with_tok[0])
    ref_vocab = ref_tok.get_vocab()
    for p, sig in zip(with_tok[1:], sigs[1:]):
        if sig == sigs[0] and sig[0] == "sha256":
            continue
        tok = load_tokenizer(p)
        vocab = tok.get_vocab()
        if vocab != ref_vocab:
            diff = sorted(set(vocab.items()) ^ set(ref_vocab.items()))[:1]
            raise ProbeError(
                f"{p}: tokenizer differs from {with_tok[0]}'s ({len(vocab)} vs {len(ref_vocab)} tokens, "
                f"e.g. {diff[0] if diff else '?'}); checkpoints with different tokenizers cannot be compared"
            )
        for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
            if getattr(tok, name, None) != getattr(ref_tok, name, None):
                raise ProbeError(f"{p}: tokenizer {name} {getattr(tok, name)} differs from {with_tok[0]}'s "
                                 f"{getattr(ref_tok, name)}")


# ----------------------------------------------------------------------------- probe sets


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line (:func:`resrl_analysis.rundir.read_jsonl`); a one-line
    :class:`ProbeError` naming file:line, also for a missing or empty file.

    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "a.jsonl"; _ = f.write_text('{"a": 1}\\n\\n{"a": 2}\\n')
    >>> read_jsonl(f)
    [(1, {'a': 1}), (3, {'a': 2})]
    """
    path = Path(path)
    if not path.is_file():
        raise ProbeError(f"{path}: file not found")
    try:
        out = rundir.read_jsonl(path)
    except JsonlError as e:
        raise ProbeError(str(e)) from None
    if not out:
        raise ProbeError(f"{path}: empty file")
    return out


def _field(obj: dict, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in obj:
        raise ProbeError(f"{where}: missing field {name!r}")
    v = obj[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):  # JSON true is not an int here
        raise ProbeError(f"{where}: field {name!r} has type {type(v).__name__}")
    return v


def _int_list(obj: dict, name: str, where: str) -> tuple[int, ...]:
    v = _field(obj, name, list, where)
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        raise ProbeError(f"{where}: field {name!r} must be a list of non-negative ints")
    return tuple(v)


@dataclass(frozen=True)
class ProbeGroup:
    """One prompt with its responses, token ids without padding, and their rewards.

    A response is positive when its reward is > 0 (as the trainer's ``is_positive``).
    """

    group_id: int
    prompt_ids: tuple[int, ...]
    response_ids: tuple[tuple[int, ...], ...]
    rewards: tuple[float, ...]
    prompt: str = ""
    responses: tuple[str, ...] = ()
    ground_truth: str | None = None
    prompt_uid: str = ""
    data_source: str = ""

    def __post_init__(self) -> None:
        if len(self.response_ids) != len(self.rewards):
            raise ValueError(f"group {self.group_id}: {len(self.response_ids)} responses but "
                             f"{len(self.rewards)} rewards")
        if len(self.prompt_ids) == 0:
            raise ValueError(f"group {self.group_id}: empty prompt")

    @property
    def n_responses(self) -> int:
        return len(self.response_ids)

    @property
    def is_positive(self) -> tuple[bool, ...]:
        return tuple(r > 0 for r in self.rewards)

    @property
    def n_positive(self) -> int:
        return sum(self.is_positive)

    @property
    def n_negative(self) -> int:
        return self.n_responses - self.n_positive

    @property
    def status(self) -> str:
        """``"mixed"``, ``"no_positive"`` or ``"no_negative"``."""
        if self.n_positive == 0:
            return "no_positive"
        if self.n_negative == 0:
            return "no_negative"
        return "mixed"

    @property
    def is_mixed(self) -> bool:
        return self.status == "mixed"


@dataclass(frozen=True)
class ProbeSet:
    """A fixed, teacher-forced probe set: prompt groups scored identically at every checkpoint.

    ``source`` says where it came from, ``step`` the rollout step it was taken from (None for a
    user file), ``notes`` anything dropped while reading.
    """

    groups: tuple[ProbeGroup, ...]
    source: str = ""
    step: int | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    @property
    def n_responses(self) -> int:
        return sum(g.n_responses for g in self.groups)

    @property
    def n_mixed(self) -> int:
        return sum(g.is_mixed for g in self.groups)

    @property
    def max_token_id(self) -> int:
        return max(max(g.prompt_ids + tuple(t for r in g.response_ids for t in r)) for g in self.groups)

    def describe(self) -> dict:
        """A JSON-able summary (for ``summary.json`` and result metadata)."""
        return {"source": self.source, "step": self.step, "n_groups": self.n_groups, "n_mixed": self.n_mixed,
                "n_responses": self.n_responses, "notes": list(self.notes)}

    def select(self, n_groups: int | None = None, *, prefer_mixed: bool = True) -> ProbeSet:
        """The first ``n_groups`` groups, mixed groups (both positive and negative responses) first.

        Interference, the bound and the first-order split need mixed groups; with ``prefer_mixed``
        a small probe set spends its budget on them (order within each kind is kept).

        >>> g = lambda i, r: ProbeGroup(i, (1,), ((3,),) * len(r), tuple(r))
        >>> [x.group_id for x in ProbeSet((g(0, [0, 0]), g(1, [1, 0]), g(2, [1, 1]))).select(2).groups]
        [1, 0]
        """
        groups = list(self.groups)
        if prefer_mixed:
            groups = [g for g in groups if g.is_mixed] + [g for g in groups if not g.is_mixed]
        if n_groups is not None:
            if n_groups < 1:
                raise ValueError(f"n_groups must be >= 1, got {n_groups}")
            groups = groups[:n_groups]
        return replace(self, groups=tuple(groups))

    def check_vocab(self, vocab_size: int, where: str = "model") -> None:
        """Raise :class:`ProbeError` if a token id is outside the model's vocabulary."""
        if self.max_token_id >= vocab_size:
            raise ProbeError(f"{self.source}: token id {self.max_token_id} outside the {where}'s vocabulary "
                             f"of {vocab_size}; was the probe set made with another tokenizer?")

    # -- constructors ------------------------------------------------------------------------------

    @classmethod
    def from_rollouts(cls, path: str | Path) -> ProbeSet:
        """Read a rollout dump ``rollouts/step_XXXXXX.jsonl`` (docs/RUN_DIRECTORY.md).

        Rows are grouped by ``group_id`` in order of first appearance; responses with no token are
        dropped (and counted in ``notes``).
        """
        path = Path(path)
        rows = read_jsonl(path)
        by_group: dict[int, list[tuple[int, dict]]] = {}
        for i, obj in rows:
            gid = _field(obj, "group_id", int, f"{path}:{i}")
            by_group.setdefault(gid, []).append((i, obj))
        groups, dropped = [], 0
        for gid, items in by_group.items():
            i0, first = items[0]
            where0 = f"{path}:{i0}"
            prompt_ids = _int_list(first, "prompt_ids", where0)
            resp_ids, resp_text, rewards = [], [], []
            for i, obj in items:
                where = f"{path}:{i}"
                if _int_list(obj, "prompt_ids", where) != prompt_ids:
                    raise ProbeError(f"{where}: prompt_ids differ within group {gid}")
                ids = _int_list(obj, "response_ids", where)
                reward = float(_field(obj, "reward", (int, float), where))
                if not math.isfinite(reward):
                    raise ProbeError(f"{where}: field 'reward' must be a finite number, got {reward}")
                if "is_positive" in obj and bool(obj["is_positive"]) != (reward > 0):
                    raise ProbeError(f"{where}: is_positive={obj['is_positive']} disagrees with reward {reward}")
                if not ids:
                    dropped += 1
                    continue
                resp_ids.append(ids)
                resp_text.append(str(obj.get("response", "")))
                rewards.append(reward)
            if not resp_ids:
                continue
            gt = first.get("ground_truth")
            groups.append(ProbeGroup(
                group_id=gid, prompt_ids=prompt_ids, response_ids=tuple(resp_ids), rewards=tuple(rewards),
                prompt=str(first.get("prompt", "")), responses=tuple(resp_text),
                ground_truth=None if gt is None else str(gt), prompt_uid=str(first.get("prompt_uid", gid)),
                data_source=str(first.get("data_source", "")),
            ))
        if not groups:
            raise ProbeError(f"{path}: no response with tokens")
        steps = {obj.get("step") for _, obj in rows}
        step = steps.pop() if len(steps) == 1 else None
        notes = (f"dropped {dropped} empty responses",) if dropped else ()
        return cls(groups=tuple(groups), source=str(path), step=step if isinstance(step, int) else None,
                   notes=notes)

    @classmethod
    def from_run(cls, run_dir: str | Path, step: int = 0) -> ProbeSet:
        """The probe set of a run: ``RUN_DIR/rollouts/step_XXXXXX.jsonl`` (step 0 by default, so
        every checkpoint is scored on what the starting policy sampled)."""
        path = Path(run_dir) / "rollouts" / f"step_{step:06d}.jsonl"
        if not path.is_file():
            raise ProbeError(f"{path}: rollout dump not found")
        return cls.from_rollouts(path)

    @classmethod
    def from_jsonl(
        cls,
        path: str | Path,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        append_eos: bool = True,
        add_special_tokens: bool = True,
    ) -> ProbeSet:
        """A user probe set: one JSON object per prompt with ``prompt`` (str), ``responses`` (list
        of str), ``rewards`` (list of numbers); optional ``ground_truth``, ``group_id``,
        ``prompt_uid``, and ``prompt_ids`` / ``response_ids`` (then no tokenizer is needed).

        Text is tokenized with ``tokenizer``: the prompt with its special tokens (as the model saw
        it), each response without them and, with ``append_eos``, followed by EOS (a finished
        response). A file in the rollout-dump format (one response per line) is read as such.
        """
        path = Path(path)
        rows = read_jsonl(path)
        if "responses" not in rows[0][1] and "response_ids" in rows[0][1]:
            return cls.from_rollouts(path)
        groups = []
        for n, (i, obj) in enumerate(rows):
            where = f"{path}:{i}"
            prompt = _field(obj, "prompt", str, where)
            responses = _field(obj, "responses", list, where)
            rewards = _field(obj, "rewards", list, where)
            if len(responses) != len(rewards) or not responses:
                raise ProbeError(f"{where}: need as many rewards as responses (and at least one), got "
                                 f"{len(responses)} and {len(rewards)}")
            if not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in rewards):
                raise ProbeError(f"{where}: field 'rewards' must hold numbers")
            if not all(math.isfinite(r) for r in rewards):
                raise ProbeError(f"{where}: field 'rewards' must hold finite numbers, got {rewards}")
            if not all(isinstance(r, str) for r in responses):
                raise ProbeError(f"{where}: field 'responses' must hold strings")
            if "prompt_ids" in obj and "response_ids" in obj:
                prompt_ids = _int_list(obj, "prompt_ids", where)
                resp_ids = obj["response_ids"]
                if not isinstance(resp_ids, list) or len(resp_ids) != len(responses):
                    raise ProbeError(f"{where}: field 'response_ids' must be one id list per response")
                resp = tuple(_int_list({"r": r}, "r", where) for r in resp_ids)
            else:
                if tokenizer is None:
                    raise ProbeError(f"{where}: text without token ids needs a tokenizer")
                prompt_ids = tuple(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
                eos = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []
                resp = tuple(tuple(tokenizer(r, add_special_tokens=False)["input_ids"]) + tuple(eos)
                             for r in responses)
            if any(len(r) == 0 for r in resp):
                raise ProbeError(f"{where}: a response has no tokens")
            gt = obj.get("ground_truth")
            gid = obj.get("group_id", n)
            if isinstance(gid, bool) or not isinstance(gid, int):
                raise ProbeError(f"{where}: field 'group_id' must be an integer, got {type(gid).__name__} {gid!r}")
            groups.append(ProbeGroup(
                group_id=int(gid), prompt_ids=prompt_ids, response_ids=resp,
                rewards=tuple(float(r) for r in rewards), prompt=prompt, responses=tuple(responses),
                ground_truth=None if gt is None else str(gt), prompt_uid=str(obj.get("prompt_uid", gid)),
                data_source=str(obj.get("data_source", "")),
            ))
        return cls(groups=tuple(groups), source=str(path), step=None)
