"""Stage 1a-fix of the chunked KDA forward: exact in-strip products of the rows stage 1a could not anchor.

Rows whose decay since their strip's first row exceeds 2^DIAG_RANGE (stage 1a flags the strip): their in-strip A_qk / L
entries, the diagonal (e = 1), then by halves: pairs i in the upper, j in the lower half of a 2b-row block anchored on
the upper half's first row a (2^(G_i - G_a), 2^(G_a - G_j) <= 1), one masked tensor-core product per level, K tile.
Grid (chunks, HV); unflagged programs (no strip flagged) return at once. Reads far, q, k, beta, Gc, rstd; overwrites
those Aqk, L entries.
"""
import triton
import triton.language as tl

from ._common import chunk_program, load_beta, load_rstd, load_row_tile, row_tile
from .chunk_intra import DIAG_RANGE


@triton.jit
def level_factor(G_b, b_G, o_t, b, i_c, seq_len, BT: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, c0,
                 BK: tl.constexpr):
    """Level b of the exact in-strip products (shared with the backward fix): each 2b-row block anchored on its
    lower half's first row a. Returns e = 2^(G_i - G_a) for the lower-half rows (`up`), 2^(G_a - G_i) for the
    upper-half ones (both <= 1), `up` [BT, 1] and the anchors' mask m_a."""
    o_a = (o_t // (2 * b)) * (2 * b) + b
    b_Ga, m_a = load_row_tile(G_b, o_a, (i_c * BT + o_a) < seq_len, HV * K, c0, K, BK)
    up = ((o_t % (2 * b)) >= b)[:, None]
    return tl.exp2(tl.minimum(tl.where(up, b_G - b_Ga, b_Ga - b_G), 0.)), up, m_a


@triton.jit(do_not_specialize=["T"])
def kda_intra_fix_kernel(q, k, beta, Gc, Aqk, L, rstd_q, rstd_k, far, cu_seqlens, chunk_indices, scale, T,
                         H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                         LOG_BC: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr, USE_L2NORM: tl.constexpr,
                         USE_SIGMOID: tl.constexpr, DOT_PREC: tl.constexpr):
    i_t, i_n, i_c, i_hv, i_h, bos, seq_len, tok, m_t = chunk_program(chunk_indices, cu_seqlens, H, HV, BT)
    NS: tl.constexpr = BT // BC
    if tl.max(tl.load(far + (i_t * HV + i_hv) * NS + tl.arange(0, NS)), axis=0) != 0:
        o_t = tl.arange(0, BT)
        row = bos + i_c * BT
        q_b = q + row * H * K + i_h * K
        k_b = k + row * H * K + i_h * K
        G_b = Gc + row * HV * K + i_hv * K
        # the rows stage 1a could not anchor: decay since the strip's first row beyond 2^DIAG_RANGE
        b_rng = tl.zeros([BT], dtype=tl.float32)
        for i_k in range(NK):
            b_G, m = load_row_tile(G_b, o_t, m_t, HV * K, i_k * BK, K, BK)
            p_x, _ = row_tile(G_b, (o_t // BC) * BC, m_t, HV * K, i_k * BK, K, BK)
            b_ga = tl.load(p_x, mask=m, other=0.)
            b_rng = tl.maximum(b_rng, tl.max(tl.where(m, b_ga - b_G, 0.), axis=1))
        m_far = (b_rng > DIAG_RANGE) & m_t

        # the strips' [BC, BC] diagonal blocks as one batch: [NS, BC, BC] products instead of masked [BT, BT] ones
        o_r = tl.arange(0, BC)
        b_Aq = tl.zeros([NS, BC, BC], dtype=tl.float32)
        b_Ak = tl.zeros([NS, BC, BC], dtype=tl.float32)
        b_dd = tl.zeros([BT], dtype=tl.float32)
        m_far3 = tl.reshape(m_far, [NS, BC])[:, :, None]
        for i_k in range(NK):
            b_q, m = load_row_tile(q_b, o_t, m_t, H * K, i_k * BK, K, BK)
            b_k, m = load_row_tile(k_b, o_t, m_t, H * K, i_k * BK, K, BK)
            b_G, m = load_row_tile(G_b, o_t, m_t, HV * K, i_k * BK, K, BK)
            b_dd += tl.sum(b_q * b_k, axis=1)
            for i_l in range(LOG_BC):
                b = BC >> (i_l + 1)
                b_e, up, m_a = level_factor(G_b, b_G, o_t, b, i_c, seq_len, BT, HV, K, i_k * BK, BK)
                b_kc = tl.permute(tl.reshape(tl.where(up | ~m_a, 0., b_k * b_e), [NS, BC, BK]), (0, 2, 1))
                m_blk = ((o_r // (2 * b))[None, :, None] == (o_r // (2 * b))[None, None, :]) & m_far3
                b_x = tl.reshape(tl.where(up, b_q * b_e, 0.), [NS, BC, BK])
                b_Aq += tl.where(m_blk, tl.dot(b_x, b_kc, input_precision=DOT_PREC), 0.)
                b_x = tl.reshape(tl.where(up, b_k * b_e, 0.), [NS, BC, BK])
                b_Ak += tl.where(m_blk, tl.dot(b_x, b_kc, input_precision=DOT_PREC), 0.)

        b_rq, b_rk = load_rstd(rstd_q, rstd_k, tok, m_t, i_hv, HV, BT, USE_L2NORM)
        b_beta = load_beta(beta, tok, m_t, i_hv, HV, USE_SIGMOID)
        b_rq = tl.reshape(b_rq, [NS, BC])
        b_rk = tl.reshape(b_rk, [NS, BC])
        b_bk = tl.reshape(b_beta, [NS, BC]) * b_rk
        o_r3 = o_r[None, :, None]
        o_c3 = o_r[None, None, :]
        b_Aq = tl.where(o_r3 == o_c3, tl.reshape(b_dd, [NS, BC])[:, :, None], b_Aq)
        b_Aq = b_Aq * scale * b_rq[:, :, None] * b_rk[:, None, :]
        b_Ak = b_Ak * b_bk[:, :, None] * b_rk[:, None, :]
        o_s3 = tl.arange(0, NS)[:, None, None] * BC
        o_x = (o_s3 + o_r3) * (HV * BT) + o_s3 + o_c3             # each strip's diagonal block
        m_x = m_far3 & (tl.reshape(m_t, [NS, BC])[:, :, None])
        a_off = row * HV * BT + i_hv * BT
        tl.store(Aqk + a_off + o_x, b_Aq.to(Aqk.dtype.element_ty), mask=m_x & (o_r3 >= o_c3))
        tl.store(L + a_off + o_x, b_Ak, mask=m_x & (o_r3 > o_c3))
