"""Stage 1 of the chunked KDA backward: the reverse sequential pass over state gradients.

With dS the gradient of the state leaving a chunk: dVn = Aqk^T dO + (k*2^(G_last-G)) dS and the state
entering it gets 2^(G_last) * dS + (scale q*2^G)^T dO - W^T dVn, W = Tinv diag(beta) (k*2^G).
Grid (V tiles, N*HV), chunks in reverse. Reads q, k, beta, Gc, Aqk, Tinv, rstd, dO, dht.
Writes dh [NT, HV, K, V] (gradient of the state leaving every chunk) and dh0.
"""
import triton
import triton.language as tl

from .chunk_fwd import load_beta, load_chunk_qk


@triton.jit(do_not_specialize=["T"])
def kda_state_bwd_kernel(q, k, beta, Gc, Aqk, Tinv, rstd_q, rstd_k, do, dht, dh, dh0, cu_seqlens, chunk_offsets, scale, T,
                         H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                         BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_L2NORM: tl.constexpr,
                         USE_SIGMOID: tl.constexpr, USE_DHT: tl.constexpr, USE_H0: tl.constexpr, DOT_PREC: tl.constexpr):
    i_v, i_nh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    NT = tl.cdiv(seq_len, BT)

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + (i_n * HV + i_hv) * K * V + o_kv, mask=m_kv, other=0.)
    for i_r in range(0, NT):
        i_c = NT - 1 - i_r
        tl.store(dh + ((boh + i_c) * HV + i_hv) * K * V + o_kv, b_dh, mask=m_kv)
        tok = bos + i_c * BT + o_t
        m_t = (i_c * BT + o_t) < seq_len
        last = bos + tl.minimum(i_c * BT + BT, seq_len) - 1
        b_q, b_k, b_G, b_gl = load_chunk_qk(q, k, Gc, rstd_q, rstd_k, tok, m_t, i_h, i_hv, last,
                                            H, HV, K, BK, USE_L2NORM)
        b_eg = tl.exp2(b_G)
        b_kd = tl.where(m_t[:, None], b_k * tl.exp2(b_gl[None, :] - b_G), 0.)
        o_a = (tok * HV + i_hv) * BT
        b_T = tl.load(Tinv + o_a[:, None] + o_t[None, :], mask=m_t[:, None], other=0.)
        b_T = b_T * load_beta(beta, tok, m_t, i_hv, HV, USE_SIGMOID)[None, :]
        b_A = tl.load(Aqk + o_a[:, None] + o_t[None, :], mask=m_t[:, None], other=0.)
        m_v = m_t[:, None] & (o_v < V)[None, :]
        b_do = tl.load(do + ((tok * HV + i_hv) * V)[:, None] + o_v[None, :], mask=m_v, other=0.).to(tl.float32)

        b_w = tl.dot(b_T, b_k * b_eg, input_precision=DOT_PREC)
        b_dvn = tl.dot(tl.trans(b_A), b_do, input_precision=DOT_PREC) + tl.dot(b_kd, b_dh, input_precision=DOT_PREC)
        b_dh = (b_dh * tl.exp2(b_gl)[:, None]
                + tl.dot(tl.trans(b_q * b_eg * scale), b_do, input_precision=DOT_PREC)
                - tl.dot(tl.trans(b_w), b_dvn, input_precision=DOT_PREC))
    if USE_H0:
        tl.store(dh0 + (i_n * HV + i_hv) * K * V + o_kv, b_dh, mask=m_kv)
