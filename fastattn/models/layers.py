"""Building blocks of the Qwen3 block: RMSNorm, rotary position embedding, SwiGLU MLP; derived-weight cache."""
from typing import Callable, Dict, Sequence, Tuple

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
    """Tensors computed from parameters (a concatenation of projection weights, an fp32 copy), rebuilt only when
    one of those parameters changes: moved, cast, or modified in place (its version counter).

    Inference only: with a gradient to propagate, call the builder directly so autograd sees it. The cached
    tensors are plain attributes, not buffers: they never enter a state dict.
    """

    def __init__(self):
        self._store: Dict[str, Tuple[tuple, object]] = {}

    @staticmethod
    def needs_grad(params: Sequence[torch.Tensor]) -> bool:
        return torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)

    def get(self, name: str, params: Sequence[torch.Tensor], build: Callable[[], object]):
        """``build()``, computed once per state of ``params`` (None entries ignored)."""
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in params if p is not None)
        hit = self._store.get(name)
        if hit is None or hit[0] != key:
            hit = self._store[name] = (key, build())
        return hit[1]
