"""Stage 1a of the chunked KDA forward: the decayed products of one row strip of a chunk (Gc from stage 1a-0).

e_ijd = 2^(Gc_id - Gc_jd); A_qk = scale tril(sum_d q k e), L = diag(beta) strict_tril(sum_d k k e) (q, k l2-normed
when asked), strip rows x columns up to the strip's end: one dot per K tile anchored on the strip's first row a
(2^(G_i - G_a) <= 1, 2^(G_a - G_j) <= 1 left of it, <= 2^DIAG_RANGE inside); past the cap the [BC, BC] diagonal
block is redone exactly, column by column. Grid (chunks * strips, HV). Reads q, k, beta, Gc; writes Aqk, L rows.
"""
import triton
import triton.language as tl

from ._common import chunk_of, load_beta, load_row_tile, row_tile

# Largest log2 decay the diagonal sub-block dot may undo (2^48 stays far from fp32 overflow and the
# factor it multiplies, <= 1, far from the subnormals); a strip with a row whose decay since the strip's start
# exceeds it forms its diagonal block column by column instead (exact for any decay: H200, B8 T4096 bf16 mode B,
# every strip beyond the cap, forward 2.499 -> 2.244 ms against the former separate fix kernel).
DIAG_RANGE = tl.constexpr(48.0)


@triton.jit
def far_rows(G_b, b_G, o_t, m_t, m, c0, HV: tl.constexpr, K: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """Rows [BT] of a chunk's [BT, BK] G tile whose decay since their strip's anchor (the row before the strip, row 0
    for the first) passes 2^DIAG_RANGE on some channel: the backward's anchored products leave their in-strip pairs
    to stage 3-fix."""
    p_x, _ = row_tile(G_b, (o_t // BC) * BC - 1 + (o_t < BC), m_t, HV * K, c0, K, BK)
    return (tl.max(tl.where(m, tl.load(p_x, mask=m, other=0.) - b_G, 0.), axis=1) > DIAG_RANGE) & m_t


@triton.jit(do_not_specialize=["T"])
def kda_intra_fwd_kernel(q, k, beta, Gc, Aqk, L, rstd_q, rstd_k, cu_seqlens, chunk_indices, scale, T,
                         H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                         BK: tl.constexpr, NK: tl.constexpr, USE_L2NORM: tl.constexpr, USE_SIGMOID: tl.constexpr,
                         DOT_PREC: tl.constexpr):
    NS: tl.constexpr = BT // BC
    i_p = tl.program_id(0).to(tl.int64)
    i_s = i_p % NS
    i_t, i_n, i_c, i_hv, i_h, bos, seq_len, tok, m_t = chunk_of(chunk_indices, cu_seqlens, i_p // NS,
                                                                tl.program_id(1).to(tl.int64), H, HV, BT)
    o_t = tl.arange(0, BT)
    row = bos + i_c * BT                           # first token of the chunk (int64 bases, int32 tiles)
    q_b = q + row * H * K + i_h * K
    k_b = k + row * H * K + i_h * K
    G_b = Gc + row * HV * K + i_hv * K
    s0 = (i_s * BC).to(tl.int32)
    o_r = s0 + tl.arange(0, BC)
    m_r = (i_c * BT + o_r) < seq_len               # no valid row past the sequence's end: nothing stored
    m_cols = m_t & (o_t < s0 + BC)                 # columns left of the strip and inside it

    b_Aq = tl.zeros([BC, BT], dtype=tl.float32)
    b_Ak = tl.zeros([BC, BT], dtype=tl.float32)
    b_sq = tl.zeros([BC], dtype=tl.float32)        # l2norm statistics of the strip's rows and of the columns
    b_sks = tl.zeros([BC], dtype=tl.float32)
    b_sk = tl.zeros([BT], dtype=tl.float32)
    b_far = 0.
    for i_k in range(NK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_ga = tl.load(G_b + s0 * HV * K + o_k, mask=m_k & (i_c * BT + s0 + 0 * o_k < seq_len), other=0.)
        b_qs, _ = load_row_tile(q_b, o_r, m_r, H * K, i_k * BK, K, BK)
        b_ks, _ = load_row_tile(k_b, o_r, m_r, H * K, i_k * BK, K, BK)
        b_Gs, m_xs = load_row_tile(G_b, o_r, m_r, HV * K, i_k * BK, K, BK)
        b_ea = tl.where(m_xs, tl.exp2(tl.minimum(b_Gs - b_ga[None, :], 0.)), 0.)
        b_k, _ = load_row_tile(k_b, o_t, m_cols, H * K, i_k * BK, K, BK)
        b_G, m_x = load_row_tile(G_b, o_t, m_cols, HV * K, i_k * BK, K, BK)
        if USE_L2NORM:
            b_sq += tl.sum(b_qs * b_qs, axis=1)
            b_sks += tl.sum(b_ks * b_ks, axis=1)
            b_sk += tl.sum(b_k * b_k, axis=1)
        b_kb = tl.trans(tl.where(m_x, b_k * tl.exp2(tl.minimum(b_ga[None, :] - b_G, DIAG_RANGE)), 0.))
        b_far = tl.maximum(b_far, tl.max(tl.max(tl.where(m_xs, b_ga[None, :] - b_Gs, 0.), axis=1), axis=0))
        b_Aq += tl.dot(b_qs * b_ea, b_kb, input_precision=DOT_PREC)
        b_Ak += tl.dot(b_ks * b_ea, b_kb, input_precision=DOT_PREC)

    if b_far > DIAG_RANGE:
        # rows beyond the cap: the strip's [BC, BC] diagonal block exactly, one column j at a time (e <= 1)
        o_c = tl.arange(0, BC)
        b_dq = tl.zeros([BC, BC], dtype=tl.float32)
        b_dk = tl.zeros([BC, BC], dtype=tl.float32)
        for i_k in range(NK):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            b_qs, _ = load_row_tile(q_b, o_r, m_r, H * K, i_k * BK, K, BK)
            b_ks, _ = load_row_tile(k_b, o_r, m_r, H * K, i_k * BK, K, BK)
            b_Gs, _ = load_row_tile(G_b, o_r, m_r, HV * K, i_k * BK, K, BK)
            for j in tl.static_range(BC):
                m_j = m_k & (i_c * BT + s0 + j + 0 * o_k < seq_len)
                b_kj = tl.load(k_b + (s0 + j) * H * K + o_k, mask=m_j, other=0.).to(tl.float32)
                b_Gj = tl.load(G_b + (s0 + j) * HV * K + o_k, mask=m_j, other=0.)
                b_kje = b_kj[None, :] * tl.exp2(tl.minimum(b_Gs - b_Gj[None, :], 0.))
                b_dq = tl.where(o_c[None, :] == j, b_dq + tl.sum(b_qs * b_kje, axis=1)[:, None], b_dq)
                b_dk = tl.where(o_c[None, :] == j, b_dk + tl.sum(b_ks * b_kje, axis=1)[:, None], b_dk)
        m_s = (tl.arange(0, NS) == i_s)[None, :, None]
        b_Aq = tl.reshape(tl.where(m_s, b_dq[:, None, :], tl.reshape(b_Aq, [BC, NS, BC])), [BC, BT])
        b_Ak = tl.reshape(tl.where(m_s, b_dk[:, None, :], tl.reshape(b_Ak, [BC, NS, BC])), [BC, BT])

    if USE_L2NORM:
        b_rqs = 1.0 / tl.sqrt(b_sq + 1e-6)
        b_rks = 1.0 / tl.sqrt(b_sks + 1e-6)
        b_rk = 1.0 / tl.sqrt(b_sk + 1e-6)
        tl.store(rstd_q + (row + o_r) * HV + i_hv, b_rqs, mask=m_r)
        tl.store(rstd_k + (row + o_r) * HV + i_hv, b_rks, mask=m_r)
    else:
        b_rqs = tl.full([BC], 1.0, dtype=tl.float32)
        b_rks = tl.full([BC], 1.0, dtype=tl.float32)
        b_rk = tl.full([BT], 1.0, dtype=tl.float32)
    b_betas = load_beta(beta, row + o_r, m_r, i_hv, HV, USE_SIGMOID)
    m_valid = m_r[:, None] & m_t[None, :]
    b_Aq = tl.where(m_valid & (o_r[:, None] >= o_t[None, :]), b_Aq * scale * b_rqs[:, None] * b_rk[None, :], 0.)
    b_Ak = tl.where(m_valid & (o_r[:, None] > o_t[None, :]), b_Ak * (b_betas * b_rks)[:, None] * b_rk[None, :], 0.)
    a_off = row * HV * BT + i_hv * BT
    p_a, m_a = row_tile(Aqk + a_off, o_r, m_r, HV * BT, 0, BT, BT)
    tl.store(p_a, b_Aq.to(Aqk.dtype.element_ty), mask=m_a)
    p_a, m_a = row_tile(L + a_off, o_r, m_r, HV * BT, 0, BT, BT)
    tl.store(p_a, b_Ak, mask=m_a)
