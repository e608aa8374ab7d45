"""Stage 1a of the chunked KDA forward: the decayed products inside one chunk.

G = in-chunk cumsum of the (in-kernel) gate, log2 units; e_ijd = 2^(G_id - G_jd); A_qk = scale tril(sum_d q k e),
L = diag(beta) strict_tril(sum_d k k e) (q, k l2-normalised when asked). Sub-blocks use tensor-core dots anchored
on a past row (exponents <= 0, or <= DIAG_RANGE on the diagonal; rows beyond it are redone pairwise).
Grid (chunks, HV). Reads q, k, g, beta. Writes Gc [T, HV, K], Aqk and L [T, HV, BT], rstd_q/k [T, HV].
"""
import triton
import triton.language as tl

from ._common import LOG2E, chunk_program, gate_fwd, load_beta, load_gate_params, row_tile

# Largest log2 decay the diagonal sub-block dot may undo (2^48 stays far from fp32 overflow and the
# factor it multiplies, <= 1, far from the subnormals); a row whose decay since its sub-block start
# exceeds it gets its diagonal entries from the exact pairwise loop instead.
DIAG_RANGE = tl.constexpr(48.0)


@triton.jit
def diag_pairwise(b_q, b_k, b_G, k, Gc, bos, i_c, seq_len, i_h, i_hv, o_t, o_k, m_k,
                  H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Exact diagonal sub-block sums, row i against partner j = its block start + c (j <= i, exponent <= 0):
    returns (sum_d q_id k_jd e_ijd, sum_d k_id k_jd e_ijd) placed at [i, j]."""
    b_sq = tl.zeros([BT, BT], dtype=tl.float32)
    b_sk = tl.zeros([BT, BT], dtype=tl.float32)
    for c in range(BC):
        o_j = (o_t // BC) * BC + c
        m_j = (o_j <= o_t) & ((i_c * BT + o_j) < seq_len)
        tok_j = bos + i_c * BT + o_j
        m2 = m_j[:, None] & m_k[None, :]
        b_kj = tl.load(k + ((tok_j * H + i_h) * K)[:, None] + o_k[None, :], mask=m2, other=0.).to(tl.float32)
        b_Gj = tl.load(Gc + ((tok_j * HV + i_hv) * K)[:, None] + o_k[None, :], mask=m2, other=0.)
        b_e = tl.exp2(tl.where(m2, b_G - b_Gj, float("-inf")))
        b_put = o_t[None, :] == o_j[:, None]
        b_sq += tl.where(b_put, tl.sum(b_q * b_kj * b_e, axis=1)[:, None], 0.)
        b_sk += tl.where(b_put, tl.sum(b_k * b_kj * b_e, axis=1)[:, None], 0.)
    return b_sq, b_sk


@triton.jit(do_not_specialize=["T"])
def kda_intra_fwd_kernel(q, k, g, beta, A_log, dt_bias, Gc, Aqk, L, rstd_q, rstd_k, cu_seqlens, chunk_indices,
                         scale, T, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                         BC: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr,
                         USE_L2NORM: tl.constexpr, USE_GATE: tl.constexpr, HAS_A: tl.constexpr,
                         HAS_BIAS: tl.constexpr, HAS_LB: tl.constexpr, LB: tl.constexpr,
                         USE_SIGMOID: tl.constexpr, DOT_PREC: tl.constexpr):
    i_t, i_n, i_c, i_hv, i_h, bos, seq_len, tok, m_t = chunk_program(chunk_indices, cu_seqlens, H, HV, BT)

    o_t = tl.arange(0, BT)
    row = bos + i_c * BT                           # first token of the chunk (int64 bases, int32 tiles)
    q_b = q + row * H * K + i_h * K
    k_b = k + row * H * K + i_h * K
    x_b = row * HV * K + i_hv * K                  # g, Gc, w, qg, kd
    m_blk = (o_t // BC)[:, None] == (o_t // BC)[None, :]

    # ---- l2norm statistics over the whole head dim
    if USE_L2NORM:
        b_sq = tl.zeros([BT], dtype=tl.float32)
        b_sk = tl.zeros([BT], dtype=tl.float32)
        for i_k in range(NK):
            p_x, m_x = row_tile(q_b, o_t, m_t, H * K, i_k * BK, K, BK)
            b_q = tl.load(p_x, mask=m_x, other=0.).to(tl.float32)
            p_x, m_x = row_tile(k_b, o_t, m_t, H * K, i_k * BK, K, BK)
            b_k = tl.load(p_x, mask=m_x, other=0.).to(tl.float32)
            b_sq += tl.sum(b_q * b_q, axis=1)
            b_sk += tl.sum(b_k * b_k, axis=1)
        b_rq = 1.0 / tl.sqrt(b_sq + 1e-6)
        b_rk = 1.0 / tl.sqrt(b_sk + 1e-6)
        tl.store(rstd_q + tok * HV + i_hv, b_rq, mask=m_t)
        tl.store(rstd_k + tok * HV + i_hv, b_rk, mask=m_t)
    else:
        b_rq = tl.full([BT], 1.0, dtype=tl.float32)
        b_rk = tl.full([BT], 1.0, dtype=tl.float32)

    b_beta = load_beta(beta, tok, m_t, i_hv, HV, USE_SIGMOID)

    b_Aqk = tl.zeros([BT, BT], dtype=tl.float32)
    b_Akk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(NK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m = m_t[:, None] & m_k[None, :]
        p_x, m_x = row_tile(q_b, o_t, m_t, H * K, i_k * BK, K, BK)
        b_q = tl.load(p_x, mask=m_x, other=0.).to(tl.float32)
        p_x, m_x = row_tile(k_b, o_t, m_t, H * K, i_k * BK, K, BK)
        b_k = tl.load(p_x, mask=m_x, other=0.).to(tl.float32)
        p_x, m_x = row_tile(g + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
        b_g = tl.load(p_x, mask=m_x, other=0.).to(tl.float32)
        if USE_GATE:
            b_a, b_bias = load_gate_params(A_log, dt_bias, i_hv, o_k, m_k, K, BK, HAS_A, HAS_BIAS)
            b_g = gate_fwd(b_g, b_a, b_bias[None, :], HAS_LB, LB)
        b_g = tl.where(m, b_g * LOG2E, 0.)
        b_G = tl.cumsum(b_g, axis=0)
        p_G, _ = row_tile(Gc + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
        tl.store(p_G, b_G, mask=m)

        # off-diagonal sub-blocks: rows of sub-block s against columns of earlier sub-blocks,
        # both factors anchored at row s*BC-1, so both exponents are <= 0
        for i_s in tl.static_range(1, BT // BC):
            b_ga = tl.sum(tl.where((o_t == i_s * BC - 1)[:, None], b_G, 0.), axis=0)
            m_row = (o_t >= i_s * BC) & (o_t < (i_s + 1) * BC)
            b_ea = tl.where(m_row[:, None], tl.exp2(tl.minimum(b_G - b_ga[None, :], 0.)), 0.)
            b_eb = tl.where((o_t < i_s * BC)[:, None], tl.exp2(tl.minimum(b_ga[None, :] - b_G, 0.)), 0.)
            b_kb = tl.trans(b_k * b_eb)
            b_Aqk += tl.dot(b_q * b_ea, b_kb, input_precision=DOT_PREC)
            b_Akk += tl.dot(b_k * b_ea, b_kb, input_precision=DOT_PREC)

        # diagonal sub-blocks: one dot anchored at each block's first row (a past row of every row of
        # the block); exact while the decay since that row stays within DIAG_RANGE
        b_G0 = tl.zeros([BT, BK], dtype=tl.float32)
        for i_s in tl.static_range(0, BT // BC):
            b_ga = tl.sum(tl.where((o_t == i_s * BC)[:, None], b_G, 0.), axis=0)
            b_G0 = tl.where((o_t // BC == i_s)[:, None], b_ga[None, :], b_G0)
        b_kb = tl.trans(b_k * tl.exp2(tl.minimum(b_G0 - b_G, DIAG_RANGE)))
        b_ea = tl.exp2(tl.minimum(b_G - b_G0, 0.))
        b_dq = tl.dot(b_q * b_ea, b_kb, input_precision=DOT_PREC)
        b_dk = tl.dot(b_k * b_ea, b_kb, input_precision=DOT_PREC)
        b_rng = tl.max(b_G0 - b_G, axis=1)
        if tl.max(b_rng, axis=0) > DIAG_RANGE:
            tl.debug_barrier()  # Gc of this chunk was just written by other threads of this program
            b_pq, b_pk = diag_pairwise(b_q, b_k, b_G, k, Gc, bos, i_c, seq_len, i_h, i_hv, o_t, o_k, m_k,
                                       H, HV, K, BT, BC)
            b_dq = tl.where((b_rng > DIAG_RANGE)[:, None], b_pq, b_dq)
            b_dk = tl.where((b_rng > DIAG_RANGE)[:, None], b_pk, b_dk)
        b_Aqk += tl.where(m_blk, b_dq, 0.)
        b_Akk += tl.where(m_blk, b_dk, 0.)

    m_valid = m_t[:, None] & m_t[None, :]
    b_Aqk = tl.where(m_valid & (o_t[:, None] >= o_t[None, :]), b_Aqk * scale * b_rq[:, None] * b_rk[None, :], 0.)
    b_L = tl.where(m_valid & (o_t[:, None] > o_t[None, :]), b_Akk * (b_beta * b_rk)[:, None] * b_rk[None, :], 0.)

    a_off = row * HV * BT + i_hv * BT
    p_a, m_a = row_tile(Aqk + a_off, o_t, m_t, HV * BT, 0, BT, BT)
    tl.store(p_a, b_Aqk, mask=m_a)
    p_a, m_a = row_tile(L + a_off, o_t, m_t, HV * BT, 0, BT, BT)
    tl.store(p_a, b_L, mask=m_a)
