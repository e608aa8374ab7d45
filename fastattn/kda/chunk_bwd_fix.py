"""Stage 3-fix of the chunked KDA backward, run before stage 3: the in-strip terms stage 3 cannot anchor.

Rows whose decay since their anchor (the row before their strip) exceeds 2^DIAG_RANGE: P_A = dMa (k e), P_L = dMl (k e)
over their in-strip pairs, Q = dMa^T (scale q e) + dMl^T (beta k e), as batched [NS, BC, BC] products, factors centred
on each strip's (else half's) mid-decay while it spans <= 2^CENTER_RANGE, else by halving levels (factors <= 1). Grid
(chunks * K tiles, HV); tiles flagged in far (stage 1b) write P_A, P_L, Q to dqn, dkn, qfix, the others return.
"""
import triton
import triton.language as tl

from ._common import chunk_tile_program, load_beta, load_qk_tile, load_row_tile, row_tile
from .chunk_intra import far_rows

# Largest log2 decay across a block of rows that its centred products take: row and column factors within 2^+-112,
# less where the operands' magnitudes need the headroom (below 2^120 in every product). On the bench's mode-B gate
# (H200, B8 T4096 bf16) most tiles' strips fit, nearly all halves: fwd+bwd 9.84 -> 9.42 ms against halving levels
# throughout (the magnitude cap costs 0.05 ms of it).
CENTER_RANGE = tl.constexpr(224.0)


@triton.jit
def level_factor(G_b, b_G, o_t, b, i_c, seq_len, BT: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, c0,
                 BK: tl.constexpr):
    """Level b of the halving scheme: each 2b-row block anchored on its lower half's first row a. Returns the row
    factors 2^(G_i - G_a) of the lower-half rows and the column factors 2^(G_a - G_j) of the upper-half ones (both
    <= 1, 0 elsewhere), so that their products cover the pairs (lower half, upper half) of every block."""
    o_a = (o_t // (2 * b)) * (2 * b) + b
    b_Ga, m_a = load_row_tile(G_b, o_a, (i_c * BT + o_a) < seq_len, HV * K, c0, K, BK)
    up = ((o_t % (2 * b)) >= b)[:, None]
    b_e = tl.exp2(tl.minimum(tl.where(up, b_G - b_Ga, b_Ga - b_G), 0.))
    return tl.where(up, b_e, 0.), tl.where(up | ~m_a, 0., b_e)


@triton.jit
def block_centres(b_G, m, NB: tl.constexpr, RB: tl.constexpr, BK: tl.constexpr):
    """Blocks of RB rows of the [NB * RB, BK] tile b_G: the widest decay span of any block and channel, and each
    row's block mid-decay c [NB * RB, BK] (centred factors 2^(G_i - c), 2^(c - G_j) stay within 2^(span / 2))."""
    b_G3 = tl.reshape(b_G, [NB, RB, BK])
    m3 = tl.reshape(m, [NB, RB, BK])
    b_hi = tl.max(tl.where(m3, b_G3, -1e30), axis=1)
    b_lo = tl.min(tl.where(m3, b_G3, 1e30), axis=1)
    b_c = tl.reshape(tl.broadcast_to(((b_hi + b_lo) * 0.5)[:, None, :], [NB, RB, BK]), [NB * RB, BK])
    return tl.max(tl.max(b_hi - b_lo, axis=1), axis=0), b_c


@triton.jit
def centred_factors(b_G, b_c, m):
    """Row and column factors 2^(G_i - c), 2^(c - G_j) around block_centres' c (0 outside the mask)."""
    return tl.where(m, tl.exp2(b_G - b_c), 0.), tl.where(m, tl.exp2(b_c - b_G), 0.)


@triton.jit
def pair_products(b_pa, b_pl, b_qr, b_Ma, b_Ml, m_blk, b_rf, b_cf, b_k, b_aq, b_al, NS: tl.constexpr,
                  BC: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Add one block set's terms: pairs (i, j) inside the blocks m_blk [1, BC, BC] of every strip, row factors b_rf,
    column factors b_cf (their product 2^(G_i - G_j) per channel); batched [NS, BC, BC] products."""
    b_kc = tl.reshape(b_cf * b_k, [NS, BC, BK])
    b_Mb = tl.where(m_blk, b_Ma, 0.)
    b_pa += b_rf * tl.reshape(tl.dot(b_Mb, b_kc, input_precision=DOT_PREC), [BT, BK])
    b_x = tl.dot(tl.permute(b_Mb, (0, 2, 1)), tl.reshape(b_aq * b_rf, [NS, BC, BK]), input_precision=DOT_PREC)
    b_Mb = tl.where(m_blk, b_Ml, 0.)
    b_pl += b_rf * tl.reshape(tl.dot(b_Mb, b_kc, input_precision=DOT_PREC), [BT, BK])
    b_x += tl.dot(tl.permute(b_Mb, (0, 2, 1)), tl.reshape(b_al * b_rf, [NS, BC, BK]), input_precision=DOT_PREC)
    return b_pa, b_pl, b_qr + b_cf * tl.reshape(b_x, [BT, BK])


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
        # centred factors reach 2^(span / 2): take them only while every intermediate stays below 2^120 (the products
        # sum BC terms |dM| |k|, |dM| |scale q|, |dM| |beta k|; fp32 / tf32 overflow at 2^128)
        b_mx = tl.max(tl.max(tl.max(tl.maximum(tl.abs(b_Ma), tl.abs(b_Ml)), axis=2), axis=1), axis=0)
        b_mx *= tl.max(tl.max(tl.maximum(tl.abs(b_k), tl.maximum(tl.abs(b_aq), tl.abs(b_al))), axis=1), axis=0) * BC
        cap = tl.minimum(CENTER_RANGE, 2 * (120. - tl.log2(b_mx + 1e-30)))
        # every strip spanning <= 2^cap: all its pairs by one product, factors centred on its mid-decay
        span, b_c = block_centres(b_G, m, NS, BC, BK)
        m_all = (o_r3 // BC) == (o_c3 // BC)
        if span <= cap:
            b_rf, b_cf = centred_factors(b_G, b_c, m)
            b_pa, b_pl, b_qr = pair_products(b_pa, b_pl, b_qr, b_Ma, b_Ml, m_all, b_rf, b_cf, b_k, b_aq, b_al,
                                             NS, BC, BT, BK, DOT_PREC)
        else:
            # the lower-left quarter of every strip anchored on its lower half's first row (both factors <= 1)
            b_rf, b_cf = level_factor(Gc + x_b, b_G, o_t, BC // 2, i_c, seq_len, BT, HV, K, i_k * BK, BK)
            b_pa, b_pl, b_qr = pair_products(b_pa, b_pl, b_qr, b_Ma, b_Ml, m_all, b_rf, b_cf, b_k, b_aq, b_al,
                                             NS, BC, BT, BK, DOT_PREC)
            # the in-half pairs: centred on each half's mid-decay, or by the remaining halving levels
            span, b_c = block_centres(b_G, m, 2 * NS, BC // 2, BK)
            if span <= cap:
                b_rf, b_cf = centred_factors(b_G, b_c, m)
                m_half = (o_r3 // (BC // 2)) == (o_c3 // (BC // 2))
                b_pa, b_pl, b_qr = pair_products(b_pa, b_pl, b_qr, b_Ma, b_Ml, m_half, b_rf, b_cf, b_k, b_aq, b_al,
                                                 NS, BC, BT, BK, DOT_PREC)
            else:
                for i_l in range(1, LOG_BC):
                    b = BC >> (i_l + 1)
                    b_rf, b_cf = level_factor(Gc + x_b, b_G, o_t, b, i_c, seq_len, BT, HV, K, i_k * BK, BK)
                    b_pa, b_pl, b_qr = pair_products(b_pa, b_pl, b_qr, b_Ma, b_Ml,
                                                     (o_r3 // (2 * b)) == (o_c3 // (2 * b)), b_rf, b_cf, b_k, b_aq,
                                                     b_al, NS, BC, BT, BK, DOT_PREC)
        p_x, _ = row_tile(dqn + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
        tl.store(p_x, b_pa, mask=m)
        p_x, _ = row_tile(dkn + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
        tl.store(p_x, b_pl, mask=m)
        p_x, _ = row_tile(qfix + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
        tl.store(p_x, b_qr, mask=m)
