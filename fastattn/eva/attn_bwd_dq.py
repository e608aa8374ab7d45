"""FlashEVA backward, stage 1: delta and dq (the backward's preprocess is fused in).

delta_t = dO_t . O_t - dlse_t; with P = exp2(qk_scale q.kappa - lse log2 e) over the same augmented
keys kappa as the forward, dS = P (dO.nu - delta) and dq_t = s sum_j dS_tj kappa_j.
Grid (query blocks, H / GP, B) with the forward's row packing and loop structure.
Reads q, k, v, k_lm, v_lm, o, do, lse (dlse); writes delta [B, H, T] fp32 and dq.
"""
import triton
import triton.language as tl

from ._common import K_LOG2E, key_block, key_spans, load_rows, query_rows, seq_layout, store_rows


@triton.jit
def dq_step(b_dq, b_q, b_do, b_k, b_v, b_lse2, b_delta, qk_scale, m_vis, MASKED: tl.constexpr, PREC: tl.constexpr):
    """dq += dS kappa for one block of keys b_k / values b_v (the caller applies the scale s at the end)."""
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
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_t, o_h, m_r, t_row, lo_r, nr_r = query_rows(i_m, i_hg, seq_len, W, C, BT, GP, SLIDING)
    n_full, nr_max, j_lo, e1, e2, end = key_spans(i_m, seq_len, W, C, BT, BN, SLIDING)

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

    for c0 in range(0, n_full, BN):
        b_k, b_v, m_vis = key_block(k_lm, v_lm, lm_bos, c0, nr_max, i_hk, o_d, m_d, t_row, lo_r, nr_r,
                                    HKV, D, BN, True, False)
        b_dq = dq_step(b_dq, b_q, b_do, b_k, b_v, b_lse2, b_delta, qk_scale, m_vis, False, PREC)
    for c0 in range(n_full, nr_max, BN):
        b_k, b_v, m_vis = key_block(k_lm, v_lm, lm_bos, c0, nr_max, i_hk, o_d, m_d, t_row, lo_r, nr_r,
                                    HKV, D, BN, True, True)
        b_dq = dq_step(b_dq, b_q, b_do, b_k, b_v, b_lse2, b_delta, qk_scale, m_vis, True, PREC)

    for j0 in range(j_lo, tl.minimum(e1, end), BN):
        b_k, b_v, m_vis = key_block(k, v, bos, j0, end, i_hk, o_d, m_d, t_row, lo_r, nr_r, HKV, D, BN, False, True)
        b_dq = dq_step(b_dq, b_q, b_do, b_k, b_v, b_lse2, b_delta, qk_scale, m_vis, True, PREC)
    for j0 in range(e1, e2, BN):
        b_k, b_v, m_vis = key_block(k, v, bos, j0, end, i_hk, o_d, m_d, t_row, lo_r, nr_r, HKV, D, BN, False, False)
        b_dq = dq_step(b_dq, b_q, b_do, b_k, b_v, b_lse2, b_delta, qk_scale, m_vis, False, PREC)
    for j0 in range(tl.maximum(e1, e2), end, BN):
        b_k, b_v, m_vis = key_block(k, v, bos, j0, end, i_hk, o_d, m_d, t_row, lo_r, nr_r, HKV, D, BN, False, True)
        b_dq = dq_step(b_dq, b_q, b_do, b_k, b_v, b_lse2, b_delta, qk_scale, m_vis, True, PREC)

    store_rows(dq, b_dq * scale, bos + o_t, o_h, m_r, o_d, m_d, H, D)
