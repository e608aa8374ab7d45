"""Fused pre/post-processing of the KDA layer: validation, then dispatch to Triton or the PyTorch reference.

The Triton kernels are forward only. A call whose inputs need gradients (``torch.is_grad_enabled()`` and
any input with ``requires_grad``) runs the PyTorch reference, so training keeps its autograd graph.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..._backend import select_backend
from ..._checks import check_shape, check_tensor
from .conv_fwd import launch_conv_heads_fwd
from .norm_fwd import launch_gated_rms_norm_fwd

ACTIVATIONS = (None, "silu")


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {x.device}")


def _use_triton(x: torch.Tensor, *tensors: Optional[torch.Tensor]) -> bool:
    """Triton when the backend says so and no input needs a gradient (the kernels have no backward)."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *tensors))
    return not needs_grad and select_backend(x) == "triton"


def causal_conv_torch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      tail: Optional[torch.Tensor]) -> torch.Tensor:
    """PyTorch reference of the depthwise causal conv: ``x [B, T, C]``, ``weight [C, W]``, ``bias [C]`` or
    None, ``tail [B, C, W-1]`` (the previous inputs, oldest first) or None (zeros). Computes in x's dtype;
    returns ``y [B, T, C]`` (a transposed view)."""
    T, C = x.shape[1], x.shape[2]
    W = weight.shape[1]
    xt = x.transpose(1, 2)
    w = weight.to(x.dtype)[:, None, :]
    b = bias.to(x.dtype) if bias is not None else None
    if tail is None:
        y = F.conv1d(xt, w, b, padding=W - 1, groups=C)[..., :T]
    else:
        y = F.conv1d(torch.cat([tail.to(x.dtype), xt], dim=2), w, b, groups=C)
    return y.transpose(1, 2)


def _conv_heads_torch(qkv, weight, bias, tail, H: int, Hkv: int, D: int, activation: Optional[str]):
    """Reference of :func:`causal_conv_heads`: conv, activation, split, k/v heads repeated to H."""
    B, T, _ = qkv.shape
    y = causal_conv_torch(qkv, weight, bias, tail)
    if activation == "silu":
        y = F.silu(y)
    q, k, v = y.split([H * D, Hkv * D, Hkv * D], dim=-1)
    k = k.reshape(B, T, Hkv, D).repeat_interleave(H // Hkv, dim=2)
    v = v.reshape(B, T, Hkv, D).repeat_interleave(H // Hkv, dim=2)
    return q.reshape(B, T, H, D), k, v


def causal_conv_heads(qkv: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      tail: Optional[torch.Tensor], num_heads: int, num_kv_heads: int, head_dim: int,
                      activation: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Depthwise causal conv of packed q/k/v projections, split into heads, k and v repeated to the q heads.

    Channel ``c`` of ``qkv`` gives ``y[t, c] = bias[c] + sum_j weight[c, j] * x[t - (W-1) + j, c]`` where
    inputs before the first token come from ``tail`` (zeros when None), then ``activation``; ``y`` is split
    into q ``[B, T, H, D]`` and k, v ``[B, T, Hkv, D]``, and k/v head ``i`` is repeated to q heads
    ``i * H/Hkv ... (i+1) * H/Hkv - 1`` (``repeat_interleave``). The new conv tail is not computed here.

    Args:
        qkv: ``[B, T, C]`` with ``C = (H + 2*Hkv) * D``, channels ordered q heads, k heads, v heads;
            fp32/fp16/bf16; may be a column slice of a wider projection (read in place).
        weight: ``[C, W]`` conv taps, oldest input first (a ``Conv1d`` weight ``[C, 1, W]`` as ``w[:, 0]``).
        bias: ``[C]`` or None.
        tail: ``[B, C, W-1]``, the ``W-1`` inputs preceding ``qkv`` (oldest first), or None for a fresh
            sequence (zeros).
        num_heads: H, q heads. num_kv_heads: Hkv, k/v heads, dividing H. head_dim: D.
        activation: None (identity) or ``"silu"``.

    Returns:
        ``(q, k, v)``, each ``[B, T, H, D]`` in qkv's dtype. The Triton kernel (backend ``triton``, no input
        needing a gradient) accumulates in fp32 and rounds once, writing three contiguous tensors; otherwise
        the PyTorch reference runs in qkv's dtype with autograd (it is the training path) and may return views.

    Example:
        >>> qkv = torch.randn(2, 10, (4 + 2 * 2) * 16)
        >>> q, k, v = causal_conv_heads(qkv, torch.randn(128, 4), None, None, 4, 2, 16, activation="silu")
        >>> q.shape, k.shape
        (torch.Size([2, 10, 4, 16]), torch.Size([2, 10, 4, 16]))
    """
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        _check_int(name, value)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads must be a multiple of num_kv_heads={num_kv_heads}, got {num_heads}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_tensor("qkv", qkv, ndim=3)
    B, T, C = qkv.shape
    if (num_heads + 2 * num_kv_heads) * head_dim != C:
        raise ValueError(f"qkv's last dim must be (num_heads + 2*num_kv_heads) * head_dim = "
                         f"{(num_heads + 2 * num_kv_heads) * head_dim}, got {C}")
    if B < 1 or T < 1:
        raise ValueError(f"qkv must not be empty, got shape {tuple(qkv.shape)}")
    check_tensor("weight", weight, ndim=2)
    _check_device("weight", weight, "qkv", qkv)
    if weight.shape[0] != C or weight.shape[1] < 1:
        raise ValueError(f"weight must have shape [C={C}, W >= 1], got {tuple(weight.shape)}")
    W = weight.shape[1]
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        _check_device("bias", bias, "qkv", qkv)
        check_shape("bias", bias, (C,), "[C]")
    if tail is not None:
        check_tensor("tail", tail, ndim=3)
        _check_device("tail", tail, "qkv", qkv)
        check_shape("tail", tail, (B, C, W - 1), "[B, C, W-1]")

    if not _use_triton(qkv, weight, bias, tail):
        return _conv_heads_torch(qkv, weight, bias, tail, num_heads, num_kv_heads, head_dim, activation)
    shape = (B, T, num_heads, head_dim)
    q, k, v = (torch.empty(shape, dtype=qkv.dtype, device=qkv.device) for _ in range(3))
    launch_conv_heads_fwd(qkv if qkv.stride(2) == 1 else qkv.contiguous(), weight.contiguous(),
                          bias.contiguous() if bias is not None else None,
                          tail.contiguous() if tail is not None else None, q, k, v, num_kv_heads,
                          use_silu=activation == "silu")
    return q, k, v


def _check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3's RMSNorm: fp32 statistics, the normalised row rounded to x's dtype, then times weight."""
    h = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _gated_norm_torch(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference of :func:`gated_rms_norm`: the RMSNorm module's math (fp32 statistics), then the gate."""
    B, T, H, D = x.shape
    o = _rms_norm_torch(x, weight, eps) * torch.sigmoid(gate).reshape(B, T, H, D)
    return o.reshape(B, T, H * D).to(x.dtype)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head RMSNorm times a sigmoid gate: ``weight * x / sqrt(mean(x^2) + eps) * sigmoid(gate)``.

    The mean runs over each head's D channels; ``gate`` holds logits for every output channel.

    Args:
        x: ``[B, T, H, D]``, fp32/fp16/bf16 (e.g. the KDA output).
        gate: ``[B, T, H*D]`` gate logits (before the sigmoid), any float dtype.
        weight: ``[D]`` RMSNorm scale (``RMSNorm.weight``).
        eps: float > 0 (``RMSNorm.eps``).

    Returns:
        ``[B, T, H*D]`` in x's dtype. The Triton kernel (backend ``triton``, no input needing a gradient)
        computes in fp32 and rounds once; otherwise the PyTorch reference (RMSNorm in fp32, rounded to x's
        dtype, then scaled and gated in that dtype) runs with autograd, the training path.

    Example:
        >>> out = gated_rms_norm(torch.randn(2, 10, 4, 16), torch.randn(2, 10, 64), torch.ones(16), 1e-6)
        >>> out.shape
        torch.Size([2, 10, 64])
    """
    check_tensor("x", x, ndim=4)
    B, T, H, D = x.shape
    if min(B, T, H, D) < 1:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    check_tensor("gate", gate, ndim=3)
    _check_device("gate", gate, "x", x)
    check_shape("gate", gate, (B, T, H * D), "[B, T, H*D]")
    check_tensor("weight", weight, ndim=1)
    _check_device("weight", weight, "x", x)
    check_shape("weight", weight, (D,), "[D]")
    _check_eps(eps)

    if not _use_triton(x, gate, weight):
        return _gated_norm_torch(x, gate, weight, eps)
    out = torch.empty((B, T, H * D), dtype=x.dtype, device=x.device)
    launch_gated_rms_norm_fwd(x.contiguous(), gate.contiguous(), weight.contiguous(), out, float(eps))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3's RMSNorm over the last dim: ``weight * x / sqrt(mean(x^2) + eps)``.

    Args:
        x: ``[..., D]``, fp32/fp16/bf16.
        weight: ``[D]``.
        eps: float > 0.

    Returns:
        x's shape, dtype ``promote(x, weight)``. Both paths normalise in fp32, round to x's dtype, then multiply by
        weight (transformers' Qwen3RMSNorm, so a converted student matches its teacher); the Triton kernel runs
        when the backend is ``triton``, no input needs a gradient and weight has x's dtype, else PyTorch (autograd).

    Example:
        >>> rms_norm(torch.randn(2, 10, 64), torch.ones(64), 1e-6).shape
        torch.Size([2, 10, 64])
    """
    check_tensor("x", x)
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty tensor [..., D], got shape {tuple(x.shape)}")
    check_tensor("weight", weight, ndim=1)
    _check_device("weight", weight, "x", x)
    check_shape("weight", weight, (x.shape[-1],), "[D], D = x.shape[-1]")
    _check_eps(eps)
    if weight.dtype != x.dtype or not _use_triton(x, weight):
        return _rms_norm_torch(x, weight, eps)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    launch_gated_rms_norm_fwd(x.contiguous(), None, weight.contiguous(), out, float(eps))
    return out
