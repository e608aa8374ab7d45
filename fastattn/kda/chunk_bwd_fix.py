"""Stage 3-fix of the chunked KDA backward: the in-block terms stage 3 could not anchor, exact for any decay.

Rows of a flagged (chunk, K tile) whose decay since their anchor exceeds 2^DIAG_RANGE: P_A = dMa (k e), P_L = dMl (k e),
Q = dMa^T (scale q e) + dMl^T (beta k e) over their in-block entries, by halves (both factors <= 1, as stage 1a-fix).
Stage 3's outputs are linear in them: added to dqn, dkn, dbeta partials, dg, dA_log / dt_bias partials.
Grid (chunks, HV, K tiles); unflagged programs return at once. Reads q, k, g, beta, Gc, rstd, dAqk, dL, far.
"""
import triton
import triton.language as tl

from ._common import chunk_program, gate_grad_tile, load_beta, load_qk_tile, row_tile
from .chunk_intra import DIAG_RANGE


@triton.jit
def in_block_terms(p_dM, m_far, b_left, b_k, b_G, G_b, i_c, seq_len, o_t, c0, HV: tl.constexpr, K: tl.constexpr,
                   BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, LOG_BC: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    """(P, Q) [BT, BK] of the in-block pairs of the rows m_far for one product M_ij = sum_d a_id k_jd e_ijd:
    P = dM (k e), Q = dM^T (a e), with dM read at p_dM ([BT, BT], row stride HV * BT) one level at a time (one
    [BT, BT] tile live); b_left = a, b_k = k (l2-normalised), b_G the decay of this K tile."""
    o_m = o_t[:, None] * (HV * BT) + o_t[None, :]
    b_d = tl.load(p_dM + o_t * (HV * BT + 1), mask=m_far, other=0.)      # the diagonal: e = 1
    b_p = b_d[:, None] * b_k
    b_q = b_d[:, None] * b_left
    for i_l in range(LOG_BC):
        b = BC >> (i_l + 1)
        o_a = (o_t // (2 * b)) * (2 * b) + b
        p_x, m_a = row_tile(G_b, o_a, (i_c * BT + o_a) < seq_len, HV * K, c0, K, BK)
        b_Ga = tl.load(p_x, mask=m_a, other=0.)
        up = ((o_t % (2 * b)) >= b)[:, None]
        b_e = tl.exp2(tl.minimum(tl.where(up, b_G - b_Ga, b_Ga - b_G), 0.))
        b_rf = tl.where(up, b_e, 0.)
        b_cf = tl.where(up | ~m_a, 0., b_e)
        m_blk = ((o_t // (2 * b))[:, None] == (o_t // (2 * b))[None, :]) & m_far[:, None]
        b_M = tl.load(p_dM + o_m, mask=m_blk, other=0.)
        b_p += b_rf * tl.dot(b_M, b_k * b_cf, input_precision=DOT_PREC)
        b_q += b_cf * tl.dot(tl.trans(b_M), b_left * b_rf, input_precision=DOT_PREC)
    return b_p, b_q


@triton.jit(do_not_specialize=["T"])
def kda_intra_fix_bwd_kernel(q, k, g, beta, A_log, dt_bias, Gc, rstd_q, rstd_k, dAqk, dL, far, dqn, dkn, dg, dbeta,
                             dA, dbias, cu_seqlens, chunk_indices, scale, T, H: tl.constexpr, HV: tl.constexpr,
                             K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, LOG_BC: tl.constexpr,
                             BK: tl.constexpr, NK: tl.constexpr, USE_L2NORM: tl.constexpr,
                             USE_SIGMOID: tl.constexpr, USE_GATE: tl.constexpr, HAS_A: tl.constexpr,
                             HAS_BIAS: tl.constexpr, HAS_LB: tl.constexpr, LB: tl.constexpr, DOT_PREC: tl.constexpr):
    i_t, i_n, i_c, i_hv, i_h, bos, seq_len, tok, m_t = chunk_program(chunk_indices, cu_seqlens, H, HV, BT)
    i_k = tl.program_id(2)
    if tl.load(far + (i_t * HV + i_hv) * NK + i_k) != 0:
        o_t = tl.arange(0, BT)
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        row = bos + i_c * BT
        x_b = row * HV * K + i_hv * K
        p_G, m = row_tile(Gc + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
        b_G = tl.load(p_G, mask=m, other=0.)
        # the rows stage 3 left out: decay since the anchor (row before the block, row 0 for the first) too large
        p_x, _ = row_tile(Gc + x_b, (o_t // BC) * BC - 1 + (o_t < BC), m_t, HV * K, i_k * BK, K, BK)
        b_ga = tl.load(p_x, mask=m, other=0.)
        m_far = (tl.max(tl.where(m, b_ga - b_G, 0.), axis=1) > DIAG_RANGE) & m_t
        a_b = row * HV * BT + i_hv * BT

        b_q, b_k, _ = load_qk_tile(q, k, rstd_q, rstd_k, row, tok, m_t, o_t, i_h, i_hv, i_k * BK, H, HV, K, BK,
                                   USE_L2NORM)
        b_beta = load_beta(beta, tok, m_t, i_hv, HV, USE_SIGMOID)
        b_pa, b_qr = in_block_terms(dAqk + a_b, m_far, b_q * scale, b_k, b_G, Gc + x_b, i_c, seq_len, o_t, i_k * BK,
                                    HV, K, BT, BC, BK, LOG_BC, DOT_PREC)
        b_pl, b_ql = in_block_terms(dL + a_b, m_far, b_k * b_beta[:, None], b_k, b_G, Gc + x_b, i_c, seq_len, o_t,
                                    i_k * BK, HV, K, BT, BC, BK, LOG_BC, DOT_PREC)
        b_qr += b_ql
        # stage 3's outputs are linear in (P_A, P_L, Q): add these terms' share
        p_x, _ = row_tile(dqn + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
        tl.store(p_x, tl.load(p_x, mask=m, other=0.) + scale * b_pa, mask=m)
        p_x, _ = row_tile(dkn + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
        tl.store(p_x, tl.load(p_x, mask=m, other=0.) + b_beta[:, None] * b_pl + b_qr, mask=m)
        p_b = dbeta + (tok * HV + i_hv) * NK + i_k
        tl.store(p_b, tl.load(p_b, mask=m_t, other=0.) + tl.sum(b_k * b_pl, axis=1), mask=m_t)
        b_dG = tl.where(m, scale * b_q * b_pa + b_beta[:, None] * b_k * b_pl - b_k * b_qr, 0.)
        b_dg = tl.sum(b_dG, axis=0)[None, :] - tl.cumsum(b_dG, axis=0) + b_dG
        p_x, _ = row_tile(dg + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
        b_old = tl.load(p_x, mask=m, other=0.).to(tl.float32)
        if USE_GATE:
            b_dx, b_dal = gate_grad_tile(g, A_log, dt_bias, x_b, o_t, m_t, m, i_hv, o_k, m_k, i_k * BK, b_dg, HV, K,
                                         BK, HAS_A, HAS_BIAS, HAS_LB, LB)
            tl.store(p_x, (b_old + b_dx).to(dg.dtype.element_ty), mask=m)
            if HAS_A:
                p_s = dA + (i_t * HV + i_hv) * NK + i_k
                tl.store(p_s, tl.load(p_s) + b_dal)
            if HAS_BIAS:
                p_s = dbias + (i_t * HV + i_hv) * K + o_k
                tl.store(p_s, tl.load(p_s, mask=m_k, other=0.) + tl.sum(b_dx, axis=0), mask=m_k)
        else:
            tl.store(p_x, (b_old + b_dg).to(dg.dtype.element_ty), mask=m)
