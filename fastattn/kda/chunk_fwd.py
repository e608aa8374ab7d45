"""Stage 2 of the chunked KDA forward: the sequential state pass with the output fused in.

Per chunk, with S the state entering it and Tb = Tinv diag(beta): W = Tb (k*2^G), U = Tb v, Vn = U - W S,
O = (scale q*2^G) S + Aqk Vn, S <- 2^(G_last) * S + (k*2^(G_last-G))^T Vn. All exponents <= 0.
Grid (V tiles, N*HV), a loop over the chunks of one sequence. Reads q, k, v, beta, Gc, Aqk, Tinv, rstd, h0.
Writes o, the state entering every chunk h [NT, HV, K, V] (for the backward) and the final state.
"""
import triton
import triton.language as tl


@triton.jit
def load_beta(beta, tok, m_t, i_hv, HV: tl.constexpr, USE_SIGMOID: tl.constexpr):
    """beta of the rows of one chunk in fp32 (0 on invalid rows), through the sigmoid when asked."""
    b_beta = tl.load(beta + tok * HV + i_hv, mask=m_t, other=0.).to(tl.float32)
    if USE_SIGMOID:
        b_beta = tl.where(m_t, tl.sigmoid(b_beta), 0.)
    return b_beta


@triton.jit
def load_chunk_qk(q, k, Gc, rstd_q, rstd_k, tok, m_t, i_h, i_hv, last,
                  H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                  USE_L2NORM: tl.constexpr):
    """Normalised q, k rows of one chunk with their decays: (q, k, G, G_last) in fp32, G in log2 units."""
    o_k = tl.arange(0, BK)
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
    return b_q, b_k, b_G, b_gl


@triton.jit(do_not_specialize=["T"])
def kda_state_fwd_kernel(q, k, v, beta, Gc, Aqk, Tinv, rstd_q, rstd_k, h0, o, h, ht, cu_seqlens, chunk_offsets, scale, T,
                         H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                         BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_L2NORM: tl.constexpr,
                         USE_SIGMOID: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr, DOT_PREC: tl.constexpr):
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

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + (i_n * HV + i_hv) * K * V + o_kv, mask=m_kv, other=0.)
    for i_c in range(0, NT):
        tl.store(h + ((boh + i_c) * HV + i_hv) * K * V + o_kv, b_h, mask=m_kv)
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
        o_tv = (tok * HV + i_hv) * V
        b_v = tl.load(v + o_tv[:, None] + o_v[None, :], mask=m_v, other=0.).to(tl.float32)

        b_w = tl.dot(b_T, b_k * b_eg, input_precision=DOT_PREC)
        b_vn = tl.dot(b_T, b_v, input_precision=DOT_PREC) - tl.dot(b_w, b_h, input_precision=DOT_PREC)
        b_o = tl.dot(b_q * b_eg * scale, b_h, input_precision=DOT_PREC) + tl.dot(b_A, b_vn, input_precision=DOT_PREC)
        tl.store(o + o_tv[:, None] + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_v)
        b_h = b_h * tl.exp2(b_gl)[:, None] + tl.dot(tl.trans(b_kd), b_vn, input_precision=DOT_PREC)
    if STORE_HT:
        tl.store(ht + (i_n * HV + i_hv) * K * V + o_kv, b_h, mask=m_kv)
