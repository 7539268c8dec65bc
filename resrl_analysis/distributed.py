"""One code path for one process and ``torchrun --nproc_per_node=N`` (multi-node through torchrun's flags).

The one distributed layer of the project, used by the trainer (``resrl train``) and by the probes (``resrl probe``
under torchrun). The callers never branch on rank: they call the helpers here, which are collectives when a process
group exists and the identity otherwise, and they write through rank 0 only.

Parallelism is FSDP2 (``torch.distributed.fsdp.fully_shard``) on GPU *and* on CPU: FSDP2 works over gloo
(with one worker thread per group, see :func:`_serial_gloo_backend`) with CPU tensors (torch >= 2.6 checked
here on 2.13), so the 2-process CPU tests exercise the very code
that runs on GPUs, not a DDP-style substitute. Each decoder layer is a shard group, the root holds the
embeddings, final norm and head. The parameters FSDP2 keeps are float32 (the master weights, and so the
AdamW state is float32); with ``param_dtype=bfloat16`` the all-gather casts them to bfloat16 for compute
and gradients are reduced in float32 (``MixedPrecisionPolicy``). On a single CUDA device FSDP2 still runs
(in a one-rank process group), which is how one GPU gets float32 master weights with bfloat16 compute.
A single CPU process uses the plain module (float32).

Who reduces: functions named ``all_reduce_*`` / ``all_gather_*`` reduce across ranks and return the
global value on every rank; every rank must call them in the same order.

>>> ctx = DistContext.single(torch.device("cpu"))
>>> all_reduce_sum(torch.tensor([1.0, 2.0]), ctx).tolist(), ctx.is_main
([1.0, 2.0], True)
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistContext",
    "all_gather_objects",
    "all_reduce_max",
    "all_reduce_sum",
    "broadcast_object",
    "device_mesh",
    "full_model_state_dict",
    "fsdp_modules",
    "full_optimizer_state_dict",
    "gather_objects",
    "gathered_for_inference",
    "init_wrapped",
    "load_full_state",
    "print0",
    "setup_distributed",
    "teardown_distributed",
    "wrap_model",
]


@dataclass
class DistContext:
    """Where this process runs: rank, world size, device, whether FSDP2 wraps the model."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    use_fsdp: bool
    owns_group: bool = False  # we created the process group, so we destroy it

    @classmethod
    def single(cls, device: torch.device) -> DistContext:
        """A one-process context without a process group (plain module)."""
        return cls(rank=0, world_size=1, local_rank=0, device=device, use_fsdp=False)

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files and prints."""
        return self.rank == 0

    @property
    def has_group(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def comm_device(self) -> torch.device:
        """Device of tensors passed to collectives (gloo: CPU, nccl: the GPU)."""
        if self.has_group and dist.get_backend() == "nccl":
            return self.device
        return torch.device("cpu")


def print0(*args: Any, ctx: DistContext | None = None, **kw: Any) -> None:
    """``print`` on rank 0 only (flushes)."""
    if ctx is None or ctx.is_main:
        print(*args, **kw, flush=True)


def setup_distributed(device: str = "auto", fsdp: str = "auto") -> DistContext:
    """Detect torchrun (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``), pick the device, create the process group.

    ``device``: ``auto`` | ``cpu`` | ``cuda``. ``fsdp``: ``auto`` (FSDP2 when distributed or on CUDA) |
    ``on`` | ``off``. A process group that already exists (a notebook that made one) is reused and left
    alone at teardown.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but no CUDA device is visible; use device=cpu")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    already = dist.is_available() and dist.is_initialized()
    if already:
        world, rank = dist.get_world_size(), dist.get_rank()
    use_fsdp = fsdp == "on" or (fsdp == "auto" and (world > 1 or dev.type == "cuda"))
    if world > 1 and fsdp == "off":
        raise ValueError(f"fsdp=off works in a single process only; this run has {world} ranks (use fsdp=auto)")
    owns = False
    if use_fsdp and not already:
        backend = "nccl" if dev.type == "cuda" else _serial_gloo_backend()
        timeout = datetime.timedelta(minutes=30)
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            kw: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(backend, timeout=timeout, **kw)
        else:
            # One process without torchrun: a one-rank group on an in-memory store (FSDP2 needs a mesh).
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        owns = True
        world, rank = dist.get_world_size(), dist.get_rank()
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, use_fsdp=use_fsdp,
                       owns_group=owns)


#: Name of the CPU backend registered by :func:`_serial_gloo_backend`: gloo with one worker thread per group.
GLOO_SERIAL = "gloo_serial"


def _make_serial_gloo(store: Any, rank: int, size: int, timeout: datetime.timedelta) -> Any:
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_default_device()]
    opts._threads = 1  # works run, and are released, in the order they were issued
    return dist.ProcessGroupGloo(store, rank, size, opts)


def _serial_gloo_backend() -> str:
    """Register (once) and return the name of gloo with a single worker thread per process group.

    Why not plain gloo: its worker threads release each finished collective's tensors themselves, and when
    that release drops the last reference to a tensor that Python created, the thread must take the GIL.
    ``destroy_process_group`` does not stop those threads while anything still holds the group (FSDP2's
    device mesh and DTensor metadata keep it alive to the end of the process), so a worker delayed on a busy
    machine could ask for the GIL while the interpreter was already finalizing; Python 3.11 then ends the
    thread inside a ``noexcept`` destructor and the process dies of ``std::terminate`` (SIGABRT) after the
    run had finished. With one worker thread and the barrier in :func:`teardown_distributed`, every earlier
    collective has been released before the barrier completes, and the barrier itself holds no Python tensor.
    """
    if not hasattr(dist.Backend, GLOO_SERIAL.upper()):
        dist.Backend.register_backend(GLOO_SERIAL, _make_serial_gloo, devices=["cpu"])
    return GLOO_SERIAL


def teardown_distributed(ctx: DistContext, *, drain: bool | None = None) -> None:
    """Destroy the process group if :func:`setup_distributed` created it.

    With ``drain`` (the default unless an exception is propagating, i.e. the run ended normally, on every rank
    together) a barrier first waits until the group's worker thread has released every earlier collective
    (see :func:`_serial_gloo_backend`), so none is left to race the interpreter's exit. A rank leaving on an
    exception skips it: the other ranks may never reach a barrier.
    """
    if not (ctx.owns_group and dist.is_initialized()):
        return
    if drain is None:
        drain = sys.exc_info()[0] is None
    try:
        if drain and dist.get_backend() == GLOO_SERIAL:
            dist.barrier()
    finally:
        dist.destroy_process_group()
        ctx.owns_group = False


def exit_if_launched(code: int) -> int:
    """End a torchrun-launched rank now with ``code``, skipping interpreter finalisation; else return ``code``.

    After :func:`teardown_distributed` the run's work is done and its files are closed, but gloo's worker threads
    of process groups that FSDP2's device mesh still references (they live until the process ends) can be freeing
    a collective whose tensor Python created; such a thread asks for the GIL, and during finalisation Python ends a
    thread that does, inside a C++ destructor that may not throw: ``std::terminate``, SIGABRT, and the launcher kills
    the other ranks (docs/RELIABILITY.md, "The two-process test dying at exit"). Flushing and leaving with
    ``os._exit`` keeps the exit code and skips only that race. In one process (no ``WORLD_SIZE`` > 1) it returns.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "TORCHELASTIC_RUN_ID" not in os.environ:
        return code
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


# ----------------------------------------------------------------------------------------- collectives


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor, on ``t``'s device); the identity without a group."""
    if not ctx.has_group or ctx.world_size == 1:
        return t.clone()
    buf = t.detach().to(ctx.comm_device, copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def all_reduce_max(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Elementwise max of ``t`` over ranks."""
    if not ctx.has_group or ctx.world_size == 1:
        return t.clone()
    buf = t.detach().to(ctx.comm_device, copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return buf.to(t.device)


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects)."""
    if not ctx.has_group or ctx.world_size == 1:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_objects(obj: Any, ctx: DistContext) -> list[Any] | None:
    """``[obj of rank 0, obj of rank 1, ...]`` on rank 0, None on the other ranks (picklable objects).

    Unlike :func:`all_gather_objects` only rank 0 holds every rank's object (the probes' results, which only
    rank 0 writes).

    >>> gather_objects({"a": 1}, DistContext.single(torch.device("cpu")))
    [{'a': 1}]
    """
    if not ctx.has_group or ctx.world_size == 1:
        return [obj]
    out: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.has_group or ctx.world_size == 1:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.has_group and ctx.world_size > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------- model wrapping


def _layer_classes(model: torch.nn.Module) -> set[str]:
    # HF models name their repeated blocks in `_no_split_modules` (e.g. {"Qwen3DecoderLayer"}).
    names = getattr(model, "_no_split_modules", None) or []
    return set(names)


def device_mesh(ctx: DistContext) -> Any:
    """The 1-D device mesh over every rank of ``ctx`` (FSDP2's); a collective on some backends (a GPU machine whose
    default group is gloo creates a new group), so every rank calls it at the same point."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(ctx.device.type, (ctx.world_size,))


def wrap_model(model: torch.nn.Module, ctx: DistContext, param_dtype: torch.dtype, *,
               init: bool = True, mesh: Any = None) -> torch.nn.Module:
    """Shard ``model`` with FSDP2 (every decoder layer, then the root) when ``ctx.use_fsdp``; else return it.

    The trainer passes float32 parameters (the master weights) and computes in ``param_dtype``; the probes pass
    the checkpoint as loaded (``param_dtype`` its own dtype: no cast). Gradients are reduced in float32. After
    wrapping, one tiny no-grad forward runs on every rank (:func:`init_wrapped`), so FSDP's lazy initialisation
    happens at a point all ranks reach together; ``init=False`` leaves that to the caller (sharding itself is
    local: given the ``mesh`` made by :func:`device_mesh` beforehand, ranks can wrap one after the other, each
    freeing its full copy before the next loads its own).
    """
    if not ctx.use_fsdp:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = mesh if mesh is not None else device_mesh(ctx)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = _layer_classes(model)
    for module in list(model.modules()):
        if type(module).__name__ in layers:
            fully_shard(module, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return init_wrapped(model, ctx) if init else model


def init_wrapped(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """FSDP2's lazy initialisation of a wrapped ``model`` by one tiny no-grad forward on every rank (a collective),
    then every unit resharded."""
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=ctx.device), use_cache=False)
    # The root keeps its parameters gathered after a forward (FSDP2's default for the root, undone by the
    # next backward). Reshard now, so that model.parameters() (the optimizer's) are the sharded ones.
    for m in fsdp_modules(model):
        m.reshard()
    return model


def fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2-wrapped modules of ``model``, the root first (``[]`` for a plain module)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered_for_inference(model: torch.nn.Module) -> Iterator[None]:
    """Keep an FSDP2 model's parameters gathered (in the compute dtype) for the duration of the block.

    Sampling runs a different number of forwards on each rank (rows finish at different times); with the
    parameters gathered once up front and no resharding after each forward, those forwards run no
    collectives, so ranks cannot deadlock and decoding does not re-gather the model for every token.
    A no-op for a plain module.
    """
    mods = fsdp_modules(model)
    if not mods:
        yield
        return
    mods[0].set_reshard_after_forward(False)  # recursive
    for m in mods:  # same order on every rank: model.modules() is deterministic
        m.unshard()
    try:
        yield
    finally:
        # Layers go back to resharding after forward (the FSDP2 default for them); the root keeps not
        # resharding, which is FSDP2's own default for the root.
        for m in mods[1:]:
            m.set_reshard_after_forward(True, recurse=False)
        for m in mods:
            m.reshard()


# ----------------------------------------------------------------------------------------- state dicts


def _sd_options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def full_model_state_dict(model: torch.nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """The full (unsharded) float32 state dict on CPU, on rank 0; ``{}`` on the other ranks.

    A collective under FSDP2: every rank must call it.
    """
    if not ctx.use_fsdp:
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_sd_options(full_state_dict=True, cpu_offload=True))


def full_optimizer_state_dict(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext
) -> dict[str, Any]:
    """The optimizer state keyed by parameter names (portable across world sizes), full, on rank 0.

    ``{}`` while the optimizer has taken no step: ``get_optimizer_state_dict`` would otherwise initialise
    the state with a zero-gradient, zero-lr ``step()``, which advances Adam's step counter (so the first
    real update would be bias-corrected as the second) and changes the run.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if not optimizer.state:  # the same on every rank: all ranks step together
        return {}

    return get_optimizer_state_dict(model, optimizer, options=_sd_options(full_state_dict=True, cpu_offload=True))


def load_full_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_sd: dict[str, torch.Tensor] | None,
    optim_sd: dict[str, Any] | None,
    ctx: DistContext,
) -> None:
    """Load full state dicts held by rank 0 (the other ranks pass ``{}``); broadcast under a process group."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    opts = _sd_options(full_state_dict=True, broadcast_from_rank0=ctx.use_fsdp)
    if model_sd is not None:
        set_model_state_dict(model, model_sd, options=opts)
    if optimizer is not None and optim_sd is not None:
        # A checkpoint written before the first step holds no optimizer state: nothing to load.
        has_state = bool(broadcast_object(bool(optim_sd), ctx))
        if has_state:
            set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
