"""FlashEVA backward, stage 3: gradients of the landmarks.

Landmark c is seen by every query t >= t_min(c) of its sequence; dvl_c = sum_t P_tc dO_t and
dkl_c = s sum_t dS_tc q_t, summed over the query heads of its kv head.
Grid (landmark blocks of BN, Hkv, B), earliest (heaviest) blocks first; a program loops over query
blocks (BT tokens x GP heads), masking only edge blocks. Reads q, k_lm, v_lm, do, lse, delta;
writes dk_lm, dv_lm [B, N_LM, Hkv, D] fp32 (consumed by the pooling backward).
"""
import triton
import triton.language as tl

from ._common import first_query_of_landmark, seq_layout
from .attn_bwd_dkv import dkv_sweep


@triton.jit(do_not_specialize=["T", "N_LM", "W", "C"])
def eva_attn_bwd_lm_kernel(q, k_lm, v_lm, do, lse, delta, dk_lm, dv_lm, cu_seqlens, lm_offsets, blk_seq, blk_idx,
                           qk_scale, scale, T, N_LM, W, C,
                           H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, GP: tl.constexpr,
                           BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, SLIDING: tl.constexpr,
                           IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    i_z, i_hk, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_blk, bos, seq_len, lm_bos = seq_layout(cu_seqlens, lm_offsets, blk_seq, blk_idx, i_b, i_z, T, N_LM,
                                                  IS_VARLEN)
    if i_n < 0:
        return
    n_lm = seq_len // C
    c0 = i_blk * BN
    o_c = c0 + tl.arange(0, BN)
    c_last = tl.minimum(c0 + BN, n_lm) - 1
    start = first_query_of_landmark(c0, W, C, SLIDING)
    f1 = ((first_query_of_landmark(c_last, W, C, SLIDING) + BT - 1) // BT) * BT  # every row sees every landmark
    f2 = (seq_len // BT) * BT
    dkv_sweep(k_lm, v_lm, dk_lm, dv_lm, q, do, lse, delta, lm_bos, o_c, o_c < n_lm, i_hk, bos, i_b, T, seq_len, W, C,
              qk_scale, scale, start, f1, f2, seq_len, H, HKV, D, GP, BT, BN, BD, SLIDING, True, PREC)
