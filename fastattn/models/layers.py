"""Building blocks of the Qwen3 block: RMSNorm, rotary position embedding, SwiGLU MLP; derived-weight cache."""
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .fused import rms_norm


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim, computed in fp32 (Qwen3's RMSNorm); one fused
    Triton kernel at inference on the triton backend (``fused.rms_norm``), PyTorch with autograd otherwise."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` without biases."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies ``theta^(-2i/d)``, i < d/2, fp32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables ``[..., T, D]`` for integer ``positions [..., T]`` (angles in fp32, result in dtype)."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device, torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, T, H, D]`` by cos/sin ``[T, D]`` or ``[B, T, D]`` (rotate-half convention)."""
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DerivedWeights:
    """Tensors computed from parameters (a concatenation of projection weights, an fp32 copy), kept between
    inference calls of a module in eval mode and rebuilt when one of those parameters is moved, cast, replaced or
    modified in place (storage pointer, version counter, dtype).

    Kept only when it is safe to: gradients disabled (``torch.no_grad`` / ``torch.inference_mode``), the owning
    module in eval mode, no tracer (``torch.compile``), no inference-mode parameters (they have no version counter);
    otherwise :meth:`get` builds the tensors on every call, so autograd and compilers see the real computation.
    The owner clears the store whenever ``train()``/``eval()`` or ``to()``/``cuda()``/``half()`` is called, which
    also covers wrappers that rewrite parameters in place without bumping their version (FSDP's all-gather); a
    change made through ``param.data`` while in eval mode is not seen until the next ``eval()``.
    The tensors are plain attributes, not buffers: they never enter a state dict.
    """

    def __init__(self):
        self._store: Dict[str, Tuple[tuple, object]] = {}

    def clear(self) -> None:
        self._store.clear()

    def get(self, name: str, params: Sequence[Optional[torch.Tensor]], build: Callable[[], object],
            training: bool):
        """``build()``, kept per state of ``params`` (None entries ignored) when caching is safe (class docstring);
        ``training`` is the owning module's ``self.training``."""
        if training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return build()
        live = [p for p in params if p is not None]
        if any(p.is_inference() for p in live):
            return build()
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in live)
        hit = self._store.get(name)
        if hit is None or hit[0] != key:
            hit = self._store[name] = (key, build())
        return hit[1]
