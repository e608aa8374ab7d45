"""Stage 3 of the chunked KDA backward: the per-channel gradients of one chunk, one K tile per program.

dqg = dO S^T, dkd = Vn dS^T, dW = -dVn S^T, dkg = Tb^T dW; through Aqk and L (dAqk, dL of stage 2, anchored
sub-blocks) to q, k and G; dg by a reverse cumsum (the gate backward is stage 4's). Grid (chunks * K tiles, HV).
Reads q, k, beta, Gc, Tinv, rstd, h, dh, dO, vn, dvn, dAqk, dL, and where stage 3-fix flagged the tile (far) its
terms in dqn / dkn / qfix. Writes dq, dk before the l2norm backward (fp32), dg, the K-tile partials of dbeta.
"""
import triton
import triton.language as tl

from ._common import chunk_tile_program, load_beta, load_qk_tile, row_tile
from .chunk_intra import DIAG_RANGE


@triton.jit
def decay_products_bwd(dAqk, dL, q, k, beta, Gc, rstd_q, rstd_k, p_pa, p_pl, fixed, b_k, b_G, a_b, row, i_c,
                       seq_len, i_h, i_hv, scale, o_t, c0, o_k, m_k, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
                       BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, USE_L2NORM: tl.constexpr,
                       USE_SIGMOID: tl.constexpr, DOT_PREC: tl.constexpr):
    """For M_ij = sum_d a_id b_jd 2^(G_id - G_jd) with (a, b) = (scale q, k) [Aqk] and (beta k, k) [L]:
    P_A = dMa (k e), P_L = dMl (k e) (left factors, returned through the scratch tiles p_pa / p_pl) and
    Q = dMa^T (scale q e) + dMl^T (beta k e) (right factors, returned).
    One pass per row sub-block s, every factor anchored at row a = s*BC-1 (row 0 for s = 0): the row side
    2^(G_i - G_a) <= 1, the column side 2^(G_a - G_j) <= 1 left of the block and <= 2^DIAG_RANGE inside it;
    rows whose decay since the anchor exceeds that leave their in-block pairs to kda_intra_fix_bwd_kernel, which
    ran first: when it flagged this tile (`fixed`), the scratch tiles already hold its P_A / P_L and are added to."""
    b_qr = tl.zeros([BT, BK], dtype=tl.float32)
    for i_s in range(0, BT // BC):
        o_s = i_s * BC + tl.arange(0, BC)
        m_s = (i_c * BT + o_s) < seq_len
        tok_s = row + o_s
        b_qs, b_ks, m = load_qk_tile(q, k, rstd_q, rstd_k, row, tok_s, m_s, o_s, i_h, i_hv, c0, H, HV, K, BK,
                                     USE_L2NORM)
        b_qs = b_qs * scale
        b_ks = b_ks * load_beta(beta, tok_s, m_s, i_hv, HV, USE_SIGMOID)[:, None]
        p_x, _ = row_tile(Gc + row * HV * K + i_hv * K, o_s, m_s, HV * K, c0, K, BK)
        b_Gs = tl.load(p_x, mask=m, other=0.)
        a_s = i_s * BC - 1 + (i_s == 0)         # the anchor row
        b_ga = tl.load(Gc + (row + a_s) * HV * K + i_hv * K + o_k, mask=m_k & (o_k * 0 + i_c * BT + a_s < seq_len),
                       other=0.)
        b_rng = tl.max(tl.where(m, b_ga[None, :] - b_Gs, 0.), axis=1)
        m_keep = m_s[:, None] & ((o_t < i_s * BC)[None, :] | (b_rng <= DIAG_RANGE)[:, None])
        p_a, _ = row_tile(dAqk + a_b, o_s, m_s, HV * BT, 0, BT, BT)
        b_da = tl.load(p_a, mask=m_keep, other=0.)
        p_a, _ = row_tile(dL + a_b, o_s, m_s, HV * BT, 0, BT, BT)
        b_dl = tl.load(p_a, mask=m_keep, other=0.)
        b_ea = tl.exp2(tl.minimum(b_Gs - b_ga[None, :], 0.))
        b_eb = tl.exp2(tl.minimum(b_ga[None, :] - b_G, DIAG_RANGE))
        b_keb = b_k * b_eb
        o_x = o_s[:, None] * (HV * K) + tl.arange(0, BK)[None, :]
        b_xa = b_ea * tl.dot(b_da, b_keb, input_precision=DOT_PREC)
        b_xl = b_ea * tl.dot(b_dl, b_keb, input_precision=DOT_PREC)
        if fixed:
            b_xa += tl.load(p_pa + o_x, mask=m, other=0.)
            b_xl += tl.load(p_pl + o_x, mask=m, other=0.)
        tl.store(p_pa + o_x, b_xa, mask=m)
        tl.store(p_pl + o_x, b_xl, mask=m)
        b_qr += b_eb * (
            tl.dot(tl.trans(b_da), b_qs * b_ea, input_precision=DOT_PREC)
            + tl.dot(tl.trans(b_dl), b_ks * b_ea, input_precision=DOT_PREC))
    tl.debug_barrier()  # the scratch tiles were written by other threads of this program
    m_all = ((i_c * BT + o_t) < seq_len)[:, None] & m_k[None, :]
    b_pa = tl.load(p_pa + (o_t[:, None] * (HV * K) + tl.arange(0, BK)[None, :]), mask=m_all, other=0.)
    b_pl = tl.load(p_pl + (o_t[:, None] * (HV * K) + tl.arange(0, BK)[None, :]), mask=m_all, other=0.)
    return b_pa, b_pl, b_qr


@triton.jit(do_not_specialize=["T"])
def kda_intra_bwd_kernel(q, k, beta, Gc, Tinv, rstd_q, rstd_k, h, dh, do, vn, dvn, dAqk, dL, dqn, dkn, dg, dbeta,
                         far, qfix, cu_seqlens, chunk_indices, chunk_offsets, scale, T,
                         H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                         BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr,
                         USE_L2NORM: tl.constexpr, USE_SIGMOID: tl.constexpr, DOT_PREC: tl.constexpr):
    i_k, i_t, i_n, i_c, i_hv, i_h, bos, seq_len, tok, m_t = chunk_tile_program(chunk_indices, cu_seqlens, H, HV, BT,
                                                                                NK)
    i_gc = tl.load(chunk_offsets + i_n).to(tl.int64) + i_c
    st = vn.dtype.element_ty
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    n_valid = tl.minimum(BT, seq_len - i_c * BT)
    row = bos + i_c * BT                           # first token of the chunk (int64 bases, int32 tiles)
    x_b = row * HV * K + i_hv * K                  # Gc, g, dqn, dkn, dg
    b_beta = load_beta(beta, tok, m_t, i_hv, HV, USE_SIGMOID)
    a_b = row * HV * BT + i_hv * BT

    # ---- products with the states: dqg = dO S^T, dkd = Vn dS^T, dW = -dVn S^T
    b_dqg = tl.zeros([BT, BK], dtype=tl.float32)
    b_dkd = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_dgl = tl.zeros([BK], dtype=tl.float32)
    s_b = (i_gc * HV + i_hv) * K * V
    v_b = row * HV * V + i_hv * V
    for i_v in range(tl.cdiv(V, BV)):
        p_s, m_s = row_tile(h + s_b, o_k, m_k, V, i_v * BV, V, BV)
        b_h = tl.load(p_s, mask=m_s, other=0.).to(tl.float32)
        p_s, m_s = row_tile(dh + s_b, o_k, m_k, V, i_v * BV, V, BV)
        b_dh = tl.load(p_s, mask=m_s, other=0.).to(tl.float32)
        p_v, m_tv = row_tile(do + v_b, o_t, m_t, HV * V, i_v * BV, V, BV)
        b_do = tl.load(p_v, mask=m_tv, other=0.).to(st)
        p_v, m_tv = row_tile(vn + v_b, o_t, m_t, HV * V, i_v * BV, V, BV)
        b_vn = tl.load(p_v, mask=m_tv, other=0.)
        p_v, m_tv = row_tile(dvn + v_b, o_t, m_t, HV * V, i_v * BV, V, BV)
        b_dvn = tl.load(p_v, mask=m_tv, other=0.)
        b_hs = tl.trans(b_h.to(st))
        b_dqg += tl.dot(b_do, b_hs, input_precision=DOT_PREC)
        b_dw -= tl.dot(b_dvn, b_hs, input_precision=DOT_PREC)
        b_dkd += tl.dot(b_vn, tl.trans(b_dh.to(st)), input_precision=DOT_PREC)
        b_dgl += tl.sum(b_h * b_dh, axis=1)
    p_a, m_a = row_tile(Tinv + a_b, o_t, m_t, HV * BT, 0, BT, BT)
    b_Tb = tl.load(p_a, mask=m_a, other=0.) * b_beta[None, :]
    _, b_k, m = load_qk_tile(q, k, rstd_q, rstd_k, row, tok, m_t, o_t, i_h, i_hv, i_k * BK, H, HV, K, BK,
                             USE_L2NORM)
    p_G, _ = row_tile(Gc + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
    b_G = tl.load(p_G, mask=m, other=0.)
    b_gl = tl.load(Gc + ((row + n_valid - 1) * HV + i_hv) * K + o_k, mask=m_k, other=0.)
    b_dkg = tl.dot(tl.trans(b_Tb), b_dw, input_precision=DOT_PREC)
    # fold the state terms now, so fewer tiles stay live through the decayed products:
    # dqa = P_A + eg dqg, dkn = beta P_L + Q + (eg dkg + ed dkd), dG = ... + k (eg dkg - ed dkd)
    b_eg = tl.exp2(b_G)
    b_ed = tl.where(m_t[:, None], tl.exp2(tl.minimum(b_gl[None, :] - b_G, 0.)), 0.) * b_dkd
    b_dgl = b_dgl * tl.exp2(b_gl) + tl.sum(b_k * b_ed, axis=0)
    b_sq = b_eg * b_dqg
    b_sk = b_eg * b_dkg + b_ed
    b_sg = b_eg * b_dkg - b_ed

    # ---- through the decayed products Aqk and L (the left-factor terms pass through dqn / dkn as scratch)
    p_dq = dqn + x_b + i_k * BK
    p_dk = dkn + x_b + i_k * BK
    fixed = tl.load(far + (i_t * HV + i_hv) * NK + i_k) != 0     # stage 3-fix wrote this tile's in-strip terms
    b_pa, b_pl, b_qr = decay_products_bwd(dAqk, dL, q, k, beta, Gc, rstd_q, rstd_k, p_dq, p_dk, fixed, b_k, b_G,
                                          a_b, row, i_c, seq_len, i_h, i_hv, scale, o_t, i_k * BK, o_k, m_k,
                                          H, HV, K, BT, BC, BK, USE_L2NORM, USE_SIGMOID, DOT_PREC)
    if fixed:
        p_x, _ = row_tile(qfix + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
        b_qr += tl.load(p_x, mask=m, other=0.)
    tl.debug_barrier()  # every thread has read its scratch before the final values overwrite it
    b_dqa = b_pa + b_sq
    b_dkn = b_beta[:, None] * b_pl + b_qr + b_sk
    p_x, _ = row_tile(dqn + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
    tl.store(p_x, scale * b_dqa, mask=m)
    p_x, _ = row_tile(dkn + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
    tl.store(p_x, b_dkn, mask=m)
    tl.store(dbeta + (tok * HV + i_hv) * NK + i_k, tl.sum(b_k * b_pl, axis=1), mask=m_t)

    # ---- gradient of the cumulative decay G (natural-log units), then g = reverse cumsum within the chunk
    b_q, _, _ = load_qk_tile(q, k, rstd_q, rstd_k, row, tok, m_t, o_t, i_h, i_hv, i_k * BK, H, HV, K, BK,
                             USE_L2NORM)         # loaded again here: one tile fewer live through the products above
    b_dG = scale * b_q * b_dqa + b_k * (b_beta[:, None] * b_pl - b_qr + b_sg)
    b_dG += tl.where((o_t == n_valid - 1)[:, None], b_dgl[None, :], 0.)
    b_dG = tl.where(m, b_dG, 0.)
    b_dg = tl.sum(b_dG, axis=0)[None, :] - tl.cumsum(b_dG, axis=0) + b_dG
    p_x, _ = row_tile(dg + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
    tl.store(p_x, b_dg.to(dg.dtype.element_ty), mask=m)
