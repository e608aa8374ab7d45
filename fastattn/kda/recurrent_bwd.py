"""Token-by-token KDA backward: reverse-time sweep over BS-token segments, states recomputed, never inverted.

Per segment (last first): reload its checkpointed entry state, replay it forward storing each S_{t-1} to scratch, then
step back from dht: dS += q~ do^T; dq~ = S_t do; dw = dS^T k; dbeta = dw.e; dv = de = beta dw; dk = dS w - S~ de;
dS~ = dS - k de^T; dg = rowsum(dS~ * S~); dS_{t-1} = 2^(log2e g) dS~; l2norm, gate, sigmoid backward in-kernel. Grid
(V tiles, N*HV). Reads q, k, v, g, beta, A_log, dt_bias, ckpt, do, dht; writes dv, dh0, fp32 per-V-tile partials.
"""
import torch
import triton
import triton.language as tl

from .._launch import launch
from ._common import (LOG2E, gate_bwd, gate_fwd, l2norm_bwd, l2norm_rstd, load_gate_params, load_state,
                      seq_program, state_tile)
from .recurrent_fwd import load_kgbv


@triton.jit(do_not_specialize=["T", "SB"])
def kda_recurrent_bwd_kernel(q, k, v, g, beta, A_log, dt_bias, ckpt, scratch, do, dht,
                             dq, dk, dv, dg, dbeta, dA, dbias, dh0, cu_seqlens, ckpt_offsets, scale, T, SB,
                             H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                             BK: tl.constexpr, BV: tl.constexpr, BS: tl.constexpr,
                             USE_L2NORM: tl.constexpr, USE_SIGMOID: tl.constexpr, USE_GATE: tl.constexpr,
                             HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LB: tl.constexpr, LB: tl.constexpr,
                             USE_DHT: tl.constexpr, USE_H0: tl.constexpr, IS_VARLEN: tl.constexpr):
    i_v, i_nh, i_n, i_hv, i_h, bos, seq_len = seq_program(cu_seqlens, T, H, HV, IS_VARLEN)
    NV = tl.num_programs(0).to(tl.int64)
    if IS_VARLEN:
        seg0 = tl.load(ckpt_offsets + i_n).to(tl.int64)
    else:
        seg0 = i_n * tl.cdiv(T, BS)

    o_k, o_v, m_k, m_v, m_kv, o_kv = state_tile(i_v, K, V, BK, BV)
    p_scr = scratch + i_nh * SB * K * V
    b_a, b_bias = load_gate_params(A_log, dt_bias, i_hv, o_k, m_k, K, BK, HAS_A, HAS_BIAS)

    b_dh = load_state(dht, i_nh, o_kv, m_kv, K, V, BK, BV, USE_DHT)
    b_dA = tl.zeros([BK], dtype=tl.float32)
    b_db = tl.zeros([BK], dtype=tl.float32)
    NS = tl.cdiv(seq_len, BS)
    for i_r in range(0, NS):
        t0 = (NS - 1 - i_r) * BS
        L = tl.minimum(seq_len - t0, BS)
        # replay the segment forward from its checkpoint, keeping every entry state S_{t-1}
        b_h = tl.load(ckpt + ((seg0 + NS - 1 - i_r) * HV + i_hv) * K * V + o_kv, mask=m_kv, other=0.)
        for j in range(0, L):
            tl.store(p_scr + j * K * V + o_kv, b_h, mask=m_kv)
            b_k, b_g, b_b, b_v = load_kgbv(k, g, beta, v, bos + t0 + j, i_h, i_hv, o_k, m_k, o_v, m_v, b_a, b_bias,
                                           H, HV, K, V, USE_L2NORM, USE_SIGMOID, USE_GATE, HAS_LB, LB)
            b_h = b_h * tl.exp2(b_g * LOG2E)[:, None]
            b_h += b_k[:, None] * (b_b * (b_v - tl.sum(b_h * b_k[:, None], axis=0)))[None, :]
        tl.debug_barrier()  # the scratch rows were written by other threads of this program
        for j_r in range(0, L):
            tok = bos + t0 + L - 1 - j_r
            o_qk = (tok * H + i_h) * K + o_k
            o_tv = (tok * HV + i_hv) * V + o_v
            b_qx = tl.load(q + o_qk, mask=m_k, other=0.).to(tl.float32)
            b_kx = tl.load(k + o_qk, mask=m_k, other=0.).to(tl.float32)
            b_q, b_k = b_qx, b_kx
            if USE_L2NORM:
                b_rq = l2norm_rstd(b_qx[None, :])
                b_rk = l2norm_rstd(b_kx[None, :])
                b_q, b_k = b_qx * b_rq, b_kx * b_rk
            b_gx = tl.load(g + (tok * HV + i_hv) * K + o_k, mask=m_k, other=0.).to(tl.float32)
            b_g = b_gx
            if USE_GATE:
                b_g = gate_fwd(b_gx, b_a, b_bias, HAS_LB, LB)
            b_b = tl.load(beta + tok * HV + i_hv).to(tl.float32)
            if USE_SIGMOID:
                b_b = tl.sigmoid(b_b)
            b_v = tl.load(v + o_tv, mask=m_v, other=0.).to(tl.float32)
            b_do = tl.load(do + o_tv, mask=m_v, other=0.).to(tl.float32)
            # recompute this step from the stored entry state S_{t-1}
            b_hd = tl.load(p_scr + (L - 1 - j_r) * K * V + o_kv, mask=m_kv, other=0.)
            b_hd = b_hd * tl.exp2(b_g * LOG2E)[:, None]
            b_e = b_v - tl.sum(b_hd * b_k[:, None], axis=0)
            b_w = b_b * b_e
            b_h = b_hd + b_k[:, None] * b_w[None, :]
            # step back: b_dh holds dL/dS_t, then dL/dS~, then dL/dS_{t-1}
            b_dh += (b_q * scale)[:, None] * b_do[None, :]
            b_dq = tl.sum(b_h * b_do[None, :], axis=1) * scale
            b_dw = tl.sum(b_dh * b_k[:, None], axis=0)
            b_dbeta = tl.sum(b_dw * b_e, axis=0)
            b_de = b_b * b_dw
            b_dk = tl.sum(b_dh * b_w[None, :] - b_hd * b_de[None, :], axis=1)
            b_dh -= b_k[:, None] * b_de[None, :]
            b_dg = tl.sum(b_dh * b_hd, axis=1)
            b_dh = b_dh * tl.exp2(b_g * LOG2E)[:, None]

            tl.store(dv + o_tv, b_de.to(dv.dtype.element_ty), mask=m_v)
            if USE_L2NORM:
                b_dq = tl.reshape(l2norm_bwd(b_qx[None, :], b_rq, b_dq[None, :]), [BK])
                b_dk = tl.reshape(l2norm_bwd(b_kx[None, :], b_rk, b_dk[None, :]), [BK])
            if USE_GATE:
                b_dg, b_dal = gate_bwd(b_gx, b_a, b_bias, b_dg, HAS_LB, LB)
                b_dA += tl.where(m_k, b_dal, 0.)
                b_db += tl.where(m_k, b_dg, 0.)
            if USE_SIGMOID:
                b_dbeta = b_dbeta * b_b * (1. - b_b)
            o_p = ((tok * HV + i_hv) * NV + i_v) * K + o_k
            tl.store(dq + o_p, b_dq, mask=m_k)
            tl.store(dk + o_p, b_dk, mask=m_k)
            tl.store(dg + o_p, b_dg, mask=m_k)
            tl.store(dbeta + (tok * HV + i_hv) * NV + i_v, b_dbeta)
        tl.debug_barrier()  # the next segment overwrites the scratch
    if USE_H0:
        tl.store(dh0 + i_nh * K * V + o_kv, b_dh, mask=m_kv)
    if HAS_A:
        tl.store(dA + (i_nh * NV + i_v) * K + o_k, b_dA, mask=m_k)
    if HAS_BIAS:
        tl.store(dbias + (i_nh * NV + i_v) * K + o_k, b_db, mask=m_k)


def launch_recurrent_bwd(q, k, v, g, beta, A_log, dt_bias, h0, ckpt, cu_seqlens, ckpt_offsets, do, dht, opts,
                         BS: int):
    """Run the backward kernel and reduce its partials; returns (dq, dk, dv, dg, dbeta, dA_log, ddt_bias, dh0)
    in the dtypes of the inputs (None where the input is None)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BK = triton.next_power_of_2(K)
    BV = min(32, triton.next_power_of_2(V))
    NV = triton.cdiv(V, BV)
    SB = min(BS, T)
    f32 = dict(device=q.device, dtype=torch.float32)
    scratch = torch.empty(N * HV, SB, K, V, **f32)
    dq = torch.empty(B, T, HV, NV, K, **f32)
    dk = torch.empty(B, T, HV, NV, K, **f32)
    dg = torch.empty(B, T, HV, NV, K, **f32)
    dbeta = torch.empty(B, T, HV, NV, **f32)
    dv = torch.empty_like(v)
    dA = torch.empty(N, HV, NV, K, **f32) if A_log is not None else None
    dbias = torch.empty(N, HV, NV, K, **f32) if dt_bias is not None else None
    dh0 = torch.empty(N, HV, K, V, **f32) if h0 is not None else None
    launch(kda_recurrent_bwd_kernel, (NV, N * HV),
        q, k, v, g, beta, A_log, dt_bias, ckpt, scratch, do, dht, dq, dk, dv, dg, dbeta, dA, dbias, dh0,
        cu_seqlens, ckpt_offsets, opts.scale, T, SB, H=H, HV=HV, K=K, V=V, BK=BK, BV=BV, BS=BS,
        USE_L2NORM=opts.use_qk_l2norm, USE_SIGMOID=opts.use_beta_sigmoid, USE_GATE=opts.use_gate,
        HAS_A=A_log is not None, HAS_BIAS=dt_bias is not None, HAS_LB=opts.has_lower_bound,
        LB=opts.lower_bound if opts.has_lower_bound else 0.0, USE_DHT=dht is not None, USE_H0=h0 is not None,
        IS_VARLEN=cu_seqlens is not None, num_warps=4 if BK <= 64 else 8)
    G = HV // H
    dq = dq.view(B, T, H, G * NV, K).sum(3).to(q.dtype)
    dk = dk.view(B, T, H, G * NV, K).sum(3).to(k.dtype)
    dA_log = dA.sum((0, 2, 3)) if dA is not None else None
    ddt_bias = dbias.sum((0, 2)) if dbias is not None else None
    return dq, dk, dv, dg.sum(3).to(g.dtype), dbeta.sum(3).to(beta.dtype), dA_log, ddt_bias, dh0
