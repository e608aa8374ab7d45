"""Stage 1a of the chunked KDA forward: the decayed products inside one chunk.

G = in-chunk cumsum of the (in-kernel) gate, log2 units; e_ijd = 2^(G_id - G_jd); A_qk = scale tril(sum_d q k e),
L = diag(beta) strict_tril(sum_d k k e) (q, k l2-normalised when asked). One row strip of BC rows at a time, one
dot per strip and K tile anchored on its first row a: 2^(G_i - G_a) <= 1, 2^(G_a - G_j) <= 1 left of the strip and
capped at 2^DIAG_RANGE inside it (chunks with rows beyond the cap are flagged in `far`: see chunk_intra_fix.py).
Grid (chunks, HV). Reads q, k, g, beta. Writes Gc [T, HV, K], Aqk (state_dtype) and L [T, HV, BT], rstd_q/k, far.
"""
import triton
import triton.language as tl

from ._common import LOG2E, chunk_program, gate_fwd, load_beta, load_gate_params, load_rstd, row_tile

# Largest log2 decay the diagonal sub-block dot may undo (2^48 stays far from fp32 overflow and the
# factor it multiplies, <= 1, far from the subnormals); a row whose decay since its sub-block start
# exceeds it gets its in-strip entries from stage 1a-fix instead (exact for any decay, slower).
DIAG_RANGE = tl.constexpr(48.0)


@triton.jit(do_not_specialize=["T"])
def kda_intra_fwd_kernel(q, k, g, beta, A_log, dt_bias, Gc, Aqk, L, rstd_q, rstd_k, far, cu_seqlens, chunk_indices,
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
    x_b = row * HV * K + i_hv * K                  # g, Gc

    # ---- pass 1: gate and in-chunk cumsum -> Gc, l2norm statistics over the whole head dim
    b_sq = tl.zeros([BT], dtype=tl.float32)
    b_sk = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(NK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m = m_t[:, None] & m_k[None, :]
        if USE_L2NORM:
            p_x, m_x = row_tile(q_b, o_t, m_t, H * K, i_k * BK, K, BK)
            b_q = tl.load(p_x, mask=m_x, other=0.).to(tl.float32)
            p_x, m_x = row_tile(k_b, o_t, m_t, H * K, i_k * BK, K, BK)
            b_k = tl.load(p_x, mask=m_x, other=0.).to(tl.float32)
            b_sq += tl.sum(b_q * b_q, axis=1)
            b_sk += tl.sum(b_k * b_k, axis=1)
        p_x, m_x = row_tile(g + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
        b_g = tl.load(p_x, mask=m_x, other=0.).to(tl.float32)
        if USE_GATE:
            b_a, b_bias = load_gate_params(A_log, dt_bias, i_hv, o_k, m_k, K, BK, HAS_A, HAS_BIAS)
            b_g = gate_fwd(b_g, b_a, b_bias[None, :], HAS_LB, LB)
        b_g = tl.where(m, b_g * LOG2E, 0.)
        p_G, _ = row_tile(Gc + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
        tl.store(p_G, tl.cumsum(b_g, axis=0), mask=m)
    if USE_L2NORM:
        b_rk = 1.0 / tl.sqrt(b_sk + 1e-6)
        tl.store(rstd_q + tok * HV + i_hv, 1.0 / tl.sqrt(b_sq + 1e-6), mask=m_t)
        tl.store(rstd_k + tok * HV + i_hv, b_rk, mask=m_t)
    else:
        b_rk = tl.full([BT], 1.0, dtype=tl.float32)
    tl.debug_barrier()  # Gc and rstd rows written above by other threads of this program are read below

    # ---- pass 2: one strip of BC rows at a time, every column of the chunk in one dot per K tile
    o_c = tl.arange(0, BC)
    b_far = 0.
    for i_s in range(0, tl.cdiv(tl.minimum(seq_len - i_c * BT, BT), BC)):
        s0 = i_s * BC
        o_r = s0 + o_c
        m_r = (i_c * BT + o_r) < seq_len
        m_cols = m_t & (o_t < s0 + BC)             # columns left of the strip and inside it
        b_Aq = tl.zeros([BC, BT], dtype=tl.float32)
        b_Ak = tl.zeros([BC, BT], dtype=tl.float32)
        for i_k in range(NK):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            b_ga = tl.load(Gc + x_b + s0 * HV * K + o_k, mask=m_k, other=0.)
            p_x, m_x = row_tile(q_b, o_r, m_r, H * K, i_k * BK, K, BK)
            b_qs = tl.load(p_x, mask=m_x, other=0.).to(tl.float32)
            p_x, m_x = row_tile(k_b, o_r, m_r, H * K, i_k * BK, K, BK)
            b_ks = tl.load(p_x, mask=m_x, other=0.).to(tl.float32)
            p_x, m_xs = row_tile(Gc + x_b, o_r, m_r, HV * K, i_k * BK, K, BK)
            b_Gs = tl.load(p_x, mask=m_xs, other=0.)
            b_ea = tl.where(m_xs, tl.exp2(tl.minimum(b_Gs - b_ga[None, :], 0.)), 0.)
            p_x, m_x = row_tile(k_b, o_t, m_cols, H * K, i_k * BK, K, BK)
            b_k = tl.load(p_x, mask=m_x, other=0.).to(tl.float32)
            p_x, m_x = row_tile(Gc + x_b, o_t, m_cols, HV * K, i_k * BK, K, BK)
            b_G = tl.load(p_x, mask=m_x, other=0.)
            b_kb = tl.trans(tl.where(m_x, b_k * tl.exp2(tl.minimum(b_ga[None, :] - b_G, DIAG_RANGE)), 0.))
            b_far = tl.maximum(b_far, tl.max(tl.max(tl.where(m_xs, b_ga[None, :] - b_Gs, 0.), axis=1), axis=0))
            b_Aq += tl.dot(b_qs * b_ea, b_kb, input_precision=DOT_PREC)
            b_Ak += tl.dot(b_ks * b_ea, b_kb, input_precision=DOT_PREC)

        b_rqs, b_rks = load_rstd(rstd_q, rstd_k, row + o_r, m_r, i_hv, HV, BC, USE_L2NORM)
        b_betas = load_beta(beta, row + o_r, m_r, i_hv, HV, USE_SIGMOID)
        m_valid = m_r[:, None] & m_t[None, :]
        b_Aq = tl.where(m_valid & (o_r[:, None] >= o_t[None, :]), b_Aq * scale * b_rqs[:, None] * b_rk[None, :], 0.)
        b_Ak = tl.where(m_valid & (o_r[:, None] > o_t[None, :]), b_Ak * (b_betas * b_rks)[:, None] * b_rk[None, :], 0.)
        a_off = row * HV * BT + i_hv * BT
        p_a, m_a = row_tile(Aqk + a_off, o_r, m_r, HV * BT, 0, BT, BT)
        tl.store(p_a, b_Aq.to(Aqk.dtype.element_ty), mask=m_a)
        p_a, m_a = row_tile(L + a_off, o_r, m_r, HV * BT, 0, BT, BT)
        tl.store(p_a, b_Ak, mask=m_a)
    tl.store(far + i_t * HV + i_hv, (b_far > DIAG_RANGE).to(tl.int8))
