"""Stage 2 of the chunked KDA backward: all gradients local to one chunk, in one kernel.

Given the entering state S (h) and the gradient dS of the leaving state (dh): dv, then through
Tb = (I+L)^-1 diag(beta), L and Aqk (pairwise decayed products, same sub-block anchoring as the forward)
to q, k, beta and the cumulative decay G; G -> g by a reverse cumsum, then the in-kernel gate, sigmoid and
l2norm backwards. Grid (chunks, HV). Reads q, k, v, g, beta, Gc, Aqk, Tinv, rstd, h, dh, do.
Writes dq, dk (per value head when HV > H), dv, dg, dbeta and per-chunk partial sums of dA_log, ddt_bias.
"""
import triton
import triton.language as tl

from ._common import chunk_program, gate_bwd, l2norm_bwd, load_beta, load_gate_params
from .chunk_bwd_state import load_chunk


@triton.jit
def pairwise_bwd(b_dMa, b_dMl, b_q, b_k, b_beta, b_G, q, k, beta, Gc, rstd_q, rstd_k, bos, i_c, seq_len,
                 i_h, i_hv, scale, o_t, o_k, m_k,
                 H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                 USE_L2NORM: tl.constexpr, USE_SIGMOID: tl.constexpr, DOT_PREC: tl.constexpr):
    """For M_ij = sum_d a_id b_jd 2^(G_id - G_jd) with (a, b) = (scale q, k) [Aqk] and (beta k, k) [L]:
    return P_A = dMa (k e), P_L = dMl (k e) (left factors) and Q = dMa^T (scale q e) + dMl^T (beta k e)."""
    b_qs = b_q * scale
    b_kb = b_k * b_beta[:, None]
    b_pa = tl.zeros(b_q.shape, dtype=tl.float32)
    b_pl = tl.zeros(b_q.shape, dtype=tl.float32)
    b_qr = tl.zeros(b_q.shape, dtype=tl.float32)
    for i_s in tl.static_range(1, BT // BC):
        b_ga = tl.sum(tl.where((o_t == i_s * BC - 1)[:, None], b_G, 0.), axis=0)
        m_row = (o_t >= i_s * BC) & (o_t < (i_s + 1) * BC)
        m_col = o_t < i_s * BC
        b_ea = tl.where(m_row[:, None], tl.exp2(tl.minimum(b_G - b_ga[None, :], 0.)), 0.)
        b_eb = tl.where(m_col[:, None], tl.exp2(tl.minimum(b_ga[None, :] - b_G, 0.)), 0.)
        m_blk = m_row[:, None] & m_col[None, :]
        b_da = tl.where(m_blk, b_dMa, 0.)
        b_dl = tl.where(m_blk, b_dMl, 0.)
        b_keb = b_k * b_eb
        b_pa += b_ea * tl.dot(b_da, b_keb, input_precision=DOT_PREC)
        b_pl += b_ea * tl.dot(b_dl, b_keb, input_precision=DOT_PREC)
        b_qr += b_eb * (tl.dot(tl.trans(b_da), b_qs * b_ea, input_precision=DOT_PREC)
                        + tl.dot(tl.trans(b_dl), b_kb * b_ea, input_precision=DOT_PREC))
    # diagonal sub-blocks: row r against partner p = its block start + c
    for c in range(BC):
        o_p = (o_t // BC) * BC + c
        m_p = (i_c * BT + o_p) < seq_len
        tok_p = bos + i_c * BT + o_p
        m2 = m_p[:, None] & m_k[None, :]
        m_r = (i_c * BT + o_t) < seq_len
        b_qp = tl.load(q + ((tok_p * H + i_h) * K)[:, None] + o_k[None, :], mask=m2, other=0.).to(tl.float32)
        b_kp = tl.load(k + ((tok_p * H + i_h) * K)[:, None] + o_k[None, :], mask=m2, other=0.).to(tl.float32)
        if USE_L2NORM:
            b_qp = b_qp * tl.load(rstd_q + tok_p * HV + i_hv, mask=m_p, other=0.)[:, None]
            b_kp = b_kp * tl.load(rstd_k + tok_p * HV + i_hv, mask=m_p, other=0.)[:, None]
        b_bp = load_beta(beta, tok_p, m_p, i_hv, HV, USE_SIGMOID)
        b_Gp = tl.load(Gc + ((tok_p * HV + i_hv) * K)[:, None] + o_k[None, :], mask=m2, other=0.)
        # left: p <= r, value dM[r, p]
        m_left = m2 & ((o_p <= o_t) & m_r)[:, None]
        b_el = tl.exp2(tl.where(m_left, b_G - b_Gp, float("-inf")))
        m_rp = o_t[None, :] == o_p[:, None]
        b_pa += tl.sum(tl.where(m_rp, b_dMa, 0.), axis=1)[:, None] * b_kp * b_el
        b_pl += tl.sum(tl.where(m_rp, b_dMl, 0.), axis=1)[:, None] * b_kp * b_el
        # right: p >= r, value dM[p, r]
        m_right = m2 & ((o_p >= o_t) & m_r)[:, None]
        b_er = tl.exp2(tl.where(m_right, b_Gp - b_G, float("-inf")))
        m_pr = o_t[:, None] == o_p[None, :]
        b_va = tl.sum(tl.where(m_pr, b_dMa, 0.), axis=0)
        b_vl = tl.sum(tl.where(m_pr, b_dMl, 0.), axis=0)
        b_qr += (b_va[:, None] * b_qp * scale + (b_vl * b_bp)[:, None] * b_kp) * b_er
    return b_pa, b_pl, b_qr


@triton.jit(do_not_specialize=["T"])
def kda_intra_bwd_kernel(q, k, v, g, beta, A_log, dt_bias, Gc, Aqk, Tinv, rstd_q, rstd_k, h, dh, do,
                         dq, dk, dv, dg, dbeta, dA, dbias, cu_seqlens, chunk_indices, chunk_offsets, scale, T,
                         H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                         BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         USE_L2NORM: tl.constexpr, USE_SIGMOID: tl.constexpr, USE_GATE: tl.constexpr,
                         HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LB: tl.constexpr, LB: tl.constexpr,
                         DOT_PREC: tl.constexpr):
    i_t, i_n, i_c, i_hv, i_h, bos, seq_len, tok, m_t = chunk_program(chunk_indices, cu_seqlens, H, HV, BT)
    i_gc = tl.load(chunk_offsets + i_n).to(tl.int64) + i_c

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    n_valid = tl.minimum(BT, seq_len - i_c * BT)
    _, _, b_q, b_k, b_G, b_gl, b_eg, b_kd, b_Ti, b_beta, b_T, b_A = load_chunk(
        q, k, beta, Gc, Aqk, Tinv, rstd_q, rstd_k, bos, seq_len, i_c, i_h, i_hv,
        H, HV, K, BT, BK, USE_L2NORM, USE_SIGMOID)
    b_kg = b_k * b_eg
    b_w = tl.dot(b_T, b_kg, input_precision=DOT_PREC)

    b_dqg = tl.zeros([BT, BK], dtype=tl.float32)
    b_dkd = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_dT = tl.zeros([BT, BT], dtype=tl.float32)
    b_dgl = tl.zeros([BK], dtype=tl.float32)
    o_hk = (i_gc * HV + i_hv) * K * V + o_k[:, None] * V
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = m_t[:, None] & (o_v < V)[None, :]
        m_kv = m_k[:, None] & (o_v < V)[None, :]
        o_tv = ((tok * HV + i_hv) * V)[:, None] + o_v[None, :]
        b_v = tl.load(v + o_tv, mask=m_v, other=0.).to(tl.float32)
        b_do = tl.load(do + o_tv, mask=m_v, other=0.).to(tl.float32)
        b_h = tl.load(h + o_hk + o_v[None, :], mask=m_kv, other=0.)
        b_dh = tl.load(dh + o_hk + o_v[None, :], mask=m_kv, other=0.)
        b_vn = tl.dot(b_T, b_v, input_precision=DOT_PREC) - tl.dot(b_w, b_h, input_precision=DOT_PREC)
        b_dvn = tl.dot(tl.trans(b_A), b_do, input_precision=DOT_PREC) + tl.dot(b_kd, b_dh, input_precision=DOT_PREC)
        b_dqg += tl.dot(b_do, tl.trans(b_h), input_precision=DOT_PREC)
        b_dA += tl.dot(b_do, tl.trans(b_vn), input_precision=DOT_PREC)
        b_dkd += tl.dot(b_vn, tl.trans(b_dh), input_precision=DOT_PREC)
        b_dw -= tl.dot(b_dvn, tl.trans(b_h), input_precision=DOT_PREC)
        b_dT += tl.dot(b_dvn, tl.trans(b_v), input_precision=DOT_PREC)
        b_dv = tl.dot(tl.trans(b_T), b_dvn, input_precision=DOT_PREC)
        tl.store(dv + o_tv, b_dv.to(dv.dtype.element_ty), mask=m_v)
        b_dgl += tl.sum(b_h * b_dh, axis=1)
    b_dT += tl.dot(b_dw, tl.trans(b_kg), input_precision=DOT_PREC)
    b_dkg = tl.dot(tl.trans(b_T), b_dw, input_precision=DOT_PREC)

    # Tb = Tinv diag(beta), Tinv = (I + L)^-1  =>  dL = -Tinv^T (dTb diag(beta)) Tinv^T
    m_valid = m_t[:, None] & m_t[None, :]
    b_dbeta = tl.sum(b_dT * b_Ti, axis=0)
    b_dL = -tl.dot(tl.trans(b_Ti), tl.dot(b_dT * b_beta[None, :], tl.trans(b_Ti), input_precision=DOT_PREC),
                   input_precision=DOT_PREC)
    b_dL = tl.where(m_valid & (o_t[:, None] > o_t[None, :]), b_dL, 0.)
    b_dA = tl.where(m_valid & (o_t[:, None] >= o_t[None, :]), b_dA, 0.)
    b_pa, b_pl, b_qr = pairwise_bwd(b_dA, b_dL, b_q, b_k, b_beta, b_G, q, k, beta, Gc, rstd_q, rstd_k,
                                    bos, i_c, seq_len, i_h, i_hv, scale, o_t, o_k, m_k,
                                    H, HV, K, BT, BC, USE_L2NORM, USE_SIGMOID, DOT_PREC)
    b_dbeta += tl.sum(b_k * b_pl, axis=1)
    b_dqn = scale * (b_pa + b_eg * b_dqg)
    b_dkn = b_beta[:, None] * b_pl + b_qr + b_eg * b_dkg + tl.exp2(b_gl[None, :] - b_G) * b_dkd
    b_dkn = tl.where(m_t[:, None], b_dkn, 0.)
    # gradient of the cumulative decay G (natural-log units), then g = reverse cumsum within the chunk
    b_dG = (scale * b_q * (b_pa + b_eg * b_dqg) + b_beta[:, None] * b_k * b_pl - b_k * b_qr
            + b_kg * b_dkg - b_kd * b_dkd)
    b_dgl = b_dgl * tl.exp2(b_gl) + tl.sum(b_kd * b_dkd, axis=0)
    b_dG += tl.where((o_t == n_valid - 1)[:, None], b_dgl[None, :], 0.)
    b_dG = tl.where(m_t[:, None] & m_k[None, :], b_dG, 0.)
    b_dg = tl.sum(b_dG, axis=0)[None, :] - tl.cumsum(b_dG, axis=0) + b_dG

    m = m_t[:, None] & m_k[None, :]
    o_g = ((tok * HV + i_hv) * K)[:, None] + o_k[None, :]
    if USE_GATE:
        b_x = tl.load(g + o_g, mask=m, other=0.).to(tl.float32)
        b_a, b_bias = load_gate_params(A_log, dt_bias, i_hv, o_k, m_k, K, BK, HAS_A, HAS_BIAS)
        b_dx, b_dal = gate_bwd(b_x, b_a, b_bias[None, :], b_dg, HAS_LB, LB)
        b_dx = tl.where(m, b_dx, 0.)
        tl.store(dg + o_g, b_dx.to(dg.dtype.element_ty), mask=m)
        if HAS_A:
            tl.store(dA + i_t * HV + i_hv, tl.sum(tl.sum(tl.where(m, b_dal, 0.), axis=1), axis=0))
        if HAS_BIAS:
            tl.store(dbias + (i_t * HV + i_hv) * K + o_k, tl.sum(b_dx, axis=0), mask=m_k)
    else:
        tl.store(dg + o_g, b_dg.to(dg.dtype.element_ty), mask=m)

    if USE_SIGMOID:  # sigmoid' = s(x) s(-x): exact also where s(x) rounds to 1
        b_braw = tl.load(beta + tok * HV + i_hv, mask=m_t, other=0.).to(tl.float32)
        b_dbeta = b_dbeta * b_beta * tl.sigmoid(-b_braw)
    tl.store(dbeta + tok * HV + i_hv, b_dbeta.to(dbeta.dtype.element_ty), mask=m_t)

    o_qk = ((tok * H + i_h) * K)[:, None] + o_k[None, :]
    o_d = ((tok * HV + i_hv) * K)[:, None] + o_k[None, :]
    if USE_L2NORM:
        b_qx = tl.load(q + o_qk, mask=m, other=0.).to(tl.float32)
        b_kx = tl.load(k + o_qk, mask=m, other=0.).to(tl.float32)
        b_dqn = l2norm_bwd(b_qx, tl.load(rstd_q + tok * HV + i_hv, mask=m_t, other=0.), b_dqn)
        b_dkn = l2norm_bwd(b_kx, tl.load(rstd_k + tok * HV + i_hv, mask=m_t, other=0.), b_dkn)
    tl.store(dq + o_d, b_dqn.to(dq.dtype.element_ty), mask=m)
    tl.store(dk + o_d, b_dkn.to(dk.dtype.element_ty), mask=m)
