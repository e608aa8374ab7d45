"""FlashEVA backward, stage 1: delta and dq (the backward's preprocess is fused in).

delta_t = dO_t . O_t - dlse_t; with P = exp2(qk_scale q.kappa - lse log2 e) over the same augmented
keys kappa as the forward, dS = P (dO.nu - delta) and dq_t = s sum_j dS_tj kappa_j.
Grid (query blocks, H / GP, B) with the forward's row packing and loop structure.
Reads q, k, v, k_lm, v_lm, o, do, lse (dlse); writes delta [B, H, T] fp32 and dq.
"""
import triton
import triton.language as tl

from ._common import K_LOG2E, load_rows, local_bounds, seq_layout


@triton.jit
def dq_block(b_dq, b_q, b_do, k, v, rows, m_rows, i_hk, o_d, m_d, b_lse2, b_delta, qk_scale, m_vis,
             HKV: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    """dq += dS kappa over key/value rows ``rows`` of k, v (the caller applies the scale s at the end)."""
    o_kv = (rows * HKV + i_hk)[:, None] * D + o_d[None, :]
    m_kv = m_rows[:, None] & m_d[None, :]
    b_k = tl.load(k + o_kv, mask=m_kv, other=0.)
    b_v = tl.load(v + o_kv, mask=m_kv, other=0.)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale
    b_p = tl.exp2(b_s - b_lse2[:, None])
    if MASKED:
        b_p = tl.where(m_vis, b_p, 0.)
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
    b_ds = b_p * (b_dp - b_delta[:, None])
    return b_dq + tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)


@triton.jit(do_not_specialize=["T", "N_LM", "W", "C"])
def eva_attn_bwd_dq_kernel(q, k, v, k_lm, v_lm, o, do, lse, dlse, delta, dq, cu_seqlens, lm_offsets,
                           blk_seq, blk_idx, qk_scale, scale, T, N_LM, W, C,
                           H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, GP: tl.constexpr,
                           BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, SLIDING: tl.constexpr,
                           IS_VARLEN: tl.constexpr, HAS_DLSE: tl.constexpr, PREC: tl.constexpr):
    BM: tl.constexpr = BT * GP
    i_z, i_hg, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if not IS_VARLEN:
        i_z = tl.num_programs(0) - 1 - i_z
    i_n, i_m, bos, seq_len, lm_bos = seq_layout(cu_seqlens, lm_offsets, blk_seq, blk_idx, i_b, i_z, T, N_LM,
                                                IS_VARLEN)
    if i_n < 0:
        return
    i_hk = (i_hg * GP) // (H // HKV)

    o_r = tl.arange(0, BM)
    o_t = i_m * BT + o_r // GP
    o_h = i_hg * GP + o_r % GP
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_n = tl.arange(0, BN)
    m_r = o_t < seq_len
    t_row = tl.minimum(o_t, seq_len - 1)
    lo_r, nr_r = local_bounds(t_row, W, C, SLIDING)
    t_first = i_m * BT
    t_last = tl.minimum(t_first + BT - 1, seq_len - 1)
    lo_min, nr_min = local_bounds(t_first, W, C, SLIDING)
    lo_max, nr_max = local_bounds(t_last, W, C, SLIDING)

    b_q = load_rows(q, bos + o_t, o_h, m_r, o_d, m_d, H, D)
    b_do = load_rows(do, bos + o_t, o_h, m_r, o_d, m_d, H, D)
    b_o = load_rows(o, bos + o_t, o_h, m_r, o_d, m_d, H, D)
    o_row = (i_b * H + o_h).to(tl.int64) * T + (bos - i_b.to(tl.int64) * T) + o_t
    b_delta = tl.sum(b_do.to(tl.float32) * b_o.to(tl.float32), 1)
    if HAS_DLSE:
        b_delta -= tl.load(dlse + o_row, mask=m_r, other=0.)
    tl.store(delta + o_row, b_delta, mask=m_r)
    b_lse2 = tl.load(lse + o_row, mask=m_r, other=0.) * K_LOG2E
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    m_all = o_n >= 0

    n_full = (nr_min // BN) * BN
    for c0 in range(0, n_full, BN):
        b_dq = dq_block(b_dq, b_q, b_do, k_lm, v_lm, lm_bos + c0 + o_n, m_all, i_hk, o_d, m_d, b_lse2, b_delta,
                        qk_scale, 0, HKV, D, False, PREC)
    for c0 in range(n_full, nr_max, BN):
        c = c0 + o_n
        m_vis = c[None, :] < nr_r[:, None]
        b_dq = dq_block(b_dq, b_q, b_do, k_lm, v_lm, lm_bos + c, c < nr_max, i_hk, o_d, m_d, b_lse2, b_delta,
                        qk_scale, m_vis, HKV, D, True, PREC)

    end = t_last + 1
    e1 = ((lo_max + BN - 1) // BN) * BN
    e2 = ((t_first + 1) // BN) * BN
    for j0 in range((lo_min // BN) * BN, tl.minimum(e1, end), BN):
        j = j0 + o_n
        m_vis = (j[None, :] >= lo_r[:, None]) & (j[None, :] <= t_row[:, None])
        b_dq = dq_block(b_dq, b_q, b_do, k, v, bos + j, j < end, i_hk, o_d, m_d, b_lse2, b_delta,
                        qk_scale, m_vis, HKV, D, True, PREC)
    for j0 in range(e1, e2, BN):
        b_dq = dq_block(b_dq, b_q, b_do, k, v, bos + j0 + o_n, m_all, i_hk, o_d, m_d, b_lse2, b_delta,
                        qk_scale, 0, HKV, D, False, PREC)
    for j0 in range(tl.maximum(e1, e2), end, BN):
        j = j0 + o_n
        m_vis = (j[None, :] >= lo_r[:, None]) & (j[None, :] <= t_row[:, None])
        b_dq = dq_block(b_dq, b_q, b_do, k, v, bos + j, j < end, i_hk, o_d, m_d, b_lse2, b_delta,
                        qk_scale, m_vis, HKV, D, True, PREC)

    p_dq = dq + ((bos + o_t) * H + o_h)[:, None] * D + o_d[None, :]
    tl.store(p_dq, (b_dq * scale).to(dq.dtype.element_ty), mask=m_r[:, None] & m_d[None, :])
