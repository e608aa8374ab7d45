"""FlashEVA decode step, stage 2: merge the per-split partial outputs of one query head.

o = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max) over the n_split valid splits of decode.py's stage.
Grid (B * H). Reads part_o [B*H, NS, D], part_lse [B*H, NS]; writes o (its dtype).
"""
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n_split"])
def eva_decode_combine_kernel(part_o, part_lse, o, n_split, D: tl.constexpr, BD: tl.constexpr, NS: tl.constexpr):
    i_bh = tl.program_id(0).to(tl.int64)
    o_s = tl.arange(0, NS)
    m_s = o_s < n_split
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_lse = tl.load(part_lse + i_bh * NS + o_s, mask=m_s, other=float("-inf"))
    b_w = tl.exp2(b_lse - tl.max(b_lse, 0))
    b_w = tl.where(m_s, b_w, 0.)
    b_po = tl.load(part_o + (i_bh * NS + o_s)[:, None] * D + o_d[None, :], mask=m_s[:, None] & m_d[None, :], other=0.)
    b_o = tl.sum(b_w[:, None] * b_po, 0) / tl.sum(b_w, 0)
    tl.store(o + i_bh * D + o_d, b_o.to(o.dtype.element_ty), mask=m_d)
