"""FlashEVA attention forward: one online softmax over the remote landmarks, then the local window.

o_t = softmax over {s q_t.kl_c : c < n_remote(t)} U {s q_t.k_j : lo(t) <= j <= t} applied to [vl ; v].
Grid (query blocks, H / GP, B); a program owns BT tokens x GP query heads of one kv head (rows
token-major), so GQA heads share every key load. Visits O(W / BN + T / (C BN)) key blocks, masking
only the edge blocks (from indices). Reads q, k, v, k_lm, v_lm; writes o and lse (natural log, fp32).
"""
import triton
import triton.language as tl

from ._common import K_LN2, attend_block, load_rows, local_bounds, seq_layout


@triton.jit(do_not_specialize=["T", "N_LM", "W", "C"])
def eva_attn_fwd_kernel(q, k, v, k_lm, v_lm, o, lse, cu_seqlens, lm_offsets, blk_seq, blk_idx,
                        qk_scale, T, N_LM, W, C,
                        H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, GP: tl.constexpr,
                        BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, SLIDING: tl.constexpr,
                        IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    BM: tl.constexpr = BT * GP
    i_z, i_hg, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if not IS_VARLEN:
        i_z = tl.num_programs(0) - 1 - i_z  # heaviest (latest) query blocks first
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
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    m_i = tl.full([BM], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    m_all = o_n >= 0

    # remote landmarks [0, nr_max): full blocks below nr_min need no mask
    n_full = (nr_min // BN) * BN
    for c0 in range(0, n_full, BN):
        acc, m_i, l_i = attend_block(acc, m_i, l_i, b_q, k_lm, v_lm, lm_bos + c0 + o_n, m_all, i_hk, o_d, m_d,
                                     qk_scale, 0, HKV, D, False, PREC)
    for c0 in range(n_full, nr_max, BN):
        c = c0 + o_n
        m_vis = c[None, :] < nr_r[:, None]
        acc, m_i, l_i = attend_block(acc, m_i, l_i, b_q, k_lm, v_lm, lm_bos + c, c < nr_max, i_hk, o_d, m_d,
                                     qk_scale, m_vis, HKV, D, True, PREC)

    # local keys [lo_min, t_last]: blocks in [e1, e2) are visible to every row
    end = t_last + 1
    e1 = ((lo_max + BN - 1) // BN) * BN
    e2 = ((t_first + 1) // BN) * BN
    for j0 in range((lo_min // BN) * BN, tl.minimum(e1, end), BN):
        j = j0 + o_n
        m_vis = (j[None, :] >= lo_r[:, None]) & (j[None, :] <= t_row[:, None])
        acc, m_i, l_i = attend_block(acc, m_i, l_i, b_q, k, v, bos + j, j < end, i_hk, o_d, m_d,
                                     qk_scale, m_vis, HKV, D, True, PREC)
    for j0 in range(e1, e2, BN):
        acc, m_i, l_i = attend_block(acc, m_i, l_i, b_q, k, v, bos + j0 + o_n, m_all, i_hk, o_d, m_d,
                                     qk_scale, 0, HKV, D, False, PREC)
    for j0 in range(tl.maximum(e1, e2), end, BN):
        j = j0 + o_n
        m_vis = (j[None, :] >= lo_r[:, None]) & (j[None, :] <= t_row[:, None])
        acc, m_i, l_i = attend_block(acc, m_i, l_i, b_q, k, v, bos + j, j < end, i_hk, o_d, m_d,
                                     qk_scale, m_vis, HKV, D, True, PREC)

    b_o = acc / l_i[:, None]
    p_o = o + ((bos + o_t) * H + o_h)[:, None] * D + o_d[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_r[:, None] & m_d[None, :])
    b_lse = (m_i + tl.log2(l_i)) * K_LN2
    tl.store(lse + (i_b * H + o_h).to(tl.int64) * T + (bos - i_b.to(tl.int64) * T) + o_t, b_lse, mask=m_r)
