"""Load Hugging Face causal-LM checkpoints (docs/RUN_DIRECTORY.md): file checks, the model, the tokenizer.

A *checkpoint* is any directory that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` accept: ours (``RUN_DIR/checkpoints/step_XXXXXX``), a TRL one, a
verl checkpoint merged to HF format, a plain ``save_pretrained`` folder. Before any model is built
the files are checked (config, weights, safetensors headers against the file sizes), so a missing or
truncated file gives a one-line :class:`~resrl_analysis.errors.ProbeError` naming the path instead of a
deep traceback.

Finding a run's checkpoints is :mod:`resrl_analysis.runs` (any trainer) and :mod:`resrl_analysis.rundir` (ours);
probe sets are :mod:`resrl_analysis.probe_sets`. Module-level imports are the standard library only: torch
and transformers are imported inside the functions that need them.

    >>> from resrl_analysis.checkpoints import ProbeSet
    Traceback (most recent call last):
    ...
    ImportError: resrl_analysis.checkpoints.ProbeSet has moved: import it from resrl_analysis.probe_sets
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
import sys
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ProbeError
from .errors import one_line as _one_line
from .rundir import checkpoint_step

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "Checkpoint",
    "validate_checkpoint_files",
    "check_safetensors",
    "load_checkpoint",
    "load_tokenizer",
    "quiet_progress_bars_unless_tty",
    "check_compatible",
]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


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
    resrl_analysis.errors.ProbeError: .../model.safetensors: truncated safetensors file (...)
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
    resrl_analysis.errors.ProbeError: .../config.json: missing
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


def import_model_code(path: str | Path) -> type | None:
    """Import the modelling code of checkpoint ``path``'s architecture and return its causal-LM class (None when
    the config cannot say): transformers imports it lazily on the first load, which costs seconds of Python
    imports that a pass's timing would otherwise count as loading weights. Never raises: the load that follows
    reports a bad checkpoint in its own words.

    >>> import_model_code("/nonexistent") is None
    True
    """
    try:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        with _quiet_transformers():
            return MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(str(path)))]
    except Exception:  # noqa: BLE001 - best effort, see above
        return None


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

    >>> from resrl_analysis.rundir import list_checkpoints
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


#: Names this module held before issue 20, and their one home now: importing them from here fails with a pointer.
_MOVED = {"ProbeSet": "resrl_analysis.probe_sets", "ProbeGroup": "resrl_analysis.probe_sets",
          "read_jsonl": "resrl_analysis.rundir", "list_checkpoints": "resrl_analysis.rundir",
          "checkpoint_step": "resrl_analysis.rundir", "run_checkpoints": "resrl_analysis.runs"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        # ImportError, not AttributeError: `from resrl_analysis.checkpoints import ProbeSet` shows this line.
        raise ImportError(f"resrl_analysis.checkpoints.{name} has moved: import it from {_MOVED[name]}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
