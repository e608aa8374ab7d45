"""Plain-Python orchestration of the chunked KDA kernels: index tensors, buffers, launches."""
from typing import Optional

import torch
import triton

from .chunk_bwd_intra import kda_intra_bwd_kernel
from .chunk_bwd_state import kda_state_bwd_kernel
from .chunk_fwd import kda_state_fwd_kernel
from .chunk_intra import kda_intra_fwd_kernel
from .chunk_wy import kda_wy_fwd_kernel
from .options import KDAOptions

SUB_CHUNK = 16
# launch settings of the forward stages, from a sweep on an H200 (triton 3.6, bf16, B8 T4096 and B1 T65536):
# 4 warps everywhere (two programs per SM hide each other's dependent-product latency: 1a 2.43 -> 1.21 ms,
# 1b 1.26 -> 0.72 ms at B8 T4096); the state pass software-pipelines its loads two deep.
INTRA_LAUNCH = dict(num_warps=4, num_stages=1)
WY_LAUNCH = dict(num_warps=4, num_stages=1)
STATE_FWD_LAUNCH = dict(num_warps=4, num_stages=2)
# Above this head dim the chunk-local backward's [chunk, K] fp32 tiles overflow Hopper's shared memory at
# 64-row chunks (290 KB > 227 KB at K = 256, ptxas sm_90a): such heads run with 32-row chunks.
WIDE_HEAD = 128


def effective_chunk(chunk_size: int, K: int) -> int:
    """Chunk length the kernels use: the requested one, capped at 32 for K > 128."""
    return min(chunk_size, 32) if K > WIDE_HEAD else chunk_size


def chunk_layout(B: int, T: int, cu_seqlens: Optional[torch.Tensor], BT: int, device):
    """Return (cu_seqlens int64 [N+1], chunk_indices int32 [NT, 2] = (sequence, chunk), chunk_offsets int64
    [N+1], NT). Equal-length batches are treated as B packed sequences (no host sync)."""
    if cu_seqlens is None:
        nt = triton.cdiv(T, BT)
        cu = torch.arange(B + 1, device=device, dtype=torch.int64) * T
        ids = torch.arange(B * nt, device=device, dtype=torch.int32)
        idx = torch.stack([ids // nt, ids % nt], dim=1).contiguous()
        offsets = torch.arange(B + 1, device=device, dtype=torch.int64) * nt
        return cu, idx, offsets, B * nt
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to("cpu")
    nts = [triton.cdiv(int(n), BT) for n in lens]
    idx = torch.tensor([(n, c) for n, nt in enumerate(nts) for c in range(nt)], dtype=torch.int32)
    offsets = torch.tensor([0] + nts, dtype=torch.int64).cumsum(0)
    return cu_seqlens, idx.to(device), offsets.to(device), sum(nts)


def _dims(q, v, opts: KDAOptions):
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(32, triton.next_power_of_2(V)))
    # fp32 inputs: exact fp32 products (tf32x3 hit an illegal memory access at B2 T4096 H16 on an H200
    # with triton 3.6); 16-bit inputs: tf32 products of fp32 operands
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    return B, T, H, K, HV, V, BK, BV, prec


def _gate_flags(A_log, dt_bias, opts: KDAOptions):
    return dict(USE_GATE=opts.use_gate, HAS_A=A_log is not None, HAS_BIAS=dt_bias is not None,
                HAS_LB=opts.has_lower_bound, LB=opts.lower_bound if opts.has_lower_bound else 0.0)


def _inverse_precision(dtype) -> str:
    """(I + L)^-1 products: tf32 under bf16 (its 8-bit storage dominates), tf32x3 under fp16, exact in fp32."""
    return {torch.float32: "ieee", torch.float16: "tf32x3"}.get(dtype, "tf32")


def _state_tile(programs: int, V: int, device) -> int:
    """V tile of the sequential forward pass: 64 (fewest redundant loads of W, qg, kd) when that still gives
    every SM a program, else 32 (measured 2.14 ms at B1 T65536 H16 against 2.27 ms for 16)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    bv = 64 if programs * triton.cdiv(V, 64) >= sms else 32
    return min(bv, max(16, triton.next_power_of_2(V)))


def chunk_kda_fwd(q, k, v, g, beta, A_log, dt_bias, h0, cu_seqlens, opts: KDAOptions, save: bool = True):
    """Forward: returns (o, final_state or None, saved) with saved = (Gc, Aqk, Tinv, rstd, h); without
    `save` (no backward will follow) Tinv and h are empty and never written."""
    B, T, H, K, HV, V, BK, BV, prec = _dims(q, v, opts)
    BT = effective_chunk(opts.chunk_size, K)
    cu, idx, offsets, NT = chunk_layout(B, T, cu_seqlens, BT, q.device)
    N = cu.numel() - 1
    f32 = dict(device=q.device, dtype=torch.float32)
    Gc = torch.empty(B, T, HV, K, **f32)
    Aqk = torch.empty(B, T, HV, BT, **f32)
    Tinv = torch.empty(B, T, HV, BT, **f32)  # L from stage 1a, (I + L)^-1 after stage 1b when saved
    rstd = torch.empty(2, B, T, HV, **f32) if opts.use_qk_l2norm else torch.empty(2, 1, **f32)
    # the state pass's factors, in the input dtype (fp32 stays fp32)
    w, qg, kd = (torch.empty(B, T, HV, K, device=q.device, dtype=q.dtype) for _ in range(3))
    u = torch.empty(B, T, HV, V, device=q.device, dtype=q.dtype)
    BKi = min(BK, 32)  # 64 spills at BT=64 (ptxas sm_90a, 8 warps)
    kda_intra_fwd_kernel[(NT, HV)](
        q, k, g, beta, A_log, dt_bias, Gc, Aqk, Tinv, rstd[0], rstd[1], cu, idx, opts.scale, T,
        H=H, HV=HV, K=K, BT=BT, BC=min(SUB_CHUNK, BT), BK=BKi, NK=triton.cdiv(K, BKi),
        USE_L2NORM=opts.use_qk_l2norm, USE_SIGMOID=opts.use_beta_sigmoid, DOT_PREC=prec,
        **_gate_flags(A_log, dt_bias, opts), **INTRA_LAUNCH)
    kda_wy_fwd_kernel[(NT, HV)](
        q, k, v, beta, Gc, Tinv, rstd[0], rstd[1], w, u, qg, kd, cu, idx, opts.scale, T,
        H=H, HV=HV, K=K, V=V, BT=BT, BK=min(BK, 64), BV=min(64, max(16, triton.next_power_of_2(V))),
        USE_L2NORM=opts.use_qk_l2norm, USE_SIGMOID=opts.use_beta_sigmoid, SAVE_T=save, DOT_PREC=prec,
        INV_PREC=_inverse_precision(q.dtype), **WY_LAUNCH)
    o = torch.empty(B, T, HV, V, device=q.device, dtype=v.dtype)
    h = torch.empty(NT, HV, K, V, **f32) if save else torch.empty(0, **f32)
    ht = torch.empty(N, HV, K, V, **f32) if opts.output_final_state else None
    BVs = _state_tile(N * HV, V, q.device)
    kda_state_fwd_kernel[(triton.cdiv(V, BVs), N * HV)](
        w, u, qg, kd, Aqk, Gc, h0, o, h, ht, cu, offsets, T,
        H=H, HV=HV, K=K, V=V, BT=BT, BK=BK, BV=BVs, USE_H0=h0 is not None, STORE_H=save,
        STORE_HT=ht is not None, DOT_PREC=prec, **STATE_FWD_LAUNCH)
    return o, ht, (Gc, Aqk, Tinv if save else torch.empty(0, **f32), rstd, h)


def chunk_kda_bwd(q, k, v, g, beta, A_log, dt_bias, h0, cu_seqlens, saved, do, dht, opts: KDAOptions):
    """Backward: returns (dq, dk, dv, dg, dbeta, dA_log, ddt_bias, dh0); entries are None where the
    matching input is None."""
    B, T, H, K, HV, V, BK, BV, prec = _dims(q, v, opts)
    BT = effective_chunk(opts.chunk_size, K)
    Gc, Aqk, Tinv, rstd, h = saved
    cu, idx, offsets, NT = chunk_layout(B, T, cu_seqlens, BT, q.device)
    N = cu.numel() - 1
    f32 = dict(device=q.device, dtype=torch.float32)
    dh = torch.empty(NT, HV, K, V, **f32)
    dh0 = torch.empty(N, HV, K, V, **f32) if h0 is not None else None
    kda_state_bwd_kernel[(triton.cdiv(V, BV), N * HV)](
        q, k, beta, Gc, Aqk, Tinv, rstd[0], rstd[1], do, dht, dh, dh0, cu, offsets, opts.scale, T,
        H=H, HV=HV, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_L2NORM=opts.use_qk_l2norm,
        USE_SIGMOID=opts.use_beta_sigmoid, USE_DHT=dht is not None, USE_H0=h0 is not None, DOT_PREC=prec,
        num_warps=8, num_stages=1)
    gva = HV != H
    dq = torch.empty(B, T, HV, K, **f32) if gva else torch.empty_like(q)
    dk = torch.empty(B, T, HV, K, **f32) if gva else torch.empty_like(k)
    dv = torch.empty_like(v)
    dg = torch.empty(B, T, HV, K, device=q.device, dtype=g.dtype)
    dbeta = torch.empty(B, T, HV, device=q.device, dtype=beta.dtype)
    dA = torch.empty(NT, HV, **f32) if A_log is not None else None
    dbias = torch.empty(NT, HV, K, **f32) if dt_bias is not None else None
    kda_intra_bwd_kernel[(NT, HV)](
        q, k, v, g, beta, A_log, dt_bias, Gc, Aqk, Tinv, rstd[0], rstd[1], h, dh, do,
        dq, dk, dv, dg, dbeta, dA, dbias, cu, idx, offsets, opts.scale, T,
        H=H, HV=HV, K=K, V=V, BT=BT, BC=min(SUB_CHUNK, BT), BK=BK, BV=16,
        USE_L2NORM=opts.use_qk_l2norm, USE_SIGMOID=opts.use_beta_sigmoid, DOT_PREC=prec,
        **_gate_flags(A_log, dt_bias, opts), num_warps=8, num_stages=1)
    if gva:
        dq = dq.view(B, T, H, HV // H, K).sum(3).to(q.dtype)
        dk = dk.view(B, T, H, HV // H, K).sum(3).to(k.dtype)
    dA_log = dA.sum(0) if dA is not None else None
    ddt_bias = dbias.sum(0) if dbias is not None else None
    return dq, dk, dv, dg, dbeta, dA_log, ddt_bias, dh0
