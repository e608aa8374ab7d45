"""Stage 4 of the chunked KDA backward: the row-wise reductions the per-channel stage cannot do.

dq, dk: sum the per-value-head gradients of each q/k head (GVA), then the l2norm backward dx = rstd (dy - y sum(dy y)).
dbeta: the stage-2 term plus the stage-3 K-tile partials, through the sigmoid s(x) s(-x). USE_GATE: the gate backward
of stage 3's dg (fp32, dgl) into dg, with per-row-block partials of dA_log and dt_bias. Grid (row blocks of B*T, H).
Reads dqn, dkn [T, HV, K] fp32, dbeta partials, q, k, rstd, beta (g, A_log, dt_bias, dgl). Writes dq, dk, dbeta (dg).
"""
import triton
import triton.language as tl

from ._common import gate_grad_tile, l2norm_bwd, row_tile


@triton.jit(do_not_specialize=["NTOK"])
def kda_finish_bwd_kernel(q, k, beta, rstd_q, rstd_k, dqn, dkn, dbeta_t, dbeta_k, dq, dk, dbeta, g, A_log, dt_bias, dgl,
                          dg, dA, dbias, NTOK, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BR: tl.constexpr,
                          BK: tl.constexpr, NK: tl.constexpr, USE_L2NORM: tl.constexpr, USE_SIGMOID: tl.constexpr,
                          USE_GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LB: tl.constexpr,
                          LB: tl.constexpr):
    i_h = tl.program_id(1).to(tl.int64)
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_k = tl.arange(0, BK)
    m_r = o_r < NTOK
    m = m_r[:, None] & (o_k < K)[None, :]
    G: tl.constexpr = HV // H
    b_dq = tl.zeros([BR, BK], dtype=tl.float32)
    b_dk = tl.zeros([BR, BK], dtype=tl.float32)
    for j in tl.static_range(G):
        o_rv = o_r * HV + i_h * G + j
        b_dq += tl.load(dqn + (o_rv * K)[:, None] + o_k[None, :], mask=m, other=0.)
        b_dk += tl.load(dkn + (o_rv * K)[:, None] + o_k[None, :], mask=m, other=0.)
        b_db = tl.load(dbeta_t + o_rv, mask=m_r, other=0.)
        for i_k in tl.static_range(NK):
            b_db += tl.load(dbeta_k + o_rv * NK + i_k, mask=m_r, other=0.)
        if USE_SIGMOID:
            b_x = tl.load(beta + o_rv, mask=m_r, other=0.).to(tl.float32)
            b_db = b_db * tl.sigmoid(b_x) * tl.sigmoid(-b_x)
        tl.store(dbeta + o_rv, b_db.to(dbeta.dtype.element_ty), mask=m_r)
        if USE_GATE:
            i_hv = i_h * G + j
            x_b = (tl.program_id(0).to(tl.int64) * BR * HV + i_hv) * K
            o_t = tl.arange(0, BR)
            p_x, _ = row_tile(dgl + x_b, o_t, m_r, HV * K, 0, K, BK)
            b_dx, b_dal = gate_grad_tile(g, A_log, dt_bias, x_b, o_t, m_r, m, i_hv, o_k, o_k < K, 0,
                                         tl.load(p_x, mask=m, other=0.), HV, K, BK, HAS_A, HAS_BIAS, HAS_LB, LB)
            p_x, _ = row_tile(dg + x_b, o_t, m_r, HV * K, 0, K, BK)
            tl.store(p_x, b_dx.to(dg.dtype.element_ty), mask=m)
            if HAS_A:
                tl.store(dA + tl.program_id(0) * HV + i_hv, b_dal)
            if HAS_BIAS:
                tl.store(dbias + (tl.program_id(0) * HV + i_hv) * K + o_k, tl.sum(b_dx, axis=0), mask=o_k < K)
    o_x = (o_r * H + i_h) * K
    if USE_L2NORM:
        b_qx = tl.load(q + o_x[:, None] + o_k[None, :], mask=m, other=0.).to(tl.float32)
        b_kx = tl.load(k + o_x[:, None] + o_k[None, :], mask=m, other=0.).to(tl.float32)
        b_dq = l2norm_bwd(b_qx, tl.load(rstd_q + o_r * HV + i_h * G, mask=m_r, other=0.), b_dq)
        b_dk = l2norm_bwd(b_kx, tl.load(rstd_k + o_r * HV + i_h * G, mask=m_r, other=0.), b_dk)
    tl.store(dq + o_x[:, None] + o_k[None, :], b_dq.to(dq.dtype.element_ty), mask=m)
    tl.store(dk + o_x[:, None] + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m)
