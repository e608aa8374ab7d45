"""torch.library registration of the chunked KDA kernels (so torch.compile sees two opaque ops) and
their autograd formula. Options cross the op boundary as scalars and are rebuilt into KDAOptions."""
from typing import List, Optional

import torch

from .._backend import eager_inference
from .._launch import compile_ahead, compile_ahead_available
from .chunk_launch import state_dtype, chunk_kda_bwd, chunk_kda_fwd, effective_chunk
from .options import KDAOptions


def _opts(scale, use_qk_l2norm, use_gate, use_beta_sigmoid, lower_bound, output_final_state, chunk_size):
    return KDAOptions(scale=scale, use_qk_l2norm=use_qk_l2norm, use_gate=use_gate,
                      use_beta_sigmoid=use_beta_sigmoid, lower_bound=lower_bound,
                      output_final_state=output_final_state, chunk_size=chunk_size)


def _empty(x):
    return x.new_zeros(0)


@torch.library.custom_op("fastattn::kda_chunk_fwd", mutates_args=())
def kda_chunk_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     A_log: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor],
                     initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                     scale: float, use_qk_l2norm: bool, use_gate: bool, use_beta_sigmoid: bool,
                     lower_bound: Optional[float], output_final_state: bool, chunk_size: int, save: bool
                     ) -> List[torch.Tensor]:
    opts = _opts(scale, use_qk_l2norm, use_gate, use_beta_sigmoid, lower_bound, output_final_state, chunk_size)
    o, ht, saved = chunk_kda_fwd(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, opts, save)
    return [o, ht if ht is not None else _empty(q).float(), *saved]


@kda_chunk_fwd_op.register_fake
def _(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, scale, use_qk_l2norm, use_gate,
      use_beta_sigmoid, lower_bound, output_final_state, chunk_size, save):
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    chunk_size = effective_chunk(chunk_size, K)
    ctx = torch.library.get_ctx()
    NT = ctx.new_dynamic_size() if cu_seqlens is not None else B * ((T + chunk_size - 1) // chunk_size)
    f32 = dict(device=q.device, dtype=torch.float32)
    ht = q.new_empty(N, HV, K, V, dtype=torch.float32) if output_final_state else q.new_empty(0, dtype=torch.float32)
    rstd = q.new_empty(2, B, T, HV, **f32) if use_qk_l2norm else q.new_empty(2, 1, **f32)
    Tinv = q.new_empty(B, T, HV, chunk_size, **f32) if save else q.new_empty(0, **f32)
    h = q.new_empty(NT, HV, K, V, dtype=state_dtype(q.dtype)) if save else q.new_empty(0, **f32)
    Aqk = q.new_empty(B, T, HV, chunk_size, dtype=state_dtype(q.dtype))
    return [v.new_empty(B, T, HV, V), ht, q.new_empty(B, T, HV, K, **f32), Aqk, Tinv, rstd, h]


@torch.library.custom_op("fastattn::kda_chunk_bwd", mutates_args=())
def kda_chunk_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     A_log: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor],
                     initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                     Gc: torch.Tensor, Aqk: torch.Tensor, Tinv: torch.Tensor, rstd: torch.Tensor, h: torch.Tensor,
                     do: torch.Tensor, dht: Optional[torch.Tensor],
                     scale: float, use_qk_l2norm: bool, use_gate: bool, use_beta_sigmoid: bool,
                     lower_bound: Optional[float], chunk_size: int) -> List[torch.Tensor]:
    opts = _opts(scale, use_qk_l2norm, use_gate, use_beta_sigmoid, lower_bound, False, chunk_size)
    grads = chunk_kda_bwd(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens,
                          (Gc, Aqk, Tinv, rstd, h), do.contiguous(), None if dht is None else dht.contiguous(), opts)
    return [x if x is not None else _empty(q) for x in grads]


@kda_chunk_bwd_op.register_fake
def _(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, Gc, Aqk, Tinv, rstd, h, do, dht,
      scale, use_qk_l2norm, use_gate, use_beta_sigmoid, lower_bound, chunk_size):
    def like(x):
        return torch.empty_like(x) if x is not None else q.new_empty(0)
    return [like(q), like(k), like(v), like(g), like(beta), like(A_log), like(dt_bias), like(initial_state)]


def _setup_context(ctx, inputs, output):
    (q, k, v, g, beta, A_log, dt_bias, h0, cu, scale, l2, gate, sig, lb, out_ht, bt, _save) = inputs
    ctx.opts = _opts(scale, l2, gate, sig, lb, out_ht, bt)
    ctx.save_for_backward(q, k, v, g, beta, A_log, dt_bias, h0, cu, *output[2:])


def _backward(ctx, grads):
    q, k, v, g, beta, A_log, dt_bias, h0, cu, Gc, Aqk, Tinv, rstd, h = ctx.saved_tensors
    opts: KDAOptions = ctx.opts
    do, dht = grads[0], grads[1]
    if do is None:
        do = torch.zeros_like(v)
    if not opts.output_final_state:
        dht = None
    dq, dk, dv, dg, dbeta, dA, dbias, dh0 = kda_chunk_bwd_op(
        q, k, v, g, beta, A_log, dt_bias, h0, cu, Gc, Aqk, Tinv, rstd, h, do, dht,
        opts.scale, opts.use_qk_l2norm, opts.use_gate, opts.use_beta_sigmoid, opts.lower_bound, opts.chunk_size)
    return (dq, dk, dv, dg, dbeta, dA if A_log is not None else None, dbias if dt_bias is not None else None,
            dh0 if h0 is not None else None, None, None, None, None, None, None, None, None, None)


kda_chunk_fwd_op.register_autograd(_backward, setup_context=_setup_context)


_COMPILED_AHEAD = set()


def _compile_once(q, k, v, g, beta, A_log, dt_bias, h0, cu, opts: KDAOptions, save: bool):
    """The first call of a configuration compiles every kernel it will launch, forward and (when a gradient can
    flow) backward, in parallel threads before running (fastattn._launch.compile_ahead): a fresh process pays
    about the slowest kernel's compile instead of the sum of ~10 (fresh process, empty Triton cache, mode B B8 T4096
    bf16 on an H200 with 16 cores: forward + backward 21.6 -> 14.1 s, forward 13.9 -> 12.0 s). Costs one launcher
    pass with unwritten intermediates (the peak memory of one forward + backward, released at once)."""
    if q.device.type != "cuda" or not compile_ahead_available():
        return
    key = (q.device, q.dtype, v.dtype, g.dtype, beta.dtype, tuple(q.shape[2:]), tuple(v.shape[2:]),
           A_log is None, dt_bias is None, h0 is None, cu is None, opts.use_qk_l2norm, opts.use_gate,
           opts.use_beta_sigmoid, opts.lower_bound, opts.output_final_state, opts.chunk_size, save)
    if key in _COMPILED_AHEAD:
        return
    with compile_ahead():
        o, ht, saved = chunk_kda_fwd(q, k, v, g, beta, A_log, dt_bias, h0, cu, opts, save)
        if save:
            chunk_kda_bwd(q, k, v, g, beta, A_log, dt_bias, h0, cu, saved, torch.empty_like(o),
                          None if ht is None else torch.empty_like(ht), opts)
    _COMPILED_AHEAD.add(key)


def chunk_kda_triton(q, k, v, g, beta, *, opts: KDAOptions, initial_state=None, A_log=None, dt_bias=None,
                     cu_seqlens=None):
    """Run the chunked Triton kernels through the registered op; returns (o, final_state or None).
    The forward keeps what the backward needs only when a gradient can flow (inference skips those writes)."""
    tensors = (q, k, v, g, beta, initial_state, A_log, dt_bias)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    _compile_once(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, opts, save)
    if eager_inference(*tensors, cu_seqlens):   # no autograd, no tracer: skip the op's dispatch
        o, ht, _ = chunk_kda_fwd(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, opts, save=False)
        return o, ht
    out = kda_chunk_fwd_op(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, opts.scale,
                           opts.use_qk_l2norm, opts.use_gate, opts.use_beta_sigmoid, opts.lower_bound,
                           opts.output_final_state, opts.chunk_size, save)
    return out[0], (out[1] if opts.output_final_state else None)
