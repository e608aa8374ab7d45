"""Public KDA functions: argument validation, then dispatch to the Triton or PyTorch backend."""
from typing import Optional, Tuple

import torch

from .._backend import select_backend
from .._checks import check_cu_seqlens, check_shape, check_tensor
from .options import KDAOptions

MAX_HEAD_DIM = 256
CHUNK_SIZES = (16, 32, 64)


def _prepare(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
             use_gate_in_kernel, use_beta_sigmoid_in_kernel, A_log, dt_bias, lower_bound, cu_seqlens,
             chunk_size):
    """Validate every argument; return contiguous tensors and the KDAOptions."""
    check_tensor("q", q, ndim=4)
    dev = q.device
    for name, x in (("k", k), ("v", v), ("g", g)):
        check_tensor(name, x, ndim=4, device=dev)
    check_tensor("beta", beta, ndim=3, device=dev)
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    check_shape("k", k, (B, T, H, K), "same as q")
    if v.shape[:2] != (B, T):
        raise ValueError(f"v must have shape [B={B}, T={T}, HV, V], got {tuple(v.shape)}")
    if min(B, T, H, K, HV, V) < 1:
        raise ValueError(f"empty inputs are not supported, got q shape {tuple(q.shape)}, v shape {tuple(v.shape)}")
    if HV % H != 0:
        raise ValueError(f"v's head count HV must be a multiple of q's H={H}, got HV={HV}")
    check_shape("g", g, (B, T, HV, K), "[B, T, HV, K]")
    check_shape("beta", beta, (B, T, HV), "[B, T, HV]")
    if K > MAX_HEAD_DIM:
        raise ValueError(f"q/k head dim K must be <= {MAX_HEAD_DIM}, got K={K}")
    if V > MAX_HEAD_DIM:
        raise ValueError(f"v head dim V must be <= {MAX_HEAD_DIM}, got V={V}")
    if q.dtype != k.dtype:
        raise TypeError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {CHUNK_SIZES}, got {chunk_size!r}")
    if scale is None:
        scale = K ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    cu = check_cu_seqlens(cu_seqlens, B, T, dev)
    N = B if cu is None else cu.numel() - 1
    if initial_state is not None:
        check_tensor("initial_state", initial_state, ndim=4, device=dev)
        check_shape("initial_state", initial_state, (N, HV, K, V), "[N, HV, K, V]")
        initial_state = initial_state.float().contiguous()
    if use_gate_in_kernel:
        if A_log is not None:
            check_tensor("A_log", A_log, device=dev)
            if A_log.numel() != HV:
                raise ValueError(f"A_log must have HV={HV} elements, got shape {tuple(A_log.shape)}")
            A_log = A_log.reshape(HV).float().contiguous()
        elif lower_bound is None:
            raise ValueError("A_log is required by the softplus gate (use_gate_in_kernel=True without lower_bound)")
        if dt_bias is not None:
            check_tensor("dt_bias", dt_bias, device=dev)
            if dt_bias.numel() != HV * K:
                raise ValueError(f"dt_bias must have HV*K={HV * K} elements, got shape {tuple(dt_bias.shape)}")
            dt_bias = dt_bias.reshape(HV, K).float().contiguous()
    elif A_log is not None or dt_bias is not None:
        raise ValueError("A_log and dt_bias are only used with use_gate_in_kernel=True")
    if lower_bound is not None:
        if not use_gate_in_kernel:
            raise ValueError("lower_bound is only used with use_gate_in_kernel=True")
        if not isinstance(lower_bound, (int, float)) or not (-5.0 <= lower_bound < 0.0):
            raise ValueError(f"lower_bound must be a float in [-5, 0), got {lower_bound!r}")
        lower_bound = float(lower_bound)
    opts = KDAOptions(scale=float(scale), use_qk_l2norm=bool(use_qk_l2norm_in_kernel),
                      use_gate=bool(use_gate_in_kernel), use_beta_sigmoid=bool(use_beta_sigmoid_in_kernel),
                      lower_bound=lower_bound, output_final_state=bool(output_final_state),
                      chunk_size=int(chunk_size))
    tensors = (q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous())
    return tensors, initial_state, A_log, dt_bias, cu, opts


def chunk_kda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, *,
              scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
              output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False,
              use_gate_in_kernel: bool = False, use_beta_sigmoid_in_kernel: bool = False,
              A_log: Optional[torch.Tensor] = None, dt_bias: Optional[torch.Tensor] = None,
              lower_bound: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None,
              chunk_size: int = 64) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    r"""Kimi Delta Attention (gated delta rule with per-channel decay), chunked algorithm.

    Per value head, with state S in R^{K x V} (fp32), log-decay g_t in R^K (g <= 0) and scalar beta_t:
    ``S~ = Diag(exp g_t) S_{t-1}``; ``S_t = S~ + k_t (beta_t (v_t - S~^T k_t))^T``; ``o_t = S_t^T (scale q_t)``.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys (fp32, fp16 or bf16).
        v: ``[B, T, HV, V]`` values; HV a multiple of H (value head ``hv`` reads q/k head ``hv // (HV // H)``).
        g: ``[B, T, HV, K]`` log-decay (<= 0), or raw gate inputs when ``use_gate_in_kernel``.
        beta: ``[B, T, HV]`` write strengths, or logits when ``use_beta_sigmoid_in_kernel``.
        scale: multiplier of q; default ``K ** -0.5``.
        initial_state: ``[N, HV, K, V]`` state before the first token (N = B, or sequences in cu_seqlens).
        output_final_state: also return the state after the last token, ``[N, HV, K, V]`` fp32.
        use_qk_l2norm_in_kernel: q, k become ``x / sqrt(sum(x^2) + 1e-6)`` per head, fused.
        use_gate_in_kernel: g holds raw gate inputs; the decay is
            ``-exp(A_log) * softplus(g + dt_bias)`` (no ``lower_bound``) or
            ``lower_bound * sigmoid(exp(A_log) * (g + dt_bias))``.
        use_beta_sigmoid_in_kernel: beta holds logits; ``beta = sigmoid(beta)``.
        A_log: ``[HV]`` fp32 gate parameter (required for the softplus gate).
        dt_bias: ``[HV * K]`` fp32 gate bias (optional).
        lower_bound: float in ``[-5, 0)`` selecting the bounded sigmoid gate.
        cu_seqlens: ``[N + 1]`` int32/int64 offsets of packed sequences (B must be 1).
        chunk_size: 64 (default), 32 or 16; heads with K > 128 use at most 32 (on-chip memory budget).

    Returns:
        ``(o, final_state)``: o ``[B, T, HV, V]`` in v's dtype; final_state ``[N, HV, K, V]`` fp32 or None.

    Example:
        >>> import torch, fastattn
        >>> B, T, H, K = 1, 100, 2, 32
        >>> q, k, v = (torch.randn(B, T, H, K) for _ in range(3))
        >>> g = -torch.rand(B, T, H, K)
        >>> beta = torch.rand(B, T, H)
        >>> o, s = fastattn.chunk_kda(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, output_final_state=True)
        >>> o.shape, s.shape
        (torch.Size([1, 100, 2, 32]), torch.Size([1, 2, 32, 32]))
    """
    tensors, h0, A_log, dt_bias, cu, opts = _prepare(
        q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
        use_gate_in_kernel, use_beta_sigmoid_in_kernel, A_log, dt_bias, lower_bound, cu_seqlens, chunk_size)
    if select_backend(q) == "torch":
        from .torch_impl import chunk_kda_torch
        return chunk_kda_torch(*tensors, opts=opts, initial_state=h0, A_log=A_log, dt_bias=dt_bias,
                               cu_seqlens=cu)
    from .chunk_op import chunk_kda_triton
    return chunk_kda_triton(*tensors, opts=opts, initial_state=h0, A_log=A_log, dt_bias=dt_bias, cu_seqlens=cu)


def fused_recurrent_kda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                        *, scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
                        output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False,
                        use_gate_in_kernel: bool = False, use_beta_sigmoid_in_kernel: bool = False,
                        A_log: Optional[torch.Tensor] = None, dt_bias: Optional[torch.Tensor] = None,
                        lower_bound: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None,
                        ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    r"""Kimi Delta Attention computed token by token (decoding path; any T; differentiable).

    Same math, arguments and returns as :func:`chunk_kda` (without ``chunk_size``). Use it to decode:
    pass the previous call's final state as ``initial_state``.

    Example:
        >>> import torch, fastattn
        >>> q, k, v = (torch.randn(1, 1, 2, 16) for _ in range(3))
        >>> g, beta = -torch.rand(1, 1, 2, 16), torch.rand(1, 1, 2)
        >>> state = torch.zeros(1, 2, 16, 16)
        >>> o, state = fastattn.fused_recurrent_kda(q, k, v, g, beta, initial_state=state, output_final_state=True)
        >>> o.shape
        torch.Size([1, 1, 2, 16])
    """
    tensors, h0, A_log, dt_bias, cu, opts = _prepare(
        q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
        use_gate_in_kernel, use_beta_sigmoid_in_kernel, A_log, dt_bias, lower_bound, cu_seqlens, 64)
    if select_backend(q) == "torch":
        from .torch_impl import recurrent_kda_torch
        return recurrent_kda_torch(*tensors, opts=opts, initial_state=h0, A_log=A_log, dt_bias=dt_bias,
                                   cu_seqlens=cu)
    from .recurrent_op import recurrent_kda_triton
    return recurrent_kda_triton(*tensors, opts=opts, initial_state=h0, A_log=A_log, dt_bias=dt_bias,
                                cu_seqlens=cu)


__all__ = ["chunk_kda", "fused_recurrent_kda"]
