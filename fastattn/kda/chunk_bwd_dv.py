"""Stage 2 of the chunked KDA backward: value gradients and the gradients of the two chunk matrices.

With S / dS entering / leaving the chunk, Tb = Tinv diag(beta), Y = V - kg S: Vn = Tb Y, dVn = Aqk^T dO + kd dS,
dV = Tb^T dVn, dAqk = tril(dO Vn^T), dTb = dVn Y^T, dL = -Tinv^T (dTb diag(beta)) Tinv^T, dbeta += colsum(dTb Tinv).
Grid (chunks, HV), a loop over V tiles. Reads v, kg, kd, Aqk, Tinv, beta, h, dh, dO. Writes dv, vn, dvn
[T, HV, V], dAqk, dL [T, HV, BT] and dbeta's Tinv term [T, HV] (fp32).
"""
import triton
import triton.language as tl

from ._common import chunk_program, load_beta, row_tile


@triton.jit(do_not_specialize=["T"])
def kda_dv_bwd_kernel(v, kg, kd, Aqk, Tinv, beta, h, dh, do, dv, vn, dvn, dAqk, dL, dbeta,
                      cu_seqlens, chunk_indices, chunk_offsets, T,
                      H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_SIGMOID: tl.constexpr,
                      DOT_PREC: tl.constexpr):
    i_t, i_n, i_c, i_hv, i_h, bos, seq_len, tok, m_t = chunk_program(chunk_indices, cu_seqlens, H, HV, BT)
    i_gc = tl.load(chunk_offsets + i_n).to(tl.int64) + i_c
    st = kg.dtype.element_ty
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    row = bos + i_c * BT                           # first token of the chunk (int64 bases, int32 tiles)
    x_b = row * HV * K + i_hv * K
    a_b = row * HV * BT + i_hv * BT
    p_a, m_a = row_tile(Aqk + a_b, o_t, m_t, HV * BT, 0, BT, BT)
    b_A = tl.load(p_a, mask=m_a, other=0.)     # state_dtype, as dO below: A^T dO a bf16 product under bf16 inputs
    p_a, m_a = row_tile(Tinv + a_b, o_t, m_t, HV * BT, 0, BT, BT)
    b_Ti = tl.load(p_a, mask=m_a, other=0.)
    b_beta = load_beta(beta, tok, m_t, i_hv, HV, USE_SIGMOID)
    p_x, m_tk = row_tile(kg + x_b, o_t, m_t, HV * K, 0, K, BK)
    b_kg = tl.load(p_x, mask=m_tk, other=0.)
    p_x, m_tk = row_tile(kd + x_b, o_t, m_t, HV * K, 0, K, BK)
    b_kd = tl.load(p_x, mask=m_tk, other=0.)

    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_dT = tl.zeros([BT, BT], dtype=tl.float32)
    s_b = (i_gc * HV + i_hv) * K * V               # this chunk's state tile in h / dh
    v_b = row * HV * V + i_hv * V
    for i_v in range(tl.cdiv(V, BV)):
        p_s, m_s = row_tile(h + s_b, o_k, o_k < K, V, i_v * BV, V, BV)
        b_h = tl.load(p_s, mask=m_s, other=0.).to(st)
        p_s, m_s = row_tile(dh + s_b, o_k, o_k < K, V, i_v * BV, V, BV)
        b_dh = tl.load(p_s, mask=m_s, other=0.).to(st)
        p_v, m_tv = row_tile(v + v_b, o_t, m_t, HV * V, i_v * BV, V, BV)
        b_y = tl.load(p_v, mask=m_tv, other=0.).to(tl.float32) - tl.dot(b_kg, b_h, input_precision=DOT_PREC)
        p_v, m_tv = row_tile(do + v_b, o_t, m_t, HV * V, i_v * BV, V, BV)
        b_do = tl.load(p_v, mask=m_tv, other=0.).to(st)
        b_vn = tl.dot(b_Ti, b_beta[:, None] * b_y, input_precision=DOT_PREC)   # Tb Y, Tb = Tinv diag(beta)
        b_dvn = tl.dot(tl.trans(b_A), b_do, input_precision=DOT_PREC) + tl.dot(b_kd, b_dh, input_precision=DOT_PREC)
        b_dA += tl.dot(b_do.to(tl.float32), tl.trans(b_vn), input_precision=DOT_PREC)
        b_dT += tl.dot(b_dvn, tl.trans(b_y), input_precision=DOT_PREC)
        p_v, _ = row_tile(dv + v_b, o_t, m_t, HV * V, i_v * BV, V, BV)
        b_dv = b_beta[:, None] * tl.dot(tl.trans(b_Ti), b_dvn, input_precision=DOT_PREC)
        tl.store(p_v, b_dv.to(dv.dtype.element_ty), mask=m_tv)
        p_v, _ = row_tile(vn + v_b, o_t, m_t, HV * V, i_v * BV, V, BV)
        tl.store(p_v, b_vn.to(vn.dtype.element_ty), mask=m_tv)
        p_v, _ = row_tile(dvn + v_b, o_t, m_t, HV * V, i_v * BV, V, BV)
        tl.store(p_v, b_dvn.to(dvn.dtype.element_ty), mask=m_tv)

    m_valid = m_t[:, None] & m_t[None, :]
    b_dA = tl.where(m_valid & (o_t[:, None] >= o_t[None, :]), b_dA, 0.)
    b_dL = -tl.dot(tl.trans(b_Ti), tl.dot(b_dT * b_beta[None, :], tl.trans(b_Ti), input_precision=DOT_PREC),
                   input_precision=DOT_PREC)
    b_dL = tl.where(m_valid & (o_t[:, None] > o_t[None, :]), b_dL, 0.)
    p_a, m_a = row_tile(dAqk + a_b, o_t, m_t, HV * BT, 0, BT, BT)
    tl.store(p_a, b_dA, mask=m_a)
    p_a, m_a = row_tile(dL + a_b, o_t, m_t, HV * BT, 0, BT, BT)
    tl.store(p_a, b_dL, mask=m_a)
    tl.store(dbeta + tok * HV + i_hv, tl.sum(b_dT * b_Ti, axis=0), mask=m_t)
