"""Triton helpers shared by the FlashEVA kernels: visibility bounds computed from indices, the
per-sequence layout of a program, and the online-softmax step.

Positions are 0-based inside a sequence. Block windows: lo(t) = floor(t/W) W; sliding windows:
lo(t) = C floor(max(t - W + 1, 0) / C). Query t sees keys [lo(t), t] and landmarks [0, lo(t) / C).
Scores live in log2 units (qk_scale = softmax_scale * log2 e), so every exponential is an exp2.
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # Python-side (launchers)
K_LOG2E = tl.constexpr(LOG2E)  # kernel-side constants must be constexpr globals
K_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def local_bounds(t, W, C, SLIDING: tl.constexpr):
    """(lo, n_remote) of positions t (scalar or vector): keys [lo, t], landmarks [0, n_remote)."""
    if SLIDING:
        lo = (tl.maximum(t - W + 1, 0) // C) * C
    else:
        lo = (t // W) * W
    return lo, lo // C


@triton.jit
def last_query_of_key(j, W, C, SLIDING: tl.constexpr):
    """The largest t whose local window holds key j (lo(t) <= j)."""
    if SLIDING:
        t = (j // C) * C + C + W - 2
    else:
        t = (j // W) * W + W - 1
    return t


@triton.jit
def first_query_of_landmark(c, W, C, SLIDING: tl.constexpr):
    """The smallest t that sees landmark c (n_remote(t) > c)."""
    if SLIDING:
        t = (c + 1) * C + W - 1
    else:
        t = (c // (W // C) + 1) * W
    return t


@triton.jit
def seq_layout(cu_seqlens, lm_offsets, blk_seq, blk_idx, i_b, i_z, T, N_LM, IS_VARLEN: tl.constexpr):
    """(sequence id or -1, block index, token offset, length, landmark offset) of one program.

    Positions inside a sequence are int32; the token and landmark offsets are int64. Plain batches:
    sequence i_b, block i_z. Packed sequences: read from the block tables."""
    if IS_VARLEN:
        i_n = tl.load(blk_seq + i_z)
        i_blk = tl.load(blk_idx + i_z)
        i_safe = tl.maximum(i_n, 0)
        bos = tl.load(cu_seqlens + i_safe).to(tl.int64)
        seq_len = (tl.load(cu_seqlens + i_safe + 1).to(tl.int64) - bos).to(tl.int32)
        lm_bos = tl.load(lm_offsets + i_safe).to(tl.int64)
    else:
        i_n = i_b
        i_blk = i_z
        bos = i_b.to(tl.int64) * T
        seq_len = i_b * 0 + T
        lm_bos = i_b.to(tl.int64) * N_LM
    return i_n, i_blk, bos, seq_len, lm_bos


@triton.jit
def attend_block(acc, m_i, l_i, b_q, k, v, rows, m_rows, i_hk, o_d, m_d, qk_scale, m_vis,
                 HKV: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    """One online-softmax step of queries b_q [M, BD] over key/value rows ``rows`` (head i_hk) of k, v.

    m_i starts at -1e30 (finite), so fully masked rows give p = 0 and never NaN."""
    o_kv = (rows * HKV + i_hk)[:, None] * D + o_d[None, :]
    m_kv = m_rows[:, None] & m_d[None, :]
    b_k = tl.load(k + o_kv, mask=m_kv, other=0.)
    b_v = tl.load(v + o_kv, mask=m_kv, other=0.)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale
    if MASKED:
        b_s = tl.where(m_vis, b_s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(b_s, 1))
    b_p = tl.exp2(b_s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(b_p, 1)
    acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def load_rows(x, tok, head, m_row, o_d, m_d, NH: tl.constexpr, D: tl.constexpr):
    """Rows (tok, head) of a [*, NH, D] tensor as a [R, BD] block (0 where masked)."""
    p = x + (tok * NH + head)[:, None] * D + o_d[None, :]
    return tl.load(p, mask=m_row[:, None] & m_d[None, :], other=0.)
