"""Stage 3-fix of the chunked KDA backward, run before stage 3: the in-strip terms stage 3 cannot anchor.

Rows whose decay since their anchor (the row before their strip) exceeds 2^DIAG_RANGE: P_A = dMa (k e), P_L = dMl (k e)
over their in-strip pairs, Q = dMa^T (scale q e) + dMl^T (beta k e), by halves (both factors <= 1; per level a batched
[NS, BC, BC] product per side and matrix, sharing the level's factors). Tiles flagged in far (by stage 1b's
recompute) write P_A, P_L, Q to dqn, dkn, qfix for stage 3 to add; the others return. Grid (chunks * K tiles, HV).
"""
import triton
import triton.language as tl

from ._common import chunk_tile_program, load_beta, load_qk_tile, load_row_tile, row_tile
from .chunk_intra import far_rows


@triton.jit
def level_factor(G_b, b_G, o_t, b, i_c, seq_len, BT: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, c0,
                 BK: tl.constexpr):
    """Level b of the exact in-strip products: each 2b-row block anchored on its
    lower half's first row a. Returns e = 2^(G_i - G_a) for the lower-half rows (`up`), 2^(G_a - G_i) for the
    upper-half ones (both <= 1), `up` [BT, 1] and the anchors' mask m_a."""
    o_a = (o_t // (2 * b)) * (2 * b) + b
    b_Ga, m_a = load_row_tile(G_b, o_a, (i_c * BT + o_a) < seq_len, HV * K, c0, K, BK)
    up = ((o_t % (2 * b)) >= b)[:, None]
    return tl.exp2(tl.minimum(tl.where(up, b_G - b_Ga, b_Ga - b_G), 0.)), up, m_a


@triton.jit(do_not_specialize=["T"])
def kda_intra_fix_bwd_kernel(q, k, beta, Gc, rstd_q, rstd_k, dAqk, dL, far, dqn, dkn, qfix, cu_seqlens,
                             chunk_indices, scale, T, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
                             BT: tl.constexpr, BC: tl.constexpr, LOG_BC: tl.constexpr, BK: tl.constexpr,
                             NK: tl.constexpr, USE_L2NORM: tl.constexpr, USE_SIGMOID: tl.constexpr,
                             DOT_PREC: tl.constexpr):
    i_k, i_t, i_n, i_c, i_hv, i_h, bos, seq_len, tok, m_t = chunk_tile_program(chunk_indices, cu_seqlens, H, HV, BT,
                                                                                NK)
    # the tile's flag, from stage 1b's recompute (STORE_FAR): a tile of gentle decays stops here
    if tl.load(far + (i_t * HV + i_hv) * NK + i_k) != 0:
        o_t = tl.arange(0, BT)
        row = bos + i_c * BT
        x_b = row * HV * K + i_hv * K
        p_G, m = row_tile(Gc + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
        b_G = tl.load(p_G, mask=m, other=0.)
        m_far = far_rows(Gc + x_b, b_G, o_t, m_t, m, i_k * BK, HV, K, BC, BK)
        a_b = row * HV * BT + i_hv * BT
        b_q, b_k, _ = load_qk_tile(q, k, rstd_q, rstd_k, row, tok, m_t, o_t, i_h, i_hv, i_k * BK, H, HV, K, BK,
                                   USE_L2NORM)
        b_aq = b_q * scale
        b_al = b_k * load_beta(beta, tok, m_t, i_hv, HV, USE_SIGMOID)[:, None]
        # the strips' [BC, BC] diagonal blocks of dAqk / dL as one batch [NS, BC, BC]
        NS: tl.constexpr = BT // BC
        o_r = tl.arange(0, BC)
        o_r3 = o_r[None, :, None]
        o_c3 = o_r[None, None, :]
        o_s3 = tl.arange(0, NS)[:, None, None] * BC
        o_m = (o_s3 + o_r3) * (HV * BT) + o_s3 + o_c3
        m_in = tl.reshape(m_far, [NS, BC])[:, :, None] & (o_r3 > o_c3)
        b_Ma = tl.load(dAqk + a_b + o_m, mask=m_in, other=0.)
        b_Ml = tl.load(dL + a_b + o_m, mask=m_in, other=0.)
        b_da = tl.load(dAqk + a_b + o_t * (HV * BT + 1), mask=m_far, other=0.)     # the diagonal: e = 1
        b_dl = tl.load(dL + a_b + o_t * (HV * BT + 1), mask=m_far, other=0.)
        b_pa = b_da[:, None] * b_k
        b_pl = b_dl[:, None] * b_k
        b_qr = b_da[:, None] * b_aq + b_dl[:, None] * b_al
        for i_l in range(LOG_BC):
            b = BC >> (i_l + 1)
            b_e, up, m_a = level_factor(Gc + x_b, b_G, o_t, b, i_c, seq_len, BT, HV, K, i_k * BK, BK)
            b_rf = tl.where(up, b_e, 0.)
            b_cf = tl.where(up | ~m_a, 0., b_e)
            b_kc = tl.reshape(b_cf * b_k, [NS, BC, BK])
            m_blk = (o_r3 // (2 * b)) == (o_c3 // (2 * b))
            b_Mb = tl.where(m_blk, b_Ma, 0.)
            b_pa += b_rf * tl.reshape(tl.dot(b_Mb, b_kc, input_precision=DOT_PREC), [BT, BK])
            b_Mt = tl.permute(b_Mb, (0, 2, 1))
            b_x = tl.dot(b_Mt, tl.reshape(b_aq * b_rf, [NS, BC, BK]), input_precision=DOT_PREC)
            b_Mb = tl.where(m_blk, b_Ml, 0.)
            b_pl += b_rf * tl.reshape(tl.dot(b_Mb, b_kc, input_precision=DOT_PREC), [BT, BK])
            b_Mt = tl.permute(b_Mb, (0, 2, 1))
            b_x += tl.dot(b_Mt, tl.reshape(b_al * b_rf, [NS, BC, BK]), input_precision=DOT_PREC)
            b_qr += b_cf * tl.reshape(b_x, [BT, BK])
        p_x, _ = row_tile(dqn + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
        tl.store(p_x, b_pa, mask=m)
        p_x, _ = row_tile(dkn + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
        tl.store(p_x, b_pl, mask=m)
        p_x, _ = row_tile(qfix + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
        tl.store(p_x, b_qr, mask=m)
