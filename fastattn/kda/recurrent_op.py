"""torch.library registration of the token-by-token KDA kernels (two opaque ops for torch.compile) and their
autograd formula. Options cross the op boundary as scalars and are rebuilt into KDAOptions.

The forward saves only its inputs. The backward first replays the forward to checkpoint the state entering
every SEGMENT-token segment ([segments, HV, K, V] fp32, about T/64 states), then runs the reverse sweep,
which recomputes the per-token states of one segment at a time.
"""
from typing import List, Optional, Tuple

import torch
import triton

from .._backend import eager_inference
from .options import KDAOptions
from .recurrent_bwd import launch_recurrent_bwd
from .recurrent_fwd import launch_recurrent_fwd

SEGMENT = 64


def _opts(scale, use_qk_l2norm, use_gate, use_beta_sigmoid, lower_bound, output_final_state):
    return KDAOptions(scale=scale, use_qk_l2norm=use_qk_l2norm, use_gate=use_gate,
                      use_beta_sigmoid=use_beta_sigmoid, lower_bound=lower_bound,
                      output_final_state=output_final_state)


def _num_states(q, cu_seqlens):
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _recurrent_fwd(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, opts: KDAOptions):
    """Launch the forward kernel; returns (o, final state or None)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    o = torch.empty(B, T, HV, V, device=q.device, dtype=v.dtype)
    ht = torch.empty(_num_states(q, cu_seqlens), HV, K, V, device=q.device, dtype=torch.float32) \
        if opts.output_final_state else None
    launch_recurrent_fwd(q, k, v, g, beta, A_log, dt_bias, initial_state, o, ht, None, cu_seqlens, None, opts,
                         SEGMENT)
    return o, ht


@torch.library.custom_op("fastattn::kda_recurrent_fwd", mutates_args=())
def kda_recurrent_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                         A_log: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor],
                         initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                         scale: float, use_qk_l2norm: bool, use_gate: bool, use_beta_sigmoid: bool,
                         lower_bound: Optional[float], output_final_state: bool
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    opts = _opts(scale, use_qk_l2norm, use_gate, use_beta_sigmoid, lower_bound, output_final_state)
    o, ht = _recurrent_fwd(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, opts)
    return o, (ht if ht is not None else q.new_zeros(0, dtype=torch.float32))


@kda_recurrent_fwd_op.register_fake
def _(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, scale, use_qk_l2norm, use_gate,
      use_beta_sigmoid, lower_bound, output_final_state):
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    shape = (_num_states(q, cu_seqlens), HV, K, V) if output_final_state else (0,)
    return v.new_empty(B, T, HV, V), q.new_empty(shape, dtype=torch.float32)


def _checkpoints(q, v, h0, cu_seqlens):
    """States entering every segment and the per-sequence index of each sequence's first segment."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = _num_states(q, cu_seqlens)
    if cu_seqlens is None and T <= SEGMENT:  # one segment per sequence: its entry state is h0
        return (h0 if h0 is not None else q.new_zeros(N, HV, K, V, dtype=torch.float32)), None
    if cu_seqlens is None:
        ckpt, offsets = torch.empty(B * triton.cdiv(T, SEGMENT), HV, K, V, device=q.device,
                                    dtype=torch.float32), None
    else:  # sum_n ceil(len_n / S) <= ceil(T / S) + N, and no host sync to learn the exact count
        counts = (cu_seqlens[1:] - cu_seqlens[:-1] + SEGMENT - 1) // SEGMENT
        offsets = torch.cumsum(counts, 0) - counts
        ckpt = torch.empty(triton.cdiv(T, SEGMENT) + N, HV, K, V, device=q.device, dtype=torch.float32)
    return ckpt, offsets


@torch.library.custom_op("fastattn::kda_recurrent_bwd", mutates_args=())
def kda_recurrent_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                         A_log: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor],
                         initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                         do: torch.Tensor, dht: Optional[torch.Tensor],
                         scale: float, use_qk_l2norm: bool, use_gate: bool, use_beta_sigmoid: bool,
                         lower_bound: Optional[float]) -> List[torch.Tensor]:
    opts = _opts(scale, use_qk_l2norm, use_gate, use_beta_sigmoid, lower_bound, False)
    ckpt, offsets = _checkpoints(q, v, initial_state, cu_seqlens)
    if offsets is not None or q.shape[1] > SEGMENT:
        launch_recurrent_fwd(q, k, v, g, beta, A_log, dt_bias, initial_state, None, None, ckpt, cu_seqlens,
                             offsets, opts, SEGMENT)
    dht = dht.float().contiguous() if dht is not None else None
    grads = launch_recurrent_bwd(q, k, v, g, beta, A_log, dt_bias, initial_state, ckpt, cu_seqlens, offsets,
                                 do.contiguous(), dht, opts, SEGMENT)
    return [x if x is not None else q.new_zeros(0) for x in grads]


@kda_recurrent_bwd_op.register_fake
def _(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, do, dht, scale, use_qk_l2norm, use_gate,
      use_beta_sigmoid, lower_bound):
    def like(x):
        return torch.empty_like(x) if x is not None else q.new_empty(0)
    return [like(q), like(k), like(v), like(g), like(beta), like(A_log), like(dt_bias), like(initial_state)]


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, A_log, dt_bias, h0, cu, scale, l2, gate, sig, lb, out_ht = inputs
    ctx.opts = _opts(scale, l2, gate, sig, lb, out_ht)
    ctx.save_for_backward(q, k, v, g, beta, A_log, dt_bias, h0, cu)


def _backward(ctx, do, dht):
    q, k, v, g, beta, A_log, dt_bias, h0, cu = ctx.saved_tensors
    opts: KDAOptions = ctx.opts
    if do is None:
        do = torch.zeros_like(v)
    if not opts.output_final_state:
        dht = None
    dq, dk, dv, dg, dbeta, dA, dbias, dh0 = kda_recurrent_bwd_op(
        q, k, v, g, beta, A_log, dt_bias, h0, cu, do, dht,
        opts.scale, opts.use_qk_l2norm, opts.use_gate, opts.use_beta_sigmoid, opts.lower_bound)
    return (dq, dk, dv, dg, dbeta, dA if A_log is not None else None, dbias if dt_bias is not None else None,
            dh0 if h0 is not None else None, None, None, None, None, None, None, None)


kda_recurrent_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def recurrent_kda_triton(q, k, v, g, beta, *, opts: KDAOptions, initial_state=None, A_log=None, dt_bias=None,
                         cu_seqlens=None):
    """Run the token-by-token Triton kernels through the registered op; returns (o, final_state or None).

    Arguments arrive validated and contiguous from :func:`fastattn.fused_recurrent_kda`."""
    if eager_inference(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens):  # skip the op's dispatch
        return _recurrent_fwd(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, opts)
    o, ht = kda_recurrent_fwd_op(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, opts.scale,
                                 opts.use_qk_l2norm, opts.use_gate, opts.use_beta_sigmoid, opts.lower_bound,
                                 opts.output_final_state)
    return o, (ht if opts.output_final_state else None)
