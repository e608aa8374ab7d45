"""Stage 3 of the chunked KDA backward: the per-channel gradients of one chunk, one K tile per program.

dqg = dO S^T, dkd = Vn dS^T, dW = -dVn S^T, dkg = Tb^T dW; through Aqk and L (dAqk, dL of stage 2, anchored
sub-blocks) to q, k and G; g by a reverse cumsum, then the gate backward. Grid (chunks, HV, K tiles).
Reads q, k, g, beta, Gc, Tinv, rstd, h, dh, dO, vn, dvn, dAqk, dL. Writes dq, dk before the l2norm backward
(fp32, per value head), dg, dbias and K-tile partials of dbeta and dA_log (finished by stage 4).
"""
import triton
import triton.language as tl

from ._common import chunk_program, gate_bwd, load_beta, load_gate_params, row_tile
from .chunk_intra import DIAG_RANGE


@triton.jit
def diag_pairwise_bwd(b_dMa, b_dMl, b_pa, b_pl, b_qr, q, k, beta, Gc, rstd_q, rstd_k, b_G, bos, i_c, seq_len,
                      i_h, i_hv, scale, o_t, o_k, m_k, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
                      BT: tl.constexpr, BC: tl.constexpr, USE_L2NORM: tl.constexpr, USE_SIGMOID: tl.constexpr):
    """Exact diagonal sub-block terms of the rows whose decay exceeds DIAG_RANGE (dMa / dMl hold only those
    rows): row r against partner p = its block start + c, as the left factor (p <= r) and as the right (p >= r)."""
    m_r = (i_c * BT + o_t) < seq_len
    for c in range(BC):
        o_p = (o_t // BC) * BC + c
        m_p = (i_c * BT + o_p) < seq_len
        tok_p = bos + i_c * BT + o_p
        m2 = m_p[:, None] & m_k[None, :]
        b_qp = tl.load(q + ((tok_p * H + i_h) * K)[:, None] + o_k[None, :], mask=m2, other=0.).to(tl.float32)
        b_kp = tl.load(k + ((tok_p * H + i_h) * K)[:, None] + o_k[None, :], mask=m2, other=0.).to(tl.float32)
        if USE_L2NORM:
            b_qp = b_qp * tl.load(rstd_q + tok_p * HV + i_hv, mask=m_p, other=0.)[:, None]
            b_kp = b_kp * tl.load(rstd_k + tok_p * HV + i_hv, mask=m_p, other=0.)[:, None]
        b_bp = load_beta(beta, tok_p, m_p, i_hv, HV, USE_SIGMOID)
        b_Gp = tl.load(Gc + ((tok_p * HV + i_hv) * K)[:, None] + o_k[None, :], mask=m2, other=0.)
        m_left = m2 & ((o_p <= o_t) & m_r)[:, None]
        b_el = tl.exp2(tl.where(m_left, b_G - b_Gp, float("-inf")))
        m_rp = o_t[None, :] == o_p[:, None]
        b_pa += tl.sum(tl.where(m_rp, b_dMa, 0.), axis=1)[:, None] * b_kp * b_el
        b_pl += tl.sum(tl.where(m_rp, b_dMl, 0.), axis=1)[:, None] * b_kp * b_el
        m_right = m2 & ((o_p >= o_t) & m_r)[:, None]
        b_er = tl.exp2(tl.where(m_right, b_Gp - b_G, float("-inf")))
        m_pr = o_t[:, None] == o_p[None, :]
        b_va = tl.sum(tl.where(m_pr, b_dMa, 0.), axis=0)
        b_vl = tl.sum(tl.where(m_pr, b_dMl, 0.), axis=0)
        b_qr += (b_va[:, None] * b_qp * scale + (b_vl * b_bp)[:, None] * b_kp) * b_er
    return b_pa, b_pl, b_qr


@triton.jit
def decay_products_bwd(dAqk, dL, q, k, beta, Gc, rstd_q, rstd_k, p_pa, p_pl, b_k, b_G, a_b, row, bos, i_c,
                       seq_len, i_h, i_hv, scale, o_t, c0, o_k, m_k, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
                       BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, USE_L2NORM: tl.constexpr,
                       USE_SIGMOID: tl.constexpr, DOT_PREC: tl.constexpr):
    """For M_ij = sum_d a_id b_jd 2^(G_id - G_jd) with (a, b) = (scale q, k) [Aqk] and (beta k, k) [L]:
    P_A = dMa (k e), P_L = dMl (k e) (left factors, returned through the scratch tiles p_pa / p_pl) and
    Q = dMa^T (scale q e) + dMl^T (beta k e) (right factors, returned).
    One pass per row sub-block s, every factor anchored at row a = s*BC-1 (row 0 for s = 0): the row side
    2^(G_i - G_a) <= 1, the column side 2^(G_a - G_j) <= 1 left of the block and <= 2^DIAG_RANGE inside it;
    rows whose decay since the anchor exceeds that get their in-block pairs from the pairwise loop."""
    b_qr = tl.zeros([BT, BK], dtype=tl.float32)
    b_far = 0.
    for i_s in tl.static_range(0, BT // BC):
        o_s = i_s * BC + tl.arange(0, BC)
        m_s = (i_c * BT + o_s) < seq_len
        m = m_s[:, None] & m_k[None, :]
        tok_s = row + o_s
        p_x, _ = row_tile(q + row * H * K + i_h * K, o_s, m_s, H * K, c0, K, BK)
        b_qs = tl.load(p_x, mask=m, other=0.).to(tl.float32) * scale
        p_x, _ = row_tile(k + row * H * K + i_h * K, o_s, m_s, H * K, c0, K, BK)
        b_ks = tl.load(p_x, mask=m, other=0.).to(tl.float32)
        if USE_L2NORM:
            b_qs = b_qs * tl.load(rstd_q + tok_s * HV + i_hv, mask=m_s, other=0.)[:, None]
            b_ks = b_ks * tl.load(rstd_k + tok_s * HV + i_hv, mask=m_s, other=0.)[:, None]
        b_ks = b_ks * load_beta(beta, tok_s, m_s, i_hv, HV, USE_SIGMOID)[:, None]
        p_x, _ = row_tile(Gc + row * HV * K + i_hv * K, o_s, m_s, HV * K, c0, K, BK)
        b_Gs = tl.load(p_x, mask=m, other=0.)
        a_s = i_s * BC - 1 + (i_s == 0)         # the anchor row
        b_ga = tl.load(Gc + (row + a_s) * HV * K + i_hv * K + o_k, mask=m_k & (o_k * 0 + i_c * BT + a_s < seq_len),
                       other=0.)
        b_rng = tl.max(tl.where(m, b_ga[None, :] - b_Gs, 0.), axis=1)
        b_far = tl.maximum(b_far, tl.max(b_rng, axis=0))
        m_keep = m_s[:, None] & ((o_t < i_s * BC)[None, :] | (b_rng <= DIAG_RANGE)[:, None])
        p_a, _ = row_tile(dAqk + a_b, o_s, m_s, HV * BT, 0, BT, BT)
        b_da = tl.load(p_a, mask=m_keep, other=0.)
        p_a, _ = row_tile(dL + a_b, o_s, m_s, HV * BT, 0, BT, BT)
        b_dl = tl.load(p_a, mask=m_keep, other=0.)
        b_ea = tl.exp2(tl.minimum(b_Gs - b_ga[None, :], 0.))
        b_eb = tl.exp2(tl.minimum(b_ga[None, :] - b_G, DIAG_RANGE))
        b_keb = b_k * b_eb
        tl.store(p_pa + (o_s[:, None] * (HV * K) + tl.arange(0, BK)[None, :]),
                 b_ea * tl.dot(b_da, b_keb, input_precision=DOT_PREC), mask=m)
        tl.store(p_pl + (o_s[:, None] * (HV * K) + tl.arange(0, BK)[None, :]),
                 b_ea * tl.dot(b_dl, b_keb, input_precision=DOT_PREC), mask=m)
        b_qr += b_eb * (
            tl.dot(tl.trans(b_da), b_qs * b_ea, input_precision=DOT_PREC)
            + tl.dot(tl.trans(b_dl), b_ks * b_ea, input_precision=DOT_PREC))
    tl.debug_barrier()  # the scratch tiles were written by other threads of this program
    m_all = ((i_c * BT + o_t) < seq_len)[:, None] & m_k[None, :]
    b_pa = tl.load(p_pa + (o_t[:, None] * (HV * K) + tl.arange(0, BK)[None, :]), mask=m_all, other=0.)
    b_pl = tl.load(p_pl + (o_t[:, None] * (HV * K) + tl.arange(0, BK)[None, :]), mask=m_all, other=0.)
    if b_far > DIAG_RANGE:
        b_Ga = tl.zeros([BT, BK], dtype=tl.float32)
        for i_s in tl.static_range(0, BT // BC):
            b_gaf = tl.sum(tl.where((o_t == i_s * BC - 1 + (i_s == 0))[:, None], b_G, 0.), axis=0)
            b_Ga = tl.where((o_t // BC == i_s)[:, None], b_gaf[None, :], b_Ga)
        b_rngf = tl.max(tl.where(m_all, b_Ga - b_G, 0.), axis=1)
        m_far = ((o_t // BC)[:, None] == (o_t // BC)[None, :]) & (b_rngf > DIAG_RANGE)[:, None]
        m_far = m_far & ((i_c * BT + o_t) < seq_len)[:, None]
        o_a = o_t[:, None] * (HV * BT) + o_t[None, :]
        b_dMa = tl.load(dAqk + a_b + o_a, mask=m_far, other=0.)
        b_dMl = tl.load(dL + a_b + o_a, mask=m_far, other=0.)
        b_pa, b_pl, b_qr = diag_pairwise_bwd(b_dMa, b_dMl, b_pa, b_pl, b_qr, q, k, beta, Gc, rstd_q, rstd_k, b_G,
                                             bos, i_c, seq_len, i_h, i_hv, scale, o_t, o_k, m_k, H, HV, K, BT, BC,
                                             USE_L2NORM, USE_SIGMOID)
    return b_pa, b_pl, b_qr


@triton.jit(do_not_specialize=["T"])
def kda_intra_bwd_kernel(q, k, g, beta, A_log, dt_bias, Gc, Tinv, rstd_q, rstd_k, h, dh, do, vn, dvn, dAqk, dL,
                         dqn, dkn, dg, dbeta, dA, dbias, cu_seqlens, chunk_indices, chunk_offsets, scale, T,
                         H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                         BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr,
                         USE_L2NORM: tl.constexpr, USE_SIGMOID: tl.constexpr, USE_GATE: tl.constexpr,
                         HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LB: tl.constexpr, LB: tl.constexpr,
                         DOT_PREC: tl.constexpr):
    i_t, i_n, i_c, i_hv, i_h, bos, seq_len, tok, m_t = chunk_program(chunk_indices, cu_seqlens, H, HV, BT)
    i_k = tl.program_id(2)
    i_gc = tl.load(chunk_offsets + i_n).to(tl.int64) + i_c
    st = vn.dtype.element_ty
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    n_valid = tl.minimum(BT, seq_len - i_c * BT)
    row = bos + i_c * BT                           # first token of the chunk (int64 bases, int32 tiles)
    x_b = row * HV * K + i_hv * K                  # Gc, g, dqn, dkn, dg
    p_x, m = row_tile(q + row * H * K + i_h * K, o_t, m_t, H * K, i_k * BK, K, BK)
    b_q = tl.load(p_x, mask=m, other=0.).to(tl.float32)
    p_x, m = row_tile(k + row * H * K + i_h * K, o_t, m_t, H * K, i_k * BK, K, BK)
    b_k = tl.load(p_x, mask=m, other=0.).to(tl.float32)
    if USE_L2NORM:
        b_q = b_q * tl.load(rstd_q + tok * HV + i_hv, mask=m_t, other=0.)[:, None]
        b_k = b_k * tl.load(rstd_k + tok * HV + i_hv, mask=m_t, other=0.)[:, None]
    p_G, _ = row_tile(Gc + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
    b_G = tl.load(p_G, mask=m, other=0.)
    b_gl = tl.load(Gc + ((row + n_valid - 1) * HV + i_hv) * K + o_k, mask=m_k, other=0.)
    b_eg = tl.exp2(b_G)
    b_ed = tl.where(m_t[:, None], tl.exp2(tl.minimum(b_gl[None, :] - b_G, 0.)), 0.)
    b_beta = load_beta(beta, tok, m_t, i_hv, HV, USE_SIGMOID)
    a_b = row * HV * BT + i_hv * BT
    p_a, m_a = row_tile(Tinv + a_b, o_t, m_t, HV * BT, 0, BT, BT)
    b_Tb = tl.load(p_a, mask=m_a, other=0.) * b_beta[None, :]

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
    b_dkg = tl.dot(tl.trans(b_Tb), b_dw, input_precision=DOT_PREC)

    # ---- through the decayed products Aqk and L (the left-factor terms pass through dqn / dkn as scratch)
    p_dq = dqn + x_b + i_k * BK
    p_dk = dkn + x_b + i_k * BK
    b_pa, b_pl, b_qr = decay_products_bwd(dAqk, dL, q, k, beta, Gc, rstd_q, rstd_k, p_dq, p_dk, b_k, b_G, a_b,
                                          row, bos, i_c, seq_len, i_h, i_hv, scale, o_t, i_k * BK, o_k, m_k,
                                          H, HV, K, BT, BC, BK, USE_L2NORM, USE_SIGMOID, DOT_PREC)
    tl.debug_barrier()  # every thread has read its scratch before the final values overwrite it
    b_dqa = b_pa + b_eg * b_dqg
    b_dkn = b_beta[:, None] * b_pl + b_qr + b_eg * b_dkg + b_ed * b_dkd
    p_x, _ = row_tile(dqn + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
    tl.store(p_x, scale * b_dqa, mask=m)
    p_x, _ = row_tile(dkn + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
    tl.store(p_x, b_dkn, mask=m)
    tl.store(dbeta + (tok * HV + i_hv) * NK + i_k, tl.sum(b_k * b_pl, axis=1), mask=m_t)

    # ---- gradient of the cumulative decay G (natural-log units), then g = reverse cumsum within the chunk
    b_kd = b_k * b_ed
    b_dG = scale * b_q * b_dqa + b_beta[:, None] * b_k * b_pl - b_k * b_qr + b_k * b_eg * b_dkg - b_kd * b_dkd
    b_dgl = b_dgl * tl.exp2(b_gl) + tl.sum(b_kd * b_dkd, axis=0)
    b_dG += tl.where((o_t == n_valid - 1)[:, None], b_dgl[None, :], 0.)
    b_dG = tl.where(m, b_dG, 0.)
    b_dg = tl.sum(b_dG, axis=0)[None, :] - tl.cumsum(b_dG, axis=0) + b_dG
    p_x, _ = row_tile(dg + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
    if USE_GATE:
        p_g, _ = row_tile(g + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
        b_x = tl.load(p_g, mask=m, other=0.).to(tl.float32)
        b_a, b_bias = load_gate_params(A_log, dt_bias, i_hv, o_k, m_k, K, BK, HAS_A, HAS_BIAS)
        b_dx, b_dal = gate_bwd(b_x, b_a, b_bias[None, :], b_dg, HAS_LB, LB)
        b_dx = tl.where(m, b_dx, 0.)
        tl.store(p_x, b_dx.to(dg.dtype.element_ty), mask=m)
        if HAS_A:
            tl.store(dA + (i_t * HV + i_hv) * NK + i_k, tl.sum(tl.sum(tl.where(m, b_dal, 0.), axis=1), axis=0))
        if HAS_BIAS:
            tl.store(dbias + (i_t * HV + i_hv) * K + o_k, tl.sum(b_dx, axis=0), mask=m_k)
    else:
        tl.store(p_x, b_dg.to(dg.dtype.element_ty), mask=m)
