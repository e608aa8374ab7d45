"""FlashEVA attention forward: one online softmax over the remote landmarks, then the local window.

o_t = softmax over {s q_t.kl_c : c < n_remote(t)} U {s q_t.k_j : lo(t) <= j <= t} applied to [vl ; v].
Grid (query blocks, H / GP, B); a program owns BT tokens x GP query heads of one kv head (rows
token-major), so GQA heads share every key load. Visits O(W / BN + T / (C BN)) key blocks, masking
only the edge blocks (from indices). Reads q, k, v, k_lm, v_lm; writes o and lse (natural log, fp32).
"""
import triton
import triton.language as tl

from ._common import K_LN2, key_block, key_spans, load_rows, query_rows, seq_layout, softmax_step, store_rows


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
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_t, o_h, m_r, t_row, lo_r, nr_r = query_rows(i_m, i_hg, seq_len, W, C, BT, GP, SLIDING)
    n_full, nr_max, j_lo, e1, e2, end = key_spans(i_m, seq_len, W, C, BT, BN, SLIDING)

    b_q = load_rows(q, bos + o_t, o_h, m_r, o_d, m_d, H, D)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    m_i = tl.full([BM], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)

    # remote landmarks [0, nr_max): full blocks below n_full need no mask
    for c0 in range(0, n_full, BN):
        b_k, b_v, m_vis = key_block(k_lm, v_lm, lm_bos, c0, nr_max, i_hk, o_d, m_d, t_row, lo_r, nr_r,
                                    HKV, D, BN, True, False)
        acc, m_i, l_i = softmax_step(acc, m_i, l_i, b_q, b_k, b_v, qk_scale, m_vis, False, PREC)
    for c0 in range(n_full, nr_max, BN):
        b_k, b_v, m_vis = key_block(k_lm, v_lm, lm_bos, c0, nr_max, i_hk, o_d, m_d, t_row, lo_r, nr_r,
                                    HKV, D, BN, True, True)
        acc, m_i, l_i = softmax_step(acc, m_i, l_i, b_q, b_k, b_v, qk_scale, m_vis, True, PREC)

    # local keys [j_lo, end): blocks in [e1, e2) are visible to every row
    for j0 in range(j_lo, tl.minimum(e1, end), BN):
        b_k, b_v, m_vis = key_block(k, v, bos, j0, end, i_hk, o_d, m_d, t_row, lo_r, nr_r, HKV, D, BN, False, True)
        acc, m_i, l_i = softmax_step(acc, m_i, l_i, b_q, b_k, b_v, qk_scale, m_vis, True, PREC)
    for j0 in range(e1, e2, BN):
        b_k, b_v, m_vis = key_block(k, v, bos, j0, end, i_hk, o_d, m_d, t_row, lo_r, nr_r, HKV, D, BN, False, False)
        acc, m_i, l_i = softmax_step(acc, m_i, l_i, b_q, b_k, b_v, qk_scale, m_vis, False, PREC)
    for j0 in range(tl.maximum(e1, e2), end, BN):
        b_k, b_v, m_vis = key_block(k, v, bos, j0, end, i_hk, o_d, m_d, t_row, lo_r, nr_r, HKV, D, BN, False, True)
        acc, m_i, l_i = softmax_step(acc, m_i, l_i, b_q, b_k, b_v, qk_scale, m_vis, True, PREC)

    store_rows(o, acc / l_i[:, None], bos + o_t, o_h, m_r, o_d, m_d, H, D)
    b_lse = (m_i + tl.log2(l_i)) * K_LN2
    tl.store(lse + (i_b * H + o_h).to(tl.int64) * T + (bos - i_b.to(tl.int64) * T) + o_t, b_lse, mask=m_r)
