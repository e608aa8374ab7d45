"""FlashEVA backward, stage 3: landmark gradients dvl_c = sum_t P_tc dO_t, dkl_c = s sum_t dS_tc q_t.

Landmark c is seen by every query t >= t_min(c); sums run over the query heads of its kv head. Each sequence's
queries are cut into NSEG segments (multiples of BT) so the early landmarks do not serialise on one program.
Grid (landmark blocks of BN, Hkv x NSEG, B). Reads q, k_lm, v_lm, do, lse, delta; writes each segment's partial
sums to its slice of dk_lm, dv_lm [NSEG, B, N_LM, Hkv, D] fp32 (added up by the pooling backward).
"""
import triton
import triton.language as tl

from ._common import first_query_of_landmark, segment_rows, seq_layout
from .attn_bwd_dkv import dkv_sweep


@triton.jit(do_not_specialize=["T", "N_LM", "W", "C"])
def eva_attn_bwd_lm_kernel(q, k_lm, v_lm, do, lse, delta, dk_lm, dv_lm, cu_seqlens, lm_offsets, blk_seq, blk_idx,
                           qk_scale, scale, T, N_LM, W, C,
                           H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, GP: tl.constexpr,
                           BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, SLIDING: tl.constexpr,
                           IS_VARLEN: tl.constexpr, NSEG: tl.constexpr, PREC: tl.constexpr):
    i_z, i_hs, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hk, i_s = i_hs % HKV, i_hs // HKV
    i_n, i_blk, bos, seq_len, lm_bos = seq_layout(cu_seqlens, lm_offsets, blk_seq, blk_idx, i_b, i_z, T, N_LM,
                                                  IS_VARLEN)
    if i_n < 0:
        return
    n_lm = seq_len // C
    c0 = i_blk * BN
    o_c = c0 + tl.arange(0, BN)
    c_last = tl.minimum(c0 + BN, n_lm) - 1
    seg = tl.cdiv(tl.cdiv(seq_len, NSEG), BT) * BT
    s0 = i_s * seg
    s1 = tl.minimum(s0 + seg, seq_len)
    start = tl.maximum(first_query_of_landmark(c0, W, C, SLIDING), s0)
    # from f1 on every row sees every landmark of the block
    f1 = tl.maximum(((first_query_of_landmark(c_last, W, C, SLIDING) + BT - 1) // BT) * BT, s0)
    f2 = tl.minimum((seq_len // BT) * BT, s1)
    out_base = segment_rows(i_s, N_LM) + lm_bos
    dkv_sweep(k_lm, v_lm, dk_lm, dv_lm, q, do, lse, delta, lm_bos, out_base, o_c, o_c < n_lm, i_hk, bos, i_b, T,
              seq_len, W, C, qk_scale, scale, start, f1, f2, s1, H, HKV, D, GP, BT, BN, BD, SLIDING, True, PREC)
