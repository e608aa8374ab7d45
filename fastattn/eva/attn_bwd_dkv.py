"""FlashEVA backward, stage 2: dk and dv of the local keys.

Key j is seen by queries t in [j, t_max(j)] (its window); dv_j = sum_t P_tj dO_t and dk_j = s sum_t dS_tj q_t, summed
over the H / Hkv query heads of its kv head. Grid (key blocks of BN, Hkv, B); a program loops over the query blocks (BT
tokens x GP heads, and over head groups when GP < H / Hkv), masking only edge blocks. Reads q, k, v, do, lse, delta;
writes dk, dv (the landmark part is added later, in place, by the pooling backward).
"""
import triton
import triton.language as tl

from ._common import K_LOG2E, last_query_of_key, load_row_pair, load_rows, local_bounds, seq_layout, store_rows, visible


@triton.jit
def dkv_block(b_dk, b_dv, b_k, b_v, q, do, lse, delta, t0, h0, bos, lse_tok0, i_b, T, o_j, seq_len, W, C,
              qk_scale, H: tl.constexpr, D: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
              SLIDING: tl.constexpr, LANDMARK: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    """Add one query block's contribution to dk, dv of keys o_j (local keys, or landmarks when LANDMARK)."""
    BM: tl.constexpr = BT * GP
    o_r = tl.arange(0, BM)
    o_t = t0 + o_r // GP
    o_h = h0 + o_r % GP
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_r = o_t < seq_len
    if not MASKED:
        m_r = o_r >= 0
    b_q, b_do = load_row_pair(q, do, bos + o_t, o_h, m_r, o_d, m_d, H, D)
    o_row = (i_b * H + o_h).to(tl.int64) * T + lse_tok0 + o_t
    b_lse2 = tl.load(lse + o_row, mask=m_r, other=0.) * K_LOG2E
    b_delta = tl.load(delta + o_row, mask=m_r, other=0.)
    b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * qk_scale
    b_pt = tl.exp2(b_st - b_lse2[None, :])
    if MASKED:
        lo_r, nr_r = local_bounds(o_t, W, C, SLIDING)
        m_vis = visible(o_j[:, None], o_t[None, :], lo_r[None, :], nr_r[None, :], LANDMARK)
        b_pt = tl.where(m_vis & m_r[None, :], b_pt, 0.)
    b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PREC)
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)
    b_dst = b_pt * (b_dpt - b_delta[None, :])
    b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC)
    return b_dk, b_dv


@triton.jit
def dkv_sweep(k, v, dk, dv, q, do, lse, delta, base, out_base, o_j, m_j, i_hk, bos, i_b, T, seq_len, W, C, qk_scale,
              scale, t_start, f1, f2, t_end, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, GP: tl.constexpr,
              BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, SLIDING: tl.constexpr, LANDMARK: tl.constexpr,
              PREC: tl.constexpr):
    """Rows base + o_j of k, v (head i_hk): sum the query blocks [t_start, t_end) of every query head of kv
    head i_hk (blocks in [f1, f2) unmasked) and store dk (times scale) and dv into rows out_base + o_j."""
    G: tl.constexpr = H // HKV
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_k = load_rows(k, base + o_j, i_hk, m_j, o_d, m_d, HKV, D)
    b_v = load_rows(v, base + o_j, i_hk, m_j, o_d, m_d, HKV, D)
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BD], dtype=tl.float32)
    lse_tok0 = bos - i_b.to(tl.int64) * T
    for i_g in range(0, G // GP):
        h0 = i_hk * G + i_g * GP
        for t0 in range((t_start // BT) * BT, tl.minimum(f1, t_end), BT):
            b_dk, b_dv = dkv_block(b_dk, b_dv, b_k, b_v, q, do, lse, delta, t0, h0, bos, lse_tok0, i_b, T, o_j,
                                   seq_len, W, C, qk_scale, H, D, GP, BT, BD, SLIDING, LANDMARK, True, PREC)
        for t0 in range(f1, f2, BT):
            b_dk, b_dv = dkv_block(b_dk, b_dv, b_k, b_v, q, do, lse, delta, t0, h0, bos, lse_tok0, i_b, T, o_j,
                                   seq_len, W, C, qk_scale, H, D, GP, BT, BD, SLIDING, LANDMARK, False, PREC)
        for t0 in range(tl.maximum(f1, f2), t_end, BT):
            b_dk, b_dv = dkv_block(b_dk, b_dv, b_k, b_v, q, do, lse, delta, t0, h0, bos, lse_tok0, i_b, T, o_j,
                                   seq_len, W, C, qk_scale, H, D, GP, BT, BD, SLIDING, LANDMARK, True, PREC)
    store_rows(dk, b_dk * scale, out_base + o_j, i_hk, m_j, o_d, m_d, HKV, D)
    store_rows(dv, b_dv, out_base + o_j, i_hk, m_j, o_d, m_d, HKV, D)


@triton.jit(do_not_specialize=["T", "N_LM", "W", "C"])
def eva_attn_bwd_dkv_kernel(q, k, v, do, lse, delta, dk, dv, cu_seqlens, lm_offsets, blk_seq, blk_idx,
                            qk_scale, scale, T, N_LM, W, C,
                            H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, GP: tl.constexpr,
                            BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, SLIDING: tl.constexpr,
                            IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    i_z, i_hk, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_blk, bos, seq_len, lm_bos = seq_layout(cu_seqlens, lm_offsets, blk_seq, blk_idx, i_b, i_z, T, N_LM,
                                                  IS_VARLEN)
    if i_n < 0:
        return
    j0 = i_blk * BN
    o_j = j0 + tl.arange(0, BN)
    j_last = tl.minimum(j0 + BN - 1, seq_len - 1)
    end = tl.minimum(last_query_of_key(j_last, W, C, SLIDING), seq_len - 1) + 1
    f1 = ((j_last + BT - 1) // BT) * BT  # query blocks from f1 on lie on or after every key
    f2 = ((tl.minimum(last_query_of_key(j0, W, C, SLIDING), seq_len - 1) + 1) // BT) * BT
    dkv_sweep(k, v, dk, dv, q, do, lse, delta, bos, bos, o_j, o_j < seq_len, i_hk, bos, i_b, T, seq_len, W, C,
              qk_scale, scale, j0, f1, f2, end, H, HKV, D, GP, BT, BN, BD, SLIDING, False, PREC)
