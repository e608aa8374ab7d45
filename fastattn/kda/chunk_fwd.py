"""Stage 2 of the chunked KDA forward: the sequential state pass with the output fused in.

Per chunk, with S the state entering it and Tb = Tinv diag(beta): W = Tb (k*2^G), U = Tb v, Vn = U - W S,
O = (scale q*2^G) S + Aqk Vn, S <- 2^(G_last) * S + (k*2^(G_last-G))^T Vn. All exponents <= 0.
Grid (V tiles, N*HV), a loop over the chunks of one sequence. Reads q, k, v, beta, Gc, Aqk, Tinv, rstd, h0.
Writes o, the state entering every chunk h [NT, HV, K, V] (for the backward) and the final state.
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
def kda_state_fwd_kernel(q, k, v, beta, Gc, Aqk, Tinv, rstd_q, rstd_k, h0, o, h, ht, cu_seqlens, chunk_offsets, scale, T,
                         H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                         BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_L2NORM: tl.constexpr,
                         USE_SIGMOID: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr, DOT_PREC: tl.constexpr):
    i_nh, i_hv, i_h, bos, seq_len, boh, NT, o_v, m_v, o_kv, m_kv = state_pass_program(
        cu_seqlens, chunk_offsets, T, H, HV, K, V, BT, BK, BV)
    b_h = load_state(h0, i_nh, o_kv, m_kv, K, V, BK, BV, USE_H0)
    for i_c in range(0, NT):
        tl.store(h + ((boh + i_c) * HV + i_hv) * K * V + o_kv, b_h, mask=m_kv)
        tok, m_t, b_q, b_k, _, b_gl, b_eg, b_kd, _, _, b_T, b_A = load_chunk(
            q, k, beta, Gc, Aqk, Tinv, rstd_q, rstd_k, bos, seq_len, i_c, i_h, i_hv,
            H, HV, K, BT, BK, USE_L2NORM, USE_SIGMOID)
        m_tv = m_t[:, None] & m_v[None, :]
        o_tv = (tok * HV + i_hv) * V
        b_v = tl.load(v + o_tv[:, None] + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)

        b_w = tl.dot(b_T, b_k * b_eg, input_precision=DOT_PREC)
        b_vn = tl.dot(b_T, b_v, input_precision=DOT_PREC) - tl.dot(b_w, b_h, input_precision=DOT_PREC)
        b_o = tl.dot(b_q * b_eg * scale, b_h, input_precision=DOT_PREC) + tl.dot(b_A, b_vn, input_precision=DOT_PREC)
        tl.store(o + o_tv[:, None] + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_tv)
        b_h = b_h * tl.exp2(b_gl)[:, None] + tl.dot(tl.trans(b_kd), b_vn, input_precision=DOT_PREC)
    if STORE_HT:
        tl.store(ht + i_nh * K * V + o_kv, b_h, mask=m_kv)
