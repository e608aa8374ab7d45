"""Scale-out helpers: process-group setup under ``torchrun``, device choice, reductions, DDP/FSDP2 wrapping.

A run is distributed when the environment says so (``WORLD_SIZE > 1`` with ``RANK`` and ``LOCAL_RANK``,
as ``torchrun --nproc-per-node N`` sets them) or when the caller already initialised a process group.
The backend is NCCL on CUDA and Gloo on the CPU. Each rank computes its shard of every global batch;
gradients are reduced so that the update equals a one-process step on the whole global batch (see
``train.py``). Only rank 0 writes files.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "setup_distributed", "teardown_distributed", "resolve_device", "all_reduce_sum",
           "barrier", "fsdp_available", "wrap_ddp", "shard_fsdp", "full_state_dict", "load_full_state_dict"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size`` (``local_rank`` on its host)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """Turn a device string into a ``torch.device``.

    Args:
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` (``cuda:LOCAL_RANK``
            in a distributed run) or ``"cuda:N"``.
        local_rank: this process's rank on its host.
    Returns:
        the device.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if not isinstance(device, str):
        raise TypeError(f"device must be a str such as 'auto', 'cpu', 'cuda', got {type(device).__name__}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device must be usable: {device!r} asked for CUDA but torch.cuda.is_available() "
                             "is False")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return dev


def setup_distributed(device: str = "auto") -> "tuple[DistInfo, torch.device]":
    """Initialise the process group when launched by ``torchrun`` (or reuse an existing one).

    With ``WORLD_SIZE > 1`` in the environment and no group yet, calls ``init_process_group`` (NCCL for a
    CUDA device, Gloo for the CPU; rendezvous from ``MASTER_ADDR``/``MASTER_PORT``). A CUDA device becomes
    ``cuda:LOCAL_RANK`` and is made current.

    Args:
        device: as in :func:`resolve_device`.
    Returns:
        ``(DistInfo, torch.device)``.

    Example:
        >>> info, dev = setup_distributed("cpu")      # a plain single-process run
        >>> info.world_size, dev.type
        (1, 'cpu')
    """
    if dist.is_available() and dist.is_initialized():
        local = _env_int("LOCAL_RANK", dist.get_rank() % max(1, torch.cuda.device_count() or 1))
        info = DistInfo(dist.get_rank(), dist.get_world_size(), local)
        dev = resolve_device(device, info.local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return info, dev
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo(), resolve_device(device, 0)
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} asks for a distributed run but torch.distributed is not available")
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local), dev


def teardown_distributed() -> None:
    """Destroy the default process group if one exists (call once, at the very end of a program)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over all ranks in place (a no-op for one process) and return it."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    """Wait for every rank (a no-op for one process)."""
    if info.distributed:
        dist.barrier()


def fsdp_available() -> bool:
    """Whether this torch has FSDP2's ``fully_shard``."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def wrap_ddp(module: nn.Module, device: torch.device, find_unused: bool) -> nn.Module:
    """``DistributedDataParallel`` around ``module`` (only its parameters with ``requires_grad`` are synced).

    Gradients are averaged over ranks by DDP; the trainer scales each rank's loss by the world size to
    turn that average into the sum it needs.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=ids, broadcast_buffers=False, find_unused_parameters=find_unused)


def shard_fsdp(student: nn.Module, device: torch.device) -> nn.Module:
    """An FSDP2-sharded copy of ``student`` on ``device``: each mixer, each decoder layer, then the root.

    Mixers are sharded on their own because stage 1 calls them directly (outside the decoder layer).
    The original ``student`` is left untouched; copy the trained weights back with
    :func:`full_state_dict` + :func:`load_full_state_dict`.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))   # explicit: CPU shards on a CUDA host too
    sharded = copy.deepcopy(student).to(device)
    for p_src, p_dst in zip(student.parameters(), sharded.parameters(), strict=True):
        p_dst.requires_grad_(p_src.requires_grad)
    for layer in sharded.layers:
        fully_shard(layer.mixer, mesh=mesh)
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    return sharded


def full_state_dict(model: nn.Module, sharded: bool, cpu: bool = True) -> dict:
    """Full (unsharded) ``state_dict`` of ``model`` on every rank, on the CPU when ``cpu``."""
    if not sharded:
        state = model.state_dict()
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: (v.detach().cpu() if cpu else v.detach()) for k, v in state.items()}


def load_full_state_dict(model: nn.Module, state: dict, sharded: bool) -> None:
    """Load a full ``state_dict`` into ``model`` (FSDP2-sharded or not), strictly."""
    if not sharded:
        model.load_state_dict(state, strict=True)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict:
    """Optimizer state to save: plain ``state_dict`` (keys = parameter order) or FSDP's full one."""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))
    return state


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                         sharded: bool) -> None:
    """Inverse of :func:`optimizer_state`."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def local_grad_norm_value(norm) -> float:
    """A gradient norm returned by ``clip_grad_norm_`` (tensor or DTensor) as a float."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


