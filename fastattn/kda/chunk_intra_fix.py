"""Stage 1a-fix of the chunked KDA forward: exact in-strip products of the rows stage 1a could not anchor.

Rows whose decay since their strip's first row exceeds 2^DIAG_RANGE (stage 1a flags the chunk): their in-strip A_qk / L
entries, the diagonal (e = 1), then by halves: pairs i in the upper, j in the lower half of a 2b-row block anchored on
the upper half's first row a (2^(G_i - G_a), 2^(G_a - G_j) <= 1), one masked tensor-core product per level, K tile.
Grid (chunks, HV); unflagged programs return at once. Reads far, q, k, beta, Gc, rstd; overwrites those Aqk, L entries.
"""
import triton
import triton.language as tl

from ._common import chunk_program, load_beta, load_rstd, row_tile
from .chunk_intra import DIAG_RANGE


@triton.jit(do_not_specialize=["T"])
def kda_intra_fix_kernel(q, k, beta, Gc, Aqk, L, rstd_q, rstd_k, far, cu_seqlens, chunk_indices, scale, T,
                         H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                         LOG_BC: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr, USE_L2NORM: tl.constexpr,
                         USE_SIGMOID: tl.constexpr, DOT_PREC: tl.constexpr):
    i_t, i_n, i_c, i_hv, i_h, bos, seq_len, tok, m_t = chunk_program(chunk_indices, cu_seqlens, H, HV, BT)
    if tl.load(far + i_t * HV + i_hv) != 0:
        o_t = tl.arange(0, BT)
        row = bos + i_c * BT
        q_b = q + row * H * K + i_h * K
        k_b = k + row * H * K + i_h * K
        G_b = Gc + row * HV * K + i_hv * K
        # the rows stage 1a could not anchor: decay since the strip's first row beyond 2^DIAG_RANGE
        b_rng = tl.zeros([BT], dtype=tl.float32)
        for i_k in range(NK):
            p_x, m = row_tile(G_b, o_t, m_t, HV * K, i_k * BK, K, BK)
            b_G = tl.load(p_x, mask=m, other=0.)
            p_x, _ = row_tile(G_b, (o_t // BC) * BC, m_t, HV * K, i_k * BK, K, BK)
            b_ga = tl.load(p_x, mask=m, other=0.)
            b_rng = tl.maximum(b_rng, tl.max(tl.where(m, b_ga - b_G, 0.), axis=1))
        m_far = (b_rng > DIAG_RANGE) & m_t

        b_Aq = tl.zeros([BT, BT], dtype=tl.float32)
        b_Ak = tl.zeros([BT, BT], dtype=tl.float32)
        b_dd = tl.zeros([BT], dtype=tl.float32)
        for i_k in range(NK):
            p_x, m = row_tile(q_b, o_t, m_t, H * K, i_k * BK, K, BK)
            b_q = tl.load(p_x, mask=m, other=0.).to(tl.float32)
            p_x, m = row_tile(k_b, o_t, m_t, H * K, i_k * BK, K, BK)
            b_k = tl.load(p_x, mask=m, other=0.).to(tl.float32)
            p_x, m = row_tile(G_b, o_t, m_t, HV * K, i_k * BK, K, BK)
            b_G = tl.load(p_x, mask=m, other=0.)
            b_dd += tl.sum(b_q * b_k, axis=1)
            for i_l in range(LOG_BC):
                b = BC >> (i_l + 1)
                o_a = (o_t // (2 * b)) * (2 * b) + b
                p_x, m_a = row_tile(G_b, o_a, (i_c * BT + o_a) < seq_len, HV * K, i_k * BK, K, BK)
                b_Ga = tl.load(p_x, mask=m_a, other=0.)
                up = ((o_t % (2 * b)) >= b)[:, None]
                b_e = tl.exp2(tl.minimum(tl.where(up, b_G - b_Ga, b_Ga - b_G), 0.))
                b_kc = tl.trans(tl.where(up | ~m_a, 0., b_k * b_e))
                m_blk = ((o_t // (2 * b))[:, None] == (o_t // (2 * b))[None, :]) & m_far[:, None]
                b_Aq += tl.where(m_blk, tl.dot(tl.where(up, b_q * b_e, 0.), b_kc, input_precision=DOT_PREC), 0.)
                b_Ak += tl.where(m_blk, tl.dot(tl.where(up, b_k * b_e, 0.), b_kc, input_precision=DOT_PREC), 0.)

        b_rq, b_rk = load_rstd(rstd_q, rstd_k, tok, m_t, i_hv, HV, BT, USE_L2NORM)
        b_beta = load_beta(beta, tok, m_t, i_hv, HV, USE_SIGMOID)
        m_eq = o_t[:, None] == o_t[None, :]
        m_w = m_far[:, None] & m_t[None, :] & ((o_t // BC)[:, None] == (o_t // BC)[None, :])
        m_q = m_w & (o_t[:, None] >= o_t[None, :])
        m_l = m_w & (o_t[:, None] > o_t[None, :])
        b_Aq = tl.where(m_eq, b_dd[:, None], b_Aq) * scale * b_rq[:, None] * b_rk[None, :]
        b_Ak = b_Ak * (b_beta * b_rk)[:, None] * b_rk[None, :]
        a_off = row * HV * BT + i_hv * BT
        p_a, m_a = row_tile(Aqk + a_off, o_t, m_t, HV * BT, 0, BT, BT)
        tl.store(p_a, b_Aq, mask=m_a & m_q)
        p_a, m_a = row_tile(L + a_off, o_t, m_t, HV * BT, 0, BT, BT)
        tl.store(p_a, b_Ak, mask=m_a & m_l)
