"""torch.library registration of the FlashEVA Triton kernels (opaque to torch.compile) and their
autograd formulas. Options cross the op boundary as scalars and are rebuilt into EvaOptions.

fastattn::eva_fwd / eva_bwd: pooling + attention as one differentiable op; the landmark gradients
are pooled back into dk, dv in place (no second full-size gradient tensor).
fastattn::eva_pool_fwd / eva_pool_bwd: the pooling alone (``eva_landmarks``).
"""
from typing import List, Optional

import torch

from .._backend import eager_inference
from .launch import Layout, eva_backward, eva_forward, pool_bwd, pool_fwd
from .options import EvaOptions

Tensor = torch.Tensor


def _opts(scale, window_size, chunk_size, sliding) -> EvaOptions:
    return EvaOptions(window_size=window_size, chunk_size=chunk_size, scale=scale, sliding=sliding)


@torch.library.custom_op("fastattn::eva_fwd", mutates_args=())
def eva_fwd_op(q: Tensor, k: Tensor, v: Tensor, mu: Tensor, phi: Tensor, cu_seqlens: Optional[Tensor],
               scale: float, window_size: int, chunk_size: int, sliding: bool) -> List[Tensor]:
    return list(eva_forward(q, k, v, mu, phi, cu_seqlens, _opts(scale, window_size, chunk_size, sliding)))


@eva_fwd_op.register_fake
def _(q, k, v, mu, phi, cu_seqlens, scale, window_size, chunk_size, sliding):
    B, T, H, D = q.shape
    HKV, n = k.shape[2], T // chunk_size
    return [torch.empty_like(q), q.new_empty(B, H, T, dtype=torch.float32), k.new_empty(B, n, HKV, D),
            v.new_empty(B, n, HKV, D), k.new_empty(B, n, HKV, 2, dtype=torch.float32)]


@torch.library.custom_op("fastattn::eva_bwd", mutates_args=())
def eva_bwd_op(q: Tensor, k: Tensor, v: Tensor, mu: Tensor, phi: Tensor, cu_seqlens: Optional[Tensor],
               o: Tensor, lse: Tensor, k_lm: Tensor, v_lm: Tensor, lm_lse: Tensor, do: Tensor,
               dlse: Optional[Tensor], scale: float, window_size: int, chunk_size: int,
               sliding: bool) -> List[Tensor]:
    opts = _opts(scale, window_size, chunk_size, sliding)
    dlse = None if dlse is None else dlse.float().contiguous()
    return list(eva_backward(q, k, v, mu, phi, cu_seqlens, o, lse, k_lm, v_lm, lm_lse, do.contiguous(), dlse, opts))


@eva_bwd_op.register_fake
def _(q, k, v, mu, phi, cu_seqlens, o, lse, k_lm, v_lm, lm_lse, do, dlse, scale, window_size, chunk_size, sliding):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(mu),
            torch.empty_like(phi)]


def _setup_fwd(ctx, inputs, output):
    q, k, v, mu, phi, cu, scale, W, C, sliding = inputs
    o, lse, k_lm, v_lm, lm_lse = output
    ctx.opts = (scale, W, C, sliding)
    ctx.mark_non_differentiable(k_lm, v_lm, lm_lse)
    ctx.save_for_backward(q, k, v, mu, phi, cu, o, lse, k_lm, v_lm, lm_lse)


def _backward_fwd(ctx, grads):
    q, k, v, mu, phi, cu, o, lse, k_lm, v_lm, lm_lse = ctx.saved_tensors
    do, dlse = grads[0], grads[1]
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv, dmu, dphi = eva_bwd_op(q, k, v, mu, phi, cu, o, lse, k_lm, v_lm, lm_lse, do, dlse, *ctx.opts)
    return dq, dk, dv, dmu, dphi, None, None, None, None, None


eva_fwd_op.register_autograd(_backward_fwd, setup_context=_setup_fwd)


@torch.library.custom_op("fastattn::eva_pool_fwd", mutates_args=())
def eva_pool_fwd_op(k: Tensor, v: Tensor, mu: Tensor, phi: Tensor, scale: float, chunk_size: int) -> List[Tensor]:
    return list(_pool(k, v, mu, phi, scale, chunk_size))


def _pool(k, v, mu, phi, scale: float, chunk_size: int):
    """Launch the pooling alone (plain batches): (k_lm, v_lm, lm_lse)."""
    return pool_fwd(k, v, mu, phi, Layout(k.shape[0], k.shape[1], chunk_size, None),
                    _opts(scale, chunk_size, chunk_size, False))


@eva_pool_fwd_op.register_fake
def _(k, v, mu, phi, scale, chunk_size):
    B, T, HKV, D = k.shape
    n = T // chunk_size
    return [k.new_empty(B, n, HKV, D), v.new_empty(B, n, HKV, D), k.new_empty(B, n, HKV, 2, dtype=torch.float32)]


@torch.library.custom_op("fastattn::eva_pool_bwd", mutates_args=())
def eva_pool_bwd_op(k: Tensor, v: Tensor, mu: Tensor, phi: Tensor, lm_lse: Tensor, dk_lm: Tensor, dv_lm: Tensor,
                    scale: float, chunk_size: int) -> List[Tensor]:
    opts = _opts(scale, chunk_size, chunk_size, False)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    lay = Layout(k.shape[0], k.shape[1], chunk_size, None)
    dmu, dphi = pool_bwd(k, v, mu, phi, lm_lse, dk_lm.float().contiguous(), dv_lm.float().contiguous(), dk, dv,
                         lay, opts)
    return [dk, dv, dmu, dphi]


@eva_pool_bwd_op.register_fake
def _(k, v, mu, phi, lm_lse, dk_lm, dv_lm, scale, chunk_size):
    return [torch.empty_like(k), torch.empty_like(v), torch.empty_like(mu), torch.empty_like(phi)]


def _setup_pool(ctx, inputs, output):
    k, v, mu, phi, scale, C = inputs
    ctx.opts = (scale, C)
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(k, v, mu, phi, output[2])


def _backward_pool(ctx, grads):
    k, v, mu, phi, lm_lse = ctx.saved_tensors
    dk_lm = grads[0] if grads[0] is not None else torch.zeros(lm_lse.shape[:-1] + k.shape[-1:], device=k.device)
    dv_lm = grads[1] if grads[1] is not None else torch.zeros_like(dk_lm)
    dk, dv, dmu, dphi = eva_pool_bwd_op(k, v, mu, phi, lm_lse, dk_lm, dv_lm, *ctx.opts)
    return dk, dv, dmu, dphi, None, None


eva_pool_fwd_op.register_autograd(_backward_pool, setup_context=_setup_pool)


def flash_eva_triton(q, k, v, mu, phi, opts: EvaOptions, cu_seqlens=None):
    """Run the Triton FlashEVA through the registered op (or straight to the launcher when no gradient or
    tracer is involved); returns (o, lse [B, H, T] fp32)."""
    if eager_inference(q, k, v, mu, phi, cu_seqlens):
        out = eva_forward(q, k, v, mu, phi, cu_seqlens, opts)
        return out[0], out[1]
    out = eva_fwd_op(q, k, v, mu, phi, cu_seqlens, opts.scale, opts.window_size, opts.chunk_size, opts.sliding)
    return out[0], out[1]


def eva_landmarks_triton(k, v, mu, phi, opts: EvaOptions):
    """Triton landmark pooling through the registered op (or straight to the launcher when no gradient or
    tracer is involved); returns (k_lm, v_lm)."""
    if eager_inference(k, v, mu, phi):
        out = _pool(k, v, mu, phi, opts.scale, opts.chunk_size)
        return out[0], out[1]
    out = eva_pool_fwd_op(k, v, mu, phi, opts.scale, opts.chunk_size)
    return out[0], out[1]
