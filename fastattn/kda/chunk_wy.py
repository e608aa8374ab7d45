"""Stage 1b of the chunked KDA forward: the WY factors of one chunk.

Tinv = (I + L)^-1 by recursive block inversion ([[A, 0], [B, C]] -> D - D B D, D the inverse of its diagonal
s-blocks, s = 1, 2, 4, ...); Tb = Tinv diag(beta), W = Tb (k 2^G), U = Tb v, qg = scale q 2^G, kd = k 2^(G_last - G).
Grid (chunks, HV). Reads L (Tinv in place when SAVE_T; already Tinv without INVERT), q, k, v, beta, Gc, rstd;
writes w, qg, kd [T, HV, K], u [T, HV, V] (STORE_U) and kg = k 2^G (STORE_KG) in the output buffers' dtype.
"""
import triton
import triton.language as tl

from ._common import chunk_program, load_beta, load_rstd, row_tile


@triton.jit(do_not_specialize=["T"])
def kda_wy_fwd_kernel(q, k, v, beta, Gc, L, rstd_q, rstd_k, w, u, qg, kd, kg, cu_seqlens, chunk_indices, scale, T,
                      H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, USE_L2NORM: tl.constexpr, USE_SIGMOID: tl.constexpr,
                      INVERT: tl.constexpr, SAVE_T: tl.constexpr, STORE_U: tl.constexpr, STORE_KG: tl.constexpr,
                      DOT_PREC: tl.constexpr, INV_PREC: tl.constexpr):
    i_t, i_n, i_c, i_hv, i_h, bos, seq_len, tok, m_t = chunk_program(chunk_indices, cu_seqlens, H, HV, BT)
    o_t = tl.arange(0, BT)
    row = bos + i_c * BT                           # first token of the chunk (int64 bases, int32 tiles)
    p_a, m_a = row_tile(L + row * HV * BT + i_hv * BT, o_t, m_t, HV * BT, 0, BT, BT)
    b_L = tl.load(p_a, mask=m_a, other=0.)

    if INVERT:
        b_D = tl.where(o_t[:, None] == o_t[None, :], 1., 0.)
        for i_l in tl.static_range(0, 8):
            if (1 << i_l) < BT:
                s = 1 << i_l
                # B: rows of the lower s-block, columns of the upper s-block, inside each 2s-block
                m_s = ((o_t // (2 * s))[:, None] == (o_t // (2 * s))[None, :]) & ((o_t // s) % 2 == 1)[:, None]
                b_B = tl.where(m_s & ((o_t // s) % 2 == 0)[None, :], b_L, 0.)
                b_D = b_D - tl.dot(b_D, tl.dot(b_B, b_D, input_precision=INV_PREC), input_precision=INV_PREC)
        if SAVE_T:
            tl.store(p_a, b_D, mask=m_a)
    else:
        b_D = b_L

    b_beta = load_beta(beta, tok, m_t, i_hv, HV, USE_SIGMOID)
    b_rq, b_rk = load_rstd(rstd_q, rstd_k, tok, m_t, i_hv, HV, BT, USE_L2NORM)
    b_Tb = b_D * b_beta[None, :]
    last = bos + tl.minimum(i_c * BT + BT, seq_len) - 1
    q_b = q + row * H * K + i_h * K
    k_b = k + row * H * K + i_h * K
    x_b = row * HV * K + i_hv * K
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        p_x, m = row_tile(q_b, o_t, m_t, H * K, i_k * BK, K, BK)
        b_q = tl.load(p_x, mask=m, other=0.).to(tl.float32) * b_rq[:, None]
        p_x, m = row_tile(k_b, o_t, m_t, H * K, i_k * BK, K, BK)
        b_k = tl.load(p_x, mask=m, other=0.).to(tl.float32) * b_rk[:, None]
        p_x, m = row_tile(Gc + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
        b_G = tl.load(p_x, mask=m, other=0.)
        b_gl = tl.load(Gc + (last * HV + i_hv) * K + o_k, mask=o_k < K, other=0.)
        b_eg = tl.exp2(b_G)
        b_w = tl.dot(b_Tb, b_k * b_eg, input_precision=DOT_PREC)
        if STORE_KG:
            p_x, m = row_tile(kg + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
            tl.store(p_x, (b_k * b_eg).to(kg.dtype.element_ty), mask=m)
        p_x, m = row_tile(w + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
        tl.store(p_x, b_w.to(w.dtype.element_ty), mask=m)
        p_x, m = row_tile(qg + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
        tl.store(p_x, (b_q * b_eg * scale).to(qg.dtype.element_ty), mask=m)
        p_x, m = row_tile(kd + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
        tl.store(p_x, (b_k * tl.exp2(tl.minimum(b_gl[None, :] - b_G, 0.))).to(kd.dtype.element_ty), mask=m)
    if STORE_U:
        for i_v in range(tl.cdiv(V, BV)):
            p_v, m = row_tile(v + row * HV * V + i_hv * V, o_t, m_t, HV * V, i_v * BV, V, BV)
            b_u = tl.dot(b_Tb, tl.load(p_v, mask=m, other=0.).to(tl.float32), input_precision=DOT_PREC)
            p_u, m = row_tile(u + row * HV * V + i_hv * V, o_t, m_t, HV * V, i_v * BV, V, BV)
            tl.store(p_u, b_u.to(u.dtype.element_ty), mask=m)
