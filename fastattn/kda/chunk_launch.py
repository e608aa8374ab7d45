"""Plain-Python orchestration of the chunked KDA kernels: index tensors, buffers, launches."""
import functools
from typing import Optional

import torch
import triton

from .._checks import cached_for
from .._launch import launch
from .chunk_bwd_dv import kda_dv_bwd_kernel
from .chunk_bwd_finish import kda_finish_bwd_kernel
from .chunk_bwd_fix import kda_intra_fix_bwd_kernel
from .chunk_bwd_intra import kda_intra_bwd_kernel
from .chunk_bwd_state import kda_state_bwd_kernel
from .chunk_fwd import kda_state_fwd_kernel
from .chunk_gate import kda_gate_cumsum_fwd_kernel
from .chunk_intra import kda_intra_fwd_kernel
from .chunk_wy import kda_wy_fwd_kernel
from .chunk_wy_inv import kda_wy_inv_kernel
from .options import KDAOptions

SUB_CHUNK = 16
# launch settings of the forward stages, from a sweep on an H200 (triton 3.6, bf16, B8 T4096 and B1 T65536):
# 4 warps everywhere (two programs per SM hide each other's dependent-product latency: 1a 2.43 -> 1.21 ms,
# 1b 1.26 -> 0.72 ms at B8 T4096 as one kernel); the state pass software-pipelines its loads two deep.
# Stage 1a in two kernels: stage 1a-0 streams the gate cumsum in [BT, GATE_BK] tiles; the products run one program
# per 16-row strip (4x the programs of a per-chunk kernel, none carrying the gate pass): forward B8 T4096 bf16 on an
# H200 1.782 -> 1.739 ms (mode A), 2.884 -> 2.723 (mode B); maxnreg 80: 1.719 / 2.746, uncapped 1.795 / 2.793.
# ptxas sm_90a (triton 3.6, 16-byte aligned arguments): 97 / 126 registers (mode A / B) uncapped, 4 programs per
# SM; capped at 96 (0 / 4 bytes of spill stores with the exact diagonal loop), 5 per SM to overlap the strips'
# load -> exp2 -> dot chains (the per-chunk kernel: 128 registers, 40 / 76 bytes of spills at 96).
GATE_LAUNCH = dict(num_warps=4, num_stages=1)
GATE_BK = 64        # K tile of stage 1a-0
INTRA_LAUNCH = dict(num_warps=4, num_stages=1, maxnreg=96)
INTRA_LAUNCH_FP32 = dict(num_warps=4, num_stages=1)   # fp32 inputs: 136 / 160 registers, 288 B of spills at 96
# 16-bit inputs without the in-kernel l2norm (fla's mode A): 2 warps, 146 registers, forward B8 T4096 bf16 on an
# H200 1.542 -> 1.500 ms; with it (the model path, whose steep gates run the exact diagonal loop) 2 warps lose
# (2.155 -> 2.186 ms), as do 4 warps at 112 registers (+0.04 / +0.03) and 8 at 64 (+0.15 / +0.47)
INTRA_LAUNCH_NO_L2 = dict(num_warps=2, num_stages=1)
INTRA_BK = 32       # K tile of stage 1a
# stage 1b in two kernels: the inversion per (chunk, head) (levels 2-8 as batched [4, 16, 16] products: 96 registers),
# then one program per K / V tile; tile 32: 146 / 116 registers in modes A / B (3-4 programs per SM), 64: 214 / 231
# (2 per SM; ptxas sm_90a, triton 3.6, bf16). Forward B8 T4096 on an H200: 1.782 -> 1.682 ms (A), 2.884 -> 2.653 (B);
# tile 64: 1.848 / 2.872; inversion as plain doubling levels: 1.897 / 2.866. With the split 1a: 1.641 / 2.489 ms.
WY_INV_LAUNCH = dict(num_warps=4, num_stages=1)
WY_LAUNCH = dict(num_warps=4, num_stages=1)
WY_TILE = 32        # K and V tile of stage 1b-ii
STATE_FWD_LAUNCH = dict(num_warps=4, num_stages=2)
# backward stages: state pass, dv / dAqk / dL per chunk, per-channel gradients per K tile, row-wise finish
STATE_BWD_LAUNCH = dict(num_warps=4, num_stages=2)
# fp32 intermediates (fp16/fp32 inputs) double the staged tiles: 2 stages need 288 KB of shared memory at K = V = 128
# (ptxas sm_90a, triton 3.6; Hopper has 227 KB), 1 stage 160 KB
STATE_BWD_LAUNCH_FP32 = dict(num_warps=4, num_stages=1)
# dv stage: V tile 32 at 4 warps, two programs per SM (112 KB of shared memory each; the 64 tile needs 144 KB):
# fwd+bwd B8 T4096 8.92 -> 8.70 ms mode A, 15.23 -> 15.01 ms mode B (H200; 8 warps capped at 128 registers: 9.55)
DV_BWD_LAUNCH = dict(num_warps=4, num_stages=1)
INTRA_BWD_LAUNCH = dict(num_warps=4, num_stages=1)
FIX_BWD_LAUNCH = dict(num_warps=4, num_stages=1)
FINISH_BWD_LAUNCH = dict(num_warps=4, num_stages=1)
DV_BWD_TILE = 32
# Above this head dim 64-row chunks overflow Hopper's 227 KB of shared memory in the backward (K = 256, ptxas
# sm_90a, triton 3.6: reverse state pass 270 KB, dv stage 229 KB): such heads run with 32-row chunks.
WIDE_HEAD = 128


def effective_chunk(chunk_size: int, K: int) -> int:
    """Chunk length the kernels use: the requested one, capped at 32 for K > 128."""
    return min(chunk_size, 32) if K > WIDE_HEAD else chunk_size


def chunk_layout(B: int, T: int, cu_seqlens: Optional[torch.Tensor], BT: int, device):
    """Return (cu_seqlens int64 [N+1], chunk_indices int32 [NT, 2] = (sequence, chunk), chunk_offsets int64
    [N+1], NT). Equal-length batches are treated as B packed sequences (no host sync)."""
    if cu_seqlens is None:
        return _equal_layout(B, T, BT, torch.device(device))
    # per cu_seqlens tensor (fastattn._checks.cached_for): one host sync for its first call, none after
    return cached_for(cu_seqlens, ("kda_chunk_layout", BT, torch.device(device)),
                      lambda cu: _packed_layout(cu, BT, device))


def _packed_layout(cu_seqlens: torch.Tensor, BT: int, device):
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to("cpu")
    nts = [triton.cdiv(int(n), BT) for n in lens]
    idx = torch.tensor([(n, c) for n, nt in enumerate(nts) for c in range(nt)], dtype=torch.int32)
    offsets = torch.tensor([0] + nts, dtype=torch.int64).cumsum(0)
    return cu_seqlens, idx.to(device), offsets.to(device), sum(nts)


@functools.lru_cache(maxsize=64)
def _equal_layout(B: int, T: int, BT: int, device: torch.device):
    """chunk_layout of B sequences of T tokens, kept per shape: the kernels only read these tensors, and building
    them costs five small launches per call (host time a short prefill cannot hide)."""
    nt = triton.cdiv(T, BT)
    cu = torch.arange(B + 1, device=device, dtype=torch.int64) * T
    ids = torch.arange(B * nt, device=device, dtype=torch.int32)
    idx = torch.stack([ids // nt, ids % nt], dim=1).contiguous()
    offsets = torch.arange(B + 1, device=device, dtype=torch.int64) * nt
    return cu, idx, offsets, B * nt


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _dims(q, v, opts: KDAOptions):
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(64, triton.next_power_of_2(V)))   # V tile of the chunk-parallel stages
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


def state_dtype(dtype):
    """Storage of the saved per-chunk states h and of every backward intermediate (recomputed WY factors, Vn, dVn,
    dh): bf16 under bf16 inputs (the products that read them run in bf16, as in the forward), fp32 otherwise:
    fp16's 5-bit exponent cannot hold a state that grows with the sequence (fp16 intermediates did not change the
    fp16 gradient errors on an H200: ddt_bias 1.11e-2 with them, 1.12e-2 without, B1-T3000 lb varlen)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _state_tile(programs: int, V: int, device) -> int:
    """V tile of the sequential forward pass: 64 (fewest redundant loads of W, qg, kd) when that still gives
    every SM a program, else 32 (measured 2.14 ms at B1 T65536 H16 against 2.27 ms for 16)."""
    sms = _sm_count(torch.device(device))
    bv = 64 if programs * triton.cdiv(V, 64) >= sms else 32
    return min(bv, max(16, triton.next_power_of_2(V)))


def _wy_factors(q, k, v, beta, Gc, T_or_L, rstd, outs, cu, idx, opts: KDAOptions, BT: int, invert: bool, far=None):
    """Stage 1b: write outs = (w, u, qg, kd, kg), skipping the None ones (w, qg, kd always present). With
    `invert`, T_or_L holds L and becomes Tinv (stage 1b-i); without it, it already holds Tinv (backward). `far`
    [NT, HV, NK] int8: also write stage 3-fix's per-tile flags (NK K tiles of WY_TILE, stage 3's tiling)."""
    B, T, H, K, HV, V, BK, BV, prec = _dims(q, v, opts)
    w, u, qg, kd, kg = outs
    NT = idx.shape[0]
    BC = min(SUB_CHUNK, BT)
    T_wy = T_or_L
    if invert:
        # bf16 inputs: the products of stage 1b-ii read a bf16 copy of Tinv (bf16 tensor-core products, half the
        # bytes); the backward keeps the fp32 one (its products stay tf32)
        cast = state_dtype(q.dtype) != torch.float32
        T_wy = torch.empty(T_or_L.shape, device=q.device, dtype=state_dtype(q.dtype)) if cast else T_or_L
        launch(kda_wy_inv_kernel, (NT, HV), T_or_L, T_wy, cu, idx, T, H=H, HV=HV, BT=BT, BC=BC,
               INV_PREC=_inverse_precision(q.dtype), CAST_OUT=cast, **WY_INV_LAUNCH)
    BKw, BVw = min(BK, WY_TILE), min(BV, WY_TILE)
    NK = triton.cdiv(K, BKw)
    NJ = NK + (triton.cdiv(V, BVw) if u is not None else 0)
    launch(kda_wy_fwd_kernel, (NT * NJ, HV),
        q, k, v, beta, Gc, T_wy, rstd[0], rstd[1], w, u if u is not None else w, qg, kd,
        kg if kg is not None else w, far if far is not None else w, cu, idx, opts.scale, T,
        H=H, HV=HV, K=K, V=V, BT=BT, BC=BC, BK=BKw, BV=BVw, NK=NK, NJ=NJ,
        USE_L2NORM=opts.use_qk_l2norm, USE_SIGMOID=opts.use_beta_sigmoid, STORE_KG=kg is not None,
        STORE_FAR=far is not None, DOT_PREC=prec, **WY_LAUNCH)


def chunk_kda_fwd(q, k, v, g, beta, A_log, dt_bias, h0, cu_seqlens, opts: KDAOptions, save: bool = True):
    """Forward: returns (o, final_state or None, saved) with saved = (Gc, Aqk, Tinv, rstd, h); without
    `save` (no backward will follow) Tinv and h are empty and never written."""
    B, T, H, K, HV, V, BK, _, prec = _dims(q, v, opts)
    BT = effective_chunk(opts.chunk_size, K)
    cu, idx, offsets, NT = chunk_layout(B, T, cu_seqlens, BT, q.device)
    N = cu.numel() - 1
    f32 = dict(device=q.device, dtype=torch.float32)
    Gc = torch.empty(B, T, HV, K, **f32)
    # A_qk in state_dtype: every product that reads it runs on the 16-bit value (state passes, dv stage), so bf16
    # storage loses nothing and halves its bytes (written once, read by the forward's V tiles and by the backward)
    Aqk = torch.empty(B, T, HV, BT, device=q.device, dtype=state_dtype(q.dtype))
    Tinv = torch.empty(B, T, HV, BT, **f32)  # L from stage 1a, (I + L)^-1 after stage 1b-i
    rstd = torch.empty(2, B, T, HV, **f32) if opts.use_qk_l2norm else torch.empty(2, 1, **f32)
    # the state pass's factors, in the input dtype (fp32 stays fp32)
    w, qg, kd = (torch.empty(B, T, HV, K, device=q.device, dtype=q.dtype) for _ in range(3))
    u = torch.empty(B, T, HV, V, device=q.device, dtype=q.dtype)
    BKi = min(BK, INTRA_BK)
    BC = min(SUB_CHUNK, BT)
    NS = BT // BC
    BKg = min(BK, GATE_BK)
    launch(kda_gate_cumsum_fwd_kernel, (NT, HV, triton.cdiv(K, BKg)),
        g, A_log, dt_bias, Gc, cu, idx, T, H=H, HV=HV, K=K, BT=BT, BK=BKg,
        **_gate_flags(A_log, dt_bias, opts), **GATE_LAUNCH)
    launch(kda_intra_fwd_kernel, (NT * NS, HV),
        q, k, beta, Gc, Aqk, Tinv, rstd[0], rstd[1], cu, idx, opts.scale, T,
        H=H, HV=HV, K=K, BT=BT, BC=BC, BK=BKi, NK=triton.cdiv(K, BKi),
        USE_L2NORM=opts.use_qk_l2norm, USE_SIGMOID=opts.use_beta_sigmoid, DOT_PREC=prec,
        **(INTRA_LAUNCH_FP32 if q.dtype == torch.float32 else
           INTRA_LAUNCH if opts.use_qk_l2norm else INTRA_LAUNCH_NO_L2))
    _wy_factors(q, k, v, beta, Gc, Tinv, rstd, (w, u, qg, kd, None), cu, idx, opts, BT, invert=True)
    o = torch.empty(B, T, HV, V, device=q.device, dtype=v.dtype)
    h = torch.empty(NT, HV, K, V, device=q.device, dtype=state_dtype(q.dtype)) if save else torch.empty(0, **f32)
    ht = torch.empty(N, HV, K, V, **f32) if opts.output_final_state else None
    BVs = _state_tile(N * HV, V, q.device)
    launch(kda_state_fwd_kernel, (triton.cdiv(V, BVs), N * HV),
        w, u, qg, kd, Aqk, Gc, h0, o, h, ht, cu, offsets, T,
        H=H, HV=HV, K=K, V=V, BT=BT, BK=BK, BV=BVs, USE_H0=h0 is not None, STORE_H=save,
        STORE_HT=ht is not None, DOT_PREC=prec, **STATE_FWD_LAUNCH)
    return o, ht, (Gc, Aqk, Tinv if save else torch.empty(0, **f32), rstd, h)


def chunk_kda_bwd(q, k, v, g, beta, A_log, dt_bias, h0, cu_seqlens, saved, do, dht, opts: KDAOptions):
    """Backward: returns (dq, dk, dv, dg, dbeta, dA_log, ddt_bias, dh0); entries are None where the
    matching input is None. Recomputes the WY factors (stage 1b without the inversion), then runs the four
    backward stages; each intermediate is released as soon as its last reader has been launched."""
    B, T, H, K, HV, V, BK, BV, prec = _dims(q, v, opts)
    BT = effective_chunk(opts.chunk_size, K)
    Gc, Aqk, Tinv, rstd, h = saved
    cu, idx, offsets, NT = chunk_layout(B, T, cu_seqlens, BT, q.device)
    N = cu.numel() - 1
    f32 = dict(device=q.device, dtype=torch.float32)
    fac = dict(device=q.device, dtype=state_dtype(q.dtype))
    w, qg, kd, kg = (torch.empty(B, T, HV, K, **fac) for _ in range(4))
    BKt = min(BK, WY_TILE)       # K tile of stage 3 and its fix: stage 1b's, which writes their far flags
    NK = triton.cdiv(K, BKt)
    far = torch.empty(NT, HV, NK, device=q.device, dtype=torch.int8)
    _wy_factors(q, k, v, beta, Gc, Tinv, rstd, (w, None, qg, kd, kg), cu, idx, opts, BT, invert=False, far=far)

    dh = torch.empty(NT, HV, K, V, **fac)
    dh0 = torch.empty(N, HV, K, V, **f32) if h0 is not None else None
    BVs = _state_tile(N * HV, V, q.device)
    launch(kda_state_bwd_kernel, (triton.cdiv(V, BVs), N * HV),
        w, qg, kd, Aqk, Gc, do, dht, dh, dh0, cu, offsets, T, H=H, HV=HV, K=K, V=V, BT=BT, BK=BK, BV=BVs,
        USE_DHT=dht is not None, USE_H0=h0 is not None, DOT_PREC=prec,
        **(STATE_BWD_LAUNCH_FP32 if fac["dtype"] == torch.float32 else STATE_BWD_LAUNCH))
    del w, qg

    dv = torch.empty_like(v)
    vn, dvn = (torch.empty(B, T, HV, V, **fac) for _ in range(2))
    dAqk, dL = (torch.empty(B, T, HV, BT, **f32) for _ in range(2))
    dbeta_t = torch.empty(B, T, HV, **f32)
    launch(kda_dv_bwd_kernel, (NT, HV),
        v, kg, kd, Aqk, Tinv, beta, h, dh, do, dv, vn, dvn, dAqk, dL, dbeta_t, cu, idx, offsets, T,
        H=H, HV=HV, K=K, V=V, BT=BT, BK=BK, BV=min(BV, DV_BWD_TILE),
        USE_SIGMOID=opts.use_beta_sigmoid, DOT_PREC=prec,
        **DV_BWD_LAUNCH)
    del kg, kd

    BC = min(SUB_CHUNK, BT)
    dqn, dkn = (torch.empty(B, T, HV, K, **f32) for _ in range(2))
    dg = torch.empty(B, T, HV, K, device=q.device, dtype=g.dtype)
    # stage 3's dg: the log-decay gradient, which stage 4 takes through the in-kernel gate (fp32 in between)
    dgl = dg if dg.dtype == torch.float32 or not opts.use_gate else torch.empty(B, T, HV, K, **f32)
    dbeta_k = torch.empty(B, T, HV, NK, **f32)
    # the fix's Q terms: in dgl until stage 3 reads them and writes dgl over them (same program, same tile), or in a
    # buffer of their own when dgl is not fp32
    qfix = dgl if dgl.dtype == torch.float32 else torch.empty(B, T, HV, K, **f32)
    launch(kda_intra_fix_bwd_kernel, (NT * NK, HV),
        q, k, beta, Gc, rstd[0], rstd[1], dAqk, dL, far, dqn, dkn, qfix, cu, idx, opts.scale, T,
        H=H, HV=HV, K=K, BT=BT, BC=BC, LOG_BC=BC.bit_length() - 1, BK=BKt, NK=NK, USE_L2NORM=opts.use_qk_l2norm,
        USE_SIGMOID=opts.use_beta_sigmoid, DOT_PREC=prec, **FIX_BWD_LAUNCH)
    launch(kda_intra_bwd_kernel, (NT * NK, HV),
        q, k, beta, Gc, Tinv, rstd[0], rstd[1], h, dh, do, vn, dvn, dAqk, dL,
        dqn, dkn, dgl, dbeta_k, far, qfix, cu, idx, offsets, opts.scale, T,
        H=H, HV=HV, K=K, V=V, BT=BT, BC=BC, BK=BKt, BV=BV, NK=NK,
        USE_L2NORM=opts.use_qk_l2norm, USE_SIGMOID=opts.use_beta_sigmoid, DOT_PREC=prec, **INTRA_BWD_LAUNCH)
    del qfix, vn, dvn, dAqk, dL, dh

    dq, dk = torch.empty_like(q), torch.empty_like(k)
    dbeta = torch.empty(B, T, HV, device=q.device, dtype=beta.dtype)
    BR = 16
    NR = triton.cdiv(B * T, BR)
    # the gate's parameter gradients as per-row-block partials (summed below)
    dA = torch.empty(NR, HV, **f32) if A_log is not None else None
    dbias = torch.empty(NR, HV, K, **f32) if dt_bias is not None else None
    launch(kda_finish_bwd_kernel, (NR, H),
        q, k, beta, rstd[0], rstd[1], dqn, dkn, dbeta_t, dbeta_k, dq, dk, dbeta, g, A_log, dt_bias, dgl, dg,
        dA, dbias, B * T, H=H, HV=HV, K=K, BR=BR, BK=BK, NK=NK, USE_L2NORM=opts.use_qk_l2norm,
        USE_SIGMOID=opts.use_beta_sigmoid, **_gate_flags(A_log, dt_bias, opts), **FINISH_BWD_LAUNCH)
    dA_log = dA.sum(0) if dA is not None else None
    ddt_bias = dbias.sum(0) if dbias is not None else None
    return dq, dk, dv, dg, dbeta, dA_log, ddt_bias, dh0
