"""Stage 1b-ii of the chunked KDA forward: the WY factors of one chunk, one K or V tile per program.

Tb = Tinv diag(beta); K tile: W = Tb (k 2^G), qg = scale q 2^G, kd = k 2^(G_last - G), kg = k 2^G (STORE_KG);
V tile: U = Tb v (STORE_U). Grid (chunks * (NK + NV), HV), a chunk's tile programs adjacent (Tinv read once from
HBM, then from L2). Reads Tinv [T, HV, BT] (stage 1b-i; a bf16 copy gives bf16 products), q, k, v, beta, Gc, rstd;
writes w, qg, kd [T, HV, K], u [T, HV, V] and kg in the output buffers' dtype (STORE_FAR: far_rows flags).
"""
import triton
import triton.language as tl

from ._common import chunk_tile_program, load_beta, load_rstd, load_row_tile, row_tile
from .chunk_intra import far_rows


@triton.jit(do_not_specialize=["T"])
def kda_wy_fwd_kernel(q, k, v, beta, Gc, Tinv, rstd_q, rstd_k, w, u, qg, kd, kg, far, cu_seqlens, chunk_indices,
                      scale, T, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                      BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, NJ: tl.constexpr,
                      USE_L2NORM: tl.constexpr, USE_SIGMOID: tl.constexpr, STORE_KG: tl.constexpr,
                      STORE_FAR: tl.constexpr, DOT_PREC: tl.constexpr):
    i_j, i_t, i_n, i_c, i_hv, i_h, bos, seq_len, tok, m_t = chunk_tile_program(chunk_indices, cu_seqlens, H, HV, BT,
                                                                              NJ)
    o_t = tl.arange(0, BT)
    row = bos + i_c * BT                           # first token of the chunk (int64 bases, int32 tiles)
    p_a, m_a = row_tile(Tinv + row * HV * BT + i_hv * BT, o_t, m_t, HV * BT, 0, BT, BT)
    b_Ti = tl.load(p_a, mask=m_a, other=0.)        # 16-bit under bf16 inputs: the products run on 16-bit operands
    b_beta = load_beta(beta, tok, m_t, i_hv, HV, USE_SIGMOID)[:, None]
    if i_j < NK:
        c0 = i_j * BK
        b_rq, b_rk = load_rstd(rstd_q, rstd_k, tok, m_t, i_hv, HV, BT, USE_L2NORM)
        last = bos + tl.minimum(i_c * BT + BT, seq_len) - 1
        x_b = row * HV * K + i_hv * K
        o_k = c0 + tl.arange(0, BK)
        b_k, m = load_row_tile(k + row * H * K + i_h * K, o_t, m_t, H * K, c0, K, BK)
        b_k = b_k * b_rk[:, None]
        b_G, m = load_row_tile(Gc + x_b, o_t, m_t, HV * K, c0, K, BK)
        if STORE_FAR:   # the backward's stage 3-fix works only on tiles with rows past the anchor cap
            m_far = far_rows(Gc + x_b, b_G, o_t, m_t, m, c0, HV, K, BC, BK)
            tl.store(far + (i_t * HV + i_hv) * NK + i_j, (tl.max(m_far.to(tl.int32), axis=0) > 0).to(tl.int8))
        b_gl = tl.load(Gc + (last * HV + i_hv) * K + o_k, mask=o_k < K, other=0.)
        b_eg = tl.exp2(b_G)
        b_w = tl.dot(b_Ti, (b_beta * b_k * b_eg).to(b_Ti.dtype), input_precision=DOT_PREC)
        if STORE_KG:
            p_x, m = row_tile(kg + x_b, o_t, m_t, HV * K, c0, K, BK)
            tl.store(p_x, (b_k * b_eg).to(kg.dtype.element_ty), mask=m)
        p_x, m = row_tile(kd + x_b, o_t, m_t, HV * K, c0, K, BK)
        tl.store(p_x, (b_k * tl.exp2(tl.minimum(b_gl[None, :] - b_G, 0.))).to(kd.dtype.element_ty), mask=m)
        b_q, m = load_row_tile(q + row * H * K + i_h * K, o_t, m_t, H * K, c0, K, BK)
        b_q = b_q * b_rq[:, None]
        p_x, m = row_tile(qg + x_b, o_t, m_t, HV * K, c0, K, BK)
        tl.store(p_x, (b_q * b_eg * scale).to(qg.dtype.element_ty), mask=m)
        p_x, m = row_tile(w + x_b, o_t, m_t, HV * K, c0, K, BK)
        tl.store(p_x, b_w.to(w.dtype.element_ty), mask=m)
    else:
        # names of their own: the K branch's tiles are [BT, BK], these [BT, BV]
        p_v, m_v = row_tile(v + row * HV * V + i_hv * V, o_t, m_t, HV * V, (i_j - NK) * BV, V, BV)
        b_u = tl.dot(b_Ti, (b_beta * tl.load(p_v, mask=m_v, other=0.).to(tl.float32)).to(b_Ti.dtype),
                     input_precision=DOT_PREC)
        p_v, m_v = row_tile(u + row * HV * V + i_hv * V, o_t, m_t, HV * V, (i_j - NK) * BV, V, BV)
        tl.store(p_v, b_u.to(u.dtype.element_ty), mask=m_v)
