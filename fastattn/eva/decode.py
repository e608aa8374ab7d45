"""FlashEVA decode step: one new query per sequence over [landmarks ; window], split over programs.

eva_decode_kernel: the augmented key range [0, N_LM + N_LOC) is cut into splits of SPLIT keys; each
program (split, kv head, batch) runs an online softmax for the H / Hkv query heads of its kv head and
writes a normalised partial output and its log2-sum-exp. Reads q, k_lm, v_lm, k_win, v_win; writes part_o,
part_lse (merged by decode_combine.py).
"""
import triton
import triton.language as tl

from ._common import attend_block, load_rows


@triton.jit(do_not_specialize=["N_LM", "N_LOC", "SPLIT", "LM_CAP", "WIN_CAP"])
def eva_decode_kernel(q, k_lm, v_lm, k_win, v_win, part_o, part_lse, qk_scale, N_LM, N_LOC, SPLIT, LM_CAP, WIN_CAP,
                      H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr,
                      BD: tl.constexpr, NS: tl.constexpr, PREC: tl.constexpr):
    i_s, i_hk, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_b.to(tl.int64)
    G: tl.constexpr = H // HKV
    o_g = tl.arange(0, BG)
    m_g = o_g < G
    o_h = i_hk * G + o_g
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_n = tl.arange(0, BN)
    b_q = load_rows(q, i_b + 0 * o_g, o_h, m_g, o_d, m_d, H, D)
    acc = tl.zeros([BG, BD], dtype=tl.float32)
    m_i = tl.full([BG], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BG], dtype=tl.float32)

    s0 = i_s * SPLIT
    s1 = tl.minimum(s0 + SPLIT, N_LM + N_LOC)
    lm_end = tl.minimum(s1, N_LM)
    for c0 in range(s0, lm_end, BN):
        m_c = (c0 + o_n) < lm_end
        acc, m_i, l_i = attend_block(acc, m_i, l_i, b_q, k_lm, v_lm, i_b * LM_CAP + c0 + o_n, m_c, i_hk, o_d, m_d,
                                     qk_scale, m_c[None, :], HKV, D, True, PREC)
    w_end = s1 - N_LM
    for j0 in range(tl.maximum(s0, N_LM) - N_LM, w_end, BN):
        m_j = (j0 + o_n) < w_end
        acc, m_i, l_i = attend_block(acc, m_i, l_i, b_q, k_win, v_win, i_b * WIN_CAP + j0 + o_n, m_j, i_hk, o_d,
                                     m_d, qk_scale, m_j[None, :], HKV, D, True, PREC)

    has = l_i > 0
    b_o = tl.where(has[:, None], acc / tl.where(has, l_i, 1.)[:, None], 0.)
    b_lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.)), float("-inf"))
    o_p = (i_b * H + o_h) * NS + i_s
    tl.store(part_o + o_p[:, None] * D + o_d[None, :], b_o, mask=m_g[:, None] & m_d[None, :])
    tl.store(part_lse + o_p, b_lse, mask=m_g)
