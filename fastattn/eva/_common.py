"""Triton helpers shared by the FlashEVA kernels: visibility bounds computed from indices, the
per-sequence layout of a program, the rows and key-block loop bounds of a query tile, key-block loads,
the online-softmax step and [*, heads, D] row loads / stores.

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
def segment_rows(i_s, N_LM):
    """First row of landmark-gradient slice i_s in a [NSEG, B, N_LM, ...] buffer (B = programs on axis 2)."""
    return tl.num_programs(2).to(tl.int64) * N_LM * i_s


@triton.jit
def visible(j, t, lo, n_remote, LANDMARK: tl.constexpr):
    """Whether query t sees key j (landmark j when LANDMARK); arguments broadcast against each other."""
    if LANDMARK:
        m = j < n_remote
    else:
        m = (j >= lo) & (j <= t)
    return m


@triton.jit
def query_rows(i_m, i_hg, seq_len, W, C, BT: tl.constexpr, GP: tl.constexpr, SLIDING: tl.constexpr):
    """(o_t, o_h, m_r, t_row, lo_r, nr_r) of the BT x GP rows of query tile i_m (token-major; GQA heads
    i_hg * GP + [0, GP)); t_row is o_t clamped into the sequence, lo_r / nr_r its window bounds."""
    o_r = tl.arange(0, BT * GP)
    o_t = i_m * BT + o_r // GP
    o_h = i_hg * GP + o_r % GP
    t_row = tl.minimum(o_t, seq_len - 1)
    lo_r, nr_r = local_bounds(t_row, W, C, SLIDING)
    return o_t, o_h, o_t < seq_len, t_row, lo_r, nr_r


@triton.jit
def key_spans(i_m, seq_len, W, C, BT: tl.constexpr, BN: tl.constexpr, SLIDING: tl.constexpr):
    """Key-block loop bounds of query tile i_m: landmarks [0, n_full) unmasked, [n_full, nr_max) masked;
    local keys from j_lo (a multiple of BN) to end, where blocks in [e1, e2) are visible to every row."""
    t_first = i_m * BT
    t_last = tl.minimum(t_first + BT - 1, seq_len - 1)
    lo_min, nr_min = local_bounds(t_first, W, C, SLIDING)
    lo_max, nr_max = local_bounds(t_last, W, C, SLIDING)
    n_full = (nr_min // BN) * BN
    e1 = ((lo_max + BN - 1) // BN) * BN
    e2 = ((t_first + 1) // BN) * BN
    return n_full, nr_max, (lo_min // BN) * BN, e1, e2, t_last + 1


@triton.jit
def key_block(k, v, base, j0, limit, i_hk, o_d, m_d, t_row, lo_r, nr_r,
              HKV: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, LANDMARK: tl.constexpr, MASKED: tl.constexpr):
    """Keys / values j0 + [0, BN) (rows base + j of k, v; head i_hk) and their visibility m_vis [rows, BN].
    MASKED blocks load keys j < limit only; unmasked blocks load every key and return m_vis = 0."""
    o_j = j0 + tl.arange(0, BN)
    if MASKED:
        m_j = o_j < limit
        m_vis = visible(o_j[None, :], t_row[:, None], lo_r[:, None], nr_r[:, None], LANDMARK)
    else:
        m_j = o_j >= 0
        m_vis = 0
    b_k, b_v = load_row_pair(k, v, base + o_j, i_hk, m_j, o_d, m_d, HKV, D)
    return b_k, b_v, m_vis


@triton.jit
def attend_block(acc, m_i, l_i, b_q, k, v, rows, m_rows, i_hk, o_d, m_d, qk_scale, m_vis,
                 HKV: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    """One online-softmax step of queries b_q [M, BD] over key/value rows ``rows`` (head i_hk) of k, v.

    m_i starts at -1e30 (finite), so fully masked rows give p = 0 and never NaN."""
    b_k, b_v = load_row_pair(k, v, rows, i_hk, m_rows, o_d, m_d, HKV, D)
    return softmax_step(acc, m_i, l_i, b_q, b_k, b_v, qk_scale, m_vis, MASKED, PREC)


@triton.jit
def softmax_step(acc, m_i, l_i, b_q, b_k, b_v, qk_scale, m_vis, MASKED: tl.constexpr, PREC: tl.constexpr):
    """acc, m_i, l_i after queries b_q attend to keys b_k / values b_v (scores masked by m_vis if MASKED)."""
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


@triton.jit
def load_row_pair(x, y, tok, head, m_row, o_d, m_d, NH: tl.constexpr, D: tl.constexpr):
    """load_rows of two tensors of one shape, from one offset block."""
    o_xy = (tok * NH + head)[:, None] * D + o_d[None, :]
    m_xy = m_row[:, None] & m_d[None, :]
    return tl.load(x + o_xy, mask=m_xy, other=0.), tl.load(y + o_xy, mask=m_xy, other=0.)


@triton.jit
def store_rows(x, b_x, tok, head, m_row, o_d, m_d, NH: tl.constexpr, D: tl.constexpr):
    """Store a [R, BD] block into rows (tok, head) of a [*, NH, D] tensor (cast to its dtype)."""
    p = x + (tok * NH + head)[:, None] * D + o_d[None, :]
    tl.store(p, b_x.to(x.dtype.element_ty), mask=m_row[:, None] & m_d[None, :])
