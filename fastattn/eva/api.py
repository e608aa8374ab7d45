"""Public FlashEVA functions: argument validation, then dispatch to the Triton or PyTorch backend."""
from typing import Optional, Tuple, Union

import torch

from .._backend import select_backend
from .._checks import FLOAT_DTYPES, check_cu_seqlens, check_shape, check_tensor
from .options import EvaOptions

MAX_HEAD_DIM = 256
LOCAL_MODES = ("block", "sliding")
ALL_DTYPES = FLOAT_DTYPES + (torch.float64,)


def _check_int(name: str, x) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < 1:
        raise ValueError(f"{name} must be >= 1, got {x}")
    return x


def _check_kv(k, v, device=None):
    check_tensor("k", k, ndim=4, dtypes=ALL_DTYPES, device=device)
    check_tensor("v", v, ndim=4, dtypes=ALL_DTYPES, device=k.device)
    check_shape("v", v, k.shape, "same as k")
    if v.dtype != k.dtype:
        raise TypeError(f"v must have k's dtype {k.dtype}, got {v.dtype}")
    B, T, HKV, D = k.shape
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim D must be <= {MAX_HEAD_DIM}, got D={D}")
    if min(B, T, HKV, D) < 1:
        raise ValueError(f"empty inputs are not supported, got k of shape {tuple(k.shape)}")
    if k.dtype == torch.float64 and select_backend(k) != "torch":
        raise TypeError("float64 inputs run only on the PyTorch backend (FASTATTN_BACKEND=torch, CPU); "
                        f"the Triton kernels take {[str(d) for d in FLOAT_DTYPES]}, got {k.dtype}")


def _check_param(name: str, x, HKV: int, D: int, device) -> torch.Tensor:
    """mu / phi: None (zeros) or a float tensor [Hkv, D]; returned as fp32 (fp64 stays fp64), through a
    differentiable cast."""
    if x is None:
        return torch.zeros(HKV, D, device=device, dtype=torch.float32)
    check_tensor(name, x, dtypes=ALL_DTYPES, device=device)
    check_shape(name, x, (HKV, D), "[Hkv, D]")
    return (x if x.dtype == torch.float64 else x.float()).contiguous()


def _check_options(D: int, window_size, chunk_size, softmax_scale, local) -> EvaOptions:
    W = _check_int("window_size", window_size)
    C = _check_int("chunk_size", chunk_size)
    if W % C != 0:
        raise ValueError(f"window_size must be a multiple of chunk_size, got window_size={W}, chunk_size={C}")
    if local not in LOCAL_MODES:
        raise ValueError(f"local must be one of {LOCAL_MODES}, got {local!r}")
    if softmax_scale is None:
        softmax_scale = D ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    return EvaOptions(window_size=W, chunk_size=C, scale=float(softmax_scale), sliding=local == "sliding")


def flash_eva(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window_size: int = 2048, chunk_size: int = 16,
              mu: Optional[torch.Tensor] = None, phi: Optional[torch.Tensor] = None,
              softmax_scale: Optional[float] = None, local: str = "block", cu_seqlens: Optional[torch.Tensor] = None,
              return_lse: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    r"""EVA attention (FlashEVA): exact causal attention over a local window plus one landmark
    key/value per complete remote chunk, as one softmax.

    For query t (0-based within its sequence), window W, chunk C and scale s:
    ``o_t = (sum_{j in L(t)} e^{s q_t.k_j} v_j + sum_{c in R(t)} e^{s q_t.kl_c} vl_c) / (same without v)``.
    ``local="block"``: L(t) = [floor(t/W) W, t], R(t) = {c < floor(t/W) W / C}.
    ``local="sliding"``: a = C floor(max(t - W + 1, 0) / C), L(t) = [a, t], R(t) = {c < a / C}.
    Landmarks (see :func:`eva_landmarks`) pool the keys/values of each complete chunk; a trailing partial
    chunk is never a landmark. Differentiable in q, k, v, mu and phi (and through lse).

    Args:
        q: ``[B, T, H, D]`` queries (fp32, fp16 or bf16), already position-encoded.
        k, v: ``[B, T, Hkv, D]`` keys and values; H a multiple of Hkv (GQA). D <= 256.
        window_size: W (default 2048), a multiple of chunk_size.
        chunk_size: C (default 16), tokens per landmark.
        mu, phi: ``[Hkv, D]`` learned pooling vectors of keys and values (None: zeros, i.e. the mean key).
        softmax_scale: s, default ``D ** -0.5``.
        local: ``"block"`` (EVA's block windows, default) or ``"sliding"``.
        cu_seqlens: ``[N + 1]`` int32/int64 offsets of packed sequences (B must be 1); windows and
            chunks restart at every sequence start.
        return_lse: also return the natural-log softmax normaliser.

    Returns:
        o ``[B, T, H, D]`` in q's dtype; with ``return_lse`` the pair (o, lse ``[B, H, T]`` fp32).

    Example:
        >>> import torch, fastattn
        >>> q = torch.randn(1, 100, 4, 32)
        >>> k, v = torch.randn(1, 100, 2, 32), torch.randn(1, 100, 2, 32)
        >>> o = fastattn.flash_eva(q, k, v, window_size=32, chunk_size=8)
        >>> o.shape
        torch.Size([1, 100, 4, 32])
    """
    check_tensor("q", q, ndim=4, dtypes=ALL_DTYPES)
    _check_kv(k, v, q.device)
    if k.dtype != q.dtype:
        raise TypeError(f"k and v must have q's dtype {q.dtype}, got {k.dtype}")
    B, T, H, D = q.shape
    HKV = k.shape[2]
    if k.shape[:2] != (B, T) or k.shape[3] != D:
        raise ValueError(f"k must have shape [B={B}, T={T}, Hkv, D={D}], got {tuple(k.shape)}")
    if H % HKV != 0:
        raise ValueError(f"q's head count H must be a multiple of k's Hkv={HKV}, got H={H}")
    opts = _check_options(D, window_size, chunk_size, softmax_scale, local)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    cu = check_cu_seqlens(cu_seqlens, B, T, q.device)
    mu = _check_param("mu", mu, HKV, D, q.device)
    phi = _check_param("phi", phi, HKV, D, q.device)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if select_backend(q) == "torch":
        from .torch_impl import flash_eva_torch
        o, lse = flash_eva_torch(q, k, v, mu, phi, opts, cu)
    else:
        from .op import flash_eva_triton
        o, lse = flash_eva_triton(q, k, v, mu.float(), phi.float(), opts, cu)
    return (o, lse) if return_lse else o


def eva_landmarks(k: torch.Tensor, v: torch.Tensor, *, chunk_size: int = 16, mu: Optional[torch.Tensor] = None,
                  phi: Optional[torch.Tensor] = None,
                  softmax_scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Landmark keys and values of the complete chunks (the remote half of :func:`flash_eva`).

    For chunk c (tokens m in [cC, cC + C)) and kv head h:
    ``kl_c = sum_m softmax_m(mu_h.k_m) k_m``; ``vl_c = sum_m softmax_m(s (phi_h.k_m - |k_m|^2 / 2)) v_m``.

    Args:
        k, v: ``[B, T, Hkv, D]`` keys and values (fp32, fp16 or bf16), D <= 256.
        chunk_size: C (default 16); a trailing partial chunk (T % C tokens) gets no landmark.
        mu, phi: ``[Hkv, D]`` pooling vectors (None: zeros).
        softmax_scale: s of the value pooling, default ``D ** -0.5``.

    Returns:
        (k_lm, v_lm), each ``[B, T // C, Hkv, D]`` in k's dtype; differentiable in k, v, mu and phi.

    Example:
        >>> import torch, fastattn
        >>> k, v = torch.randn(2, 70, 2, 16), torch.randn(2, 70, 2, 16)
        >>> k_lm, v_lm = fastattn.eva_landmarks(k, v, chunk_size=16)
        >>> k_lm.shape
        torch.Size([2, 4, 2, 16])
    """
    _check_kv(k, v)
    B, T, HKV, D = k.shape
    C = _check_int("chunk_size", chunk_size)
    opts = _check_options(D, C, C, softmax_scale, "block")
    mu = _check_param("mu", mu, HKV, D, k.device)
    phi = _check_param("phi", phi, HKV, D, k.device)
    k, v = k.contiguous(), v.contiguous()
    if select_backend(k) == "torch":
        from .torch_impl import landmarks_torch
        k_lm, v_lm = landmarks_torch(k, v, mu, phi, opts)
        return k_lm.to(k.dtype), v_lm.to(v.dtype)
    from .op import eva_landmarks_triton
    return eva_landmarks_triton(k, v, mu.float(), phi.float(), opts)


__all__ = ["flash_eva", "eva_landmarks"]
