"""Stage 1 of the chunked KDA forward: everything local to one chunk, in one kernel.

Math: G = cumsum of the (in-kernel) gate inside the chunk, in log2 units; with e_ijd = 2^(G_id - G_jd),
A_qk = scale * tril(sum_d q_id k_jd e_ijd), L = diag(beta) strict_tril(sum_d k_id k_jd e_ijd),
Tinv = (I + L)^-1 (later stages scale its columns by beta). Off-diagonal 16-row sub-blocks use
tensor-core dots anchored on the last row before the row block (every exponent <= 0); diagonal
sub-blocks are computed pairwise (exponent <= 0).
Grid (chunks, HV). Reads q, k, g, beta (raw). Writes Gc [T, HV, K], Aqk and Tinv [T, HV, BT], rstd_q/k [T, HV].
"""
import triton
import triton.language as tl

from ._common import LOG2E, chunk_program, gate_fwd, load_beta, load_gate_params


@triton.jit(do_not_specialize=["T"])
def kda_intra_fwd_kernel(q, k, g, beta, A_log, dt_bias, Gc, Aqk, Tinv, rstd_q, rstd_k,
                         cu_seqlens, chunk_indices, scale, T,
                         H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                         BC: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr,
                         USE_L2NORM: tl.constexpr, USE_GATE: tl.constexpr, HAS_A: tl.constexpr,
                         HAS_BIAS: tl.constexpr, HAS_LB: tl.constexpr, LB: tl.constexpr,
                         USE_SIGMOID: tl.constexpr, DOT_PREC: tl.constexpr):
    i_t, i_n, i_c, i_hv, i_h, bos, seq_len, tok, m_t = chunk_program(chunk_indices, cu_seqlens, H, HV, BT)

    o_t = tl.arange(0, BT)
    o_qk = (tok * H + i_h) * K                     # row offsets into q, k
    o_g = (tok * HV + i_hv) * K                    # row offsets into g, Gc

    # ---- l2norm statistics over the whole head dim
    if USE_L2NORM:
        b_sq = tl.zeros([BT], dtype=tl.float32)
        b_sk = tl.zeros([BT], dtype=tl.float32)
        for i_k in range(NK):
            o_k = i_k * BK + tl.arange(0, BK)
            m = m_t[:, None] & (o_k < K)[None, :]
            b_q = tl.load(q + o_qk[:, None] + o_k[None, :], mask=m, other=0.).to(tl.float32)
            b_k = tl.load(k + o_qk[:, None] + o_k[None, :], mask=m, other=0.).to(tl.float32)
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
        b_q = tl.load(q + o_qk[:, None] + o_k[None, :], mask=m, other=0.).to(tl.float32)
        b_k = tl.load(k + o_qk[:, None] + o_k[None, :], mask=m, other=0.).to(tl.float32)
        b_g = tl.load(g + o_g[:, None] + o_k[None, :], mask=m, other=0.).to(tl.float32)
        if USE_GATE:
            b_a, b_bias = load_gate_params(A_log, dt_bias, i_hv, o_k, m_k, K, BK, HAS_A, HAS_BIAS)
            b_g = gate_fwd(b_g, b_a, b_bias[None, :], HAS_LB, LB)
        b_g = tl.where(m, b_g * LOG2E, 0.)
        b_G = tl.cumsum(b_g, axis=0)
        tl.store(Gc + o_g[:, None] + o_k[None, :], b_G, mask=m)

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

        # diagonal sub-blocks, pairwise: row i against partner j = its block start + c (j <= i)
        tl.debug_barrier()  # Gc of this chunk was just written by other threads of this program
        for c in range(BC):
            o_j = (o_t // BC) * BC + c
            m_j = (o_j <= o_t) & ((i_c * BT + o_j) < seq_len)
            tok_j = bos + i_c * BT + o_j
            m2 = m_j[:, None] & m_k[None, :]
            b_kj = tl.load(k + ((tok_j * H + i_h) * K)[:, None] + o_k[None, :], mask=m2, other=0.).to(tl.float32)
            b_Gj = tl.load(Gc + ((tok_j * HV + i_hv) * K)[:, None] + o_k[None, :], mask=m2, other=0.)
            b_e = tl.exp2(tl.where(m2, b_G - b_Gj, float("-inf")))
            b_put = o_t[None, :] == o_j[:, None]
            b_Aqk += tl.where(b_put, tl.sum(b_q * b_kj * b_e, axis=1)[:, None], 0.)
            b_Akk += tl.where(b_put, tl.sum(b_k * b_kj * b_e, axis=1)[:, None], 0.)

    m_valid = m_t[:, None] & m_t[None, :]
    b_Aqk = tl.where(m_valid & (o_t[:, None] >= o_t[None, :]), b_Aqk * scale * b_rq[:, None] * b_rk[None, :], 0.)
    b_L = tl.where(m_valid & (o_t[:, None] > o_t[None, :]), b_Akk * (b_beta * b_rk)[:, None] * b_rk[None, :], 0.)

    # (I + L)^-1 in blocks: D = inverse of the block-diagonal part, by substitution over the 16 row
    # phases (rows i % BC == c at once, each a tensor-core product); then with M = D L_off (strictly
    # block-lower, M^4 = 0 for 4 blocks): (I + L)^-1 = (I - M)(I + M^2) D.
    b_I = tl.where(o_t[:, None] == o_t[None, :], 1., 0.)
    m_blk = (o_t // BC)[:, None] == (o_t // BC)[None, :]
    b_D = b_I
    for c in range(1, BC):
        m_c = (o_t % BC == c)[:, None]
        b_Lc = tl.where(m_c & m_blk, b_L, 0.)
        b_D = tl.where(m_c, b_I - tl.dot(b_Lc, b_D, input_precision="tf32x3"), b_D)
    b_T = b_D
    if BT > BC:
        b_M = tl.dot(b_D, tl.where(m_blk, 0., b_L), input_precision="tf32x3")
        b_M2 = tl.dot(b_M, b_M, input_precision="tf32x3")
        b_T = tl.dot(tl.dot(b_I - b_M, b_I + b_M2, input_precision="tf32x3"), b_D, input_precision="tf32x3")

    o_a = (tok * HV + i_hv) * BT
    tl.store(Aqk + o_a[:, None] + o_t[None, :], b_Aqk, mask=m_t[:, None])
    tl.store(Tinv + o_a[:, None] + o_t[None, :], b_T, mask=m_t[:, None])
