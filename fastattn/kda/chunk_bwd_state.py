"""Stage 1 of the chunked KDA backward: the reverse sequential pass over state gradients.

With dS the gradient of the state leaving a chunk: dVn = Aqk^T dO + (k*2^(G_last-G)) dS and the state
entering it gets 2^(G_last) * dS + (scale q*2^G)^T dO - W^T dVn, W = Tinv diag(beta) (k*2^G).
Grid (V tiles, N*HV), chunks in reverse. Reads q, k, beta, Gc, Aqk, Tinv, rstd, dO, dht.
Writes dh [NT, HV, K, V] (gradient of the state leaving every chunk) and dh0.
"""
import triton
import triton.language as tl

from ._common import load_beta, load_state, seq_program, state_tile


@triton.jit
def load_chunk(q, k, beta, Gc, Aqk, Tinv, rstd_q, rstd_k, bos, seq_len, i_c, i_h, i_hv,
               H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
               USE_L2NORM: tl.constexpr, USE_SIGMOID: tl.constexpr):
    """What every later stage reads of chunk i_c, fp32 (G in log2 units, 0 on invalid rows):
    (tok, m_t, q, k normalised, G, G_last, 2^G, k*2^(G_last-G), Tinv, beta, Tb = Tinv diag(beta), Aqk)."""
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    tok = bos + i_c * BT + o_t
    m_t = (i_c * BT + o_t) < seq_len
    last = bos + tl.minimum(i_c * BT + BT, seq_len) - 1
    m = m_t[:, None] & (o_k < K)[None, :]
    o_qk = (tok * H + i_h) * K
    o_g = (tok * HV + i_hv) * K
    b_q = tl.load(q + o_qk[:, None] + o_k[None, :], mask=m, other=0.).to(tl.float32)
    b_k = tl.load(k + o_qk[:, None] + o_k[None, :], mask=m, other=0.).to(tl.float32)
    if USE_L2NORM:
        b_q = b_q * tl.load(rstd_q + tok * HV + i_hv, mask=m_t, other=0.)[:, None]
        b_k = b_k * tl.load(rstd_k + tok * HV + i_hv, mask=m_t, other=0.)[:, None]
    b_G = tl.load(Gc + o_g[:, None] + o_k[None, :], mask=m, other=0.)
    b_gl = tl.load(Gc + (last * HV + i_hv) * K + o_k, mask=o_k < K, other=0.)
    b_eg = tl.exp2(b_G)
    b_kd = tl.where(m_t[:, None], b_k * tl.exp2(b_gl[None, :] - b_G), 0.)
    o_a = (tok * HV + i_hv) * BT
    b_Ti = tl.load(Tinv + o_a[:, None] + o_t[None, :], mask=m_t[:, None], other=0.)
    b_beta = load_beta(beta, tok, m_t, i_hv, HV, USE_SIGMOID)
    b_A = tl.load(Aqk + o_a[:, None] + o_t[None, :], mask=m_t[:, None], other=0.)
    return tok, m_t, b_q, b_k, b_G, b_gl, b_eg, b_kd, b_Ti, b_beta, b_Ti * b_beta[None, :], b_A


@triton.jit
def state_pass_program(cu_seqlens, chunk_offsets, T, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
                       V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Prologue of the two state passes, grid (V tiles, N*HV): (i_nh, i_hv, i_h, bos, seq_len, boh, NT, o_v, m_v,
    o_kv, m_kv); chunks boh ... boh+NT-1 of h / dh belong to this sequence."""
    i_v, i_nh, i_n, i_hv, i_h, bos, seq_len = seq_program(cu_seqlens, T, H, HV, True)
    boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    o_k, o_v, m_k, m_v, m_kv, o_kv = state_tile(i_v, K, V, BK, BV)
    return i_nh, i_hv, i_h, bos, seq_len, boh, tl.cdiv(seq_len, BT), o_v, m_v, o_kv, m_kv


@triton.jit(do_not_specialize=["T"])
def kda_state_bwd_kernel(q, k, beta, Gc, Aqk, Tinv, rstd_q, rstd_k, do, dht, dh, dh0, cu_seqlens, chunk_offsets,
                         scale, T,
                         H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                         BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_L2NORM: tl.constexpr,
                         USE_SIGMOID: tl.constexpr, USE_DHT: tl.constexpr, USE_H0: tl.constexpr,
                         DOT_PREC: tl.constexpr):
    i_nh, i_hv, i_h, bos, seq_len, boh, NT, o_v, m_v, o_kv, m_kv = state_pass_program(
        cu_seqlens, chunk_offsets, T, H, HV, K, V, BT, BK, BV)
    b_dh = load_state(dht, i_nh, o_kv, m_kv, K, V, BK, BV, USE_DHT)
    for i_r in range(0, NT):
        i_c = NT - 1 - i_r
        tl.store(dh + ((boh + i_c) * HV + i_hv) * K * V + o_kv, b_dh, mask=m_kv)
        tok, m_t, b_q, b_k, _, b_gl, b_eg, b_kd, _, _, b_T, b_A = load_chunk(
            q, k, beta, Gc, Aqk, Tinv, rstd_q, rstd_k, bos, seq_len, i_c, i_h, i_hv,
            H, HV, K, BT, BK, USE_L2NORM, USE_SIGMOID)
        m_tv = m_t[:, None] & m_v[None, :]
        b_do = tl.load(do + ((tok * HV + i_hv) * V)[:, None] + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)

        b_w = tl.dot(b_T, b_k * b_eg, input_precision=DOT_PREC)
        b_dvn = tl.dot(tl.trans(b_A), b_do, input_precision=DOT_PREC) + tl.dot(b_kd, b_dh, input_precision=DOT_PREC)
        b_dh = (b_dh * tl.exp2(b_gl)[:, None]
                + tl.dot(tl.trans(b_q * b_eg * scale), b_do, input_precision=DOT_PREC)
                - tl.dot(tl.trans(b_w), b_dvn, input_precision=DOT_PREC))
    if USE_H0:
        tl.store(dh0 + i_nh * K * V + o_kv, b_dh, mask=m_kv)
