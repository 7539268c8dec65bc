"""verl's raw FSDP actor checkpoints, read without verl or its merge step (docs/FOREIGN_RUNS.md).

verl's FSDP checkpoint manager saves, for step N, ``global_step_N/actor/``:

- ``model_world_size_{W}_rank_{R}.pt`` for R = 0..W-1: each rank's ``model.state_dict()`` written by ``torch.save``.
  With FSDP2 (and FSDP1's sharded state dict) a parameter is a ``DTensor``: this rank's local shard, its placement
  (``Shard(dim)``: the shards of the ranks concatenated along ``dim`` give the tensor; ``Replicate()``: every rank
  holds it whole) and its device mesh (1-D ``("fsdp",)``, or 2-D ``("ddp", "fsdp")`` whose first dimension
  replicates); a plain tensor is replicated on every rank.
- ``fsdp_config.json`` (``{"FSDP_version": 1 or 2, "world_size": W}``), and ``optim_…``/``extra_state_…`` files
  (not read here).
- ``huggingface/``: the model's ``config.json`` and the tokenizer, and no weights unless the run asked verl to
  save a merged model there too.

:func:`load_verl_state_dict` rebuilds the full state dict from the shards in one process. Nothing pickled in a
shard is executed: every file is read with ``torch.load(weights_only=True)``, which allows tensors and, with the
types allowlisted below, ``DTensor`` with its placements and device mesh; a shard holding anything else gives a
one-line :class:`~resrl_analysis.checkpoints.ProbeError` naming verl's merger command instead.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for r in range(2):
    ...     sd = {"w": torch.arange(4.0)[2 * r : 2 * r + 2], "b": torch.ones(1)}
    ...     torch.save(sd, d / f"model_world_size_2_rank_{r}.pt")
    >>> [p.name for p in verl_shard_files(d)]
    ['model_world_size_2_rank_0.pt', 'model_world_size_2_rank_1.pt']
    >>> load_verl_state_dict(d)["b"].tolist()  # plain tensors are replicated: rank 0's copy
    [1.0]
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ProbeError

if TYPE_CHECKING:
    import torch

__all__ = ["SHARD_FILE", "is_raw_verl_actor", "load_verl_state_dict", "verl_merger_command", "verl_shard_files"]

#: The name of one rank's model shard in a verl actor directory.
SHARD_FILE = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")


def verl_merger_command(actor_dir: str | Path) -> str:
    """verl's command that merges the shards of ``actor_dir`` into Hugging Face weights under its ``huggingface/``.

    >>> verl_merger_command("ck/global_step_5/actor").split()[-2:]
    ['--target_dir', 'ck/global_step_5/actor/huggingface']
    """
    actor = Path(actor_dir)
    return (f"python -m verl.model_merger merge --backend fsdp --local_dir {actor} "
            f"--target_dir {actor / 'huggingface'}")


def is_raw_verl_actor(actor_dir: str | Path) -> bool:
    """Whether ``actor_dir`` holds verl model shards (``model_world_size_W_rank_R.pt``)."""
    d = Path(actor_dir)
    return d.is_dir() and any(SHARD_FILE.match(p.name) for p in d.iterdir())


def verl_shard_files(actor_dir: str | Path) -> list[Path]:
    """The model shards of ``actor_dir`` in rank order: every rank 0..W-1 of one world size W (``fsdp_config.json``'s
    when present), else a one-line :class:`ProbeError` naming what is missing."""
    d = Path(actor_dir)
    found: dict[int, dict[int, Path]] = {}
    for p in d.iterdir() if d.is_dir() else []:
        if m := SHARD_FILE.match(p.name):
            found.setdefault(int(m.group(1)), {})[int(m.group(2))] = p
    if not found:
        raise ProbeError(f"{d}: no verl model shards (model_world_size_W_rank_R.pt)")
    cfg = d / "fsdp_config.json"
    world = None
    if cfg.is_file():
        import json

        try:
            world = int(json.loads(cfg.read_text(encoding="utf-8"))["world_size"])
        except (ValueError, KeyError, TypeError) as e:
            raise ProbeError(f"{cfg}: expected a JSON object with world_size ({e})") from None
    if world is None:
        if len(found) > 1:
            raise ProbeError(f"{d}: model shards of several world sizes {sorted(found)} and no fsdp_config.json")
        world = next(iter(found))
    ranks = found.get(world, {})
    missing = sorted(set(range(world)) - set(ranks))
    if missing:
        raise ProbeError(f"{d}: world size {world} but no model shard for rank(s) {missing} "
                         f"(model_world_size_{world}_rank_{missing[0]}.pt)")
    return [ranks[r] for r in range(world)]


@contextlib.contextmanager
def _allow_dtensors() -> Iterator[None]:
    """Allowlist, for weights-only loading, the types a DTensor shard pickles (the tensor subclass, its spec and
    metadata, placements, device mesh); quiet the device mesh's warning about being unpickled without a process
    group (only its layout is read here)."""
    import torch

    safe: list[Any] = []
    try:
        import torch.distributed.tensor as dt  # importing it also registers what torch itself allows
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

        safe = [dt.DTensor, DTensorSpec, TensorMeta, DeviceMesh, dt.Shard, dt.Replicate]
    except ImportError:  # torch without distributed tensors: plain tensors only
        pass
    log = logging.getLogger("torch.distributed.device_mesh")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with torch.serialization.safe_globals(safe):
            yield
    finally:
        log.setLevel(level)


def _load_shard(path: Path) -> dict[str, Any]:
    import torch

    try:
        with _allow_dtensors():
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = m.group(1) if m else "objects"
        raise ProbeError(f"{path}: holds {what}, which weights-only loading does not allow (no code from a checkpoint "
                         f"is run); merge the shards with verl's merger instead: {verl_merger_command(path.parent)}"
                         ) from None
    except (RuntimeError, OSError, EOFError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ProbeError(f"{path}: cannot read this model shard ({first})") from None
    if not isinstance(sd, dict):
        raise ProbeError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(sd).__name__}; "
                         f"merge with: {verl_merger_command(path.parent)}")
    return sd


def _placement_ranks(t: Any, world: int) -> tuple[Any, list[int]]:
    """The placement that shards ``t`` and the ranks whose local tensors, in order, make the whole tensor."""
    mesh = t.device_mesh.mesh  # (…) rank ids
    places = list(t.placements)
    if mesh.ndim == 2 and len(places) == 2 and places[0].is_replicate():  # ("ddp", "fsdp"): one replica suffices
        return places[1], [int(r) for r in mesh[0].tolist()]
    if mesh.ndim == 1 and len(places) == 1:
        return places[0], [int(r) for r in mesh.tolist()]
    raise ValueError(f"a {mesh.ndim}-D device mesh with placements {places}")


def load_verl_state_dict(actor_dir: str | Path) -> dict[str, torch.Tensor]:
    """The full state dict of a verl actor checkpoint, from its per-rank model shards (in one process, on the CPU).

    ``Shard(dim)`` tensors are the ranks' local shards concatenated along ``dim`` (checked against the DTensor's
    global shape); ``Replicate()`` and plain tensors are taken from rank 0. Raises :class:`ProbeError` (one line)
    for a missing rank, a file that is not a plain state dict, or a layout other than these (naming verl's merger).
    """
    import torch

    files = verl_shard_files(actor_dir)
    world = len(files)
    shards = [_load_shard(p) for p in files]
    keys = list(shards[0])
    for p, sd in zip(files[1:], shards[1:]):
        if set(sd) != set(keys):
            extra = sorted(set(sd) ^ set(keys))[:3]
            raise ProbeError(f"{p}: its keys differ from rank 0's (e.g. {extra})")
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        t0 = shards[0][key]
        if not isinstance(t0, torch.Tensor):
            raise ProbeError(f"{files[0]}: entry {key!r} is a {type(t0).__name__}, not a tensor; merge with: "
                             f"{verl_merger_command(files[0].parent)}")
        if not hasattr(t0, "placements"):  # a plain tensor: replicated (a buffer, an unsharded parameter)
            out[key] = t0
            continue
        try:
            place, ranks = _placement_ranks(t0, world)
        except ValueError as e:
            raise ProbeError(f"{files[0]}: {key!r} is laid out on {e}; merge with: "
                             f"{verl_merger_command(files[0].parent)}") from None
        if place.is_replicate():
            out[key] = t0.to_local()
        elif place.is_shard():
            parts = [shards[r][key].to_local() for r in ranks]
            full = torch.cat(parts, dim=place.dim)
            if tuple(full.shape) != tuple(t0.shape):
                raise ProbeError(f"{files[0].parent}: {key!r} shards make {tuple(full.shape)}, its global shape is "
                                 f"{tuple(t0.shape)}")
            out[key] = full
        else:
            raise ProbeError(f"{files[0]}: {key!r} has placement {place} (partial sums); merge with: "
                             f"{verl_merger_command(files[0].parent)}")
    return out
