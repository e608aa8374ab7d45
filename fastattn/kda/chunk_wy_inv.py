"""Stage 1b-i of the chunked KDA forward: the inverse Tinv = (I + L)^-1 of one chunk.

Levels s = 1, 2, 4, 8 on the diagonal [BC, BC] blocks as one batch [NS, BC, BC]; each later level s = BC, 2 BC
doubles the inverted blocks ([[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]) with one batched product pair
reading them back from the output. Grid (chunks, HV). Reads L [T, HV, BT]; writes Tinv over it (zeros above the
diagonal blocks left as they are) and, with CAST_OUT, a copy in Ti's dtype (bf16: stage 1b-ii's operand).
"""
import triton
import triton.language as tl

from ._common import chunk_program


@triton.jit
def double_blocks(p_b, n_r, S: tl.constexpr, HV: tl.constexpr, BT: tl.constexpr, INV_PREC: tl.constexpr):
    """One level: the chunk at p_b (n_r valid rows) holds the inverses of its diagonal S-blocks over L; write the
    lower-left S-block -C^-1 B A^-1 of each diagonal 2S-block's inverse over B."""
    tl.debug_barrier()                             # the inverted S-blocks written before by other threads
    o_s = tl.arange(0, S)
    o_b3 = tl.arange(0, BT // (2 * S))[:, None, None] * (2 * S)
    o_lo = o_b3 + o_s[None, :, None]               # rows (and columns) of the upper S-block of each 2S-block
    o_hi = o_lo + S
    o_c = o_s[None, None, :]
    b_lo = tl.load(p_b + o_lo * (HV * BT) + o_b3 + o_c, mask=o_lo < n_r, other=0.)
    b_hi = tl.load(p_b + o_hi * (HV * BT) + o_b3 + S + o_c, mask=o_hi < n_r, other=0.)
    p_x = p_b + o_hi * (HV * BT) + o_b3 + o_c
    b_X = tl.dot(b_hi, tl.dot(tl.load(p_x, mask=o_hi < n_r, other=0.), b_lo, input_precision=INV_PREC),
                 input_precision=INV_PREC)
    tl.store(p_x, -b_X, mask=o_hi < n_r)


@triton.jit(do_not_specialize=["T"])
def kda_wy_inv_kernel(L, Ti, cu_seqlens, chunk_indices, T, H: tl.constexpr, HV: tl.constexpr, BT: tl.constexpr,
                      BC: tl.constexpr, INV_PREC: tl.constexpr, CAST_OUT: tl.constexpr):
    i_t, i_n, i_c, i_hv, i_h, bos, seq_len, tok, m_t = chunk_program(chunk_indices, cu_seqlens, H, HV, BT)
    NS: tl.constexpr = BT // BC
    tl.static_assert(NS <= 4)
    p_b = L + (bos + i_c * BT) * HV * BT + i_hv * BT   # the chunk's first row (int64 base, int32 tiles)
    n_r = seq_len - i_c * BT                           # valid rows
    # the diagonal blocks as one batch [NS, BC, BC]; level s = 1: [[1, 0], [l, 1]]^-1 = [[1, 0], [-l, 1]]
    o_r = tl.arange(0, BC)
    o_r3 = o_r[None, :, None]
    o_c3 = o_r[None, None, :]
    o_s3 = tl.arange(0, NS)[:, None, None] * BC
    p_d = p_b + (o_s3 + o_r3) * (HV * BT) + o_s3 + o_c3
    m_d = (o_s3 + o_r3) < n_r
    b_L = tl.load(p_d, mask=m_d & (o_r3 > o_c3), other=0.)
    b_D = tl.where(o_r3 == o_c3, 1., 0.) - tl.where((o_r3 // 2) == (o_c3 // 2), b_L, 0.)
    for i_l in tl.static_range(1, 8):
        if (1 << i_l) < BC:
            s = 1 << i_l
            # B: rows of the lower s-block, columns of the upper s-block, inside each 2s-block
            m_s = ((o_r3 // (2 * s)) == (o_c3 // (2 * s))) & ((o_r3 // s) % 2 == 1) & ((o_c3 // s) % 2 == 0)
            b_D = b_D - tl.dot(b_D, tl.dot(tl.where(m_s, b_L, 0.), b_D, input_precision=INV_PREC),
                               input_precision=INV_PREC)
    tl.store(p_d, b_D, mask=m_d)
    if NS >= 2:
        double_blocks(p_b, n_r, BC, HV, BT, INV_PREC)
    if NS >= 4:
        double_blocks(p_b, n_r, 2 * BC, HV, BT, INV_PREC)
    if CAST_OUT:
        # the finished inverse, rounded once into the 16-bit copy for the forward's stage 1b-ii (backward: fp32)
        tl.debug_barrier()
        o_t = tl.arange(0, BT)
        m_o = (o_t < n_r)[:, None] & (o_t[None, :] < BT)
        o_x = o_t[:, None] * (HV * BT) + o_t[None, :]
        b_T = tl.load(p_b + o_x, mask=m_o, other=0.)
        tl.store(Ti + (bos + i_c * BT) * HV * BT + i_hv * BT + o_x, b_T.to(Ti.dtype.element_ty), mask=m_o)
