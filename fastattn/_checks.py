"""Input validation shared by the public functions: clear errors that name the argument."""
import weakref
from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, x, *, ndim: Optional[int] = None, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
                 device: Optional[torch.device] = None) -> None:
    """Raise TypeError/ValueError unless ``x`` is a tensor of the given rank, dtype and device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} must be on {device} (like q), got {x.device}")


def check_shape(name: str, x: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    """Raise ValueError unless ``x.shape == expected``."""
    if tuple(x.shape) != tuple(expected):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{extra}, got {tuple(x.shape)}")


def check_cu_seqlens(cu_seqlens: Optional[torch.Tensor], batch: int, total: int,
                     device: torch.device) -> Optional[torch.Tensor]:
    """Validate packed-sequence offsets ``[N+1]`` (first 0, last ``total``, strictly increasing) and
    return them as int64 on ``device``; None passes through."""
    if cu_seqlens is None:
        return None
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64))
    if batch != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (packed sequences), got B={batch}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold at least 2 offsets [0, ..., T], got {cu_seqlens.numel()}")
    if torch.compiler.is_compiling():
        # Value checks need a host sync, which would break a compiled graph: they run eagerly only.
        return cu_seqlens.to(device=device, dtype=torch.int64)
    return cached_for(cu_seqlens, ("cu_seqlens", total, torch.device(device)),
                      lambda cu: _validated_offsets(cu, total, device))


def _validated_offsets(cu_seqlens: torch.Tensor, total: int, device) -> torch.Tensor:
    cpu = cu_seqlens.detach().to("cpu", torch.int64)
    if int(cpu[0]) != 0:
        raise ValueError(f"cu_seqlens[0] must be 0, got {int(cpu[0])}")
    if int(cpu[-1]) != total:
        raise ValueError(f"cu_seqlens[-1] must equal the packed length T={total}, got {int(cpu[-1])}")
    if bool((cpu[1:] <= cpu[:-1]).any()):
        raise ValueError(f"cu_seqlens must be strictly increasing, got {cpu.tolist()}")
    return cu_seqlens.to(device=device, dtype=torch.int64)


# Results derived from small index tensors (cu_seqlens), per tensor object: validating and laying them out needs
# their values on the host, and each device -> host copy stalls the launch queue; without it a varlen call pays
# its whole host time in the open (H200, varlen-6, before: ~1.5 ms per forward whatever the mode).
_DERIVED: "OrderedDict[tuple, tuple]" = OrderedDict()
_DERIVED_MAX = 32


def cached_for(t: torch.Tensor, tag, build: Callable[[torch.Tensor], object]):
    """``build(t)``, remembered under ``tag`` for this very tensor: same object (held by weak reference), same
    storage, same in-place version counter; any in-place write or a new tensor builds again. Inference tensors
    (no version counter) are never cached. Keeps the last 32 results; an exception in ``build`` caches nothing."""
    try:
        version = t._version
    except RuntimeError:
        return build(t)
    key = (id(t), tag)
    hit = _DERIVED.get(key)
    if hit is not None and hit[0]() is t and hit[1] == version and hit[2] == t.data_ptr():
        _DERIVED.move_to_end(key)
        return hit[3]
    value = build(t)
    _DERIVED[key] = (weakref.ref(t), version, t.data_ptr(), value)
    while len(_DERIVED) > _DERIVED_MAX:
        _DERIVED.popitem(last=False)
    return value
