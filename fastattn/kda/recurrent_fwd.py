"""Token-by-token KDA forward; with STORE_CKPT it is also the checkpoint sweep of the backward.

State S [K, V] fp32 in registers; per token: S <- 2^(log2e g) S (exponent <= 0), w = beta (v - S^T k), S <- S + k w^T,
o = S^T (scale q); l2norm, gate and beta sigmoid in-kernel. Grid (V tiles of BV, N*HV): S's columns are independent,
a program holds all of K for BV columns and walks its sequence. Reads q, k, v, g, beta, A_log, dt_bias, h0; writes o,
the final state ht and (STORE_CKPT) the state entering every BS-token segment into ckpt.
"""
import triton
import triton.language as tl

from .._launch import launch
from ._common import LOG2E, gate_fwd, l2norm_rstd, load_gate_params, load_state, seq_program, state_tile


@triton.jit
def load_kgbv(k, g, beta, v, tok, i_h, i_hv, o_k, m_k, o_v, m_v, b_a, b_bias,
              H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
              USE_L2NORM: tl.constexpr, USE_SIGMOID: tl.constexpr, USE_GATE: tl.constexpr,
              HAS_LB: tl.constexpr, LB: tl.constexpr):
    """Inputs of one token's state update in fp32: (k as used, natural log-decay g, beta, v tile)."""
    b_k = tl.load(k + (tok * H + i_h) * K + o_k, mask=m_k, other=0.).to(tl.float32)
    if USE_L2NORM:
        b_k = b_k * l2norm_rstd(b_k[None, :])
    b_g = tl.load(g + (tok * HV + i_hv) * K + o_k, mask=m_k, other=0.).to(tl.float32)
    if USE_GATE:
        b_g = gate_fwd(b_g, b_a, b_bias, HAS_LB, LB)
    b_b = tl.load(beta + tok * HV + i_hv).to(tl.float32)
    if USE_SIGMOID:
        b_b = tl.sigmoid(b_b)
    b_v = tl.load(v + (tok * HV + i_hv) * V + o_v, mask=m_v, other=0.).to(tl.float32)
    return b_k, b_g, b_b, b_v


@triton.jit(do_not_specialize=["T"])
def kda_recurrent_fwd_kernel(q, k, v, g, beta, A_log, dt_bias, h0, o, ht, ckpt, cu_seqlens, ckpt_offsets, scale, T,
                             H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                             BK: tl.constexpr, BV: tl.constexpr, BS: tl.constexpr,
                             USE_L2NORM: tl.constexpr, USE_SIGMOID: tl.constexpr, USE_GATE: tl.constexpr,
                             HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LB: tl.constexpr, LB: tl.constexpr,
                             USE_H0: tl.constexpr, STORE_O: tl.constexpr, STORE_HT: tl.constexpr,
                             STORE_CKPT: tl.constexpr, IS_VARLEN: tl.constexpr):
    i_v, i_nh, i_n, i_hv, i_h, bos, seq_len = seq_program(cu_seqlens, T, H, HV, IS_VARLEN)
    if STORE_CKPT:
        if IS_VARLEN:
            seg0 = tl.load(ckpt_offsets + i_n).to(tl.int64)
        else:
            seg0 = i_n * tl.cdiv(T, BS)

    o_k, o_v, m_k, m_v, m_kv, o_kv = state_tile(i_v, K, V, BK, BV)
    b_a, b_bias = load_gate_params(A_log, dt_bias, i_hv, o_k, m_k, K, BK, HAS_A, HAS_BIAS)

    b_h = load_state(h0, i_nh, o_kv, m_kv, K, V, BK, BV, USE_H0)
    for i_s in range(0, tl.cdiv(seq_len, BS)):
        if STORE_CKPT:
            tl.store(ckpt + ((seg0 + i_s) * HV + i_hv) * K * V + o_kv, b_h, mask=m_kv)
        for i_t in range(i_s * BS, tl.minimum(i_s * BS + BS, seq_len)):
            tok = bos + i_t
            b_k, b_g, b_b, b_v = load_kgbv(k, g, beta, v, tok, i_h, i_hv, o_k, m_k, o_v, m_v, b_a, b_bias,
                                           H, HV, K, V, USE_L2NORM, USE_SIGMOID, USE_GATE, HAS_LB, LB)
            b_h = b_h * tl.exp2(b_g * LOG2E)[:, None]
            b_w = b_b * (b_v - tl.sum(b_h * b_k[:, None], axis=0))
            b_h += b_k[:, None] * b_w[None, :]
            if STORE_O:
                b_q = tl.load(q + (tok * H + i_h) * K + o_k, mask=m_k, other=0.).to(tl.float32)
                if USE_L2NORM:
                    b_q = b_q * l2norm_rstd(b_q[None, :])
                b_o = tl.sum(b_h * (b_q * scale)[:, None], axis=0)
                tl.store(o + (tok * HV + i_hv) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_HT:
        tl.store(ht + i_nh * K * V + o_kv, b_h, mask=m_kv)


def launch_recurrent_fwd(q, k, v, g, beta, A_log, dt_bias, h0, o, ht, ckpt, cu_seqlens, ckpt_offsets, opts,
                         BS: int):
    """Launch the forward kernel; any of o, ht, ckpt may be None (not stored)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BK = triton.next_power_of_2(K)
    BV = min(32, triton.next_power_of_2(V))
    launch(kda_recurrent_fwd_kernel, (triton.cdiv(V, BV), N * HV),
        q, k, v, g, beta, A_log, dt_bias, h0, o, ht, ckpt, cu_seqlens, ckpt_offsets, opts.scale, T,
        H=H, HV=HV, K=K, V=V, BK=BK, BV=BV, BS=BS, USE_L2NORM=opts.use_qk_l2norm,
        USE_SIGMOID=opts.use_beta_sigmoid, USE_GATE=opts.use_gate, HAS_A=A_log is not None,
        HAS_BIAS=dt_bias is not None, HAS_LB=opts.has_lower_bound,
        LB=opts.lower_bound if opts.has_lower_bound else 0.0, USE_H0=h0 is not None, STORE_O=o is not None,
        STORE_HT=ht is not None, STORE_CKPT=ckpt is not None, IS_VARLEN=cu_seqlens is not None,
        num_warps=4 if BK * BV >= 4096 else 2)
